//! A runtime that runs nothing and records what it was asked, with failures
//! to inject: for unit tests of the handover shells.

use std::sync::Mutex;

use super::{BoxFut, InstanceId, InstanceSpec, Runtime, RuntimeError};

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// `start` of a session's instance.
    Start(String),
    /// `stop`.
    Stop(InstanceId),
    /// `discard` (ended frozen).
    Discard(InstanceId),
    /// `pause` (freeze).
    Pause(InstanceId),
    /// `resume` (thaw).
    Resume(InstanceId),
}

/// Records calls; `fail_pause` makes the next pause fail.
#[derive(Debug, Default)]
pub struct FakeRuntime {
    /// Every call, in order.
    pub calls: Mutex<Vec<Call>>,
    /// Fail every pause.
    pub fail_pause: std::sync::atomic::AtomicBool,
}

impl FakeRuntime {
    /// The calls so far.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    fn record(&self, c: Call) {
        self.calls.lock().unwrap().push(c);
    }
}

impl Runtime for FakeRuntime {
    fn start<'a>(&'a self, spec: &'a InstanceSpec) -> BoxFut<'a, Result<InstanceId, RuntimeError>> {
        Box::pin(async move {
            self.record(Call::Start(spec.session_id.clone()));
            Ok(InstanceId::Pid(4242))
        })
    }

    fn stop<'a>(&'a self, id: &'a InstanceId) -> BoxFut<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            self.record(Call::Stop(id.clone()));
            Ok(())
        })
    }

    fn discard<'a>(&'a self, id: &'a InstanceId) -> BoxFut<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            self.record(Call::Discard(id.clone()));
            Ok(())
        })
    }

    fn alive<'a>(&'a self, _id: &'a InstanceId) -> BoxFut<'a, bool> {
        Box::pin(async move { true })
    }

    fn pause<'a>(&'a self, id: &'a InstanceId) -> BoxFut<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            // Take a moment, so a concurrent thaw would overtake an unguarded freeze.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            if self.fail_pause.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(RuntimeError::Process("injected pause failure".into()));
            }
            self.record(Call::Pause(id.clone()));
            Ok(())
        })
    }

    fn resume<'a>(&'a self, id: &'a InstanceId) -> BoxFut<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            self.record(Call::Resume(id.clone()));
            Ok(())
        })
    }

    fn data_in_instance<'a>(
        &'a self,
        _id: &'a InstanceId,
    ) -> BoxFut<'a, Result<Option<std::path::PathBuf>, RuntimeError>> {
        Box::pin(async { Ok(None) })
    }

    fn logs<'a>(
        &'a self,
        _id: &'a InstanceId,
        _spec: &'a InstanceSpec,
        _n: usize,
    ) -> BoxFut<'a, Vec<String>> {
        Box::pin(async move { Vec::new() })
    }
}
