//! What a client sees of a move, measured: calls every 5 ms and the
//! longest time none completed (the gap), beside what the edges report;
//! and a case's moves summed up for a table line.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What one move measured.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub gap: Duration,
    pub downtime: Duration,
    pub total: Duration,
    pub bytes: u64,
    /// Bytes of the final round (edgeshift) or of pass 2 (rsync).
    pub last: u64,
    /// Highest throttle of the app's writes, bytes/s.
    pub throttle: u64,
    pub rounds: u32,
}

/// Completion times of the client's calls.
pub type Done = Arc<Mutex<Vec<Instant>>>;

/// The longest time without a completed call from `from` until `until`.
pub fn gap(done: &[Instant], from: Instant, until: Instant) -> Duration {
    let mut prev: Option<Instant> = done.iter().rev().find(|t| **t <= from).copied();
    let mut worst = Duration::ZERO;
    for &t in done.iter().filter(|t| **t > from && **t <= until) {
        if let Some(p) = prev {
            worst = worst.max(t - p);
        }
        prev = Some(t);
    }
    worst
}

/// Calls `call` every 5 ms until `stop`, recording when each one succeeded.
pub fn prober<F, Fut>(call: F, stop: Arc<AtomicBool>) -> (Done, tokio::task::JoinHandle<()>)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let done: Done = Arc::default();
    let d = done.clone();
    let task = tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            if call().await {
                d.lock().unwrap().push(Instant::now());
                tokio::time::sleep(Duration::from_millis(5)).await;
            } else {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    });
    (done, task)
}

/// A case's moves in a line of the table.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub gap_p50: f64,
    pub gap_max: f64,
    pub down_p50: f64,
    pub down_max: f64,
    pub total_p50: f64,
    pub bytes_p50: u64,
    pub last_max: u64,
    pub throttle: u64,
}

impl Summary {
    pub fn of(outs: &[Outcome]) -> Summary {
        let med = |f: &dyn Fn(&Outcome) -> f64| {
            let mut v: Vec<f64> = outs.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).copied().unwrap_or(0.0)
        };
        let max = |f: &dyn Fn(&Outcome) -> f64| outs.iter().map(f).fold(0.0, f64::max);
        Summary {
            gap_p50: med(&|o| ms(o.gap)),
            gap_max: max(&|o| ms(o.gap)),
            down_p50: med(&|o| ms(o.downtime)),
            down_max: max(&|o| ms(o.downtime)),
            total_p50: med(&|o| ms(o.total)),
            bytes_p50: med(&|o| o.bytes as f64) as u64,
            last_max: outs.iter().map(|o| o.last).max().unwrap_or(0),
            throttle: outs.iter().map(|o| o.throttle).max().unwrap_or(0),
        }
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
