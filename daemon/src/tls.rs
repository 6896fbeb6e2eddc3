//! TLS termination (rustls, ring): a listener's certificate chain and key, read from PEM files, and
//! optionally the CA that client certificates must chain to (mutual TLS, for the internal and admin
//! listeners). The certificate is held behind an atomic pointer: [`Acceptor::reload`] (on SIGHUP, and
//! whenever [`Acceptor::watch`] sees the files change, as when certbot renews) swaps it for new handshakes,
//! while connections already open keep the one they started with. A reload that fails (a half-written file,
//! a key that does not match) keeps the current certificate and says why in the log.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// How often [`Acceptor::watch`] looks at the certificate files.
pub const WATCH_EVERY: Duration = Duration::from_secs(5);

/// A listener's TLS settings, paths absolute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSpec {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates that client certificates must chain to; `None`: no client certificates asked.
    pub client_ca: Option<PathBuf>,
}

/// Why TLS could not be set up or reloaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM item.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// rustls refused the material.
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
    /// The client CA set is unusable.
    #[error("client_ca: {0}")]
    ClientCa(String),
}

fn file_error(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::File { path: path.to_path_buf(), message: message.to_string() }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads the chain and key and checks that they belong together.
fn load_key(spec: &TlsSpec, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&spec.cert)
        .map_err(|e| file_error(&spec.cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(&spec.cert, e))?;
    if chain.is_empty() {
        return Err(file_error(&spec.cert, "no CERTIFICATE in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(&spec.key).map_err(|e| file_error(&spec.key, e))?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => file_error(&spec.key, "the key does not match the certificate"),
        e => TlsError::Rustls(e),
    })
}

/// A file's modification time and length, if it can be read.
type Stamp = Option<(SystemTime, u64)>;

/// What identifies a file's version (a renewal replaces the file or the symlink it is reached through).
fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

#[derive(Debug)]
struct Resolver {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Accepts TLS connections with the current certificate. Cheap to clone.
#[derive(Clone)]
pub struct Acceptor {
    spec: TlsSpec,
    resolver: Arc<Resolver>,
    acceptor: tokio_rustls::TlsAcceptor,
    provider: Arc<CryptoProvider>,
    /// The certificate's and the key's stamps when they were last loaded.
    stamps: Arc<std::sync::Mutex<[Stamp; 2]>>,
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acceptor").field("spec", &self.spec).finish_non_exhaustive()
    }
}

impl Acceptor {
    /// Reads the files of `spec` and builds the server configuration (HTTP/1.1 by ALPN).
    pub fn new(spec: &TlsSpec) -> Result<Acceptor, TlsError> {
        let provider = provider();
        let stamps = [stamp(&spec.cert), stamp(&spec.key)];
        let key = load_key(spec, &provider)?;
        let resolver = Arc::new(Resolver { current: ArcSwap::from_pointee(key) });
        let builder =
            rustls::ServerConfig::builder_with_provider(Arc::clone(&provider)).with_safe_default_protocol_versions()?;
        let builder = match &spec.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(ca).map_err(|e| file_error(ca, e))? {
                    roots.add(cert.map_err(|e| file_error(ca, e))?)?;
                }
                if roots.is_empty() {
                    return Err(file_error(ca, "no CERTIFICATE in the file"));
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
                    .build()
                    .map_err(|e| TlsError::ClientCa(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_cert_resolver(Arc::clone(&resolver) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Acceptor {
            spec: spec.clone(),
            resolver,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            provider,
            stamps: Arc::new(std::sync::Mutex::new(stamps)),
        })
    }

    /// The TLS handshake of one connection.
    pub async fn accept(&self, tcp: TcpStream) -> std::io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
        self.acceptor.accept(tcp).await
    }

    /// Reads the certificate and key again; new handshakes use them. On error the current ones stay.
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamps = [stamp(&self.spec.cert), stamp(&self.spec.key)];
        let key = load_key(&self.spec, &self.provider)?;
        self.resolver.current.store(Arc::new(key));
        if let Ok(mut s) = self.stamps.lock() {
            *s = stamps;
        }
        Ok(())
    }

    /// Reloads, logging the outcome (`listener` names it).
    pub fn reload_logged(&self, listener: &str) {
        match self.reload() {
            Ok(()) => tracing::info!(listener, cert = %self.spec.cert.display(), "TLS certificate loaded"),
            Err(e) => {
                tracing::error!(listener, error = %e, "TLS certificate reload failed; the current certificate stays")
            }
        }
    }

    /// Until `cancel`, reloads whenever the certificate or key file changes.
    pub async fn watch(self, listener: &'static str, cancel: CancellationToken) {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(WATCH_EVERY) => {}
            }
            let now = [stamp(&self.spec.cert), stamp(&self.spec.key)];
            let changed = self.stamps.lock().map(|s| *s != now).unwrap_or(false);
            if changed {
                tracing::info!(listener, "TLS certificate files changed");
                self.reload_logged(listener);
                // A file still being written: remember what was seen so that a failed load is tried again
                // only on the next change, not every few seconds.
                if let Ok(mut s) = self.stamps.lock() {
                    *s = now;
                }
            }
        }
    }
}
