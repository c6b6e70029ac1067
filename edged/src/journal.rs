//! The op journal of a session: every op's status and result by op id, so a
//! retried call is not run twice and `Result` answers after a reconnect.
//!
//! Records are appended to `ops.log` (length-delimited protobuf): one when an
//! op begins and one when it ends. An op that began but never ended (edged
//! died while it ran) is reported as aborted after a restart. The file is
//! not fsynced per op: it survives an edged crash (the page cache does), not
//! a host crash.

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
    /// Opens (replaying) or creates the journal at `path`.
    pub fn open(path: &Path) -> std::io::Result<Journal> {
        let mut ops = HashMap::new();
        let mut done_order = VecDeque::new();
        if let Ok(mut f) = fs::File::open(path) {
            let mut buf = Vec::new();
            f.read_to_end(&mut buf)?;
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
        Ok(Journal {
            state: Mutex::new(State {
                ops,
                done_order,
                file: Some(file),
                admitting: true,
            }),
        })
    }

    fn append(st: &mut State, r: &Record) {
        let Some(file) = st.file.as_mut() else {
            return;
        };
        if let Err(e) = file.write_all(&r.encode_length_delimited_to_vec()) {
            tracing::error!(error = %e, "journal write failed");
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
        let r = match &outcome {
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
        };
        Self::append(&mut st, &r);
        st.ops.insert(op_id, Slot::Done(outcome.clone()));
        st.done_order.push_back(op_id);
        while st.done_order.len() > KEEP_DONE {
            if let Some(old) = st.done_order.pop_front() {
                st.ops.remove(&old);
            }
        }
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
        let j = Journal::open(&p).unwrap();
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
        let j = Journal::open(&p).unwrap();
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
        let j = Journal::open(&d.path().join("ops.log")).unwrap();
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
}
