//! The volume moved the original framework's way: an rsync daemon on the
//! target, `rsync -a --inplace` passes from the source (shared by the
//! benchmarks that compare against it), and the List app run as a plain
//! process the way that method starts it on the target.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use edged::forward::AppClient;

/// The List app as a plain process on `data`, answering on `run/app.sock`
/// (`args`: e.g. `--churn RATE`).
pub fn start_app(data: &Path, run: &Path, args: &[String]) -> anyhow::Result<Child> {
    Command::new(edgeshift_tests::bin("list-app"))
        .args(args)
        .env("EDGE_DATA_DIR", data)
        .env("EDGE_SOCKET_DIR", run)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("list-app")
}

/// Waits (looking every ms, up to 60 s) until the app answers on `socket`.
pub async fn answering(socket: &Path) -> anyhow::Result<AppClient> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if socket.exists() {
            if let Ok(c) = AppClient::connect(socket, 1 << 20).await {
                return Ok(c);
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "the app did not answer");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// rsync daemon serving `dir` as module `vol` on 127.0.0.2.
pub fn daemon(work: &Path, dir: &Path) -> anyhow::Result<(Child, SocketAddr)> {
    let addr = std::net::TcpListener::bind(("127.0.0.2", 0))?.local_addr()?;
    let name = dir
        .file_name()
        .map_or("vol".into(), |n| n.to_string_lossy());
    let conf = work.join(format!("rsyncd-{name}.conf"));
    std::fs::write(
        &conf,
        format!(
            "use chroot = no\n[vol]\npath = {}\nread only = false\nuid = root\ngid = root\n",
            dir.display()
        ),
    )?;
    let child = Command::new("rsync")
        .args([
            "--daemon",
            "--no-detach",
            "--address",
            "127.0.0.2",
            "--port",
            &addr.port().to_string(),
            "--config",
        ])
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("rsync (apt-get install rsync)")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "rsync daemon did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((child, addr))
}

pub fn pass(src: &Path, relay: SocketAddr) -> anyhow::Result<u64> {
    let out = Command::new("rsync")
        .args(["-a", "--inplace", "--stats"])
        .arg(format!("{}/", src.display()))
        .arg(format!("rsync://{}:{}/vol/", relay.ip(), relay.port()))
        .output()?;
    if !out.status.success() {
        bail!("rsync: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("Total bytes sent:"))
        .context("rsync --stats")?;
    Ok(line
        .trim_start_matches("Total bytes sent:")
        .trim()
        .replace(',', "")
        .parse()?)
}
