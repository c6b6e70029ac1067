//! A time-boxed, seeded mutational fuzz of the delta reader and apply
//! ([`volfs::fuzz`]): arbitrary bytes, byte-level mutations of valid deltas,
//! and field-level mutations whose trailer is repaired so that they reach
//! the apply. Every input must return without a panic or an abort and
//! allocate at most 64 MiB at its peak (a counting global allocator).
//!
//! `VOLFS_FUZZ_SECS` (default 5) bounds the run; `VOLFS_FUZZ_SEED` replays
//! one (the seed is printed). Inputs that once failed live in
//! `tests/fuzz_regressions/` and are replayed first. The last input is kept
//! in `$TMPDIR/volfs-fuzz-last-input.bin`, so an abort leaves its reproducer.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use edge_proto::v1 as pb;
use edge_proto::v1::delta_frame::Frame;
use prost::Message;
use volfs::blockstore::BlockStore;
use volfs::delta::{DeltaError, read_delta_with};
use volfs::fuzz::{DeltaFuzz, Outcome, fuzz_limits};

/// Counts live and peak heap bytes.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to the system allocator unchanged; the
// counters have no effect on the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            grew(l.size());
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` was allocated by `System` with `l`.
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: `p` was allocated by `System` with `l`.
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            LIVE.fetch_sub(l.size(), Ordering::Relaxed);
            grew(new);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Most heap one input may take at its peak.
const PEAK_LIMIT: usize = 64 << 20;

/// splitmix64: small, seedable, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

const INTERESTING: [u64; 14] = [
    0,
    1,
    4095,
    4096,
    4097,
    0x7f,
    0x80,
    0xffff,
    1 << 31,
    u32::MAX as u64,
    1 << 43,
    1 << 55,
    i64::MAX as u64,
    u64::MAX,
];

/// A byte-level mutation of `data`.
fn mutate_bytes(rng: &mut Rng, data: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    for _ in 0..1 + rng.below(4) {
        let len = data.len();
        match rng.below(8) {
            0 if len > 0 => data[rng.below(len)] ^= 1 << rng.below(8),
            1 if len > 0 => data[rng.below(len)] = *rng.pick(&[0, 1, 0x7f, 0x80, 0xff]),
            2 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(8);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                data.splice(at..at, bytes);
            }
            3 if len > 1 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(64));
                data.drain(at..at + n);
            }
            4 if len > 1 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(256));
                let chunk = data[at..at + n].to_vec();
                let to = rng.below(len + 1);
                data.splice(to..to, chunk);
            }
            5 => data.truncate(rng.below(len + 1)),
            6 => {
                // A varint of an interesting size, e.g. over a frame length.
                let at = rng.below(len + 1);
                let mut v = Vec::new();
                prost::encoding::encode_varint(*rng.pick(&INTERESTING), &mut v);
                let end = (at + v.len()).min(len);
                data.splice(at..end, v);
            }
            _ => {
                // Splice with another corpus entry.
                let other = rng.pick(corpus);
                let (a, b) = (rng.below(len + 1), rng.below(other.len() + 1));
                data.truncate(a);
                data.extend_from_slice(&other[b..]);
            }
        }
    }
}

/// Splits a delta into its frames (what decodes of it).
fn frames(mut delta: &[u8]) -> Vec<Frame> {
    let mut out = Vec::new();
    while let Ok(f) = pb::DeltaFrame::decode_length_delimited(&mut delta) {
        match f.frame {
            Some(f) => out.push(f),
            None => break,
        }
    }
    out
}

fn encode(frames: &[Frame]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        out.extend(
            pb::DeltaFrame {
                frame: Some(f.clone()),
            }
            .encode_length_delimited_to_vec(),
        );
    }
    out
}

/// A field-level mutation of one frame of a delta.
fn mutate_fields(rng: &mut Rng, frames: &mut Vec<Frame>) {
    if frames.is_empty() {
        return;
    }
    let i = rng.below(frames.len());
    let v = *rng.pick(&INTERESTING);
    match &mut frames[i] {
        Frame::Entry(e) => match rng.below(14) {
            0 => e.size = v,
            1 => e.block_count = v,
            2 => e.kind = rng.below(10) as i32,
            3 => e.mode = *rng.pick(&[0o4755, 0o2755, 0o1777, 0o7777, 0o170777, 0]),
            4 => {
                e.path = rng
                    .pick(&[
                        &b""[..],
                        b"..",
                        b"a/../b",
                        b".volfs",
                        b"d",
                        b"d/a/x",
                        b"s/x",
                        b"h",
                        b"new",
                        b"/abs",
                        b"a//b",
                    ])
                    .to_vec()
            }
            5 => {
                e.link_target = rng
                    .pick(&[
                        &b""[..],
                        b"/etc/passwd",
                        b"../../x",
                        b"d/a",
                        b"b",
                        b"nul\0x",
                        b"p",
                    ])
                    .to_vec()
            }
            6 => e.xattrs.push(pb::Xattr {
                name: rng
                    .pick(&[
                        &b"user.x"[..],
                        b"security.capability",
                        b"trusted.a",
                        b"user.",
                        b"",
                        b"user.k",
                    ])
                    .to_vec(),
                value: vec![0; rng.below(100)],
            }),
            7 => e.patch = !e.patch,
            8 => e.changed.push(pb::BlockRef {
                index: v,
                hash: vec![rng.next() as u8; 32],
            }),
            9 => e.rdev = v,
            10 => e.uid = v as u32,
            11 => e.mtime_nsec = v as u32,
            12 => {
                if !e.blocks.is_empty() {
                    let j = rng.below(e.blocks.len());
                    e.blocks.remove(j);
                }
            }
            _ => e.mtime_sec = v as i64,
        },
        Frame::Header(h) => match rng.below(3) {
            0 => h.block_size = v as u32,
            1 => h.version = v as u32,
            _ => h.base_root.truncate(rng.below(33)),
        },
        Frame::Block(b) => {
            let n = b.data.len();
            if n > 0 {
                b.data[rng.below(n)] ^= 1;
            }
        }
        Frame::Removed(p) => p.extend_from_slice(b"/x"),
        Frame::Trailer(t) => t.blocks = v,
    }
    match rng.below(4) {
        0 => {
            let f = frames[rng.below(frames.len())].clone();
            let at = rng.below(frames.len());
            frames.insert(at, f);
        }
        1 if frames.len() > 2 => {
            frames.remove(1 + rng.below(frames.len() - 2));
        }
        _ => {}
    }
}

/// Makes a mutated delta's trailer agree with its frames (counts and the
/// root the reader computes), so that it reaches the apply.
fn repair(fuzz: &DeltaFuzz, selector: u8, frames: &mut [Frame]) {
    let count = |f: fn(&Frame) -> bool| frames.iter().filter(|x| f(x)).count() as u64;
    let (entries, removed, blocks) = (
        count(|f| matches!(f, Frame::Entry(_))),
        count(|f| matches!(f, Frame::Removed(_))),
        count(|f| matches!(f, Frame::Block(_))),
    );
    let Some(Frame::Trailer(t)) = frames.last_mut() else {
        return;
    };
    (t.entries, t.removed, t.blocks) = (entries, removed, blocks);
    let probe = encode(frames);
    let dir = tempfile::tempdir().unwrap();
    let store = BlockStore::open(dir.path()).unwrap();
    let base = fuzz.base_for(selector);
    if let Err(DeltaError::RootMismatch { got, .. }) =
        read_delta_with(probe.as_slice(), &base, &store, &fuzz_limits())
    {
        let root: Vec<u8> = (0..got.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&got[i..i + 2], 16).unwrap())
            .collect();
        if let Some(Frame::Trailer(t)) = frames.last_mut() {
            t.root = root;
        }
    }
}

/// Runs one input, holding it to the peak and keeping it on disk first.
fn run_one(fuzz: &mut DeltaFuzz, input: &[u8], last: &std::path::Path) -> Outcome {
    std::fs::write(last, input).unwrap();
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let outcome = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fuzz.run(input))) {
        Ok(o) => o,
        Err(p) => {
            eprintln!(
                "an input of {} bytes panicked; it is kept in {}",
                input.len(),
                last.display(),
            );
            std::panic::resume_unwind(p)
        }
    };
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    assert!(
        peak <= PEAK_LIMIT,
        "input of {} bytes (kept in {}) took {peak} bytes of heap at its peak",
        input.len(),
        last.display()
    );
    outcome
}

/// A short name for what an outcome was, to spot inputs that went elsewhere.
fn class(o: &Outcome) -> String {
    match o {
        Outcome::Refused(e) | Outcome::ApplyFailed(e) => e
            .split([' ', ':'])
            .filter(|w| !w.is_empty() && !w.contains('/'))
            .filter(|w| !w.chars().all(|c| c.is_ascii_hexdigit()))
            .take(4)
            .collect::<Vec<_>>()
            .join(" "),
        o => format!("{o:?}"),
    }
}

#[test]
fn mutated_deltas_never_panic_abort_or_allocate_past_64_mib() {
    let secs: u64 = std::env::var("VOLFS_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let seed: u64 = std::env::var("VOLFS_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("fuzzing the delta reader for {secs} s, VOLFS_FUZZ_SEED={seed}");
    let last = std::env::temp_dir().join("volfs-fuzz-last-input.bin");
    let mut fuzz = DeltaFuzz::new().unwrap();

    let regressions =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions");
    if let Ok(rd) = std::fs::read_dir(&regressions) {
        for e in rd {
            let input = std::fs::read(e.unwrap().path()).unwrap();
            run_one(&mut fuzz, &input, &last);
        }
    }

    let mut corpus = fuzz.seeds().unwrap();
    for s in &corpus {
        assert_eq!(
            run_one(&mut fuzz, s, &last),
            Outcome::Applied,
            "a seed applies"
        );
    }
    let mut seen: HashSet<String> = HashSet::new();
    let mut rng = Rng(seed);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let (mut runs, mut applied) = (0u64, 0u64);
    while Instant::now() < deadline {
        let input = match rng.below(10) {
            0 => (0..rng.below(200)).map(|_| rng.next() as u8).collect(),
            1..=5 => {
                let mut d = rng.pick(&corpus).clone();
                mutate_bytes(&mut rng, &mut d, &corpus);
                d
            }
            _ => {
                let d = rng.pick(&corpus).clone();
                let Some((&sel, rest)) = d.split_first() else {
                    continue;
                };
                let mut fs = frames(rest);
                mutate_fields(&mut rng, &mut fs);
                repair(&fuzz, sel, &mut fs);
                [vec![sel], encode(&fs)].concat()
            }
        };
        let outcome = run_one(&mut fuzz, &input, &last);
        runs += 1;
        if outcome == Outcome::Applied {
            applied += 1;
        }
        if seen.insert(class(&outcome)) && input.len() < 1 << 20 && corpus.len() < 256 {
            corpus.push(input);
        }
    }
    eprintln!(
        "{runs} inputs, {applied} applied, {} outcomes: {seen:?}",
        seen.len()
    );
    let _ = std::fs::remove_file(&last);
}
