//! The manifest reader on hostile bytes: a `Diff`'s base comes from another
//! edge (what it says it holds). Arbitrary bytes and mutations of a real
//! manifest never panic; one the reader accepts serves as a delta's base:
//! a delta comes out, or a clear error (a receiver's apply then checks the
//! delta against what it really holds: `fuzz_delta.rs`).

use std::fs;

use proptest::prelude::*;
use volfs::manifest::Manifest;

/// A small volume, its manifest's bytes.
fn volume() -> (tempfile::TempDir, Vec<u8>) {
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join("a"), vec![1u8; 10_000]).unwrap();
    fs::create_dir(d.path().join("sub")).unwrap();
    fs::write(d.path().join("sub/b"), b"bee").unwrap();
    std::os::unix::fs::symlink("a", d.path().join("l")).unwrap();
    let m = volfs::offline::manifest(d.path()).unwrap();
    (d, m.to_bytes())
}

fn check(base: &[u8]) {
    let (vol, _) = volume();
    let Ok(m) = Manifest::from_untrusted(base, &volfs::delta::Limits::default()) else {
        return;
    };
    let mut out = Vec::new();
    // Refused or written; never a panic.
    let _ = volfs::offline::diff(vol.path(), Some(&m), &mut out);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..4096)) {
        check(&b);
    }

    #[test]
    fn mutated_manifests_never_panic(
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<Option<usize>>(),
    ) {
        let (_, mut b) = volume();
        for (at, x) in flips {
            let i = at % b.len();
            b[i] ^= x;
        }
        if let Some(c) = cut {
            b.truncate(c % (b.len() + 1));
        }
        check(&b);
    }
}

#[test]
fn a_real_manifest_is_a_base_for_an_empty_delta() {
    let (vol, b) = volume();
    let m = Manifest::from_bytes(&b).unwrap();
    let mut out = Vec::new();
    let s = volfs::offline::diff(vol.path(), Some(&m), &mut out).unwrap();
    assert_eq!((s.entries, s.blocks, s.removed), (0, 0, 0));
}
