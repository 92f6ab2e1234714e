//! TLS on the node's one port: the server configuration from PEM files
//! (`--tls-cert`, `--tls-key`, and `--tls-client-ca` to require client
//! certificates), and the connector peers are dialed with when TLS is on.
//!
//! Peers do not check each other's certificates: inside TLS they prove the
//! cluster secret to each other and seal every frame under keys derived
//! from it (`dhrt-cluster`'s handshake and session), which a man in the
//! middle without the secret can neither pass nor read. TLS between peers
//! hides the handshake and the frames' sizes from the path; a node that
//! requires client certificates gets this node's own.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use dhrt_cluster::{ConnectFuture, Connector, PeerStream};
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The first byte of a TLS record carrying a handshake (a ClientHello).
pub(crate) const HANDSHAKE_RECORD: u8 = 0x16;

/// What TLS needs: the acceptor for incoming connections, the connector
/// for peers.
pub(crate) struct Tls {
    pub(crate) acceptor: TlsAcceptor,
    pub(crate) peers: Arc<PeerConnector>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_chain(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let chain = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{} is not PEM certificates", path.display()))?;
    if chain.is_empty() {
        bail!("{} holds no certificate", path.display());
    }
    Ok(chain)
}

/// What is wrong with the certificate or key, in words: a key that is not
/// the certificate's, or a certificate rustls cannot use (an X.509 v1
/// certificate, made without extensions, among them).
fn cert_error(cert: &Path, e: rustls::Error) -> anyhow::Error {
    match e {
        rustls::Error::InconsistentKeys(_) => {
            anyhow::anyhow!("the TLS certificate and key do not go together: {e}")
        }
        e if format!("{e:?}").contains("UnsupportedCertVersion") => anyhow::anyhow!(
            "the TLS certificate {} is X.509 version 1, which TLS here does not accept: make a version 3 certificate (with extensions, such as subjectAltName for the node's address)",
            cert.display()
        ),
        e => anyhow::anyhow!("the TLS certificate {} cannot be used: {e}", cert.display()),
    }
}

impl Tls {
    /// Loads the certificate chain and key, and the client CA if given.
    pub(crate) fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> anyhow::Result<Tls> {
        let chain = read_chain(cert)?;
        let key = PrivateKeyDer::from_pem_file(key)
            .with_context(|| format!("reading the private key {}", key.display()))?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for ca in read_chain(path)? {
                    roots
                        .add(ca)
                        .with_context(|| format!("{} is not a CA certificate", path.display()))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .build()
                        .with_context(|| format!("the client CA {}", path.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let server = builder
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| cert_error(cert, e))?;
        let client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SecretDoesIt(provider())))
            .with_client_auth_cert(chain, key)
            .context("the TLS certificate as a client certificate")?;
        Ok(Tls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            peers: Arc::new(PeerConnector {
                connector: TlsConnector::from(Arc::new(client)),
            }),
        })
    }
}

/// Dials peers over TLS.
#[derive(Clone)]
pub(crate) struct PeerConnector {
    connector: TlsConnector,
}

impl std::fmt::Debug for PeerConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerConnector(tls)")
    }
}

impl Connector for PeerConnector {
    fn connect<'a>(&'a self, addr: &'a str) -> ConnectFuture<'a> {
        Box::pin(async move {
            let stream = TcpStream::connect(addr).await?;
            let _ = stream.set_nodelay(true);
            dhrt_cluster::keep_alive(&stream);
            let host = match addr.rsplit_once(':') {
                Some((host, _)) => host.trim_start_matches('[').trim_end_matches(']'),
                None => addr,
            };
            let name = ServerName::try_from(host.to_string())
                .unwrap_or_else(|_| ServerName::try_from("dhrt-peer").expect("a valid name"));
            let stream = self.connector.connect(name, stream).await?;
            Ok(Box::new(stream) as Box<dyn PeerStream>)
        })
    }
}

/// Accepts any certificate from a peer, checking only that the handshake
/// is signed by its key: who the peer is, the cluster secret proves next.
#[derive(Debug)]
struct SecretDoesIt(Arc<CryptoProvider>);

impl ServerCertVerifier for SecretDoesIt {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
