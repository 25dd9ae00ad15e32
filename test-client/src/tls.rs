//! TLS for loadgen's sinks, so the proxy's `wss://` path can be measured on one machine: a
//! private CA and a `localhost` certificate it signs, written to a folder once, and the server
//! side that serves them.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The CA the proxy trusts (`ca_file`), and the sinks' certificate and key.
pub const CA_FILE: &str = "ca.pem";
const CERT_FILE: &str = "sink.pem";
const KEY_FILE: &str = "sink.key";

/// Writes `ca.pem`, `sink.pem` and `sink.key` into `dir` (made if missing).
pub fn make(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "loadgen test CA");
    let ca = ca.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec!["localhost".to_string()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let cert = params.signed_by(&key, &ca, &ca_key)?;
    std::fs::write(dir.join(CA_FILE), ca.pem())?;
    std::fs::write(dir.join(CERT_FILE), cert.pem())?;
    std::fs::write(dir.join(KEY_FILE), key.serialize_pem())?;
    Ok(())
}

/// A TLS acceptor serving the certificate `make` wrote into `dir`.
pub fn acceptor(dir: &Path) -> Result<tokio_rustls::TlsAcceptor> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join(CERT_FILE))
        .with_context(|| format!("reading {}", dir.join(CERT_FILE).display()))?
        .collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_file(dir.join(KEY_FILE))
        .with_context(|| format!("reading {}", dir.join(KEY_FILE).display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(chain, key)?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
