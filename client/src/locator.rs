//! Which edge is nearest, and following it.
//!
//! A [`FileLocator`] reads the nearest edge's address (`host:port`) from a
//! file; a [`Follower`] watches that file with `notify` (file events, not
//! polling) and hands its session over each time the file names another
//! edge. This is the original framework's shared location file, driven by
//! events. A static deployment needs no locator: call
//! [`Session::handover_to`](crate::Session::handover_to) directly.

use std::path::{Path, PathBuf};

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::{HandoverProgress, Session};

/// The nearest edge, as named in a file.
#[derive(Debug, Clone)]
pub struct FileLocator {
    path: PathBuf,
}

impl FileLocator {
    /// A locator reading `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileLocator { path: path.into() }
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The address the file names now, if it names one.
    pub fn nearest(&self) -> Option<String> {
        let text = std::fs::read_to_string(&self.path).ok()?;
        let addr = text.lines().next()?.trim();
        (!addr.is_empty()).then(|| addr.to_string())
    }
}

/// What a [`Follower`] did.
#[derive(Debug, Clone)]
pub enum FollowEvent {
    /// A handover is under way.
    Progress(HandoverProgress),
    /// The session is now served by this edge address.
    Moved(String),
    /// Moving to this address failed; the session stays where it was.
    Failed(String, String),
}

fn normalize(a: &str) -> &str {
    crate::bare(a).trim_end_matches('/')
}

/// Hands a session over whenever its locator names another edge. Dropping
/// it stops following.
#[derive(Debug)]
pub struct Follower {
    events: mpsc::UnboundedReceiver<FollowEvent>,
    task: tokio::task::JoinHandle<()>,
    _watcher: notify::RecommendedWatcher,
}

impl Follower {
    /// Starts following `locator` for `session`.
    pub fn start(session: Session, locator: FileLocator) -> notify::Result<Follower> {
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let (fs_tx, mut fs_rx) = mpsc::unbounded_channel::<()>();
        let name = locator.path.file_name().map(|n| n.to_os_string());
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                if let Ok(e) = res {
                    if e.paths
                        .iter()
                        .any(|p| p.file_name().map(|n| n.to_os_string()) == name)
                    {
                        let _ = fs_tx.send(());
                    }
                }
            })?;
        // The directory, so an atomic replace (rename over the file) is seen too.
        let dir = locator
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
        let task = tokio::spawn(async move {
            while fs_rx.recv().await.is_some() {
                while fs_rx.try_recv().is_ok() {}
                let Some(to) = locator.nearest() else {
                    continue;
                };
                if normalize(&to) == normalize(&session.edge_addr()) {
                    continue;
                }
                let edge = match crate::connect_with(crate::bare(&to), session.trust()).await {
                    Ok(e) => e,
                    Err(e) => {
                        let _ = ev_tx.send(FollowEvent::Failed(to, e.to_string()));
                        continue;
                    }
                };
                let tx = ev_tx.clone();
                match session
                    .handover_to(&edge, |p| drop(tx.send(FollowEvent::Progress(p.clone()))))
                    .await
                {
                    Ok(()) => drop(ev_tx.send(FollowEvent::Moved(to))),
                    Err(st) => drop(ev_tx.send(FollowEvent::Failed(to, st.message().to_string()))),
                }
            }
        });
        Ok(Follower {
            events: ev_rx,
            task,
            _watcher: watcher,
        })
    }

    /// The next thing the follower did.
    pub async fn next_event(&mut self) -> Option<FollowEvent> {
        self.events.recv().await
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.task.abort();
    }
}
