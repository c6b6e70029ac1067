//! Pre-copy rounds a neighbour sends, as the staging edge takes them: a
//! whole round is staged, and one cut short, carrying a frame past the
//! delta format's limit, or anything but frames after its identity changes
//! nothing of the copy already staged.

use edge_proto::v1 as pb;
use edge_proto::v1::peer_client::PeerClient;
use edgeshift_tests::{Bases, Edge, channel, fleet_ca, free_addr, neighbour};
use prost::Message;

/// The frames of a full delta of a directory holding `x` = `content`.
fn full_delta(content: &[u8]) -> Vec<pb::DeltaFrame> {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("x"), content).unwrap();
    let mut bytes = Vec::new();
    volfs::offline::diff(d.path(), None, &mut bytes).unwrap();
    let mut rest = bytes.as_slice();
    let mut out = Vec::new();
    while !rest.is_empty() {
        out.push(pb::DeltaFrame::decode_length_delimited(&mut rest).unwrap());
    }
    out
}

fn round(session: &str, frames: Vec<pb::DeltaFrame>) -> Vec<pb::PrecopyChunk> {
    let meta = pb::SessionMeta {
        session_id: session.into(),
        app: "list".into(),
        client_id: "c".into(),
        ..Default::default()
    };
    std::iter::once(pb::precopy_chunk::Chunk::Meta(meta))
        .chain(frames.into_iter().map(pb::precopy_chunk::Chunk::Frame))
        .map(|c| pb::PrecopyChunk { chunk: Some(c) })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_cut_short_or_past_the_frame_limit_leaves_the_staged_copy_as_it_was() {
    let bases = Bases::new();
    let apps = bases.process_apps();
    let a = Edge::start(
        "a",
        "127.0.0.1",
        &apps,
        &neighbour("b", free_addr("127.0.0.2")),
    );
    let b = fleet_ca().issue_edge("b", &[], 1).unwrap();
    let mut peer = PeerClient::new(channel(&a.url(), Some(&b)).await.unwrap())
        .max_encoding_message_size(64 << 20);
    let staged = a.data_dir.join("staging/s1/volume/x");
    // A whole full round is staged.
    peer.precopy(tokio_stream::iter(round("s1", full_delta(b"good"))))
        .await
        .unwrap();
    assert_eq!(std::fs::read(&staged).unwrap(), b"good");
    // A full round of something else, cut short before its trailer.
    let mut cut = full_delta(b"other");
    cut.pop();
    let st = peer
        .precopy(tokio_stream::iter(round("s1", cut)))
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::DataLoss, "{st:?}");
    assert_eq!(std::fs::read(&staged).unwrap(), b"good");
    // Just a header (a full round's first frame).
    let header = full_delta(b"other").remove(0);
    let st = peer
        .precopy(tokio_stream::iter(round("s1", vec![header])))
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::DataLoss, "{st:?}");
    assert_eq!(std::fs::read(&staged).unwrap(), b"good");
    // A frame past the delta format's limit is refused as it arrives.
    let mut big = full_delta(b"other");
    big.insert(
        1,
        pb::DeltaFrame {
            frame: Some(pb::delta_frame::Frame::Block(pb::BlockChunk {
                hash: vec![0; 32],
                data: vec![0; volfs::delta::MAX_FRAME + 1],
            })),
        },
    );
    let st = peer
        .precopy(tokio_stream::iter(round("s1", big)))
        .await
        .unwrap_err();
    assert!(st.message().contains("past the limit"), "{st:?}");
    assert_eq!(std::fs::read(&staged).unwrap(), b"good");
    assert!(
        !a.data_dir.join("staging/s1/volume.new").exists(),
        "a cut round left its fresh copy behind"
    );
    // Anything but frames after the identity (which would hold the staging
    // lock without counting against the budget) is refused.
    let mut twice = round("s1", full_delta(b"other"));
    twice.insert(1, twice[0].clone());
    let st = peer.precopy(tokio_stream::iter(twice)).await.unwrap_err();
    assert_eq!(st.code(), tonic::Code::InvalidArgument, "{st:?}");
    assert_eq!(std::fs::read(&staged).unwrap(), b"good");
    // A whole round replaces the copy.
    peer.precopy(tokio_stream::iter(round("s1", full_delta(b"new"))))
        .await
        .unwrap();
    assert_eq!(std::fs::read(&staged).unwrap(), b"new");
}
