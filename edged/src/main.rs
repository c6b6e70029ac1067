//! `edged`: serve an edge, print and check configurations, list, close and
//! move sessions, make the fleet's certificates, build app images.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use edged::config::{Config, DEFAULT_TOML};

#[derive(Parser)]
#[command(name = "edged", version, about = "edgeshift edge daemon")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the Edge and Admin services.
    Serve {
        /// Configuration file (see `edged config default`).
        #[arg(long)]
        config: PathBuf,
        /// Close every session on shutdown instead of leaving them for the next start.
        #[arg(long)]
        close_sessions: bool,
    },
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// List the sessions of a running edged (Admin service).
    Sessions {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Close one session of a running edged (Admin service).
    Close {
        /// Session id.
        session: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Move one session of a running edged to a neighbour (Admin service).
    Migrate {
        /// Session id.
        session: String,
        /// Id of the neighbour edge.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Stop and remove every session recorded in the data directory (edged not running).
    Cleanup {
        /// Configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Images for the Docker runtime, without a registry.
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// The fleet's certificates: a CA, and certificates for edges and operators.
    Pki {
        #[command(subcommand)]
        cmd: PkiCmd,
    },
}

#[derive(Subcommand)]
enum PkiCmd {
    /// Create a fleet CA in DIR (ca.pem, and ca.key mode 0600; keep it offline).
    Init {
        /// Directory for the CA (created 0700).
        dir: PathBuf,
    },
    /// Issue a certificate for an edge or an operator, signed by the CA in --ca.
    Issue {
        /// The CA's directory (from `pki init`).
        #[arg(long)]
        ca: PathBuf,
        /// An edge certificate for this edge id (server and peer client).
        #[arg(
            long,
            conflicts_with = "operator",
            required_unless_present = "operator"
        )]
        edge: Option<String>,
        /// Addresses clients dial the edge by (IP or DNS name, port ignored); repeatable.
        #[arg(long = "addr")]
        addrs: Vec<String>,
        /// An operator certificate (client of the Admin TCP port) for this name.
        #[arg(long)]
        operator: Option<String>,
        /// Where NAME.pem and NAME.key (0600) go [default: the CA's directory].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

/// Where the operator reaches a running edged: its Admin socket, or its
/// Admin TCP port with an operator certificate.
#[derive(clap::Args)]
struct AdminArgs {
    /// The edge's configuration (its Admin socket is taken from there).
    #[arg(long, conflicts_with_all = ["socket", "remote"])]
    config: Option<PathBuf>,
    /// The Admin socket itself [default: /var/lib/edgeshift/admin.sock].
    #[arg(long, conflicts_with = "remote")]
    socket: Option<PathBuf>,
    /// The edge's Admin TCP port (`admin_listen`), `host:port`.
    #[arg(long, requires_all = ["ca", "cert", "key"])]
    remote: Option<String>,
    /// With --remote: the fleet CA's certificate.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// With --remote: the operator's certificate (`edged pki issue --operator`).
    #[arg(long)]
    cert: Option<PathBuf>,
    /// With --remote: the operator's key.
    #[arg(long)]
    key: Option<PathBuf>,
}

impl AdminArgs {
    async fn connect(
        &self,
    ) -> anyhow::Result<edge_proto::v1::admin_client::AdminClient<tonic::transport::Channel>> {
        if let (Some(addr), Some(ca), Some(cert), Some(key)) =
            (&self.remote, &self.ca, &self.cert, &self.key)
        {
            let read =
                |p: &PathBuf| std::fs::read_to_string(p).with_context(|| p.display().to_string());
            return edged::admin::connect_remote(addr, &read(ca)?, &read(cert)?, &read(key)?)
                .await
                .with_context(|| format!("the Admin port {addr}"));
        }
        let path = match (&self.socket, &self.config) {
            (Some(s), _) => s.clone(),
            (None, Some(c)) => edged::admin::socket_path(&Config::load(c)?),
            (None, None) => PathBuf::from("/var/lib/edgeshift").join(edged::admin::SOCKET_NAME),
        };
        edged::admin::connect(&path).await.with_context(|| {
            format!(
                "the Admin socket {} (is edged running? are you root?)",
                path.display()
            )
        })
    }
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Print a commented default configuration.
    Default,
    /// Check a configuration file.
    Check {
        /// The file.
        path: PathBuf,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Build a FROM-scratch image holding BINARY (and its shared libraries) as entrypoint.
    Build {
        /// The app binary.
        #[arg(long)]
        binary: PathBuf,
        /// Image tag, e.g. edgeshift/list-app:latest.
        #[arg(long)]
        tag: String,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "edged=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(run(Cli::parse())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edged: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// SIGTERM or SIGINT. The handlers are installed when this is called, not
/// when the future is first polled: a signal that arrives during recovery
/// still ends the server cleanly once it runs.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Serve {
            config,
            close_sessions,
        } => {
            let cfg = Config::load(&config)?;
            // The certificates are checked as `config check` does: an edge
            // never serves under another's name.
            for note in edged::tls::check(&cfg).map_err(anyhow::Error::msg)? {
                tracing::info!("{note}");
            }
            let shutdown = shutdown_signal()?;
            let listener = tokio::net::TcpListener::bind(cfg.listen)
                .await
                .with_context(|| format!("listen on {}", cfg.listen))?;
            let admin_path = edged::admin::socket_path(&cfg);
            let admin = edged::admin::bind(&admin_path)
                .with_context(|| format!("admin socket {}", admin_path.display()))?;
            let admin_tcp = match cfg.admin_listen {
                Some(a) => Some(
                    tokio::net::TcpListener::bind(a)
                        .await
                        .with_context(|| format!("admin_listen {a}"))?,
                ),
                None => None,
            };
            let edge = edged::session::Edge::new(cfg)?;
            let (recovered, removed) = edge.recover().await;
            tracing::info!(edge = %edge.cfg.edge_id, addr = %listener.local_addr()?, recovered, removed, "serving");
            edged::server::run(edge.clone(), listener, admin, admin_tcp, shutdown).await?;
            if close_sessions {
                edge.close_all().await;
            }
            tracing::info!("stopped");
            Ok(())
        }
        Cmd::Config {
            cmd: ConfigCmd::Default,
        } => {
            print!("{DEFAULT_TOML}");
            Ok(())
        }
        Cmd::Config {
            cmd: ConfigCmd::Check { path },
        } => {
            let c = Config::load(&path)?;
            let notes = edged::tls::check(&c).map_err(anyhow::Error::msg)?;
            for n in notes {
                println!("{n}");
            }
            let process_apps = c
                .apps
                .values()
                .any(|a| matches!(a.runtime, edged::config::RuntimeConfig::Process { .. }));
            if process_apps {
                match edged::runtime::cgroup::Cgroups::detect() {
                    edged::runtime::cgroup::Cgroups::Unavailable(why) => println!(
                        "WARNING: the memory, pids and CPU limits of process-runtime apps cannot be applied: {why}"
                    ),
                    c => println!("process-runtime limits through {c:?}"),
                }
            }
            println!("ok: edge {} with {} apps", c.edge_id, c.apps.len());
            Ok(())
        }
        Cmd::Sessions { admin } => {
            let mut c = admin.connect().await?;
            let r = c
                .list_sessions(edge_proto::v1::ListSessionsRequest {})
                .await?
                .into_inner();
            println!("edge {}: {} sessions", r.edge_id, r.sessions.len());
            println!(
                "{:<34} {:<10} {:<16} {:<9} {:>12} {:>10} {:>6}  instance",
                "session", "app", "client", "state", "volume", "dirty", "ops"
            );
            for s in r.sessions {
                println!(
                    "{:<34} {:<10} {:<16} {:<9} {:>12} {:>10} {:>6}  {}",
                    s.session_id,
                    s.app,
                    s.client_id,
                    s.state,
                    s.volume_bytes,
                    s.dirty_bytes,
                    s.ops,
                    s.container_id
                );
            }
            Ok(())
        }
        Cmd::Close { session, admin } => {
            let mut c = admin.connect().await?;
            c.close_session(edge_proto::v1::AdminCloseSessionRequest {
                session_id: session,
            })
            .await?;
            println!("closed");
            Ok(())
        }
        Cmd::Migrate { session, to, admin } => {
            let mut c = admin.connect().await?;
            let mut stream = c
                .migrate(edge_proto::v1::MigrateRequest {
                    session_id: session,
                    to_edge: to.clone(),
                })
                .await?
                .into_inner();
            // On a terminal one line is rewritten in place; otherwise one line per event.
            let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
            let mut last = None;
            while let Some(p) = stream.message().await? {
                let throttle = match p.throttle_bytes_per_sec {
                    0 => String::new(),
                    t => format!("  app writes held to {}/s", human_bytes(t)),
                };
                let line = format!(
                    "{:<9} round {:>2}  {:>10} in  {:>10} left  downtime {:>8.1} ms{throttle}",
                    edge_proto::phase_name(p.phase()),
                    p.round,
                    human_bytes(p.bytes_received),
                    human_bytes(p.remaining_bytes),
                    p.downtime_micros as f64 / 1e3
                );
                if tty {
                    print!("\r\x1b[2K{line}");
                    std::io::Write::flush(&mut std::io::stdout())?;
                } else {
                    println!("{line}");
                }
                last = Some(p);
            }
            if tty {
                println!();
            }
            match last {
                Some(p) if p.phase() == edge_proto::v1::HandoverPhase::Ready => {
                    println!(
                        "moved to {to}: {} bytes at handover, downtime {:.1} ms",
                        p.bytes_received,
                        p.downtime_micros as f64 / 1e3
                    );
                    Ok(())
                }
                _ => anyhow::bail!("the move to {to} ended before the new edge served the session"),
            }
        }
        Cmd::Cleanup { config } => {
            let cfg = Config::load(&config)?;
            let n = edged::session::cleanup_all(&cfg).await;
            println!("removed {n} sessions");
            Ok(())
        }
        Cmd::Pki {
            cmd: PkiCmd::Init { dir },
        } => {
            edged::pki::Ca::generate()?.save(&dir)?;
            println!(
                "fleet CA in {}: give {} to edges and clients; keep {} offline",
                dir.display(),
                dir.join(edged::pki::CA_CERT).display(),
                dir.join(edged::pki::CA_KEY).display()
            );
            Ok(())
        }
        Cmd::Pki {
            cmd:
                PkiCmd::Issue {
                    ca,
                    edge,
                    addrs,
                    operator,
                    out,
                    days,
                },
        } => {
            let authority = edged::pki::Ca::load(&ca)?;
            let out = out.unwrap_or_else(|| ca.clone());
            let (issued, name) = match (edge, operator) {
                (Some(id), _) => (authority.issue_edge(&id, &addrs, days)?, id),
                (None, Some(name)) => (authority.issue_operator(&name, days)?, name),
                (None, None) => anyhow::bail!("name --edge ID or --operator NAME"),
            };
            let (cert, key) = issued.save(&out, &name)?;
            println!(
                "[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}",
                std::path::absolute(ca.join(edged::pki::CA_CERT))?,
                std::path::absolute(cert)?,
                std::path::absolute(key)?
            );
            Ok(())
        }
        Cmd::Image {
            cmd: ImageCmd::Build { binary, tag },
        } => {
            let d = edged::runtime::docker::connect().await?;
            let id = edged::runtime::image::build(&d, &binary, &tag).await?;
            println!("{tag} {id}");
            Ok(())
        }
    }
}

/// `n` bytes for a person: B, KiB, MiB or GiB with one decimal.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
