//! The `Volume` service of a live mount, over its real Unix socket: a
//! delta streamed as frames is the delta a file holds, a reader that goes
//! away stops the scan, a hostile base is refused while the shim stays up,
//! and the dirty state is pushed as it changes.

mod common;

use std::fs;
use std::time::{Duration, Instant};

use common::Mounted;
use edge_proto::v1 as pb;
use edge_proto::v1::volume_client::VolumeClient;
use prost::Message;
use tonic::transport::Channel;

fn served(m: &Mounted) -> std::path::PathBuf {
    let h = m.handle.as_ref().unwrap();
    volfs::service::serve(h.live().clone(), h.unmounter()).unwrap()
}

async fn client(m: &Mounted) -> VolumeClient<Channel> {
    volfs::service::connect(&m.backing)
        .await
        .unwrap()
        .expect("the shim answers")
}

async fn status(c: &mut VolumeClient<Channel>) -> pb::VolumeStatus {
    c.status(pb::StatusRequest::default())
        .await
        .unwrap()
        .into_inner()
}

/// A Diff's frames, its summary and the manifest the receiver then holds.
async fn diff(
    c: &mut VolumeClient<Channel>,
    base: Vec<u8>,
) -> Result<(Vec<pb::DeltaFrame>, pb::DiffDone, Vec<u8>), tonic::Status> {
    let mut s = c
        .diff(pb::DiffRequest {
            base,
            want_result: true,
        })
        .await?
        .into_inner();
    let (mut frames, mut result) = (Vec::new(), Vec::new());
    while let Some(chunk) = s.message().await? {
        match chunk.chunk {
            Some(pb::diff_chunk::Chunk::Frame(f)) => {
                assert!(result.is_empty(), "a frame after the result");
                frames.push(f);
            }
            Some(pb::diff_chunk::Chunk::ResultPart(p)) => {
                assert!(p.len() <= volfs::service::RESULT_PART);
                result.extend_from_slice(&p);
            }
            Some(pb::diff_chunk::Chunk::Done(d)) => return Ok((frames, d, result)),
            None => {}
        }
    }
    panic!("the diff ended without its summary")
}

fn bytes_of(frames: &[pb::DeltaFrame]) -> Vec<u8> {
    frames
        .iter()
        .flat_map(|f| f.encode_length_delimited_to_vec())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_delta_applies_to_the_volume_and_its_result_is_the_next_base() {
    let m = Mounted::new();
    let sock = served(&m);
    assert!(sock.ends_with(".volfs/volume.sock"));
    let a: Vec<u8> = (0..300_000u32).map(|i| (i / 7 % 251) as u8).collect();
    fs::write(m.p("a"), &a).unwrap();
    fs::create_dir(m.p("d")).unwrap();
    fs::write(m.p("d/b"), b"hello").unwrap();
    let mut c = client(&m).await;
    let (frames, done, result) = diff(&mut c, Vec::new()).await.unwrap();
    assert_eq!(
        volfs::Manifest::from_bytes(&result)
            .unwrap()
            .root()
            .as_slice(),
        done.root.as_slice()
    );
    assert_eq!(done.wire_bytes, bytes_of(&frames).len() as u64);
    assert!(done.blocks >= 5, "300 kB in 64 KiB blocks, and d/b");
    // Applied elsewhere, it is the volume.
    let copy = tempfile::tempdir().unwrap();
    let r = volfs::offline::apply(copy.path(), bytes_of(&frames).as_slice()).unwrap();
    assert_eq!(r.root.as_slice(), done.root.as_slice());
    assert_eq!(fs::read(copy.path().join("d/b")).unwrap(), b"hello");
    // From its result, the next delta carries only what changed since.
    fs::write(m.p("d/b"), b"world").unwrap();
    let (frames2, done2, _) = diff(&mut c, result).await.unwrap();
    assert_eq!(done2.blocks, 1);
    volfs::offline::apply(copy.path(), bytes_of(&frames2).as_slice()).unwrap();
    assert_eq!(fs::read(copy.path().join("d/b")).unwrap(), b"world");
    assert_eq!(fs::read(copy.path().join("a")).unwrap(), a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_base_is_refused_and_the_shim_stays_up() {
    let m = Mounted::new();
    served(&m);
    fs::write(m.p("f"), b"data").unwrap();
    let mut c = client(&m).await;
    for base in [
        b"not a manifest".to_vec(),
        vec![0xffu8; 1 << 20],
        // A length prefix promising far more than there is.
        vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f],
        // A few MB of empty entries that would decode into gigabytes.
        pb::PersistedManifest {
            version: edge_proto::MANIFEST_VERSION,
            block_size: 65536,
            entries: vec![pb::ManifestEntry::default(); (1 << 20) + 1],
            ..Default::default()
        }
        .encode_to_vec(),
    ] {
        let e = diff(&mut c, base).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("base manifest"), "{}", e.message());
    }
    // A lease past the limit is refused; the volume is as it was.
    let e = c
        .throttle(pb::ThrottleRequest {
            bytes_per_sec: 1,
            ttl_ms: u32::MAX,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert_eq!(m.live().throttle().rate(), 0);
    let mut c = client(&m).await;
    let st = status(&mut c).await;
    assert_eq!(st.api_version, edge_proto::VOLUME_API_VERSION);
    assert_eq!(fs::read(m.p("f")).unwrap(), b"data");
    diff(&mut c, Vec::new()).await.unwrap();
}

/// Open descriptors of this process (the shim runs in it) on `path`.
fn open_on(path: &std::path::Path) -> usize {
    fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .ok()
                .and_then(|e| fs::read_link(e.path()).ok())
                .is_some_and(|t| t == path)
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_goes_away_stops_the_scan() {
    let m = Mounted::new();
    served(&m);
    // 512 blocks, nearly all distinct: far more than the stream's few frames of queue.
    let data: Vec<u8> = (0..32u32 << 20)
        .map(|i| (i / 4096 % 253) as u8 ^ (i >> 16) as u8)
        .collect();
    fs::write(m.p("big"), &data).unwrap();
    let big = m.backing.join("big");
    // What the mount itself keeps open on it (its own handles).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let own = open_on(&big);
    let mut c = client(&m).await;
    let mut s = c
        .diff(pb::DiffRequest {
            base: Vec::new(),
            want_result: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(s.message().await.unwrap().is_some());
    // The scan waits for the reader, the file open.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        open_on(&big),
        own + 1,
        "the scan is under way, waiting for room"
    );
    drop(s);
    // The reader went away: the scan ends and lets the file go.
    let t = Instant::now();
    while open_on(&big) != own {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the scan still holds the file 10 s after its reader left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The shim answers, and a whole delta still comes out after.
    let (_, done, _) = diff(&mut c, Vec::new()).await.unwrap();
    let distinct: std::collections::HashSet<&[u8]> = data.chunks(65536).collect();
    assert_eq!(done.blocks, distinct.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dirty_state_is_pushed_when_it_changes() {
    let m = Mounted::new();
    served(&m);
    let mut c = client(&m).await;
    let mut w = c
        .watch(pb::WatchRequest {
            interval_ms: 20,
            flush_ms: 100,
        })
        .await
        .unwrap()
        .into_inner();
    let first = w.message().await.unwrap().unwrap();
    assert_eq!((first.files, first.bytes), (0, 0));
    let next = async |w: &mut tonic::Streaming<pb::VolumeStatus>| {
        tokio::time::timeout(Duration::from_secs(10), w.message())
            .await
            .expect("a status within 10 s")
            .unwrap()
            .unwrap()
    };
    // A buffered write shows once the shim flushed it.
    fs::write(m.p("f"), vec![1u8; 100_000]).unwrap();
    let mut st = next(&mut w).await;
    while st.bytes == 0 {
        st = next(&mut w).await;
    }
    assert_eq!(st.files, 1);
    // A diff takes the marks: pushed as clean, with one more refresh.
    let mut c2 = client(&m).await;
    diff(&mut c2, Vec::new()).await.unwrap();
    let mut after = next(&mut w).await;
    while after.bytes != 0 {
        after = next(&mut w).await;
    }
    assert!(after.refreshes > st.refreshes);
    // The same amount written again is told apart by the refresh count.
    fs::write(m.p("f"), vec![2u8; 100_000]).unwrap();
    let mut again = next(&mut w).await;
    while again.bytes == 0 {
        again = next(&mut w).await;
    }
    assert_eq!((again.files, again.bytes), (st.files, st.bytes));
    assert_ne!(again.refreshes, st.refreshes);
    // Nothing changes, nothing is pushed.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), w.message())
            .await
            .is_err(),
        "a status was pushed with nothing changed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_deeper_than_a_socket_path_holds_is_served() {
    // A socket's path holds 107 bytes; an edge's volumes lie deep under
    // its data directory.
    let deep = format!("{}/{}/backing", "d".repeat(60), "e".repeat(60));
    let m = Mounted::under(&deep, volfs::MountOptions::default());
    let path = served(&m);
    assert!(path.as_os_str().len() > 107, "{}", path.display());
    fs::write(m.p("f"), b"deep").unwrap();
    let mut c = client(&m).await;
    let st = status(&mut c).await;
    assert!(st.bytes >= 4, "{st:?}");
}
