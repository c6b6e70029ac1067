//! Deltas as untrusted input: every length, count and size is bounded before
//! anything is allocated for it; device nodes, setuid files and xattrs
//! outside `user.` are refused; a refused delta leaves its target exactly as
//! it was. And what the scan records, so that a volume made by an app still
//! moves.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{Mounted, contents, full_scan};
use edge_proto::v1 as pb;
use edge_proto::v1::delta_frame::Frame;
use prost::Message;
use volfs::blockstore::BlockStore;
use volfs::delta::{DeltaError, Limits, read_delta, read_delta_with};
use volfs::manifest::{Entry, Kind, Manifest};

/// The bytes of a delta made of `frames`.
fn encode(frames: Vec<Frame>) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        out.extend(pb::DeltaFrame { frame: Some(f) }.encode_length_delimited_to_vec());
    }
    out
}

fn header(block_size: u32, base: &Manifest) -> Frame {
    Frame::Header(pb::DeltaHeader {
        version: edge_proto::DELTA_VERSION,
        block_size,
        base_root: base.root().to_vec(),
        root: Vec::new(),
    })
}

/// A delta from `base` that adds or replaces `entries` (and the root
/// directory, if `base` has none), with a correct trailer: only the rules
/// can refuse it.
fn delta_over(block_size: u32, base: &Manifest, entries: &[(&[u8], Entry)]) -> Vec<u8> {
    delta_removing(block_size, base, entries, &[])
}

/// [`delta_over`] that also removes `removed`.
fn delta_removing(
    block_size: u32,
    base: &Manifest,
    entries: &[(&[u8], Entry)],
    removed: &[&[u8]],
) -> Vec<u8> {
    let mut result = base.clone();
    for p in removed {
        result.entries.remove(*p);
    }
    result.block_size = block_size;
    let mut changed = Vec::new();
    if !result.entries.contains_key(&b""[..]) {
        result.entries.insert(Vec::new(), Entry::dir(0o755, 0, 0));
        changed.push(Vec::new());
    }
    for (p, e) in entries {
        result.entries.insert(p.to_vec(), e.clone());
        changed.push(p.to_vec());
    }
    let mut frames = vec![header(block_size, base)];
    frames.extend(
        changed
            .iter()
            .map(|p| Frame::Entry(result.entries[p].to_pb(p))),
    );
    frames.extend(removed.iter().map(|p| Frame::Removed(p.to_vec())));
    frames.push(Frame::Trailer(pb::DeltaTrailer {
        entries: changed.len() as u64,
        removed: removed.len() as u64,
        blocks: 0,
        root: result.root().to_vec(),
    }));
    encode(frames)
}

/// A full delta (against nothing) of the root directory and `entries`.
fn full_delta(block_size: u32, entries: &[(&[u8], Entry)]) -> Vec<u8> {
    delta_over(block_size, &Manifest::empty(block_size), entries)
}

/// A delta from what `t` holds now that adds or replaces `entries`.
fn delta_to(t: &Path, entries: &[(&[u8], Entry)]) -> Vec<u8> {
    delta_over(4096, &volfs::offline::manifest(t).unwrap(), entries)
}

fn special(kind: Kind, mode: u32) -> Entry {
    Entry {
        kind,
        ..Entry::dir(mode, 0, 0)
    }
}

/// Reads `delta` against `base` into a throwaway store.
fn read(delta: &[u8], base: &Manifest) -> Result<volfs::delta::ReadDelta, DeltaError> {
    let d = tempfile::tempdir().unwrap();
    let store = BlockStore::open(&d.path().join("store")).unwrap();
    read_delta(delta, base, &store)
}

/// A volume directory with a file and a subdirectory, hashed once.
fn target() -> (tempfile::TempDir, std::path::PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let t = d.path().join("target");
    fs::create_dir_all(t.join("sub")).unwrap();
    fs::write(t.join("f"), vec![7u8; 10_000]).unwrap();
    volfs::offline::hash(&t, Some(4096)).unwrap();
    (d, t)
}

/// Applies `delta` to `t`, which must refuse it and stay exactly as it was.
fn refused_and_untouched(t: &Path, delta: &[u8]) -> volfs::apply::ApplyError {
    let before = (contents(t), full_scan(t, 4096));
    let err = volfs::offline::apply(t, delta).expect_err("the delta is refused");
    assert_eq!((contents(t), full_scan(t, 4096)), before, "target changed");
    let staged: Vec<_> = fs::read_dir(t.join(".volfs"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "lock" && n != "manifest.pb")
        .collect();
    assert!(staged.is_empty(), "leftovers in .volfs: {staged:?}");
    err
}

#[test]
fn a_patch_claiming_two_to_the_43_blocks_is_refused_before_allocating() {
    let (_d, t) = target();
    let base = volfs::offline::manifest(&t).unwrap();
    let mut e = base.entries[&b"f"[..]].to_pb(b"f");
    e.blocks.clear();
    e.patch = true;
    e.block_count = 1 << 43;
    let delta = encode(vec![header(4096, &base), Frame::Entry(e)]);
    assert!(delta.len() < 100, "a tiny delta: {} bytes", delta.len());
    let err = refused_and_untouched(&t, &delta);
    let msg = err.to_string();
    assert!(msg.contains("blocks for 10000 bytes"), "{msg}");
}

#[test]
fn a_patch_whose_size_needs_more_memory_than_the_budget_is_refused() {
    let (_d, t) = target();
    let base = volfs::offline::manifest(&t).unwrap();
    let mut e = base.entries[&b"f"[..]].to_pb(b"f");
    e.blocks.clear();
    e.patch = true;
    e.size = 1 << 55;
    e.block_count = e.size.div_ceil(4096);
    let delta = encode(vec![header(4096, &base), Frame::Entry(e)]);
    let err = refused_and_untouched(&t, &delta);
    assert!(
        matches!(
            err,
            volfs::apply::ApplyError::Delta(DeltaError::Limit { .. })
        ),
        "{err}"
    );
}

#[test]
fn a_frame_longer_than_the_limit_is_refused_from_its_length_alone() {
    // A length prefix of 17 MiB followed by nothing.
    let mut delta = Vec::new();
    prost::encoding::encode_varint(17 << 20, &mut delta);
    let err = read(&delta, &Manifest::empty(4096)).unwrap_err();
    assert!(
        matches!(
            err,
            DeltaError::Limit {
                what: "frame size",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn block_sizes_outside_512_bytes_to_16_mib_are_refused() {
    for bs in [1, 511, (16 << 20) + 1, u32::MAX] {
        let delta = full_delta(bs, &[]);
        let err = read(&delta, &Manifest::empty(bs)).unwrap_err();
        assert!(err.to_string().contains("block size"), "{bs}: {err}");
    }
    for bs in [512, 1000, 16 << 20] {
        read(&full_delta(bs, &[]), &Manifest::empty(bs)).expect("a block size in range");
    }
}

#[test]
fn a_full_entry_whose_block_list_disagrees_with_its_size_is_refused() {
    let file = |size: u64, blocks: usize| Entry {
        kind: Kind::File,
        size,
        blocks: vec![*blake3::hash(b"").as_bytes(); blocks],
        ..Entry::dir(0o644, 0, 0)
    };
    for (size, n) in [(4097, 1), (4096, 2), (0, 1), (1 << 40, 0)] {
        let err = read(
            &full_delta(4096, &[(b"f", file(size, n))]),
            &Manifest::empty(4096),
        )
        .unwrap_err();
        assert!(err.to_string().contains("blocks for"), "{size}/{n}: {err}");
    }
}

#[test]
fn many_small_entries_run_into_the_budget_not_out_of_memory() {
    let d = tempfile::tempdir().unwrap();
    let store = BlockStore::open(&d.path().join("store")).unwrap();
    let entries: Vec<(Vec<u8>, Entry)> = (0..5000)
        .map(|i| (format!("d{i}").into_bytes(), Entry::dir(0o755, 0, 0)))
        .collect();
    let refs: Vec<(&[u8], Entry)> = entries
        .iter()
        .map(|(p, e)| (p.as_slice(), e.clone()))
        .collect();
    let delta = full_delta(4096, &refs);
    let tight = Limits {
        max_manifest_bytes: 1 << 20,
        ..Limits::default()
    };
    let err =
        read_delta_with(delta.as_slice(), &Manifest::empty(4096), &store, &tight).unwrap_err();
    assert!(
        matches!(err, DeltaError::Limit { what, .. } if what.contains("memory")),
        "{err}"
    );
    let few = Limits {
        max_entries: 100,
        ..Limits::default()
    };
    let err = read_delta_with(delta.as_slice(), &Manifest::empty(4096), &store, &few).unwrap_err();
    assert!(
        matches!(
            err,
            DeltaError::Limit {
                what: "entries",
                ..
            }
        ),
        "{err}"
    );
    read_delta(delta.as_slice(), &Manifest::empty(4096), &store).expect("within the defaults");
}

#[test]
fn paths_names_targets_and_xattrs_past_their_limits_are_refused() {
    let long_name = vec![b'n'; 256];
    let mut deep = Vec::new();
    while deep.len() < 4100 {
        deep.extend_from_slice(b"abcdefg/");
    }
    deep.pop();
    let link = |target: Vec<u8>| Entry {
        kind: Kind::Symlink,
        size: target.len() as u64,
        link_target: target,
        ..Entry::dir(0o777, 0, 0)
    };
    let xattrs = |x: Vec<(Vec<u8>, Vec<u8>)>| Entry {
        xattrs: x,
        ..Entry::dir(0o755, 0, 0)
    };
    let cases: Vec<(&[u8], Entry, &str)> = vec![
        (&long_name, Entry::dir(0o755, 0, 0), "path component length"),
        (&deep, Entry::dir(0o755, 0, 0), "path length"),
        (b"l", link(vec![b'x'; 4096]), "link target length"),
        (
            b"x",
            xattrs(vec![(b"user.a".to_vec(), vec![0; (64 << 10) + 1])]),
            "xattr value length",
        ),
        (
            b"x",
            xattrs(vec![([&b"user."[..], &[b'a'; 251]].concat(), vec![])]),
            "xattr name length",
        ),
        (
            b"x",
            xattrs(
                (0..1025)
                    .map(|i| (format!("user.{i:04}").into_bytes(), vec![]))
                    .collect(),
            ),
            "xattrs of an entry",
        ),
    ];
    for (p, e, what) in cases {
        let err = read(&full_delta(4096, &[(p, e)]), &Manifest::empty(4096)).unwrap_err();
        assert!(
            matches!(&err, DeltaError::Limit { what: w, .. } if *w == what),
            "{what}: {err}"
        );
    }
}

#[test]
fn device_nodes_in_a_delta_are_refused_and_the_target_is_untouched() {
    let (_d, t) = target();
    for kind in [Kind::CharDevice, Kind::BlockDevice] {
        let dev = Entry {
            rdev: libc::makedev(1, 3),
            ..special(kind, 0o666)
        };
        let delta = delta_to(&t, &[(b"sub/null", dev)]);
        let err = refused_and_untouched(&t, &delta);
        assert!(err.to_string().contains("device node"), "{err}");
    }
    // FIFOs and sockets still travel.
    let delta = full_delta(
        4096,
        &[
            (b"pipe", special(Kind::Fifo, 0o640)),
            (b"sock", special(Kind::Socket, 0o755)),
        ],
    );
    let d = tempfile::tempdir().unwrap();
    volfs::offline::apply(d.path(), delta.as_slice()).expect("fifo and socket");
}

#[test]
fn setuid_and_setgid_files_in_a_delta_are_refused() {
    let (_d, t) = target();
    for mode in [0o4755, 0o2755, 0o6711] {
        let file = Entry {
            kind: Kind::File,
            ..Entry::dir(mode, 0, 0)
        };
        let err = refused_and_untouched(&t, &delta_to(&t, &[(b"sh", file)]));
        assert!(err.to_string().contains("setuid or setgid"), "{err}");
    }
    // A setgid directory (files inherit its group) is fine.
    let d = tempfile::tempdir().unwrap();
    let delta = full_delta(4096, &[(b"shared", Entry::dir(0o2775, 0, 0))]);
    volfs::offline::apply(d.path(), delta.as_slice()).expect("setgid directory");
    assert_eq!(
        fs::metadata(d.path().join("shared"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o2775
    );
}

#[test]
fn xattrs_outside_the_user_namespace_are_refused() {
    let (_d, t) = target();
    for name in [
        &b"security.capability"[..],
        b"trusted.overlay.opaque",
        b"system.posix_acl_access",
        b"user.",
    ] {
        let e = Entry {
            xattrs: vec![(name.to_vec(), b"v".to_vec())],
            ..Entry::dir(0o755, 0, 0)
        };
        let err = refused_and_untouched(&t, &delta_to(&t, &[(b"x", e)]));
        assert!(err.to_string().contains("user. namespace"), "{err}");
    }
}

#[test]
fn an_entry_too_large_for_one_frame_fails_before_anything_is_written() {
    let d = tempfile::tempdir().unwrap();
    let n = 600_000u64;
    let mut m = Manifest::empty(4096);
    m.entries.insert(Vec::new(), Entry::dir(0o755, 0, 0));
    m.entries.insert(
        b"huge".to_vec(),
        Entry {
            kind: Kind::File,
            size: n * 4096,
            blocks: vec![[1; 32]; n as usize],
            ..Entry::dir(0o644, 0, 0)
        },
    );
    let mut out = Vec::new();
    let err =
        volfs::delta::write_delta(d.path(), &m, &Manifest::empty(4096), &mut out).unwrap_err();
    assert!(
        matches!(&err, DeltaError::EntryTooLarge { path, .. } if path == "huge"),
        "{err}"
    );
    assert!(out.is_empty(), "nothing written");
}

#[test]
fn a_setuid_file_moves_as_a_plain_file_and_only_user_xattrs_travel() {
    let m = Mounted::new();
    fs::write(m.p("tool"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(m.p("tool"), fs::Permissions::from_mode(0o6755)).unwrap();
    fs::create_dir(m.p("shared")).unwrap();
    fs::set_permissions(m.p("shared"), fs::Permissions::from_mode(0o2775)).unwrap();
    let c = std::ffi::CString::new(m.backing.join("tool").into_os_string().into_encoded_bytes())
        .unwrap();
    for name in [c"user.app", c"trusted.host"] {
        // SAFETY: valid C strings and a two-byte value.
        let r = unsafe { libc::lsetxattr(c.as_ptr(), name.as_ptr(), c"v1".as_ptr().cast(), 2, 0) };
        assert_eq!(r, 0, "{name:?}: {}", std::io::Error::last_os_error());
    }
    let mut delta = Vec::new();
    m.live()
        .write_delta(&Manifest::empty(volfs::DEFAULT_BLOCK_SIZE), &mut delta)
        .unwrap();
    let t = m.dir.path().join("target");
    fs::create_dir(&t).unwrap();
    volfs::offline::apply(&t, delta.as_slice()).expect("the volume moves");
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&t.join("tool")), 0o755, "setuid and setgid dropped");
    assert_eq!(
        mode(&t.join("shared")),
        0o2775,
        "a setgid directory keeps it"
    );
    let xattrs = &full_scan(&m.backing, volfs::DEFAULT_BLOCK_SIZE).entries[&b"tool"[..]].xattrs;
    assert_eq!(xattrs, &vec![(b"user.app".to_vec(), b"v1".to_vec())]);
    let ct = std::ffi::CString::new(t.join("tool").into_os_string().into_encoded_bytes()).unwrap();
    let mut buf = [0u8; 8];
    // SAFETY: valid C strings and buffer.
    let r = unsafe {
        libc::lgetxattr(
            ct.as_ptr(),
            c"trusted.host".as_ptr(),
            buf.as_mut_ptr().cast(),
            8,
        )
    };
    assert_eq!(r, -1, "trusted.* stays on its host");
}

#[test]
fn volumes_are_mounted_nosuid_and_nodev_and_refuse_device_nodes() {
    let m = Mounted::new();
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mnt = fs::canonicalize(&m.mnt).unwrap();
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == mnt.to_str())
        .expect("the mount is listed");
    let opts: Vec<&str> = line.split(' ').nth(5).unwrap().split(',').collect();
    assert!(
        opts.contains(&"nosuid") && opts.contains(&"nodev"),
        "{line}"
    );
    let dev = std::ffi::CString::new(m.p("null").into_os_string().into_encoded_bytes()).unwrap();
    // SAFETY: valid C string.
    let r = unsafe { libc::mknod(dev.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
    assert_eq!(r, -1, "no device node in a volume");
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EPERM)
    );
    assert!(!m.backing.join("null").exists());
}

// What the fuzzer found: deltas the reader took whose apply then failed (or
// missed the root) half way, after the tree had changed.

#[test]
fn a_delta_removing_a_path_the_base_does_not_hold_is_refused() {
    let (_d, t) = target();
    let base = volfs::offline::manifest(&t).unwrap();
    let delta = delta_removing(4096, &base, &[], &[b"sub", b"f/x"]);
    let err = refused_and_untouched(&t, &delta);
    assert!(err.to_string().contains("does not hold"), "{err}");
}

#[test]
fn a_delta_removing_the_first_name_of_a_hard_link_it_keeps_is_refused() {
    let (_d, t) = target();
    fs::hard_link(t.join("f"), t.join("g")).unwrap();
    let base = volfs::offline::manifest(&t).unwrap();
    assert_eq!(base.entries[&b"g"[..]].kind, Kind::Hardlink);
    let delta = delta_removing(4096, &base, &[], &[b"f"]);
    let err = refused_and_untouched(&t, &delta);
    assert!(err.to_string().contains("hard link g"), "{err}");
}

#[test]
fn mtimes_no_filesystem_keeps_are_refused() {
    let (_d, t) = target();
    for sec in [1 << 55, i64::MIN, (1 << 34) + 1] {
        let e = Entry {
            mtime: (sec, 0),
            ..Entry::dir(0o755, 0, 0)
        };
        let err = refused_and_untouched(&t, &delta_to(&t, &[(b"sub", e)]));
        assert!(err.to_string().contains("mtime"), "{sec}: {err}");
    }
}

#[test]
fn metadata_a_hard_link_or_symlink_cannot_carry_is_refused() {
    let (_d, t) = target();
    let link = Entry {
        kind: Kind::Hardlink,
        link_target: b"f".to_vec(),
        mtime: (4096, 0),
        ..Entry::dir(0, 0, 0)
    };
    let err = refused_and_untouched(&t, &delta_to(&t, &[(b"g", link)]));
    assert!(err.to_string().contains("metadata on a hard link"), "{err}");
    let sym = Entry {
        kind: Kind::Symlink,
        size: 1,
        link_target: b"f".to_vec(),
        ..Entry::dir(0o1777, 0, 0)
    };
    let err = refused_and_untouched(&t, &delta_to(&t, &[(b"s", sym)]));
    assert!(err.to_string().contains("symlink mode"), "{err}");
}
