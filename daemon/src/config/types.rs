//! The config file's shape: one struct per section, closed (`deny_unknown_fields`), with defaults.
//! These types are what the TOML says; [`super::Config`] is what is left after validation.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::secret::SecretSpec;
use super::units::{HumanDuration, HumanSize};
use crate::limits;

/// `[server]`: the HTTP listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address and port to listen on. Default `127.0.0.1:8080`.
    #[serde(default = "limits::default_listen")]
    pub listen: SocketAddr,
    /// Largest accepted request body; larger bodies get 413. Default `1MiB`.
    #[serde(default = "limits::default_max_body_size")]
    pub max_body_size: HumanSize,
    /// Time allowed to receive a request and answer it; past it the answer is 408 (body still arriving)
    /// or 503. Default `10s`.
    #[serde(default = "limits::default_request_timeout")]
    pub request_timeout: HumanDuration,
    /// Webhook requests handled at once; more get 503 with `Retry-After`. Default 512.
    #[serde(default = "limits::default_max_concurrency")]
    pub max_concurrency: usize,
    /// On SIGTERM/SIGINT, how long in-flight requests and deliveries may take to finish. Default `30s`.
    #[serde(default = "limits::default_shutdown_timeout")]
    pub shutdown_timeout: HumanDuration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: limits::default_listen(),
            max_body_size: limits::default_max_body_size(),
            request_timeout: limits::default_request_timeout(),
            max_concurrency: limits::default_max_concurrency(),
            shutdown_timeout: limits::default_shutdown_timeout(),
        }
    }
}

/// `[storage]`: the durable spool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Folder of the spool database (`spool.db`), created if missing; relative to the config file.
    /// Default `data`.
    #[serde(default = "limits::default_data_dir")]
    pub data_dir: PathBuf,
    /// Most events with undelivered deliveries; past it new webhooks get 503. Default 100000.
    #[serde(default = "limits::default_max_pending_events")]
    pub max_pending_events: u64,
    /// Most bytes of bodies with undelivered deliveries; past it new webhooks get 503. Default `1GiB`.
    #[serde(default = "limits::default_max_pending_bytes")]
    pub max_pending_bytes: HumanSize,
    /// How long finished events are kept (for inspection and replay) before they are pruned with their
    /// attempt log. Events with a pending delivery or a dead letter are never pruned. Default `7d`.
    #[serde(default = "limits::default_retention")]
    pub retention: HumanDuration,
    /// A webhook whose dedup key was seen within this window is answered 200 and not delivered again.
    /// Default `73h` (Clockify retries up to 72 h after a failure). `"0s"` turns dedup off.
    #[serde(default = "limits::default_dedup_window")]
    pub dedup_window: HumanDuration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            data_dir: limits::default_data_dir(),
            max_pending_events: limits::default_max_pending_events(),
            max_pending_bytes: limits::default_max_pending_bytes(),
            retention: limits::default_retention(),
            dedup_window: limits::default_dedup_window(),
        }
    }
}

/// `[admin]`: the admin API (off when the section is absent).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin listener (keep it private). Default `127.0.0.1:8081`.
    #[serde(default = "limits::default_admin_listen")]
    pub listen: SocketAddr,
    /// Bearer token every admin request must carry (a secret: `"${HOOKBRIDGE_ADMIN_TOKEN}"`).
    pub token: SecretSpec,
}

/// `[sources.<id>] kind = "clockify"`: Clockify workspace webhooks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockifySourceConfig {
    /// Always `"clockify"`.
    pub kind: String,
    /// URL path; default `/hooks/<id>`.
    pub path: Option<String>,
    /// The webhook's signing secret(s) (`clockify-signature`); several during a rotation.
    pub secrets: Vec<SecretSpec>,
}

/// `[sources.<id>] kind = "clockodo"`: Clockodo webhooks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockodoSourceConfig {
    /// Always `"clockodo"`.
    pub kind: String,
    /// URL path; default `/hooks/<id>`.
    pub path: Option<String>,
    /// The token(s) chosen in Clockodo's webhook settings, sent in the body's `token`.
    pub secrets: Vec<SecretSpec>,
}

/// Hash function of an `hmac` source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum HmacAlgorithm {
    /// HMAC-SHA256.
    #[default]
    Sha256,
    /// HMAC-SHA512.
    Sha512,
}

/// Text encoding of an `hmac` signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SignatureEncoding {
    /// Lower- or upper-case hexadecimal.
    #[default]
    Hex,
    /// Standard base64 (with or without padding).
    Base64,
}

/// `[sources.<id>] kind = "hmac"`: any provider that signs the raw body with HMAC.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HmacSourceConfig {
    /// Always `"hmac"`.
    pub kind: String,
    /// URL path; default `/hooks/<id>`.
    pub path: Option<String>,
    /// Header carrying the signature, e.g. `x-hub-signature-256`.
    pub header: String,
    /// Text before the signature in the header, e.g. `sha256=`. Default none.
    #[serde(default)]
    pub prefix: String,
    /// `hex` (default) or `base64`.
    #[serde(default)]
    pub encoding: SignatureEncoding,
    /// `sha256` (default) or `sha512`.
    #[serde(default)]
    pub algorithm: HmacAlgorithm,
    /// HMAC key(s); several during a rotation.
    pub secrets: Vec<SecretSpec>,
    /// Header carrying the event type (one of `event_header` / `event_pointer`).
    pub event_header: Option<String>,
    /// JSON pointer (RFC 6901) to the event type in the body, e.g. `/event`.
    pub event_pointer: Option<String>,
    /// Header carrying a unique delivery id, used as the event's dedup key (else the body hash).
    pub id_header: Option<String>,
    /// JSON pointer to a unique id in the body, used as the dedup key (else the body hash).
    pub id_pointer: Option<String>,
}

/// `[sources.<id>] kind = "standard-webhooks"`: the Standard Webhooks scheme (`webhook-id`,
/// `webhook-timestamp`, `webhook-signature: v1,<base64>`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StandardSourceConfig {
    /// Always `"standard-webhooks"`.
    pub kind: String,
    /// URL path; default `/hooks/<id>`.
    pub path: Option<String>,
    /// Signing secret(s), `whsec_<base64>`; several during a rotation.
    pub secrets: Vec<SecretSpec>,
    /// Largest accepted distance between `webhook-timestamp` and now. Default `5m`.
    #[serde(default = "limits::default_standard_tolerance")]
    pub tolerance: HumanDuration,
    /// Header carrying the event type (instead of `event_pointer`).
    pub event_header: Option<String>,
    /// JSON pointer to the event type in the body. Default `/type` (the Standard Webhooks payload shape).
    pub event_pointer: Option<String>,
}

/// `[sources.<id>] kind = "clockify-addon"`: a Clockify Marketplace add-on (RS256 JWTs, lifecycle calls,
/// per-installation webhook tokens).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddonSourceConfig {
    /// Always `"clockify-addon"`.
    pub kind: String,
    /// URL path; default `/hooks/<id>`. Webhooks arrive at `<path>/webhook/<EVENT>`, lifecycle calls at
    /// `<path>/lifecycle/...`, and the manifest is served at `<path>/manifest`.
    pub path: Option<String>,
    /// The add-on key (manifest `key`; tokens' `sub` must equal it).
    pub addon_key: String,
    /// Manifest `name`. Default: the add-on key.
    pub name: Option<String>,
    /// Public URL of this source's path, as Clockify reaches it (manifest `baseUrl`).
    pub base_url: String,
    /// Manifest `scopes`, e.g. `["TIME_ENTRY_READ"]`.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// RSA public key (PEM) that signs the tokens. Default: Clockify's published key.
    pub public_key: Option<String>,
    /// The same, read from a file (relative to the config file).
    pub public_key_file: Option<std::path::PathBuf>,
}

/// `[sources.<id>] kind = "none"`: no verification at all. Only for trusted networks; warns at start-up.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoneSourceConfig {
    /// Always `"none"`.
    pub kind: String,
    /// URL path; default `/hooks/<id>`.
    pub path: Option<String>,
    /// Header carrying the event type (one of `event_header` / `event_pointer`).
    pub event_header: Option<String>,
    /// JSON pointer to the event type in the body.
    pub event_pointer: Option<String>,
    /// Header carrying a unique delivery id, used as the dedup key (else the body hash).
    pub id_header: Option<String>,
    /// JSON pointer to a unique id in the body, used as the dedup key (else the body hash).
    pub id_pointer: Option<String>,
}

/// Retry behaviour shared by every sink kind.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// First backoff after a failure. Default `1s`.
    #[serde(default = "limits::default_initial_backoff")]
    pub initial_backoff: HumanDuration,
    /// Backoff cap; backoff doubles up to it, with full jitter. Default `1h`.
    #[serde(default = "limits::default_max_backoff")]
    pub max_backoff: HumanDuration,
    /// Give up (dead-letter) a delivery whose event is older than this. Default `72h`, Clockify's own retry
    /// horizon.
    #[serde(default = "limits::default_max_age")]
    pub max_age: HumanDuration,
    /// Give up after this many attempts. Default: no limit (`max_age` decides).
    pub max_attempts: Option<u32>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            initial_backoff: limits::default_initial_backoff(),
            max_backoff: limits::default_max_backoff(),
            max_age: limits::default_max_age(),
            max_attempts: None,
        }
    }
}

/// `[sinks.<id>] kind = "http"`: POST each event to a URL.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSinkConfig {
    /// Always `"http"`.
    pub kind: String,
    /// Target URL (`http` or `https`).
    pub url: String,
    /// Per-request timeout. Default `10s`.
    #[serde(default = "limits::default_sink_timeout")]
    pub timeout: HumanDuration,
    /// Extra request headers; values are secrets (so `Authorization = "Bearer ${TOKEN}"` works).
    #[serde(default)]
    pub headers: BTreeMap<String, SecretSpec>,
    /// Deliveries in flight at once. Default 8.
    #[serde(default = "limits::default_max_in_flight")]
    pub max_in_flight: usize,
    /// Retry backoff.
    #[serde(default)]
    pub retry: RetryConfig,
}

/// `[sinks.<id>] kind = "file"`: append JSON lines to a file, fsync'd in batches.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSinkConfig {
    /// Always `"file"`.
    pub kind: String,
    /// File to append to (created if missing); relative to the config file.
    pub path: PathBuf,
    /// Deliveries in flight at once (they share fsyncs). Default 64.
    #[serde(default = "limits::default_file_in_flight")]
    pub max_in_flight: usize,
    /// Retry backoff.
    #[serde(default)]
    pub retry: RetryConfig,
}

/// `[[routes]]`: which events go where.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// A name for logs and metrics; unique.
    pub name: String,
    /// Source ids this route takes events from; default: every source.
    #[serde(default)]
    pub sources: Vec<String>,
    /// Event types, exact or glob (`TIME_ENTRY_*`, `entry.*`); default `["*"]`.
    #[serde(default)]
    pub events: Vec<String>,
    /// Optional CEL predicate over `event`, `source`, `headers` and `body`, e.g. `body.billable == true`.
    pub when: Option<String>,
    /// Sink ids to deliver to (fan-out when several).
    pub to: Vec<String>,
}
