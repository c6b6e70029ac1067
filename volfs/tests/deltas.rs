//! Deltas through real mounts: random operation sequences replicated to an
//! empty directory round by round; a write racing an extraction; manifests
//! persisted across remounts and changes made while unmounted.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{Mounted, contents, full_scan};
use proptest::prelude::*;
use volfs::backing::Backing;
use volfs::manifest::Manifest;

/// Applies the delta from `base` to the live volume to `target`; returns the
/// manifest the target now holds.
fn replicate(m: &Mounted, base: &Manifest, target: &Path) -> Manifest {
    let mut buf = Vec::new();
    let summary = m.live().write_delta(base, &mut buf).unwrap();
    let report = volfs::offline::apply(target, buf.as_slice()).expect("apply");
    assert_eq!(report.root, summary.manifest.root());
    summary.manifest
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        file: u8,
        offset: u32,
        len: u16,
        byte: u8,
    },
    Truncate {
        file: u8,
        len: u32,
    },
    Mkdir {
        dir: u8,
    },
    Rename {
        from: u8,
        to: u8,
    },
    Unlink {
        file: u8,
    },
    Symlink {
        file: u8,
        target: u8,
    },
    Hardlink {
        from: u8,
        to: u8,
    },
    Chmod {
        file: u8,
        mode: u16,
    },
    Xattr {
        file: u8,
        value: u8,
    },
    Rmdir {
        dir: u8,
    },
    /// Ship what changed so far to the receiver (an intermediate round).
    Round,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..6u8, 0..300_000u32, 1..20_000u16, any::<u8>())
            .prop_map(|(file, offset, len, byte)| Op::Write { file, offset, len, byte }),
        1 => (0..6u8, 0..300_000u32).prop_map(|(file, len)| Op::Truncate { file, len }),
        1 => (0..3u8).prop_map(|dir| Op::Mkdir { dir }),
        2 => (0..6u8, 0..6u8).prop_map(|(from, to)| Op::Rename { from, to }),
        1 => (0..6u8).prop_map(|file| Op::Unlink { file }),
        1 => (0..6u8, 0..6u8).prop_map(|(file, target)| Op::Symlink { file, target }),
        1 => (0..6u8, 0..6u8).prop_map(|(from, to)| Op::Hardlink { from, to }),
        1 => (0..6u8, 0..0o777u16).prop_map(|(file, mode)| Op::Chmod { file, mode }),
        1 => (0..6u8, any::<u8>()).prop_map(|(file, value)| Op::Xattr { file, value }),
        1 => (0..3u8).prop_map(|dir| Op::Rmdir { dir }),
        2 => Just(Op::Round),
    ]
}

/// File `i` lives at the root or in directory `i % 3` (if it exists).
fn file_path(m: &Mounted, i: u8) -> std::path::PathBuf {
    let d = m.p(&format!("d{}", i % 3));
    if i >= 3 && d.is_dir() {
        d.join(format!("f{i}"))
    } else {
        m.p(&format!("f{i}"))
    }
}

fn run_op(m: &Mounted, op: &Op) {
    // Errors (a missing file, a non-empty directory) are part of the game.
    let _ = match op {
        Op::Write {
            file,
            offset,
            len,
            byte,
        } => (|| {
            let f = fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(file_path(m, *file))?;
            std::os::unix::fs::FileExt::write_all_at(
                &f,
                &vec![*byte; *len as usize],
                u64::from(*offset),
            )
        })(),
        Op::Truncate { file, len } => fs::OpenOptions::new()
            .write(true)
            .open(file_path(m, *file))
            .and_then(|f| f.set_len(u64::from(*len))),
        Op::Mkdir { dir } => fs::create_dir(m.p(&format!("d{dir}"))),
        Op::Rename { from, to } => fs::rename(file_path(m, *from), file_path(m, *to)),
        Op::Unlink { file } => fs::remove_file(file_path(m, *file)),
        Op::Symlink { file, target } => {
            std::os::unix::fs::symlink(format!("f{target}"), file_path(m, *file))
        }
        Op::Hardlink { from, to } => fs::hard_link(file_path(m, *from), file_path(m, *to)),
        Op::Chmod { file, mode } => fs::set_permissions(
            file_path(m, *file),
            fs::Permissions::from_mode(u32::from(*mode) | 0o200),
        ),
        Op::Xattr { file, value } => {
            let p =
                std::ffi::CString::new(file_path(m, *file).into_os_string().into_encoded_bytes())
                    .unwrap();
            // SAFETY: valid C strings and a one-byte buffer.
            let r = unsafe {
                libc::lsetxattr(
                    p.as_ptr(),
                    c"user.v".as_ptr(),
                    std::ptr::from_ref(value).cast(),
                    1,
                    0,
                )
            };
            if r == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        }
        Op::Rmdir { dir } => fs::remove_dir(m.p(&format!("d{dir}"))),
        Op::Round => Ok(()),
    };
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random operations through the mount, shipped in rounds to an empty
    /// directory: the receiver ends with the same tree, bytes and root hash.
    #[test]
    fn random_operations_replicate_exactly(ops in proptest::collection::vec(op(), 1..40)) {
        let m = Mounted::with(volfs::MountOptions { block_size: Some(16 * 1024), ..Default::default() });
        let target = m.dir.path().join("target");
        fs::create_dir(&target).unwrap();
        let mut held = Manifest::empty(16 * 1024);
        for op in &ops {
            if let Op::Round = op {
                held = replicate(&m, &held, &target);
            } else {
                run_op(&m, op);
            }
        }
        held = replicate(&m, &held, &target);
        let sender = full_scan(&m.backing, 16 * 1024);
        prop_assert_eq!(held.root(), sender.root());
        prop_assert_eq!(full_scan(&target, 16 * 1024), sender);
        prop_assert_eq!(contents(&target), contents(&m.backing));
    }
}

#[test]
fn a_write_racing_extraction_is_in_the_next_delta() {
    let m = Mounted::with(volfs::MountOptions {
        block_size: Some(4096),
        ..Default::default()
    });
    let target = m.dir.path().join("target");
    fs::create_dir(&target).unwrap();
    let f = m.p("hot");
    fs::write(&f, vec![0u8; 64 * 4096]).unwrap();
    let stop = AtomicBool::new(false);
    let mut held = Manifest::empty(4096);
    let mut raced = 0;
    std::thread::scope(|s| {
        s.spawn(|| {
            let h = fs::OpenOptions::new().write(true).open(&f).unwrap();
            let mut i: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                let block = (i * 7) % 64;
                std::os::unix::fs::FileExt::write_all_at(
                    &h,
                    &i.to_le_bytes().repeat(512),
                    block * 4096,
                )
                .unwrap();
                i += 1;
            }
        });
        for _ in 0..30 {
            let mut buf = Vec::new();
            let s = m.live().write_delta(&held, &mut buf).unwrap();
            raced += s.raced_blocks;
            volfs::offline::apply(&target, buf.as_slice()).expect("apply of a fuzzy delta");
            held = s.manifest;
        }
        stop.store(true, Ordering::Relaxed);
    });
    // The writer has stopped: one more delta brings the receiver level.
    held = replicate(&m, &held, &target);
    assert_eq!(fs::read(target.join("hot")).unwrap(), fs::read(&f).unwrap());
    assert_eq!(held.root(), full_scan(&m.backing, 4096).root());
    eprintln!("blocks that raced an extraction: {raced}");
}

#[test]
fn only_changed_blocks_travel_and_renames_send_no_data() {
    let m = Mounted::new();
    let target = m.dir.path().join("target");
    fs::create_dir(&target).unwrap();
    let data: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    fs::write(m.p("big"), &data).unwrap();
    let held = replicate(&m, &Manifest::empty(volfs::DEFAULT_BLOCK_SIZE), &target);

    // Two small writes in different blocks, and a rename.
    let h = fs::OpenOptions::new().write(true).open(m.p("big")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&h, b"abc", 100).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&h, b"xyz", 3 << 20).unwrap();
    drop(h);
    fs::rename(m.p("big"), m.p("moved")).unwrap();
    let mut buf = Vec::new();
    let s = m.live().write_delta(&held, &mut buf).unwrap();
    assert_eq!(s.blocks, 2, "two dirty blocks, nothing for the rename");
    assert!(
        s.wire_bytes < 2 * 65536 + 4096,
        "delta is {} bytes",
        s.wire_bytes
    );
    volfs::offline::apply(&target, buf.as_slice()).unwrap();
    assert_eq!(
        fs::read(target.join("moved")).unwrap(),
        fs::read(m.p("moved")).unwrap()
    );
}

#[test]
fn manifest_persists_across_remount_and_offline_changes_are_caught() {
    let mut m = Mounted::new();
    fs::write(m.p("a"), vec![1u8; 300_000]).unwrap();
    let mut f = fs::File::create(m.p("b")).unwrap();
    f.write_all(b"bee").unwrap();
    drop(f);
    let root = m.unmount();
    assert_eq!(
        root,
        full_scan(&m.backing, volfs::DEFAULT_BLOCK_SIZE).root()
    );

    // A clean remount reuses every hash.
    let b = Backing::open(&m.backing).unwrap();
    let (t, stats) = b.load(None).unwrap();
    assert_eq!(stats.hashed_blocks, 0, "a clean manifest is trusted");
    assert_eq!(t.manifest.root(), root);
    drop(b);

    // Changed behind volfs's back: detected, rehashed, not trusted.
    std::thread::sleep(std::time::Duration::from_millis(20));
    fs::write(m.backing.join("b"), b"BEE").unwrap();
    let b = Backing::open(&m.backing).unwrap();
    let (t, stats) = b.load(None).unwrap();
    assert_eq!(stats.changed_behind_back, vec!["b".to_string()]);
    assert_eq!(
        t.manifest.root(),
        full_scan(&m.backing, volfs::DEFAULT_BLOCK_SIZE).root()
    );
    assert_ne!(t.manifest.root(), root);
    drop(b);
}
