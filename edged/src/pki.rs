//! The fleet's certificates: a CA the fleet's operator keeps, and the
//! certificates it issues to edges and operators (`edged pki init|issue`).
//!
//! Who a certificate names is carried in one DNS subject-alternative name:
//!
//! - an edge: `ID.edge.edgeshift` (plus the addresses clients dial it by,
//!   as IP or DNS names); usable as a TLS server and as a TLS client;
//! - an operator: `NAME.operator.edgeshift`; a TLS client only.
//!
//! An edge dials a peer with the server name `ID.edge.edgeshift`, so the
//! handshake itself proves the peer is that edge; a server reads the calling
//! edge's id off its verified certificate (see [`crate::tls`]). Ids are DNS
//! labels for that reason: lowercase letters, digits and `-`.
//!
//! Keys are ECDSA P-256, written mode 0600. The CA is self-signed and valid
//! for ten years; issued certificates for `days` (default 365).

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// The DNS suffix of edge identities.
pub const EDGE_SUFFIX: &str = edge_proto::EDGE_TLS_SUFFIX;
/// The DNS suffix of operator identities.
pub const OPERATOR_SUFFIX: &str = ".operator.edgeshift";
/// File names in a CA directory.
pub const CA_CERT: &str = "ca.pem";
/// The CA's private key (0600).
pub const CA_KEY: &str = "ca.key";

/// Errors of making or reading certificates.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file cannot be read or written.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// Certificate generation or parsing failed.
    #[error("{0}: {1}")]
    Cert(String, String),
    /// A name or argument is unusable.
    #[error("{0}")]
    Invalid(String),
}

/// Whether `s` can be an edge or operator id in a certificate: a DNS label
/// of lowercase letters, digits and `-` (not first or last), 1-63 long.
pub fn valid_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The DNS name an edge's certificate is issued for.
pub fn edge_name(id: &str) -> String {
    edge_proto::edge_tls_name(id)
}

/// Who a verified certificate names (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A fleet edge, by id.
    Edge(String),
    /// An operator, by name.
    Operator(String),
}

/// Reads the identity off a certificate the TLS handshake verified against
/// the fleet CA: the one `*.edge.edgeshift` or `*.operator.edgeshift` name
/// among its DNS names. None for a certificate naming none, or more than
/// one (the project's CA never issues such).
pub fn identity_of(der: &rustls_pki_types::CertificateDer<'_>) -> Option<Identity> {
    let cert = webpki::EndEntityCert::try_from(der).ok()?;
    let mut found = None;
    for name in cert.valid_dns_names() {
        let name = name.to_ascii_lowercase();
        let id = if let Some(id) = name.strip_suffix(EDGE_SUFFIX) {
            Identity::Edge(id.to_string())
        } else if let Some(id) = name.strip_suffix(OPERATOR_SUFFIX) {
            Identity::Operator(id.to_string())
        } else {
            continue;
        };
        let (Identity::Edge(label) | Identity::Operator(label)) = &id;
        if !valid_label(label) || found.is_some() {
            return None;
        }
        found = Some(id);
    }
    found
}

/// A fleet CA: its certificate and key.
#[derive(Debug)]
pub struct Ca {
    /// The CA certificate, PEM (what edges and clients trust).
    pub cert_pem: String,
    key: KeyPair,
}

/// A certificate and its key, PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

/// The CA's subject. Constant: a certificate names its issuer by subject,
/// so issuing from a stored CA needs no parser; fleets are told apart by
/// their keys (a certificate of another fleet's CA fails its signature).
fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "edgeshift");
    dn.push(DnType::CommonName, "edgeshift fleet CA");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

fn validity(p: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    // A little slack for clocks that differ between hosts.
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(i64::from(days));
}

fn err(what: &str) -> impl FnOnce(rcgen::Error) -> PkiError + '_ {
    move |e| PkiError::Cert(what.to_string(), e.to_string())
}

impl Ca {
    /// A new CA.
    pub fn generate() -> Result<Ca, PkiError> {
        let key = KeyPair::generate().map_err(err("CA key"))?;
        let mut p = ca_params();
        validity(&mut p, 3650);
        let cert = p.self_signed(&key).map_err(err("CA certificate"))?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key,
        })
    }

    /// Loads the CA kept in `dir` (`ca.pem`, `ca.key`).
    pub fn load(dir: &Path) -> Result<Ca, PkiError> {
        let cert_pem = read(&dir.join(CA_CERT))?;
        let key_path = dir.join(CA_KEY);
        let key =
            KeyPair::from_pem(&read(&key_path)?).map_err(err(&key_path.display().to_string()))?;
        Ok(Ca { cert_pem, key })
    }

    /// Writes the CA into `dir` (created 0700), refusing to overwrite one.
    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io(dir))?;
        }
        write_new(&dir.join(CA_KEY), &self.key.serialize_pem(), 0o600)?;
        write_new(&dir.join(CA_CERT), &self.cert_pem, 0o644)
    }

    fn issue(&self, mut p: CertificateParams, days: u32) -> Result<Issued, PkiError> {
        validity(&mut p, days);
        p.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(err("key"))?;
        let issuer = Issuer::new(ca_params(), &self.key);
        let cert = p.signed_by(&key, &issuer).map_err(err("certificate"))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// An edge certificate: identity `id`, reachable at `addrs` (IP
    /// addresses or DNS names clients dial; ports are dropped).
    pub fn issue_edge(&self, id: &str, addrs: &[String], days: u32) -> Result<Issued, PkiError> {
        if !valid_label(id) {
            return Err(PkiError::Invalid(format!(
                "edge id {id:?}: a certificate names a DNS label (1-63 of a-z, 0-9, '-')"
            )));
        }
        let mut sans = vec![san_dns(&edge_name(id))?];
        for a in addrs {
            sans.push(san_addr(a)?);
        }
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, id);
        p.subject_alt_names = sans;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.issue(p, days)
    }

    /// An operator certificate (a TLS client of the Admin service only).
    pub fn issue_operator(&self, name: &str, days: u32) -> Result<Issued, PkiError> {
        if !valid_label(name) {
            return Err(PkiError::Invalid(format!(
                "operator name {name:?}: use 1-63 of a-z, 0-9, '-'"
            )));
        }
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, name);
        p.subject_alt_names = vec![san_dns(&format!("{name}{OPERATOR_SUFFIX}"))?];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(p, days)
    }
}

fn san_dns(name: &str) -> Result<SanType, PkiError> {
    Ok(SanType::DnsName(name.try_into().map_err(|e| {
        PkiError::Invalid(format!("{name:?} is not a DNS name: {e}"))
    })?))
}

/// `host`, `host:port`, `[v6]:port` or an IP: the host part as a SAN.
fn san_addr(a: &str) -> Result<SanType, PkiError> {
    let a = a
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    if let Ok(ip) = a.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    if let Ok(sa) = a.parse::<std::net::SocketAddr>() {
        return Ok(SanType::IpAddress(sa.ip()));
    }
    let host = a.rsplit_once(':').map_or(a, |(h, _)| h);
    // An address never names an identity (nor all of them).
    let lower = host.to_ascii_lowercase();
    if lower.contains('*') || lower.trim_end_matches('.').ends_with(".edgeshift") {
        return Err(PkiError::Invalid(format!(
            "address {host:?}: wildcards and *.edgeshift names are not addresses"
        )));
    }
    san_dns(host)
}

impl Issued {
    /// Writes `NAME.pem` and `NAME.key` (0600) into `dir`, refusing to
    /// overwrite. Returns their paths.
    pub fn save(&self, dir: &Path, name: &str) -> Result<(PathBuf, PathBuf), PkiError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let (cert, key) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        write_new(&key, &self.key_pem, 0o600)?;
        write_new(&cert, &self.cert_pem, 0o644)?;
        Ok((cert, key))
    }
}

fn io(p: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |e| PkiError::Io(p.display().to_string(), e)
}

/// Reads a PEM file.
pub fn read(p: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(p).map_err(io(p))
}

/// Creates `p` with `mode`; an existing file is an error (keys are not
/// overwritten by accident).
fn write_new(p: &Path, text: &str, mode: u32) -> Result<(), PkiError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(p)
        .map_err(io(p))?;
    f.write_all(text.as_bytes()).map_err(io(p))?;
    f.sync_all().map_err(io(p))
}

/// Parses the certificates of a PEM text.
pub fn certs_of(
    pem: &str,
    what: &str,
) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, PkiError> {
    use rustls_pki_types::pem::PemObject;
    let certs = rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Cert(what.into(), e.to_string()))?;
    if certs.is_empty() {
        return Err(PkiError::Cert(what.into(), "no certificate in it".into()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_carry_their_identity() {
        let ca = Ca::generate().unwrap();
        let e = ca
            .issue_edge(
                "edge-a",
                &["127.0.0.1:7000".into(), "edge.example".into()],
                1,
            )
            .unwrap();
        let der = &certs_of(&e.cert_pem, "edge").unwrap()[0];
        assert_eq!(identity_of(der), Some(Identity::Edge("edge-a".into())));
        let o = ca.issue_operator("alice", 1).unwrap();
        let der = &certs_of(&o.cert_pem, "op").unwrap()[0];
        assert_eq!(identity_of(der), Some(Identity::Operator("alice".into())));
        // The CA's own certificate names nobody.
        let der = &certs_of(&ca.cert_pem, "ca").unwrap()[0];
        assert_eq!(identity_of(der), None);
    }

    #[test]
    fn names_that_are_not_labels_are_refused() {
        let ca = Ca::generate().unwrap();
        for bad in ["Edge", "a.b", "-a", "a_b", ""] {
            assert!(ca.issue_edge(bad, &[], 1).is_err(), "{bad}");
        }
        assert!(ca.issue_operator("x y", 1).is_err());
        for bad in [
            "*.edge.edgeshift",
            "b.edge.edgeshift",
            "x.operator.edgeshift:1",
            "*.example.net",
        ] {
            assert!(ca.issue_edge("a", &[bad.into()], 1).is_err(), "{bad}");
        }
    }

    #[test]
    fn saved_keys_are_private_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate().unwrap();
        ca.save(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join(CA_KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(ca.save(dir.path()).is_err());
        let back = Ca::load(dir.path()).unwrap();
        let e = back.issue_edge("b", &[], 1).unwrap();
        let (_, key) = e.save(dir.path(), "b").unwrap();
        let mode = std::fs::metadata(key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
