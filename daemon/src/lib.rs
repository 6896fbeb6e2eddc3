//! hookbridge: receive time-tracking webhooks (Clockify, Clockodo, generic HMAC), verify them, route them by
//! rules, spool them durably, and deliver them to sinks at least once.
//!
//! The library is the product; the `hookbridge` binary is a thin CLI over it. Embed it like this:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let config = hookbridge::Config::load("hookbridge.toml".as_ref())?;
//! let bridge = hookbridge::Bridge::start(config).await?;
//! // The webhook routes face the internet; the internal ones (metrics, dashboard) belong on a private port.
//! let app = axum::Router::new().nest("/bridge", bridge.router());
//! let internal = bridge.internal_router();
//! // ... serve `app` and `internal`; at the end:
//! bridge.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! See `ARCHITECTURE.md` for the map of the modules and the invariants they keep.

pub mod addon;
pub mod admin;
pub mod bridge;
pub mod classify;
pub mod config;
pub mod dispatch;
pub mod event;
pub mod ingress;
pub mod limits;
pub mod live;
pub mod metrics;
pub mod operator;
pub mod plugin;
pub mod route;
pub mod send;
pub mod server;
pub mod service;
pub mod sinks;
pub mod store;
pub mod template;
pub mod tls;
pub mod verify;

pub use bridge::{Bridge, BridgeError, Reloader, Sockets, run};
pub use config::{Config, ConfigErrors};
