//! Errors of session handling and their one conversion to gRPC statuses,
//! with codes a client can act on.

use edge_proto::meta;
use tonic::Status;

use crate::migration::Peer;
use crate::migration::owner::Refusal;
use crate::runtime::RuntimeError;
use crate::volume::VolumeError;

/// Errors of session handling; [`EdgeError::status`] maps them to gRPC.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// No such app on this edge.
    #[error("app {0:?} is not served by this edge")]
    UnknownApp(String),
    /// No such session (never opened, closed, or reaped).
    #[error("session {0:?} is not on this edge")]
    UnknownSession(String),
    /// The token does not match the session's.
    #[error("wrong token for session {0:?}")]
    BadToken(String),
    /// A malformed argument.
    #[error("{0}")]
    Invalid(String),
    /// A payload over the configured limit.
    #[error("payload of {0} bytes exceeds the limit of {1}")]
    TooLarge(usize, usize),
    /// A limit on sessions is reached.
    #[error("{0}")]
    Limit(String),
    /// The session moved to another edge (calls go there).
    #[error("session {0:?} moved to edge {id:?}", id = .1.edge_id)]
    Moved(String, Peer),
    /// The session is being handed over and the call waited too long.
    #[error("session {0:?} is moving to another edge")]
    Moving(String),
    /// A handover or release is refused.
    #[error("{0}")]
    Refused(String, Refusal),
    /// The op id is unknown to the journal.
    #[error("op {0} is unknown to session {1:?}")]
    UnknownOp(u64, String),
    /// The volume could not be prepared.
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// The runtime failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The instance started but never answered, or exited.
    #[error("app instance did not become ready: {reason}; last output: {logs}")]
    NotReady {
        /// Why.
        reason: String,
        /// Its last lines of output.
        logs: String,
    },
    /// Local I/O.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl EdgeError {
    /// The gRPC status a client can act on.
    pub fn status(&self) -> Status {
        let m = self.to_string();
        match self {
            EdgeError::UnknownApp(_) | EdgeError::UnknownSession(_) | EdgeError::UnknownOp(..) => {
                Status::not_found(m)
            }
            EdgeError::BadToken(_) => Status::permission_denied(m),
            EdgeError::Moved(_, to) => moved_status(to),
            EdgeError::Moving(_) => moving_status(),
            EdgeError::Refused(_, Refusal::Moving(to)) => {
                let mut st = Status::failed_precondition(m);
                insert_meta(&mut st, meta::MOVED_TO_ID, &to.edge_id);
                st
            }
            EdgeError::Refused(_, Refusal::Moved(to)) => moved_status(to),
            EdgeError::Refused(_, Refusal::NotGiving) => Status::failed_precondition(m),
            EdgeError::Invalid(_) => Status::invalid_argument(m),
            EdgeError::TooLarge(..) | EdgeError::Limit(_) => Status::resource_exhausted(m),
            EdgeError::Volume(_) | EdgeError::Io(_) => Status::internal(m),
            EdgeError::Runtime(_) | EdgeError::NotReady { .. } => Status::unavailable(m),
        }
    }
}

fn insert_meta(st: &mut Status, key: &'static str, v: &str) {
    if v.is_empty() {
        return;
    }
    if let Ok(v) = v.parse::<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>() {
        st.metadata_mut().insert(key, v);
    }
}

/// "Moving", with where to: the client follows at once.
pub fn moved_status(to: &Peer) -> Status {
    let mut st = moving_status();
    insert_meta(&mut st, meta::MOVED_TO_ID, &to.edge_id);
    insert_meta(&mut st, meta::MOVED_TO_ADDR, &to.addr);
    st
}

/// "Moving": the client waits a little and tries again.
pub fn moving_status() -> Status {
    let mut st = Status::unavailable("session is moving to another edge");
    st.metadata_mut().insert(
        meta::MOVING,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    st
}

/// A status for a failure talking to another edge, in plain words: a
/// connection that broke or never opened says that the edge stopped
/// answering, not "h2 protocol error".
pub fn peer_status(what: &str, edge: &str, st: Status) -> Status {
    if edge_proto::lost_connection(&st) {
        Status::unavailable(format!(
            "{what}: edge {edge} stopped answering (the connection was lost or refused)"
        ))
    } else {
        Status::new(st.code(), format!("{what}: {}", st.message()))
    }
}
