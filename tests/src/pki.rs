//! The test fleet's certificates, and clients that trust them.

use std::path::Path;
use std::time::Duration;

/// The fleet CA of this test process: every test edge gets a certificate
/// of it, and clients trust it. Made once, in memory.
pub fn fleet_ca() -> &'static edged::pki::Ca {
    static CA: std::sync::OnceLock<edged::pki::Ca> = std::sync::OnceLock::new();
    CA.get_or_init(|| edged::pki::Ca::generate().expect("a test CA"))
}

/// What a test client trusts: the test fleet's CA.
pub fn trust() -> edge_client::Trust {
    edge_client::Trust::Ca(fleet_ca().cert_pem.clone())
}

/// A client of the edge at `url` (`https://host:port`), trusting the test
/// fleet's CA.
pub async fn connect(url: &str) -> Result<edge_client::EdgeClient, edge_client::ConnectError> {
    edge_client::connect_with(url, &trust()).await
}

/// A raw gRPC channel to `url` (`https://host:port`) trusting the test
/// fleet's CA and presenting `identity` (a certificate and key) if given:
/// for calling a service the way a stranger, an operator or a peer would.
pub async fn channel(
    url: &str,
    identity: Option<&edged::pki::Issued>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&fleet_ca().cert_pem));
    if let Some(i) = identity {
        tls = tls.identity(Identity::from_pem(&i.cert_pem, &i.key_pem));
    }
    Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .tls_config(tls)?
        .connect()
        .await
}

/// Writes a certificate of the test CA for edge `id` (naming `ip`,
/// 127.0.0.1 and localhost, where the tests and the relay dial it) into
/// `dir`; returns the `[tls]` table.
pub fn edge_certs(dir: &Path, id: &str, ip: std::net::IpAddr) -> edged::config::TlsConfig {
    use std::os::unix::fs::PermissionsExt;
    let issued = fleet_ca()
        .issue_edge(
            id,
            &[ip.to_string(), "127.0.0.1".into(), "localhost".into()],
            30,
        )
        .expect("a test edge certificate");
    std::fs::create_dir_all(dir).unwrap();
    let t = edged::config::TlsConfig {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("{id}.pem")),
        key: dir.join(format!("{id}.key")),
    };
    std::fs::write(&t.ca, &fleet_ca().cert_pem).unwrap();
    std::fs::write(&t.cert, &issued.cert_pem).unwrap();
    std::fs::write(&t.key, &issued.key_pem).unwrap();
    std::fs::set_permissions(&t.key, std::fs::Permissions::from_mode(0o600)).unwrap();
    t
}
