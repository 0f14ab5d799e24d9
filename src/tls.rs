//! The TLS client settings of every outgoing connection (PostgreSQL, webhooks): rustls with its
//! `ring` provider, TLS 1.2 and 1.3, trust anchors read from a PEM CA file, no client
//! certificate. Startup only.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

/// The certificates of a PEM file, as trust anchors.
///
/// # Errors
/// What is wrong with the file: unreadable, not PEM, a certificate that cannot be a trust
/// anchor, or no certificate at all.
pub fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let pem = std::fs::read(path).map_err(|e| e.to_string())?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("not PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("not a usable CA certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("no CERTIFICATE block in the file".to_owned());
    }
    Ok(roots)
}

/// A client configuration that verifies servers against `roots` (chain and name).
///
/// # Errors
/// When rustls refuses the protocol versions (a build without them).
pub fn client_config(roots: RootCertStore) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}
