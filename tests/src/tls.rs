//! A TLS front for tests: terminates `https://` and `wss://` on loopback with a
//! certificate from a test CA made for the run, and forwards the plain bytes to the
//! server, as a load balancer in front of the real server would.

use std::net::SocketAddr;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::{self, pki_types::PrivateKeyDer};

/// A running TLS front; stops when dropped.
pub struct TlsFront {
    /// Where it listens (127.0.0.1).
    pub addr: SocketAddr,
    /// The test CA's certificate (PEM): what a client must trust.
    pub ca_pem: String,
    task: JoinHandle<()>,
}

impl TlsFront {
    /// Starts a front for the server at `upstream`, its certificate for `127.0.0.1`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        Self::start_for(upstream, "127.0.0.1").await
    }

    /// Starts a front for the server at `upstream` whose certificate (from the test CA)
    /// names `host`: another host than `127.0.0.1` makes a certificate a client must
    /// refuse even though it trusts the CA.
    pub async fn start_for(upstream: SocketAddr, host: &str) -> std::io::Result<Self> {
        let (ca_pem, config) = certificates(host).map_err(std::io::Error::other)?;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // A client that refuses the certificate ends its handshake here.
                    let Ok(mut tls) = acceptor.accept(socket).await else {
                        return;
                    };
                    let Ok(mut plain) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        Ok(Self { addr, ca_pem, task })
    }

    /// `https://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A test CA and a server certificate for `host` signed by it: the CA's PEM and the
/// server's rustls configuration.
fn certificates(
    host: &str,
) -> Result<(String, rustls::ServerConfig), Box<dyn std::error::Error + Send + Sync>> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let server_key = KeyPair::generate()?;
    let server_cert =
        CertificateParams::new(vec![host.to_owned()])?.signed_by(&server_key, &issuer)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![server_cert.der().clone()],
            PrivateKeyDer::try_from(server_key.serialize_der())?,
        )?;
    Ok((ca_cert.pem(), config))
}
