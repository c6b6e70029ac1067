//! The write throttle of a live mount (a handover's auto-converge): write
//! replies are held to the rate, data lands and is tracked all the same, and
//! the app goes at full speed again once the throttle is lifted.

mod common;

use std::fs;
use std::io::Write;
use std::time::{Duration, Instant};

use common::Mounted;

const MIB: usize = 1 << 20;

fn write_file(path: &std::path::Path, mib: usize, sync: bool) -> Duration {
    let t = Instant::now();
    let mut f = fs::File::create(path).unwrap();
    let chunk = vec![0x5au8; MIB];
    for _ in 0..mib {
        f.write_all(&chunk).unwrap();
    }
    if sync {
        f.sync_all().unwrap();
    }
    t.elapsed()
}

#[test]
fn a_throttled_writer_waits_for_its_replies_and_loses_nothing() {
    let m = Mounted::new();
    assert_eq!(m.live().throttle().rate(), 0);
    m.live().throttle().set(MIB as u64, Duration::from_secs(60));
    // 4 MiB at 1 MiB/s: the replies of the last writes wait 3 s or so.
    let took = write_file(&m.p("slow"), 4, true);
    assert!(
        took >= Duration::from_millis(2500),
        "4 MiB went out in {took:?} under a 1 MiB/s throttle"
    );
    assert_eq!(fs::read(m.p("slow")).unwrap(), vec![0x5au8; 4 * MIB]);
    assert!(m.live().dirty_stats().bytes >= 4 * MIB as u64);
}

#[test]
fn a_buffered_writer_is_slowed_too() {
    let m = Mounted::new();
    let bdi = m.bdi();
    let settings =
        || ["strict_limit", "max_ratio"].map(|f| fs::read_to_string(bdi.join(f)).unwrap());
    let before = settings();
    m.live().throttle().set(MIB as u64, Duration::from_secs(60));
    assert_ne!(settings(), before, "the mount's dirty pages are capped");
    // Without a cap on the mount's dirty pages these writes would all sit
    // in the page cache at once, for the final round to carry.
    let took = write_file(&m.p("buffered"), 8, false);
    m.live().throttle().clear();
    assert_eq!(
        settings(),
        before,
        "and set back once the throttle is lifted"
    );
    assert!(
        took >= Duration::from_secs(2),
        "8 MiB of buffered writes took {took:?} under a 1 MiB/s throttle"
    );
    m.live().flush().unwrap();
    assert_eq!(fs::read(m.p("buffered")).unwrap(), vec![0x5au8; 8 * MIB]);
}

#[test]
fn lifting_the_throttle_releases_held_writes() {
    let m = Mounted::new();
    // 16 MiB at the lowest rate would take two minutes.
    m.live()
        .throttle()
        .set(volfs::throttle::MIN_RATE, Duration::from_secs(300));
    let p = m.p("held");
    let t = Instant::now();
    let writer = std::thread::spawn(move || write_file(&p, 16, true));
    std::thread::sleep(Duration::from_millis(500));
    assert!(!writer.is_finished(), "the writer is held");
    m.live().throttle().clear();
    writer.join().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "the held writes went out when the throttle was lifted"
    );
    assert_eq!(m.live().throttle().rate(), 0);
}

#[test]
fn a_throttle_lease_runs_out_by_itself() {
    let m = Mounted::new();
    m.live()
        .throttle()
        .set(volfs::throttle::MIN_RATE, Duration::from_millis(700));
    let p = m.p("leased");
    let t = Instant::now();
    write_file(&p, 16, true);
    assert!(
        t.elapsed() >= Duration::from_millis(600),
        "held until the lease ran out"
    );
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "not for the two minutes the rate alone would take"
    );
    assert_eq!(m.live().throttle().rate(), 0);
}
