//! HTTPS for `cloudai serve`: the certificate and key files, an optional CA that client
//! certificates must chain to (mutual TLS), and a listener that hands axum only connections
//! whose handshake succeeded.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, bail};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// The files of `serve --tls-cert/--tls-key/--tls-client-ca`.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// PEM: the server's certificate first, then any intermediates.
    pub cert: PathBuf,
    /// PEM: the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM: when set, a client must present a certificate issued by one of these CAs.
    pub client_ca: Option<PathBuf>,
}

/// A handshake that has not finished by then is dropped: a client that connects and sends
/// nothing holds no more than a socket for this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in flight at once; further connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 256;

/// The certificate the server presents, replaced while it runs by [`Self::reload`] (on
/// SIGHUP): renewed certificates are taken without a restart, by new connections.
#[derive(Debug)]
pub struct ServerCertificate {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ServerCertificate {
    fn load(cert: &Path, key: &Path, provider: &CryptoProvider) -> anyhow::Result<CertifiedKey> {
        let chain = read_certificates(cert, "--tls-cert")?;
        let private = PrivateKeyDer::from_pem_file(key).map_err(|e| {
            anyhow::anyhow!(
                "--tls-key {}: no private key read ({e}); expected a PEM file with a PKCS#8, PKCS#1 or SEC1 key",
                key.display()
            )
        })?;
        CertifiedKey::from_der(chain, private, provider).with_context(|| {
            format!(
                "--tls-cert {} with --tls-key {}",
                cert.display(),
                key.display()
            )
        })
    }

    /// Reads the files again; a mistake leaves the current certificate in place.
    pub fn reload(&self) -> anyhow::Result<()> {
        let loaded = Self::load(&self.cert, &self.key, &self.provider)?;
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *current = Arc::new(loaded);
        Ok(())
    }
}

impl ResolvesServerCert for ServerCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        )
    }
}

impl ServerTls {
    /// Reads and checks the files (the key must match the certificate), so that a mistake is
    /// reported at start-up, naming the file, rather than at the first connection. The
    /// certificate handle reloads the certificate and key files.
    pub fn server_config(&self) -> anyhow::Result<(rustls::ServerConfig, Arc<ServerCertificate>)> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certificate = Arc::new(ServerCertificate {
            cert: self.cert.clone(),
            key: self.key.clone(),
            current: RwLock::new(Arc::new(ServerCertificate::load(
                &self.cert, &self.key, &provider,
            )?)),
            provider: provider.clone(),
        });
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("choosing the TLS protocol versions")?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for certificate in read_certificates(path, "--tls-client-ca")? {
                    roots.add(certificate).with_context(|| {
                        format!("--tls-client-ca {}: not a CA certificate", path.display())
                    })?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .with_context(|| {
                            format!("--tls-client-ca {}: cannot verify with it", path.display())
                        })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_cert_resolver(certificate.clone());
        // axum serves HTTP/1.1 (its http2 feature is off).
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok((config, certificate))
    }
}

fn read_certificates(path: &Path, flag: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certificates = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("{flag} {}: {e}", path.display()))?;
    if certificates.is_empty() {
        bail!(
            "{flag} {}: no certificate in it (expected PEM \"BEGIN CERTIFICATE\" blocks)",
            path.display()
        );
    }
    Ok(certificates)
}

/// A TCP listener whose connections come out of a TLS handshake. Handshakes run on tasks of
/// their own, so one slow client never holds up another's connection; failures are logged
/// at debug level (port scanners and plain-HTTP clients make many).
pub struct TlsListener {
    local: SocketAddr,
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

impl TlsListener {
    pub fn new(listener: TcpListener, config: rustls::ServerConfig) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let (sender, accepted) = mpsc::channel(MAX_HANDSHAKES);
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let Ok(permit) = handshakes.clone().acquire_owned().await else {
                    return;
                };
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    // The server stopped: the port closes with this task.
                    () = sender.closed() => return,
                };
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: what axum's own listener does.
                        tracing::warn!(%error, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let acceptor = acceptor.clone();
                let sender = sender.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            // The server stopped: the connection is dropped with it.
                            let _ = sender.send((tls, peer)).await;
                        }
                        Ok(Err(error)) => {
                            tracing::debug!(%peer, %error, "TLS handshake failed");
                        }
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { local, accepted })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(connection) => connection,
            // The accepting task ended only because this listener is being dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    fn self_signed() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let certificate = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (certificate.pem(), key.serialize_pem())
    }

    fn config(cert: &Path, key: &Path, client_ca: Option<&Path>) -> anyhow::Result<()> {
        ServerTls {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            client_ca: client_ca.map(Path::to_path_buf),
        }
        .server_config()
        .map(drop)
    }

    #[test]
    fn the_files_are_checked_at_start_up_and_a_mistake_names_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_pem, key_pem) = self_signed();
        let (_, other_key_pem) = self_signed();
        let cert = write(dir.path(), "cert.pem", &cert_pem);
        let key = write(dir.path(), "key.pem", &key_pem);
        let other_key = write(dir.path(), "other.key", &other_key_pem);
        let empty = write(dir.path(), "empty.pem", "");
        let missing = dir.path().join("missing.pem");

        config(&cert, &key, None).unwrap();
        config(&cert, &key, Some(&cert)).unwrap();

        let error = |result: anyhow::Result<()>| format!("{:#}", result.unwrap_err());
        let why = error(config(&cert, &other_key, None));
        assert!(
            why.contains("--tls-cert") && why.contains("other.key"),
            "a key of another certificate: {why}"
        );
        let why = error(config(&empty, &key, None));
        assert!(
            why.contains("--tls-cert") && why.contains("no certificate in it"),
            "{why}"
        );
        let why = error(config(&key, &key, None));
        assert!(
            why.contains("no certificate in it"),
            "a key as certificate: {why}"
        );
        let why = error(config(&cert, &missing, None));
        assert!(
            why.contains("--tls-key") && why.contains("missing.pem"),
            "{why}"
        );
        let why = error(config(&cert, &cert, None));
        assert!(
            why.contains("--tls-key") && why.contains("no private key"),
            "{why}"
        );
        let why = error(config(&cert, &key, Some(&missing)));
        assert!(
            why.contains("--tls-client-ca") && why.contains("missing.pem"),
            "{why}"
        );
    }
}
