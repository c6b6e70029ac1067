//! TLS on an edge's ports, from the fleet's certificates (see [`crate::pki`]).
//!
//! - The Edge/Peer port: server-authenticated TLS for clients; a caller
//!   that presents a certificate must present one of the fleet CA (else the
//!   handshake fails), and the Peer service serves only callers whose
//!   certificate names a fleet edge ([`caller`]).
//! - The optional Admin TCP port: mutual TLS, operator certificates only.
//! - Dialing a peer ([`crate::peers`]): mutual TLS with the server name
//!   `ID.edge.edgeshift`, so the handshake proves the peer's id before any
//!   request goes out.

use std::path::Path;

use rustls_pki_types::{ServerName, UnixTime};
use tonic::transport::{Certificate, ClientTlsConfig, Identity as TlsIdentity, ServerTlsConfig};

use crate::config::{Config, TlsConfig};
use crate::pki::{self, Identity, PkiError};

/// A handshake that does not finish in this time is dropped.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The CA, certificate and key an edge serves and dials with.
#[derive(Clone)]
pub struct Material {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Material { .. }")
    }
}

impl Material {
    /// Reads the files a `[tls]` table names.
    pub fn load(t: &TlsConfig) -> Result<Material, PkiError> {
        Ok(Material {
            ca_pem: pki::read(&t.ca)?,
            cert_pem: pki::read(&t.cert)?,
            key_pem: pki::read(&t.key)?,
        })
    }

    fn identity(&self) -> TlsIdentity {
        TlsIdentity::from_pem(&self.cert_pem, &self.key_pem)
    }

    fn ca(&self) -> Certificate {
        Certificate::from_pem(&self.ca_pem)
    }

    /// The Edge/Peer port: clients need no certificate; one presented must
    /// be the fleet's.
    pub fn edge_port(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .timeout(HANDSHAKE_TIMEOUT)
            .identity(self.identity())
            .client_ca_root(self.ca())
            .client_auth_optional(true)
    }

    /// The Admin TCP port: a fleet certificate is required.
    pub fn admin_port(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .timeout(HANDSHAKE_TIMEOUT)
            .identity(self.identity())
            .client_ca_root(self.ca())
            .client_auth_optional(false)
    }

    /// Dialing the peer `id`: our certificate, the fleet CA, and the peer's
    /// edge name as the server name to verify.
    pub fn dial_peer(&self, id: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca())
            .identity(self.identity())
            .domain_name(pki::edge_name(id))
    }
}

/// Who called, by the certificate the handshake verified; None without TLS
/// or without a client certificate.
pub fn caller<T>(req: &tonic::Request<T>) -> Option<Identity> {
    let certs = req.peer_certs()?;
    pki::identity_of(certs.first()?)
}

/// What `edged config check` verifies of the `[tls]` files: that they
/// exist and parse, the key is private (no group or other access), the
/// certificate was issued by the CA for this edge's id, names the
/// advertised address, is valid now, and belongs to the key. Returns
/// notes for the operator.
pub fn check(cfg: &Config) -> Result<Vec<String>, String> {
    let Some(t) = &cfg.tls else {
        return Ok(vec![
            "insecure_plaintext: nothing is encrypted or authenticated".into(),
        ]);
    };
    let mut notes = Vec::new();
    let m = Material::load(t).map_err(|e| e.to_string())?;
    let mode = file_mode(&t.key)?;
    if mode & 0o077 != 0 {
        return Err(format!(
            "tls.key {}: mode {mode:o} lets others read the key; chmod 600 it",
            t.key.display()
        ));
    }
    let ca = pki::certs_of(&m.ca_pem, "tls.ca").map_err(|e| e.to_string())?;
    let chain = pki::certs_of(&m.cert_pem, "tls.cert").map_err(|e| e.to_string())?;
    let anchors = ca
        .iter()
        .map(|c| {
            webpki::anchor_from_trusted_cert(c)
                .map(|a| a.to_owned())
                .map_err(|e| format!("tls.ca {}: {e:?}", t.ca.display()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let leaf = webpki::EndEntityCert::try_from(&chain[0])
        .map_err(|e| format!("tls.cert {}: {e:?}", t.cert.display()))?;
    let algs = &[
        webpki::ring::ECDSA_P256_SHA256,
        webpki::ring::ECDSA_P384_SHA384,
        webpki::ring::ED25519,
    ];
    for usage in [
        webpki::KeyUsage::server_auth(),
        webpki::KeyUsage::client_auth(),
    ] {
        leaf.verify_for_usage(
            algs,
            &anchors,
            &chain[1..],
            UnixTime::now(),
            usage,
            None,
            None,
        )
        .map_err(|e| {
            format!(
                "tls.cert {}: not a valid edge certificate of the CA {} ({e:?})",
                t.cert.display(),
                t.ca.display()
            )
        })?;
    }
    match pki::identity_of(&chain[0]) {
        Some(Identity::Edge(id)) if id == cfg.edge_id => {}
        other => {
            return Err(format!(
                "tls.cert {} is issued for {other:?}, not edge {:?} (edged pki issue --edge {})",
                t.cert.display(),
                cfg.edge_id,
                cfg.edge_id
            ));
        }
    }
    let adv = cfg.advertised();
    let host = host_of(&adv);
    match ServerName::try_from(host.to_string()) {
        Ok(name) if leaf.verify_is_valid_for_subject_name(&name).is_ok() => {}
        _ => notes.push(format!(
            "tls.cert does not name {host} (the advertised address): clients that dial it will refuse it"
        )),
    }
    // The key belongs to the certificate: rustls checks that when it
    // builds the server's configuration.
    tonic::transport::Server::builder()
        .tls_config(m.edge_port())
        .map_err(|e| {
            format!(
                "tls.key {} does not fit tls.cert {}: {e}",
                t.key.display(),
                t.cert.display()
            )
        })?;
    notes.push(format!(
        "tls: edge {} certified by {}",
        cfg.edge_id,
        t.ca.display()
    ));
    Ok(notes)
}

fn file_mode(p: &Path) -> Result<u32, String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.permissions().mode() & 0o777)
        .map_err(|e| format!("{}: {e}", p.display()))
}

/// The host of `host:port`, `[v6]:port` or `host`.
pub fn host_of(addr: &str) -> &str {
    let a = addr
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    if let Some(rest) = a.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match a.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => a,
    }
}
