//! The op journal of a session: every op's status and result by op id, so a
//! retried call is not run twice and `Result` answers after a reconnect.
//!
//! Records are appended to `ops.log` (length-delimited protobuf): one when an
//! op begins and one when it ends. An op that began but never ended (edged
//! died while it ran) is reported as aborted after a restart. The file is
//! not fsynced per op: it survives an edged crash (the page cache does), not
//! a host crash.
//!
//! What a journal keeps is bounded: at most [`KEEP_DONE`] finished ops and
//! at most `max_bytes` of their results (the oldest go first), and the file
//! is rewritten with only what is kept once it grows past twice that (at
//! least [`COMPACT_FLOOR`]), so neither memory nor disk grow with the
//! number of calls.

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Mutex;

use bytes::Bytes;
use prost::Message;
use tokio::sync::watch;

/// How many finished ops a session remembers.
pub const KEEP_DONE: usize = 4096;

/// Bytes of results a session's journal keeps unless configured otherwise.
pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;

/// The journal file is compacted once it is past twice the retained bytes,
/// and never below this size.
pub const COMPACT_FLOOR: u64 = 1 << 20;

/// What an outcome costs in the journal's budget.
pub fn outcome_bytes(o: &Outcome) -> u64 {
    16 + match o {
        Outcome::Ok(b) => b.len() as u64,
        Outcome::Err { message, .. } => message.len() as u64,
    }
}

/// How an op ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The app's response message.
    Ok(Bytes),
    /// A gRPC status (from the app, or from edged on its behalf).
    Err {
        /// `tonic::Code` as i32.
        code: i32,
        /// Message.
        message: String,
    },
}

impl Outcome {
    /// As a tonic result.
    pub fn into_result(self) -> Result<Bytes, tonic::Status> {
        match self {
            Outcome::Ok(b) => Ok(b),
            Outcome::Err { code, message } => {
                Err(tonic::Status::new(tonic::Code::from(code), message))
            }
        }
    }
}

#[derive(Clone, PartialEq, Message)]
struct Record {
    #[prost(uint64, tag = "1")]
    op_id: u64,
    #[prost(bool, tag = "2")]
    done: bool,
    #[prost(int32, tag = "3")]
    code: i32,
    #[prost(string, tag = "4")]
    message: String,
    #[prost(bytes = "bytes", tag = "5")]
    payload: Bytes,
    #[prost(string, tag = "6")]
    method: String,
}

enum Slot {
    Running(watch::Receiver<Option<Outcome>>),
    Done(Outcome),
}

/// What [`Journal::begin`] found.
#[derive(Debug)]
pub enum Begin {
    /// A new op: run it, then call [`Journal::finish`].
    New(watch::Sender<Option<Outcome>>),
    /// The op ran or runs already: wait for this.
    Existing(Waiter),
    /// New ops are held (a handover is quiescing the session): wait until
    /// the session admits calls again, or learn where it went.
    Held,
}

/// Waits for an op's outcome.
#[derive(Debug)]
pub enum Waiter {
    /// Still running.
    Running(watch::Receiver<Option<Outcome>>),
    /// Finished.
    Done(Outcome),
}

impl Waiter {
    /// The outcome, once there is one.
    pub async fn wait(self) -> Outcome {
        match self {
            Waiter::Done(o) => o,
            Waiter::Running(mut rx) => loop {
                if let Some(o) = rx.borrow_and_update().clone() {
                    return o;
                }
                if rx.changed().await.is_err() {
                    return Outcome::Err {
                        code: tonic::Code::Aborted as i32,
                        message: "op abandoned".into(),
                    };
                }
            },
        }
    }
}

struct State {
    ops: HashMap<u64, Slot>,
    done_order: VecDeque<u64>,
    /// `None` once closed (the session is gone): nothing is written, the
    /// fd is released.
    file: Option<fs::File>,
    /// Whether new ops may begin. Cleared by [`Journal::hold_new`] under the
    /// same lock as `begin`, so no op slips in after a quiesce counted the
    /// running ones.
    admitting: bool,
    /// The file, for compaction.
    path: std::path::PathBuf,
    /// Budget of retained result bytes.
    max_bytes: u64,
    /// Result bytes retained now.
    done_bytes: u64,
    /// Bytes in the file.
    file_bytes: u64,
}

impl State {
    /// Forgets the oldest finished ops past the count and byte budgets.
    fn evict(&mut self) {
        while self.done_order.len() > KEEP_DONE || self.done_bytes > self.max_bytes {
            let Some(old) = self.done_order.pop_front() else {
                break;
            };
            if let Some(Slot::Done(o)) = self.ops.remove(&old) {
                self.done_bytes = self.done_bytes.saturating_sub(outcome_bytes(&o));
            }
        }
    }

    /// Rewrites the file with only what is kept, once it grew past twice that.
    fn maybe_compact(&mut self) {
        if self.file.is_none() || self.file_bytes <= (2 * self.done_bytes).max(COMPACT_FLOOR) {
            return;
        }
        let mut buf = Vec::new();
        for id in &self.done_order {
            if let Some(Slot::Done(o)) = self.ops.get(id) {
                buf.extend(done_record(*id, o).encode_length_delimited_to_vec());
            }
        }
        for (id, slot) in &self.ops {
            if matches!(slot, Slot::Running(_)) {
                buf.extend(
                    Record {
                        op_id: *id,
                        ..Default::default()
                    }
                    .encode_length_delimited_to_vec(),
                );
            }
        }
        let tmp = self.path.with_extension("compact");
        let r = (|| {
            let mut f = std::os::unix::fs::OpenOptionsExt::mode(&mut fs::OpenOptions::new(), 0o600)
                .create(true)
                .write(true)
                .truncate(true)
                .open(&tmp)?;
            f.write_all(&buf)?;
            fs::rename(&tmp, &self.path)?;
            std::os::unix::fs::OpenOptionsExt::mode(&mut fs::OpenOptions::new(), 0o600)
                .append(true)
                .open(&self.path)
        })();
        match r {
            Ok(f) => {
                self.file = Some(f);
                self.file_bytes = buf.len() as u64;
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                tracing::error!(error = %e, "journal compaction failed; appending on");
            }
        }
    }
}

fn done_record(op_id: u64, o: &Outcome) -> Record {
    match o {
        Outcome::Ok(p) => Record {
            op_id,
            done: true,
            payload: p.clone(),
            ..Default::default()
        },
        Outcome::Err { code, message } => Record {
            op_id,
            done: true,
            code: *code,
            message: message.clone(),
            ..Default::default()
        },
    }
}

/// One session's journal.
pub struct Journal {
    state: Mutex<State>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").finish_non_exhaustive()
    }
}

impl Journal {
    /// Opens (replaying) or creates the journal at `path`, keeping at most
    /// `max_bytes` of results.
    pub fn open(path: &Path, max_bytes: u64) -> std::io::Result<Journal> {
        let mut ops = HashMap::new();
        let mut done_order = VecDeque::new();
        let mut file_bytes = 0;
        if let Ok(mut f) = fs::File::open(path) {
            let mut buf = Vec::new();
            f.read_to_end(&mut buf)?;
            file_bytes = buf.len() as u64;
            let mut rest = buf.as_slice();
            while !rest.is_empty() {
                let Ok(r) = Record::decode_length_delimited(&mut rest) else {
                    tracing::warn!(path = %path.display(), "journal ends in a torn record; ignoring it");
                    break;
                };
                if r.done {
                    let o = if r.code == 0 {
                        Outcome::Ok(r.payload)
                    } else {
                        Outcome::Err {
                            code: r.code,
                            message: r.message,
                        }
                    };
                    ops.insert(r.op_id, Slot::Done(o));
                    done_order.push_back(r.op_id);
                } else {
                    let aborted = Outcome::Err {
                        code: tonic::Code::Aborted as i32,
                        message: format!(
                            "op {} ({}) was interrupted by an edge restart",
                            r.op_id, r.method
                        ),
                    };
                    ops.insert(r.op_id, Slot::Done(aborted));
                }
            }
        }
        let file = std::os::unix::fs::OpenOptionsExt::mode(&mut fs::OpenOptions::new(), 0o600)
            .create(true)
            .append(true)
            .open(path)?;
        let done_bytes = done_order
            .iter()
            .filter_map(|id| match ops.get(id) {
                Some(Slot::Done(o)) => Some(outcome_bytes(o)),
                _ => None,
            })
            .sum();
        let mut st = State {
            ops,
            done_order,
            file: Some(file),
            admitting: true,
            path: path.to_path_buf(),
            max_bytes,
            done_bytes,
            file_bytes,
        };
        st.evict();
        st.maybe_compact();
        Ok(Journal {
            state: Mutex::new(st),
        })
    }

    fn append(st: &mut State, r: &Record) {
        let Some(file) = st.file.as_mut() else {
            return;
        };
        let buf = r.encode_length_delimited_to_vec();
        match file.write_all(&buf) {
            Ok(()) => st.file_bytes += buf.len() as u64,
            Err(e) => tracing::error!(error = %e, "journal write failed"),
        }
    }

    /// No new op may begin from now on (ops already known still answer).
    pub fn hold_new(&self) {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admitting = false;
    }

    /// New ops may begin again.
    pub fn admit_new(&self) {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admitting = true;
    }

    /// Forgets everything and closes the file: the session is gone from
    /// this edge. Waiters of running ops see them abandoned.
    pub fn close(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.file = None;
        st.ops.clear();
        st.done_order.clear();
        st.admitting = false;
    }

    /// Registers op `op_id` as running, or returns the existing one.
    pub fn begin(&self, op_id: u64, method: &str) -> Begin {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match st.ops.get(&op_id) {
            Some(Slot::Running(rx)) => Begin::Existing(Waiter::Running(rx.clone())),
            Some(Slot::Done(o)) => Begin::Existing(Waiter::Done(o.clone())),
            None if !st.admitting => Begin::Held,
            None => {
                let (tx, rx) = watch::channel(None);
                st.ops.insert(op_id, Slot::Running(rx));
                Self::append(
                    &mut st,
                    &Record {
                        op_id,
                        method: method.to_string(),
                        ..Default::default()
                    },
                );
                Begin::New(tx)
            }
        }
    }

    /// Records how op `op_id` ended and wakes its waiters.
    pub fn finish(&self, op_id: u64, tx: watch::Sender<Option<Outcome>>, outcome: Outcome) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Self::append(&mut st, &done_record(op_id, &outcome));
        st.done_bytes += outcome_bytes(&outcome);
        st.ops.insert(op_id, Slot::Done(outcome.clone()));
        st.done_order.push_back(op_id);
        st.evict();
        st.maybe_compact();
        let _ = tx.send(Some(outcome));
    }

    /// A waiter for op `op_id`, if the journal knows it.
    pub fn waiter(&self, op_id: u64) -> Option<Waiter> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match st.ops.get(&op_id)? {
            Slot::Running(rx) => Some(Waiter::Running(rx.clone())),
            Slot::Done(o) => Some(Waiter::Done(o.clone())),
        }
    }

    /// Whether an op is running.
    pub fn has_running(&self) -> bool {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.ops.values().any(|s| matches!(s, Slot::Running(_)))
    }

    /// Every finished op, oldest first (what moves with a session).
    pub fn done_ops(&self) -> Vec<(u64, Outcome)> {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.done_order
            .iter()
            .filter_map(|id| match st.ops.get(id) {
                Some(Slot::Done(o)) => Some((*id, o.clone())),
                _ => None,
            })
            .collect()
    }

    /// Records an op that finished on another edge.
    pub fn import(&self, op_id: u64, outcome: Outcome) {
        if self
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ops
            .contains_key(&op_id)
        {
            return;
        }
        let (tx, _rx) = watch::channel(None);
        self.finish(op_id, tx, outcome);
    }

    /// Ops known (running or done).
    pub fn len(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ops
            .len()
    }

    /// Whether no op is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ops_run_once_and_survive_reopen() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ops.log");
        let j = Journal::open(&p, DEFAULT_MAX_BYTES).unwrap();
        let Begin::New(tx) = j.begin(7, "/m") else {
            panic!("new op")
        };
        let Begin::Existing(w) = j.begin(7, "/m") else {
            panic!("second begin attaches")
        };
        j.finish(7, tx, Outcome::Ok(Bytes::from_static(b"r")));
        assert_eq!(w.wait().await, Outcome::Ok(Bytes::from_static(b"r")));
        let Begin::New(_running) = j.begin(8, "/slow") else {
            panic!()
        };
        drop(j);
        let j = Journal::open(&p, DEFAULT_MAX_BYTES).unwrap();
        assert_eq!(
            j.waiter(7).unwrap().wait().await,
            Outcome::Ok(Bytes::from_static(b"r"))
        );
        match j.waiter(8).unwrap().wait().await {
            Outcome::Err { code, .. } => assert_eq!(code, tonic::Code::Aborted as i32),
            o => panic!("{o:?}"),
        }
        assert!(j.waiter(9).is_none());
    }

    #[test]
    fn a_held_journal_admits_no_new_op_but_answers_known_ones() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(&d.path().join("ops.log"), DEFAULT_MAX_BYTES).unwrap();
        let Begin::New(tx) = j.begin(1, "/m") else {
            panic!()
        };
        j.hold_new();
        assert!(matches!(j.begin(2, "/m"), Begin::Held));
        assert!(matches!(j.begin(1, "/m"), Begin::Existing(_)));
        assert!(j.has_running());
        j.finish(1, tx, Outcome::Ok(Bytes::new()));
        assert!(!j.has_running());
        j.admit_new();
        assert!(matches!(j.begin(2, "/m"), Begin::New(_)));
        j.close();
        assert!(j.is_empty());
        assert!(matches!(j.begin(3, "/m"), Begin::Held));
    }

    #[test]
    fn results_are_bounded_in_bytes_and_the_file_is_compacted() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ops.log");
        let budget = 10_000;
        let j = Journal::open(&p, budget).unwrap();
        for id in 0..2000u64 {
            let Begin::New(tx) = j.begin(id, "/m") else {
                panic!()
            };
            j.finish(id, tx, Outcome::Ok(Bytes::from(vec![id as u8; 1000])));
        }
        assert!(j.len() <= 10, "kept {} results", j.len());
        assert!(j.waiter(1999).is_some(), "the newest is kept");
        assert!(j.waiter(0).is_none(), "the oldest went");
        let kept: u64 = j.done_ops().iter().map(|(_, o)| outcome_bytes(o)).sum();
        assert!(kept <= budget);
        let on_disk = std::fs::metadata(&p).unwrap().len();
        assert!(
            on_disk <= 2 * COMPACT_FLOOR,
            "the file is compacted ({on_disk} bytes after 2 MB of results)"
        );
        drop(j);
        let j = Journal::open(&p, budget).unwrap();
        let ops = j.done_ops();
        assert!(ops.len() <= 10 && !ops.is_empty());
        assert_eq!(
            ops.last().unwrap(),
            &(1999, Outcome::Ok(Bytes::from(vec![1999u64 as u8; 1000])))
        );
    }
}
