//! A delta applied to a staged (unmounted) volume as its frames arrive.
//!
//! volfs's apply is synchronous: it runs on a blocking thread and reads
//! the delta from a bounded channel the async side feeds frame by frame,
//! so receiving, verifying and writing overlap, and a round of any size is
//! held in memory a few frames at a time (never spooled to a file). A
//! delta cut short (the sender failed, the stream broke, a budget ran out)
//! ends the reader early: apply fails on the truncated stream and changes
//! nothing, as it would on a truncated file.

use std::io::Read;
use std::path::Path;

use edge_proto::v1 as pb;
use prost::Message;
use tokio::sync::mpsc;
use volfs::apply::{ApplyError, ApplyReport};

/// Frames the receiver may be ahead of the apply thread (each at most
/// [`volfs::delta::MAX_FRAME`]; 64 KiB at the default block size).
const QUEUE: usize = 4;

/// The result of an apply: the thread's own failure outside, apply's inside.
pub type Applied = std::io::Result<Result<ApplyReport, ApplyError>>;

/// A delta being applied to a staged volume.
#[derive(Debug)]
pub struct Incoming {
    tx: Option<mpsc::Sender<Vec<u8>>>,
    task: tokio::task::JoinHandle<Result<ApplyReport, ApplyError>>,
    refused: Option<String>,
}

impl Incoming {
    /// Starts applying a delta to the backing directory `vol` (which may be
    /// new and empty).
    pub fn start(vol: &Path) -> Incoming {
        let (tx, rx) = mpsc::channel(QUEUE);
        let vol = vol.to_path_buf();
        let task = tokio::task::spawn_blocking(move || {
            volfs::offline::apply(
                &vol,
                ChannelReader {
                    rx,
                    cur: Vec::new(),
                    pos: 0,
                },
            )
        });
        Incoming {
            tx: Some(tx),
            task,
            refused: None,
        }
    }

    /// Hands the next frame to the apply. `false` when the apply ended
    /// already, or the frame is past the delta format's limit (which ends
    /// it): [`finish`](Self::finish) says why.
    pub async fn push(&mut self, f: &pb::DeltaFrame) -> bool {
        let len = f.encoded_len();
        if len > volfs::delta::MAX_FRAME {
            self.refused = Some(format!(
                "a delta frame of {len} bytes, past the limit of {}",
                volfs::delta::MAX_FRAME
            ));
            self.tx = None;
            return false;
        }
        match &self.tx {
            Some(tx) => tx.send(f.encode_length_delimited_to_vec()).await.is_ok(),
            None => false,
        }
    }

    /// Ends the delta and waits for the apply.
    pub async fn finish(mut self) -> Applied {
        self.tx = None;
        let r = (&mut self.task).await.map_err(std::io::Error::other)?;
        match self.refused {
            Some(why) => Err(std::io::Error::new(std::io::ErrorKind::InvalidData, why)),
            None => Ok(r),
        }
    }
}

/// The delta's bytes as the apply thread reads them.
struct ChannelReader {
    rx: mpsc::Receiver<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.blocking_recv() {
                Some(next) => {
                    self.cur = next;
                    self.pos = 0;
                }
                // The sender is done (or gone): the end of the delta.
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full delta of a small tree, as frames.
    fn frames_of(dir: &Path) -> Vec<pb::DeltaFrame> {
        let mut bytes = Vec::new();
        volfs::offline::diff(dir, None, &mut bytes).unwrap();
        let mut rest = bytes.as_slice();
        let mut out = Vec::new();
        while !rest.is_empty() {
            out.push(pb::DeltaFrame::decode_length_delimited(&mut rest).unwrap());
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_whole_delta_applies_and_a_cut_one_changes_nothing() {
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("a"), vec![1u8; 200_000]).unwrap();
        std::fs::create_dir(src.path().join("d")).unwrap();
        std::fs::write(src.path().join("d/b"), b"hello").unwrap();
        let frames = frames_of(src.path());
        assert!(frames.len() > 3, "header, blocks, entries, trailer");

        // Cut before the trailer: an error, and the target holds nothing.
        let cut = tempfile::tempdir().unwrap();
        let mut inc = Incoming::start(cut.path());
        for f in &frames[..frames.len() - 1] {
            assert!(inc.push(f).await);
        }
        assert!(inc.finish().await.unwrap().is_err());
        assert!(!cut.path().join("a").exists());
        assert!(!cut.path().join("d").exists());

        // Whole: the tree arrives, hashing to the sender's root.
        let dst = tempfile::tempdir().unwrap();
        let mut inc = Incoming::start(dst.path());
        for f in &frames {
            assert!(inc.push(f).await);
        }
        let r = inc.finish().await.unwrap().unwrap();
        assert_eq!(
            r.root,
            volfs::offline::hash(src.path(), None).unwrap().0,
            "the staged copy is the sender's tree"
        );
        assert_eq!(std::fs::read(dst.path().join("d/b")).unwrap(), b"hello");
    }
}
