//! Slowing an app's writes while a handover catches up (auto-converge).
//!
//! When the live rounds of a handover cannot drain what the app dirties,
//! the owner's edged sets a rate here (`Volume.Throttle` on the volume's
//! socket). Every write still lands in the backing file and is marked dirty
//! at once; only its *reply* is held until the write's turn at that rate
//! comes, by a pacer thread fed through a bounded crossbeam channel (the
//! FUSE workers stay free for reads). An app that writes through the page
//! cache is slowed too: while the throttle is on, the mount's share of the
//! kernel's dirty pages is capped (`strict_limit`, `max_bytes` of its
//! backing-device entry), so the kernel makes the writer wait instead of
//! piling up dirty pages the final round would have to carry.
//!
//! The rate is a lease: it ends by itself after its TTL unless renewed, so a
//! crashed or cut-off edged cannot leave an app slowed. Ending it releases
//! every held reply and restores the writeback settings.

use std::fs;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use fuser::ReplyWrite;

/// Longest lease edged may ask for.
pub const MAX_TTL: Duration = Duration::from_secs(600);

/// Lowest rate a throttle holds writes to, bytes/s: slower would stall the
/// app rather than slow it (a 1 MiB write would wait seconds).
pub const MIN_RATE: u64 = 128 << 10;

/// Replies the pacer holds at most; past it a write is answered at once
/// (the kernel has few write requests in flight anyway).
const MAX_HELD: usize = 4096;

/// How often an idle pacer looks whether the lease ran out.
const IDLE_CHECK: Duration = Duration::from_millis(250);

/// The mount's entry under `/sys/class/bdi`, and its settings before the
/// throttle capped them.
#[derive(Debug)]
struct Bdi {
    dir: PathBuf,
    saved: Mutex<Option<(String, String)>>,
}

impl Bdi {
    fn ratio_file(&self) -> PathBuf {
        let fine = self.dir.join("max_ratio_fine");
        if fine.exists() {
            fine
        } else {
            self.dir.join("max_ratio")
        }
    }

    /// Caps the mount's dirty pages at about 50 ms of writes at `rate`.
    fn cap(&self, rate: u64) {
        let mut saved = self.saved.lock().unwrap_or_else(|p| p.into_inner());
        if saved.is_none() {
            let read = |p: PathBuf| fs::read_to_string(p).map(|s| s.trim().to_string());
            match (read(self.dir.join("strict_limit")), read(self.ratio_file())) {
                (Ok(s), Ok(r)) => *saved = Some((s, r)),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(error = %e, bdi = %self.dir.display(), "cannot read writeback settings; buffered writes are not capped");
                    return;
                }
            }
        }
        let max = (rate / 20).clamp(256 << 10, 64 << 20);
        let r = fs::write(self.dir.join("strict_limit"), "1")
            .and_then(|_| fs::write(self.dir.join("max_bytes"), max.to_string()));
        if let Err(e) = r {
            tracing::warn!(error = %e, "cannot cap the writeback cache; buffered writes are not slowed");
        }
    }

    fn restore(&self) {
        let Some((strict, ratio)) = self.saved.lock().unwrap_or_else(|p| p.into_inner()).take()
        else {
            return;
        };
        let r = fs::write(self.ratio_file(), ratio)
            .and_then(|_| fs::write(self.dir.join("strict_limit"), strict));
        if let Err(e) = r {
            tracing::warn!(error = %e, "cannot restore the writeback settings");
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct State {
    /// Bytes/s; 0 when off.
    rate: u64,
    /// When the lease ends.
    until: Instant,
    /// When the next write's reply may go (the bucket's clock).
    next: Instant,
}

/// The throttle of one mount; see the module docs.
#[derive(Debug)]
pub struct Throttle {
    state: Mutex<State>,
    bdi: OnceLock<Bdi>,
}

impl Default for Throttle {
    fn default() -> Self {
        let now = Instant::now();
        Throttle {
            state: Mutex::new(State {
                rate: 0,
                until: now,
                next: now,
            }),
            bdi: OnceLock::new(),
        }
    }
}

impl Throttle {
    /// Names the mount's backing-device entry, whose dirty pages the
    /// throttle caps while it is on.
    pub fn set_bdi(&self, dir: PathBuf) {
        let _ = self.bdi.set(Bdi {
            dir,
            saved: Mutex::new(None),
        });
    }

    /// Holds writes to `rate` bytes/s (at least [`MIN_RATE`]) for `ttl` (at
    /// most [`MAX_TTL`]); a rate of 0 ends the throttle. Returns the rate
    /// in force.
    pub fn set(&self, rate: u64, ttl: Duration) -> u64 {
        if rate == 0 {
            self.clear();
            return 0;
        }
        let rate = rate.max(MIN_RATE);
        let now = Instant::now();
        // The writeback settings change under the state lock, so a clear or
        // an expiry cannot restore them between this set and its cap.
        let mut s = self.lock();
        s.rate = rate;
        s.until = now + ttl.min(MAX_TTL);
        s.next = s.next.max(now);
        if let Some(b) = self.bdi.get() {
            b.cap(rate);
        }
        rate
    }

    /// Ends the throttle: held replies go out, writeback settings return.
    pub fn clear(&self) {
        let mut s = self.lock();
        Self::clear_locked(&mut s, self.bdi.get());
    }

    fn clear_locked(s: &mut State, bdi: Option<&Bdi>) {
        s.rate = 0;
        s.next = Instant::now();
        // A no-op when nothing was capped.
        if let Some(b) = bdi {
            b.restore();
        }
    }

    /// The rate in force, bytes/s; 0 when off (or the lease ran out).
    pub fn rate(&self) -> u64 {
        self.expire(Instant::now());
        self.lock().rate
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends a lease that ran out (checked and ended under one lock, so a
    /// renewal in between is not lost).
    fn expire(&self, now: Instant) {
        let mut s = self.lock();
        if s.rate != 0 && now >= s.until {
            tracing::info!("write throttle lease ran out");
            Self::clear_locked(&mut s, self.bdi.get());
        }
    }

    /// When the reply of a write of `len` bytes may go: `None` for now.
    fn admit(&self, len: u64) -> Option<Instant> {
        let now = Instant::now();
        self.expire(now);
        let mut s = self.lock();
        if s.rate == 0 {
            return None;
        }
        let at = s.next.max(now);
        s.next = at + Duration::from_secs_f64(len as f64 / s.rate as f64);
        (at > now).then_some(at)
    }

    /// Whether a reply due `at` may go now.
    fn due(&self, at: Instant) -> bool {
        let now = Instant::now();
        self.expire(now);
        now >= at || self.lock().rate == 0
    }

    /// Starts the pacer thread that sends held replies; it ends when the
    /// returned handle (owned by the filesystem) is dropped, answering
    /// whatever it still holds.
    pub fn pacer(self: &Arc<Self>) -> std::io::Result<Pacer> {
        let (tx, rx) = crossbeam_channel::bounded(MAX_HELD);
        let t = self.clone();
        std::thread::Builder::new()
            .name("volfs-pacer".into())
            .spawn(move || pace(&t, &rx))?;
        Ok(Pacer {
            throttle: self.clone(),
            tx,
        })
    }
}

struct Held {
    at: Instant,
    reply: ReplyWrite,
    len: u32,
}

/// The filesystem's side of the throttle: answers writes, now or later.
#[derive(Debug)]
pub struct Pacer {
    throttle: Arc<Throttle>,
    tx: Sender<Held>,
}

impl Pacer {
    /// Answers a write of `len` bytes that landed: at once without a
    /// throttle, else when its turn comes.
    pub fn written(&self, reply: ReplyWrite, len: u32) {
        let Some(at) = self.throttle.admit(u64::from(len)) else {
            return reply.written(len);
        };
        match self.tx.try_send(Held { at, reply, len }) {
            Ok(()) => {}
            Err(TrySendError::Full(h) | TrySendError::Disconnected(h)) => h.reply.written(h.len),
        }
    }
}

fn pace(t: &Throttle, rx: &Receiver<Held>) {
    loop {
        let h = match rx.recv_timeout(IDLE_CHECK) {
            Ok(h) => h,
            Err(RecvTimeoutError::Timeout) => {
                t.expire(Instant::now());
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        // Replies are due in the order they were admitted (the bucket's
        // clock only moves on), so one at a time is enough; a cleared or
        // expired throttle lets each go at once.
        while !t.due(h.at) {
            let wait = h.at.saturating_duration_since(Instant::now());
            std::thread::sleep(wait.min(Duration::from_millis(20)));
        }
        h.reply.written(h.len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_spaced_at_the_rate_and_free_once_cleared() {
        let t = Throttle::default();
        assert_eq!(t.admit(1 << 20), None, "no throttle: every reply at once");
        assert_eq!(t.set(1 << 20, Duration::from_secs(60)), 1 << 20);
        let first = t.admit(512 << 10);
        let second = t.admit(512 << 10).expect("the second half-second waits");
        let third = t.admit(512 << 10).expect("and the third");
        let gap = third - second;
        assert!(
            gap >= Duration::from_millis(490) && gap <= Duration::from_millis(510),
            "512 KiB at 1 MiB/s: {gap:?}"
        );
        assert!(first.is_none_or(|f| f < second));
        t.clear();
        assert_eq!(t.admit(1 << 20), None);
        assert!(t.due(third), "a cleared throttle lets held replies go");
    }

    #[test]
    fn the_rate_has_a_floor_and_the_lease_ends_by_itself() {
        let t = Throttle::default();
        assert_eq!(t.set(1, Duration::from_secs(60)), MIN_RATE);
        t.set(MIN_RATE, Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(t.rate(), 0, "the lease ran out");
        assert_eq!(t.admit(1 << 20), None);
        assert_eq!(t.set(0, Duration::from_secs(1)), 0);
    }
}
