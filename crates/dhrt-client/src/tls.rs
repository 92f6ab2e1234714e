//! The client's TLS: a rustls configuration from PEM, and the name the
//! node's certificate must carry.

use std::io;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};

/// A client configuration trusting the CA certificates of the PEM `ca`,
/// presenting `identity` (certificate chain and key, PEM) if given.
pub(crate) fn client_config(
    ca: &[u8],
    identity: Option<&(Vec<u8>, Vec<u8>)>,
) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca) {
        let cert = cert.map_err(|e| format!("the TLS CA is not PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("the TLS CA is not a CA certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("the TLS CA holds no certificate".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("the TLS client certificate is not PEM: {e}"))?;
            let key = PrivateKeyDer::from_pem_slice(key)
                .map_err(|e| format!("the TLS client key is not PEM: {e}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("the TLS client certificate: {e}"))?
        }
    };
    Ok(Arc::new(config))
}

/// The host of `host:port` as the name the node's certificate must carry.
pub(crate) fn server_name(addr: &str) -> io::Result<ServerName<'static>> {
    let host = match addr.rsplit_once(':') {
        Some((host, _)) => host.trim_start_matches('[').trim_end_matches(']'),
        None => addr,
    };
    ServerName::try_from(host.to_string())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host:?}: {e}")))
}
