//! Real `fio` with data verification on a volfs mount: sequential and random
//! writes checked with crc32c, then the manifest equals a full scan. And the
//! kernel's settings for the mount's reads and writes.

mod common;

use std::process::Command;

use common::{Mounted, full_scan};

fn fio(dir: &std::path::Path, name: &str, rw: &str, bs: &str) {
    let out = Command::new("fio")
        .current_dir(dir)
        .args([
            &format!("--name={name}"),
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            "--size=24m",
            "--numjobs=2",
            "--ioengine=psync",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--end_fsync=1",
            "--group_reporting",
        ])
        .output()
        .expect("fio is installed (apt-get install fio; .ci/run installs it)");
    assert!(
        out.status.success(),
        "fio {name} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn fio_verified_writes_pass_on_the_mount() {
    let m = Mounted::new();
    fio(&m.mnt, "seq", "write", "1m");
    fio(&m.mnt, "rand", "randwrite", "4k");
    fio(&m.mnt, "mixed", "randrw", "16k");
    m.live().refresh().unwrap();
    assert_eq!(
        m.live().manifest(),
        full_scan(&m.backing, m.live().block_size())
    );
}

#[test]
fn the_mount_reads_ahead_as_far_as_one_request_carries() {
    let m = Mounted::new();
    let kib = std::fs::read_to_string(m.bdi().join("read_ahead_kb")).unwrap();
    assert_eq!(kib.trim(), "1024", "the kernel's default is 128");
    let ratio = std::fs::read_to_string(m.bdi().join("max_ratio")).unwrap();
    assert_eq!(
        ratio.trim(),
        "20",
        "the mount holds 20 % of the dirty budget"
    );
}
