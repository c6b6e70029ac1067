//! What the benchmarks share: a shaped link (a TCP relay with a rate and a
//! one-way delay in each direction), incompressible volume contents, and
//! sizes written for people.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A link shape: rate in bits/s and one-way delay.
#[derive(Clone, Copy, Debug)]
pub struct Link {
    pub name: &'static str,
    pub bits_per_sec: f64,
    pub delay: Duration,
}

pub const LINKS: [Link; 2] = [
    Link {
        name: "100Mbit/10ms",
        bits_per_sec: 100e6,
        delay: Duration::from_millis(5),
    },
    Link {
        name: "1Gbit/1ms",
        bits_per_sec: 1e9,
        delay: Duration::from_micros(500),
    },
];

/// One direction of a shaped link: bytes leave at the link's rate and arrive
/// `delay` later.
async fn shape(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    link: Link,
    cut: Arc<AtomicBool>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((at, buf)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if w.write_all(&buf).await.is_err() {
                break;
            }
        }
        let _ = w.shutdown().await;
    });
    let mut next_free = tokio::time::Instant::now();
    let mut buf = vec![0u8; 16384];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if cut.load(Ordering::SeqCst) {
            break;
        }
        let now = tokio::time::Instant::now();
        next_free =
            next_free.max(now) + Duration::from_secs_f64(n as f64 * 8.0 / link.bits_per_sec);
        // Do not let the sender run more than a second ahead of the wire.
        if next_free > now + Duration::from_secs(1) {
            tokio::time::sleep_until(next_free - Duration::from_secs(1)).await;
        }
        if tx
            .send((next_free + link.delay, buf[..n].to_vec()))
            .is_err()
        {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// A shaped TCP relay to `target`; returns its address and a switch that
/// cuts every connection through it.
pub async fn relay(
    target: SocketAddr,
    link: Link,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>, Arc<AtomicBool>)> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let cut = Arc::new(AtomicBool::new(false));
    let cut2 = cut.clone();
    let task = tokio::spawn(async move {
        while let Ok((c, _)) = l.accept().await {
            if cut2.load(Ordering::SeqCst) {
                continue;
            }
            let Ok(s) = tokio::net::TcpStream::connect(target).await else {
                continue;
            };
            let _ = c.set_nodelay(true);
            let _ = s.set_nodelay(true);
            let (cr, cw) = c.into_split();
            let (sr, sw) = s.into_split();
            tokio::spawn(shape(cr, sw, link, cut2.clone()));
            tokio::spawn(shape(sr, cw, link, cut2.clone()));
        }
    });
    Ok((addr, task, cut))
}

/// Deterministic incompressible bytes.
pub fn fill(buf: &mut [u8], seed: u64) {
    // Every seed its own stream (a plain `seed | 1` would give seeds 2k and
    // 2k+1 the same bytes, and volfs would send such blocks once).
    let mut x = (seed.wrapping_add(1)).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for c in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
}

pub fn write_volume(file: &Path, size: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(file)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    let mut i = 0;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        fill(&mut buf[..n], 7 + i);
        f.write_all(&buf[..n])?;
        left -= n as u64;
        i += 1;
    }
    f.sync_all()?;
    Ok(())
}

/// `b` bytes in whole GB, MB, kB or B.
pub fn human(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{} GB", b >> 30),
        b if b >= 1 << 20 => format!("{} MB", b >> 20),
        b if b >= 1 << 10 => format!("{} kB", b >> 10),
        b => format!("{b} B"),
    }
}
