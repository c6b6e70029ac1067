//! A TCP relay between a client and an edge that can slow, cut or tamper
//! with the link.

use std::net::SocketAddr;
use std::time::Duration;

/// A TCP relay on 127.0.0.1 to a target, for faults: on every connection
/// it can flip one byte of what the target sends, or cut the connection
/// after some bytes from the target.
#[derive(Debug)]
pub struct Relay {
    /// Where to connect instead of the target.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

/// What a [`Relay`] does to the bytes coming back from the target.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// Flip the byte at this offset of a connection's return stream (once,
    /// on the first connection that gets that far).
    pub corrupt_at: Option<u64>,
    /// Close each connection after this many bytes came back.
    pub cut_after: Option<u64>,
    /// Wait this long after every chunk (up to 16 KiB) that comes back: a slow link.
    pub throttle: Option<Duration>,
}

impl Relay {
    /// Starts relaying to `target`.
    pub async fn start(target: SocketAddr, faults: Faults) -> Relay {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let corrupted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let corrupted = corrupted.clone();
                let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                let f = faults;
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                });
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16384];
                    let mut seen = 0u64;
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if let Some(at) = f.corrupt_at {
                            if at >= seen
                                && at < seen + n as u64
                                && !corrupted.swap(true, std::sync::atomic::Ordering::SeqCst)
                            {
                                buf[(at - seen) as usize] ^= 0x5a;
                            }
                        }
                        seen += n as u64;
                        if f.cut_after.is_some_and(|c| seen >= c) {
                            break;
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        if let Some(t) = f.throttle {
                            tokio::time::sleep(t).await;
                        }
                    }
                    let _ = cw.shutdown().await;
                });
            }
        });
        Relay { addr, task }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
