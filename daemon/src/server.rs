//! Serving a router with connection discipline, on every listener (webhook, internal, admin): at most
//! `max_connections` open at once (the next ones wait in the kernel's backlog, never an error), a request's
//! head must arrive within `header_timeout` (counted from when the connection starts waiting for it, so an
//! idle kept-alive connection is closed after the same time), heads larger than `max_header_size` get `431`,
//! HTTP/1.1 only (what webhook senders speak). hyper's own HTTP/1 builder does the per-connection work; this
//! module only accepts, counts and drains.
//!
//! Shutdown: when `shutdown` completes the listener is closed, idle connections are closed at once, and
//! connections with a request in progress finish it (hyper's graceful shutdown), for at most `drain`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

use crate::metrics::Metrics;

/// The per-listener connection limits (`[server]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Time for a request's head to arrive, from the connection's start or the end of the previous answer.
    pub header_timeout: Duration,
    /// Largest request head (request line and headers) in bytes; larger ones get `431`.
    pub max_header_size: usize,
    /// Open connections at most.
    pub max_connections: usize,
}

/// One listener to serve.
#[derive(Debug)]
pub struct Listener {
    /// Its name in logs and metrics (`webhook`, `internal`, `admin`).
    pub name: &'static str,
    /// The bound socket.
    pub socket: TcpListener,
    /// What it serves.
    pub router: Router,
    /// Its connection limits.
    pub limits: ConnLimits,
    /// TLS, when this listener terminates it.
    pub tls: Option<crate::tls::Acceptor>,
}

/// How often at most the "connection limit reached" warning is logged per listener.
const LIMIT_LOG_EVERY: Duration = Duration::from_secs(10);
/// How long accepting pauses after an accept error (such as running out of file descriptors).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Serves `listener` until `shutdown` completes, then drains its connections for at most `drain`.
pub async fn serve(listener: Listener, metrics: Metrics, shutdown: impl Future<Output = ()>, drain: Duration) {
    let Listener { name, socket, router, limits, tls } = listener;
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_header_size(limits.max_header_size)
        // The read buffer bounds a head still arriving (431 past it) and the memory each connection holds.
        .max_buf_size(limits.max_header_size.max(8192))
        .keep_alive(true);
    let builder = Arc::new(builder);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut last_limit_log: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let permit = match Arc::clone(&slots).try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                metrics.connection_limit_reached(name);
                if last_limit_log.is_none_or(|t| t.elapsed() >= LIMIT_LOG_EVERY) {
                    last_limit_log = Some(Instant::now());
                    tracing::warn!(
                        listener = name,
                        max_connections = limits.max_connections,
                        "connection limit reached: new connections wait in the listen backlog"
                    );
                }
                tokio::select! {
                    p = Arc::clone(&slots).acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                    () = &mut shutdown => break,
                }
            }
        };
        let (tcp, peer) = tokio::select! {
            r = socket.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS...: the connection stays in the backlog; try again shortly.
                    metrics.connection_error(name, "accept");
                    tracing::warn!(listener = name, error = %e, "cannot accept a connection; pausing accepts briefly");
                    drop(permit);
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let service = service(router.clone(), peer);
        let builder = Arc::clone(&builder);
        let metrics = metrics.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        let header_timeout = limits.header_timeout;
        metrics.connection_opened(name);
        tokio::spawn(async move {
            match tls {
                None => serve_one(name, &builder, tcp, service, &metrics, watcher).await,
                Some(tls) => match tokio::time::timeout(header_timeout, tls.accept(tcp)).await {
                    Ok(Ok(stream)) => serve_one(name, &builder, stream, service, &metrics, watcher).await,
                    Ok(Err(e)) => {
                        metrics.connection_error(name, "tls_handshake");
                        tracing::debug!(listener = name, %peer, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        metrics.connection_error(name, "tls_handshake_timeout");
                        tracing::debug!(listener = name, %peer, "TLS handshake timed out");
                    }
                },
            }
            metrics.connection_closed(name);
            drop(permit);
        });
    }
    drop(socket);
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        tracing::warn!(listener = name, "connections still open at the shutdown deadline; closing them");
    }
}

/// The router as a hyper service for one connection, with the peer's address as a request extension
/// (`ConnectInfo<SocketAddr>`).
fn service(
    router: Router,
    peer: SocketAddr,
) -> impl hyper::service::Service<
    hyper::Request<Incoming>,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future = impl Send,
> + Clone {
    hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        router.clone().oneshot(request.map(axum::body::Body::new))
    })
}

async fn serve_one<I, S>(
    name: &'static str,
    builder: &hyper::server::conn::http1::Builder,
    io: I,
    service: S,
    metrics: &Metrics,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            hyper::Request<Incoming>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let conn = builder.serve_connection(TokioIo::new(io), service);
    if let Err(e) = watcher.watch(conn).await {
        let reason = if e.is_timeout() {
            "header_timeout"
        } else if e.is_parse_too_large() {
            "header_too_large"
        } else if e.is_parse() {
            "malformed_request"
        } else if e.is_incomplete_message() {
            "incomplete_request"
        } else {
            "io"
        };
        metrics.connection_error(name, reason);
        tracing::debug!(listener = name, reason, error = %e, "connection ended with an error");
    }
}
