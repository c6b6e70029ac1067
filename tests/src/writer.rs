//! A client that writes without pause during moves, and the check that
//! every acknowledged write is there once.

use std::time::{Duration, Instant};

use crate::list;

/// Random letters, so the volume does not compress into few distinct blocks.
pub fn noise(i: usize, n: usize) -> String {
    let mut x = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}

/// A client that adds items to a List session without pause, each with its
/// own op id, retrying an op (same id) until it is answered: what it
/// acknowledged must be in the list exactly once; what it gave up on may be
/// there at most once.
#[derive(Debug)]
pub struct Writer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    acked: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<(Vec<String>, Vec<String>)>,
}

impl Writer {
    /// Starts writing items `{prefix}{n}`.
    pub fn start(s: edge_client::Session, prefix: &str) -> Writer {
        Self::start_sized(s, prefix, 0)
    }

    /// Starts writing items `{prefix}{n}` followed by `pad` bytes of noise
    /// (a writer that dirties the volume fast).
    pub fn start_sized(s: edge_client::Session, prefix: &str, pad: usize) -> Writer {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let acked_n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (stop2, prefix, acked2) = (stop.clone(), prefix.to_string(), acked_n.clone());
        let task = tokio::spawn(async move {
            let (mut acked, mut unsure) = (Vec::new(), Vec::new());
            let mut n = 0;
            while !stop2.load(Ordering::SeqCst) {
                let item = match pad {
                    0 => format!("{prefix}{n}"),
                    _ => format!("{prefix}{n}:{}", noise(n, pad)),
                };
                n += 1;
                let op = s.next_op_id();
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    match s.invoke_op(op, list::ADD, list::add(&item)).await {
                        Ok(_) => {
                            acked.push(item);
                            acked2.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                        // The op was cut by an edge restart: it may or may not have run.
                        Err(st) if st.code() == tonic::Code::Aborted => {
                            unsure.push(item);
                            break;
                        }
                        Err(_) if Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(_) => {
                            unsure.push(item);
                            break;
                        }
                    }
                }
            }
            (acked, unsure)
        });
        Writer {
            stop,
            acked: acked_n,
            task,
        }
    }

    /// Waits (up to 30 s) until `n` writes were acknowledged: the writer
    /// runs, whatever else keeps the machine busy.
    pub async fn wait_acked(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.acked.load(std::sync::atomic::Ordering::SeqCst) < n {
            assert!(
                Instant::now() < deadline,
                "the writer had {} of {n} writes acknowledged after 30 s",
                self.acked.load(std::sync::atomic::Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Stops and returns (acknowledged, uncertain) items.
    pub async fn finish(self) -> (Vec<String>, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.task.await.expect("writer task")
    }
}

/// Checks a List's items against a [`Writer`]'s outcome: every acknowledged
/// item exactly once, uncertain ones at most once, nothing else.
pub fn check_items(items: &[String], acked: &[String], unsure: &[String]) {
    let mut count: std::collections::HashMap<&str, usize> = Default::default();
    for i in items {
        *count.entry(i.as_str()).or_default() += 1;
    }
    for a in acked {
        assert_eq!(
            count.get(a.as_str()).copied().unwrap_or(0),
            1,
            "acknowledged item {a:?} must be in the list exactly once"
        );
    }
    for u in unsure {
        assert!(
            count.get(u.as_str()).copied().unwrap_or(0) <= 1,
            "item {u:?} twice"
        );
    }
    let known: std::collections::HashSet<&str> =
        acked.iter().chain(unsure).map(String::as_str).collect();
    for i in items {
        assert!(known.contains(i.as_str()), "item {i:?} was never written");
    }
}
