//! TLS to the cluster's database (`storage.postgres.tls`): off, or `verify-full`: rustls with the server's
//! certificate verified against the configured CA file (or the system's roots) and its name checked against
//! the host connected to, as libpq's `sslmode=verify-full` does. There is no unverified mode: encryption to
//! a server nobody checked keeps out eavesdroppers but not a man in the middle, who would see the password.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use deadpool_postgres::{Manager, ManagerConfig};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_postgres::Socket;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::store::StoreError;

/// `storage.postgres.tls`, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgTls {
    /// Plain TCP.
    Off,
    /// TLS, the server verified against `ca_file` (PEM; `None`: the system's roots).
    VerifyFull {
        /// The CA certificates, absolute.
        ca_file: Option<PathBuf>,
    },
}

impl PgTls {
    /// Whether the CA file (or the system's roots) gives at least one usable certificate (for `check`).
    pub fn check(&self) -> Result<(), String> {
        match self {
            PgTls::Off => Ok(()),
            PgTls::VerifyFull { ca_file } => roots(ca_file.as_deref()).map(|_| ()),
        }
    }
}

/// The trusted roots.
fn roots(ca_file: Option<&Path>) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect())
                .map_err(|e| format!("cannot read CA certificates from {}: {e}", path.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!("{} holds no usable CA certificate (PEM `CERTIFICATE` blocks)", path.display()));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err("the system has no CA certificates: set storage.postgres.ca_file".to_owned());
            }
        }
    }
    Ok(roots)
}

/// What the database's connections are made with.
#[derive(Clone)]
pub(super) enum Connector {
    /// Plain TCP.
    Off,
    /// TLS, verified.
    Verified(MakeRustlsConnect),
}

/// What a connector needs to be for tokio-postgres and deadpool (both kinds are).
pub(super) trait MakeTls:
    MakeTlsConnect<Socket, Stream = Self::S, TlsConnect = Self::C> + Clone + Send + Sync + 'static
{
    /// The connection's stream.
    type S: tokio_postgres::tls::TlsStream + Unpin + Send + 'static;
    /// The handshake.
    type C: TlsConnect<Socket, Stream = Self::S, Future = Self::F> + Send + Sync;
    /// The handshake's future.
    type F: Send;
}

impl<T> MakeTls for T
where
    T: MakeTlsConnect<Socket> + Clone + Send + Sync + 'static,
    T::Stream: tokio_postgres::tls::TlsStream + Unpin + Send + 'static,
    T::TlsConnect: Send + Sync,
    <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
{
    type S = T::Stream;
    type C = T::TlsConnect;
    type F = <T::TlsConnect as TlsConnect<Socket>>::Future;
}

impl Connector {
    pub(super) fn new(tls: &PgTls) -> Result<Connector, StoreError> {
        match tls {
            PgTls::Off => Ok(Connector::Off),
            PgTls::VerifyFull { ca_file } => {
                let roots = roots(ca_file.as_deref()).map_err(StoreError::Schema)?;
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| StoreError::Schema(format!("TLS to PostgreSQL: {e}")))?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                Ok(Connector::Verified(MakeRustlsConnect::new(config)))
            }
        }
    }

    /// The pool's connection manager.
    pub(super) fn manager(&self, cfg: tokio_postgres::Config, manager: ManagerConfig) -> Manager {
        match self {
            Connector::Off => Manager::from_config(cfg, tokio_postgres::NoTls, manager),
            Connector::Verified(t) => Manager::from_config(cfg, t.clone(), manager),
        }
    }

    /// One connection, its driver spawned on the current runtime.
    pub(super) async fn connect(
        &self,
        cfg: &tokio_postgres::Config,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        match self {
            Connector::Off => {
                let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
                tokio::spawn(conn);
                Ok(client)
            }
            Connector::Verified(t) => {
                let (client, conn) = cfg.connect(t.clone()).await?;
                tokio::spawn(conn);
                Ok(client)
            }
        }
    }
}
