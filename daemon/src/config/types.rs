//! The config file's shape: one struct per section, closed (`deny_unknown_fields`), with defaults.
//! These types are what the TOML says; [`super::Config`] is what is left after validation.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::secret::SecretSpec;
use super::units::{HumanDuration, HumanSize};
use crate::limits;

/// `[server]`: the webhook listener, the internal listener, and the limits of both.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address and port of the webhook listener (webhook paths and `/healthz`, `/readyz` only). Default
    /// `127.0.0.1:8080`.
    #[serde(default = "limits::default_listen")]
    pub listen: SocketAddr,
    /// Address of the internal listener: `/metrics`, `/readyz` with detail, `/dashboard`, `/live/<channel>`.
    /// Keep it private. Default `127.0.0.1:8082`.
    #[serde(default = "limits::default_internal_listen")]
    pub internal_listen: SocketAddr,
    /// Token that requests to the internal listener must carry (`Authorization: Bearer <token>`, or
    /// `?token=<token>` for a browser); `/healthz` is always open. Off by default (loopback only).
    pub internal_token: Option<SecretSpec>,
    /// Largest accepted request body; larger bodies get 413. Default `1MiB`.
    #[serde(default = "limits::default_max_body_size")]
    pub max_body_size: HumanSize,
    /// Time allowed to verify, store and answer a request once its body is in; past it the answer is 503.
    /// Default `10s`.
    #[serde(default = "limits::default_request_timeout")]
    pub request_timeout: HumanDuration,
    /// Time allowed for a request body to arrive; past it the answer is 408. Default `10s`.
    #[serde(default = "limits::default_body_timeout")]
    pub body_timeout: HumanDuration,
    /// Slowest accepted body, in bytes per second on average after its first second; slower ones get 408.
    /// `0` turns the check off. Default `1KiB`.
    #[serde(default = "limits::default_min_body_rate")]
    pub min_body_rate: HumanSize,
    /// Verified webhook requests handled at once; more get 503 with `Retry-After`. Default 512.
    #[serde(default = "limits::default_max_concurrency")]
    pub max_concurrency: usize,
    /// Requests whose signature covers the body (hmac, Standard Webhooks, Clockodo) held at once while
    /// their body arrives and is checked, apart from `max_concurrency`; more get 503. Default 64.
    #[serde(default = "limits::default_max_unverified")]
    pub max_unverified: usize,
    /// Open connections per listener at most; more wait in the listen backlog. Default 1024 (the systemd
    /// unit's `LimitNOFILE` leaves room for three listeners, the spool, brokers and plugins).
    #[serde(default = "limits::default_max_connections")]
    pub max_connections: usize,
    /// Time for a request's head (request line and headers) to arrive, counted from the connection's
    /// start or the end of the previous answer: it is also how long an idle kept-alive connection stays
    /// open. Default `10s`.
    #[serde(default = "limits::default_header_timeout")]
    pub header_timeout: HumanDuration,
    /// Largest request head; larger ones get 431. Default `16KiB`.
    #[serde(default = "limits::default_max_header_size")]
    pub max_header_size: HumanSize,
    /// On SIGTERM/SIGINT, how long in-flight requests and deliveries may take to finish. Default `30s`.
    #[serde(default = "limits::default_shutdown_timeout")]
    pub shutdown_timeout: HumanDuration,
    /// TLS on the webhook listener (off: plain HTTP, e.g. behind a reverse proxy).
    pub tls: Option<TlsConfig>,
    /// TLS on the internal listener, optionally with client certificates (`client_ca`).
    pub internal_tls: Option<TlsConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: limits::default_listen(),
            internal_listen: limits::default_internal_listen(),
            internal_token: None,
            max_body_size: limits::default_max_body_size(),
            request_timeout: limits::default_request_timeout(),
            body_timeout: limits::default_body_timeout(),
            min_body_rate: limits::default_min_body_rate(),
            max_concurrency: limits::default_max_concurrency(),
            max_unverified: limits::default_max_unverified(),
            max_connections: limits::default_max_connections(),
            header_timeout: limits::default_header_timeout(),
            max_header_size: limits::default_max_header_size(),
            shutdown_timeout: limits::default_shutdown_timeout(),
            tls: None,
            internal_tls: None,
        }
    }
}

/// `tls = { cert = "...", key = "..." }`: a listener's certificate (re-read on SIGHUP and when the files
/// change).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first (e.g. certbot's `fullchain.pem`).
    pub cert: PathBuf,
    /// PEM private key (e.g. certbot's `privkey.pem`).
    pub key: PathBuf,
    /// PEM CA certificate(s): when set, clients must present a certificate that chains to one of them.
    pub client_ca: Option<PathBuf>,
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
    /// Most events kept that matched no route (kept for inspection and replay until `retention`); past it
    /// unrouted webhooks get 503, routed ones are still accepted. Default 10000.
    #[serde(default = "limits::default_max_unrouted_events")]
    pub max_unrouted_events: u64,
    /// Most body bytes of those events. Default `64MiB`.
    #[serde(default = "limits::default_max_unrouted_bytes")]
    pub max_unrouted_bytes: HumanSize,
    /// How long finished events are kept (for inspection and replay) before they are pruned with their
    /// attempt log. Events with a pending delivery or a dead letter are never pruned. Default `7d`.
    #[serde(default = "limits::default_retention")]
    pub retention: HumanDuration,
    /// A webhook whose dedup key was seen within this window is answered 200 and not delivered again.
    /// Default `73h` (Clockify retries up to 72 h after a failure). `"0s"` turns dedup off.
    #[serde(default = "limits::default_dedup_window")]
    pub dedup_window: HumanDuration,
    /// Where healthy events are kept: `"log"` (default: an append-only segment log in `log/`, with retries
    /// and dead letters in `spool.db`) or `"sqlite"` (everything in `spool.db`, the default before). A
    /// SQLite-engine spool is taken over at the first start with `"log"`; there is no way back.
    #[serde(default)]
    pub engine: crate::store::Engine,
    /// Where the spool lives: `"embedded"` (default: the files in `data_dir`, one daemon) or `"postgres"`
    /// (a PostgreSQL database shared by every node of a cluster, `[storage.postgres]`).
    #[serde(default)]
    pub backend: StorageBackend,
    /// `[storage.postgres]`, for `backend = "postgres"`.
    pub postgres: Option<PostgresConfig>,
}

/// `storage.backend`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    /// The embedded spool in `data_dir` (`storage.engine` says which engine).
    #[default]
    Embedded,
    /// A PostgreSQL database: several daemons share it (cluster mode).
    Postgres,
}

/// `[storage.postgres]`: the cluster's database.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Connection URL, `postgres://user:password@host:5432/db` or key-value (`host=... dbname=...`) (a
    /// secret: it holds a password).
    pub url: SecretSpec,
    /// Connections kept open to the database at most. Default 8.
    #[serde(default = "limits::default_pg_pool_size")]
    pub pool_size: usize,
    /// Longest a statement may run before the server cancels it (the webhook then gets 503). Default `5s`.
    #[serde(default = "limits::default_pg_statement_timeout")]
    pub statement_timeout: HumanDuration,
    /// Time allowed to connect (and to wait for a free connection). Default `5s`.
    #[serde(default = "limits::default_pg_connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// How long a node's claim on a delivery lasts without renewal: when a node dies, another takes its
    /// deliveries over after this. Default `30s`.
    #[serde(default = "limits::default_pg_lease")]
    pub lease: HumanDuration,
    /// This node's name in the cluster (unique per node; its claims carry it). Default: the host name.
    pub node_id: Option<String>,
    /// `"off"` (plain TCP, the default: a database on loopback or a private network) or `"verify-full"`
    /// (TLS required, the server's certificate verified against `ca_file`, or the system's roots, and its
    /// name checked against the host connected to).
    #[serde(default)]
    pub tls: PgTlsMode,
    /// PEM file of the CA certificates the server's certificate must chain to (with `tls = "verify-full"`;
    /// relative to the config file). Default: the system's roots.
    pub ca_file: Option<std::path::PathBuf>,
}

/// `storage.postgres.tls`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PgTlsMode {
    /// Plain TCP.
    #[default]
    Off,
    /// TLS with the server's certificate and name verified.
    VerifyFull,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            data_dir: limits::default_data_dir(),
            max_pending_events: limits::default_max_pending_events(),
            max_pending_bytes: limits::default_max_pending_bytes(),
            max_unrouted_events: limits::default_max_unrouted_events(),
            max_unrouted_bytes: limits::default_max_unrouted_bytes(),
            retention: limits::default_retention(),
            dedup_window: limits::default_dedup_window(),
            engine: crate::store::Engine::default(),
            backend: StorageBackend::default(),
            postgres: None,
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
    /// TLS on the admin listener, optionally with client certificates (`client_ca`).
    pub tls: Option<TlsConfig>,
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
    #[serde(deserialize_with = "super::secret::secret_list")]
    pub secrets: Vec<SecretSpec>,
    /// How long the provider waits for an answer before it counts the delivery as failed (and retries).
    /// An answer written later than this is uncertain: a copy of that event then dedups. Default `10s`.
    pub provider_timeout: Option<HumanDuration>,
    /// Identical bodies that arrive this close together are one delivery retried, whatever the first
    /// answer was (for providers that retry at once, e.g. after a connection reset). Default `0s`.
    pub retry_window: Option<HumanDuration>,
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
    #[serde(deserialize_with = "super::secret::secret_list")]
    pub secrets: Vec<SecretSpec>,
    /// How long the provider waits for an answer before it counts the delivery as failed (and retries).
    /// An answer written later than this is uncertain: a copy of that event then dedups. Default `10s`.
    pub provider_timeout: Option<HumanDuration>,
    /// Identical bodies that arrive this close together are one delivery retried, whatever the first
    /// answer was (for providers that retry at once, e.g. after a connection reset). Default `0s`.
    pub retry_window: Option<HumanDuration>,
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
    #[serde(deserialize_with = "super::secret::secret_list")]
    pub secrets: Vec<SecretSpec>,
    /// Header carrying the event type (one of `event_header` / `event_pointer`).
    pub event_header: Option<String>,
    /// JSON pointer (RFC 6901) to the event type in the body, e.g. `/event`.
    pub event_pointer: Option<String>,
    /// Refused: the signature does not cover headers (kept so that `check` can say so).
    pub id_header: Option<String>,
    /// JSON pointer to a unique delivery id in the (signed) body, used as the dedup key (else the body
    /// hash).
    pub id_pointer: Option<String>,
    /// Header carrying a Unix timestamp (seconds) that the signature covers too, e.g.
    /// `x-slack-request-timestamp`: requests outside `timestamp_tolerance` are refused. Default none.
    pub timestamp_header: Option<String>,
    /// Largest accepted distance between the timestamp and now. Default `5m`.
    pub timestamp_tolerance: Option<HumanDuration>,
    /// What is signed, with `timestamp_header`: `{timestamp}` and `{body}` (last). Default
    /// `"{timestamp}.{body}"`; Slack: `"v0:{timestamp}:{body}"`.
    pub signed_payload: Option<String>,
    /// How long the provider waits for an answer before it counts the delivery as failed (and retries).
    /// An answer written later than this is uncertain: a copy of that event then dedups. Default `10s`.
    pub provider_timeout: Option<HumanDuration>,
    /// Identical bodies that arrive this close together are one delivery retried, whatever the first
    /// answer was (for providers that retry at once, e.g. after a connection reset). Default `0s`.
    pub retry_window: Option<HumanDuration>,
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
    #[serde(deserialize_with = "super::secret::secret_list")]
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
    /// How long the provider waits for an answer before it counts the delivery as failed (and retries).
    /// An answer written later than this is uncertain: a copy of that event then dedups. Default `10s`.
    pub provider_timeout: Option<HumanDuration>,
    /// Identical bodies that arrive this close together are one delivery retried, whatever the first
    /// answer was (for providers that retry at once, e.g. after a connection reset). Default `0s`.
    pub retry_window: Option<HumanDuration>,
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
    /// How long the provider waits for an answer before it counts the delivery as failed (and retries).
    /// An answer written later than this is uncertain: a copy of that event then dedups. Default `10s`.
    pub provider_timeout: Option<HumanDuration>,
    /// Identical bodies that arrive this close together are one delivery retried, whatever the first
    /// answer was (for providers that retry at once, e.g. after a connection reset). Default `0s`.
    pub retry_window: Option<HumanDuration>,
}

/// Retry behaviour shared by every sink kind.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// First backoff after a failure. Default `1s`.
    #[serde(default = "limits::default_initial_backoff")]
    pub initial_backoff: HumanDuration,
    /// Backoff cap; backoff doubles up to it, with full jitter. Default `1h`, or `1m` for broker sinks
    /// (`kafka`, `amqp`) so that deliveries resume soon after a broker outage ends.
    pub max_backoff: Option<HumanDuration>,
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
            max_backoff: None,
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
    #[serde(default, deserialize_with = "super::secret::secret_map")]
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

/// Compression codec of a `kafka` sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum KafkaCompression {
    /// No compression (default).
    #[default]
    None,
    /// gzip.
    Gzip,
    /// Snappy.
    Snappy,
    /// LZ4.
    Lz4,
    /// Zstandard.
    Zstd,
}

impl KafkaCompression {
    /// librdkafka's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            KafkaCompression::None => "none",
            KafkaCompression::Gzip => "gzip",
            KafkaCompression::Snappy => "snappy",
            KafkaCompression::Lz4 => "lz4",
            KafkaCompression::Zstd => "zstd",
        }
    }
}

/// `[sinks.<id>] kind = "kafka"`: produce each event to a Kafka topic (idempotent producer, `acks=all`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// Always `"kafka"`.
    pub kind: String,
    /// Bootstrap brokers, `host:port`.
    pub brokers: Vec<String>,
    /// Topic template, e.g. `clockify.{event}` (see the README's templates).
    pub topic: String,
    /// Message key template, e.g. `{body.workspaceId}`; default: no key.
    pub key: Option<String>,
    /// `none` (default), `gzip`, `snappy`, `lz4` or `zstd`.
    #[serde(default)]
    pub compression: KafkaCompression,
    /// How long the producer may keep trying to get one message acknowledged (librdkafka
    /// `message.timeout.ms`); past it the delivery fails and is retried by the sink's policy. Default `30s`.
    #[serde(default = "limits::default_kafka_message_timeout")]
    pub message_timeout: HumanDuration,
    /// Most messages waiting in the producer's local queue (`queue.buffering.max.messages`). Default 100000.
    #[serde(default = "limits::default_kafka_queue_max_messages")]
    pub queue_max_messages: u32,
    /// How long the producer waits to fill a batch (`linger.ms`). Default `5ms`.
    #[serde(default = "limits::default_kafka_linger")]
    pub linger: HumanDuration,
    /// `plaintext` (default), `ssl`, `sasl_plaintext` or `sasl_ssl` (`ssl` needs the `kafka-tls` build
    /// feature).
    pub security_protocol: Option<String>,
    /// `PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512`, `OAUTHBEARER` or `GSSAPI` (`kafka-gssapi` build feature).
    pub sasl_mechanism: Option<String>,
    /// SASL user name.
    pub sasl_username: Option<String>,
    /// SASL password (a secret).
    pub sasl_password: Option<SecretSpec>,
    /// CA certificate(s) (PEM file) to verify the brokers; default: the system's.
    pub ssl_ca_location: Option<PathBuf>,
    /// Client certificate (PEM file) for mutual TLS.
    pub ssl_certificate_location: Option<PathBuf>,
    /// Client private key (PEM file) for mutual TLS.
    pub ssl_key_location: Option<PathBuf>,
    /// Password of the client private key (a secret).
    pub ssl_key_password: Option<SecretSpec>,
    /// Any other librdkafka producer property, e.g. `"client.id" = "hookbridge-eu"`. Properties hookbridge
    /// sets itself for its guarantees (`acks`, `enable.idempotence`, ...) cannot be overridden.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// Deliveries in flight at once (the producer batches them). Default 256.
    #[serde(default = "limits::default_broker_in_flight")]
    pub max_in_flight: usize,
    /// Retry backoff.
    #[serde(default)]
    pub retry: RetryConfig,
}

/// `[sinks.<id>.exchange]` of an `amqp` sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpExchangeConfig {
    /// Exchange name; `""` is the default exchange (the routing key is then a queue name).
    pub name: String,
    /// `direct`, `fanout`, `topic` (default) or `headers`.
    #[serde(rename = "type", default = "limits::default_amqp_exchange_type")]
    pub kind: String,
    /// Declare the exchange when connecting (default true; false: it must exist).
    #[serde(default = "limits::yes")]
    pub declare: bool,
    /// Declared durable (survives a broker restart). Default true.
    #[serde(default = "limits::yes")]
    pub durable: bool,
}

/// `[sinks.<id>] kind = "amqp"`: publish each event to a RabbitMQ (AMQP 0-9-1) exchange with publisher
/// confirms.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSinkConfig {
    /// Always `"amqp"`.
    pub kind: String,
    /// Broker URL, `amqp://user:password@host:5672/vhost` or `amqps://...` (a secret: it holds a password).
    pub url: SecretSpec,
    /// The exchange to publish to.
    pub exchange: AmqpExchangeConfig,
    /// Routing key template, e.g. `{source}.{event}` (see the README's templates).
    pub routing_key: String,
    /// Publish `mandatory`: a message no queue receives fails the delivery (retried, then dead-lettered)
    /// instead of vanishing. Default true.
    #[serde(default = "limits::yes")]
    pub mandatory: bool,
    /// Time allowed to connect, and for the broker to confirm one message. Default `10s`.
    #[serde(default = "limits::default_sink_timeout")]
    pub timeout: HumanDuration,
    /// Deliveries in flight at once (their confirms are pipelined on one channel). Default 256.
    #[serde(default = "limits::default_broker_in_flight")]
    pub max_in_flight: usize,
    /// Retry backoff.
    #[serde(default)]
    pub retry: RetryConfig,
}

/// `[plugins.<id>]`: a WebAssembly component run as a destination of routes (see the README's plugins).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// The component (`.wasm`, built for `wasm32-wasip2`); relative to the config file.
    pub path: PathBuf,
    /// The plugin's own settings, passed to its `init` as JSON.
    #[serde(default)]
    pub config: serde_json::Map<String, serde_json::Value>,
    /// Secrets added to `config` under their keys (e.g. `api_key = "${CLOCKIFY_API_KEY}"`), so that they
    /// are written as references, not values.
    #[serde(default, deserialize_with = "super::secret::secret_map")]
    pub secrets: BTreeMap<String, SecretSpec>,
    /// Hosts the plugin may send HTTP requests to: `api.clockify.me`, `127.0.0.1:8080` (that port only),
    /// `*.clockify.me` (any subdomain). Default none.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Most linear memory one invocation may use. Default `64MiB`, at most `1GiB`.
    #[serde(default = "limits::default_plugin_memory")]
    pub memory_limit: HumanSize,
    /// Wall time one invocation may take, host calls included. Default `100ms`.
    #[serde(default = "limits::default_plugin_time")]
    pub time_limit: HumanDuration,
    /// Fuel (roughly, WebAssembly instructions) one invocation may use. Default: no limit.
    pub fuel: Option<u64>,
    /// Timeout of one outbound HTTP request (also bounded by what is left of `time_limit`). Default `5s`.
    #[serde(default = "limits::default_sink_timeout")]
    pub http_timeout: HumanDuration,
    /// Outbound HTTP requests per second, per plugin (a burst of as many is allowed). Default 20.
    #[serde(default = "limits::default_plugin_http_rate")]
    pub http_rate_limit: u32,
    /// Environment variables granted to the plugin (values are secrets). Default none.
    #[serde(default, deserialize_with = "super::secret::secret_map")]
    pub env: BTreeMap<String, SecretSpec>,
    /// Host folders granted read-only, by the path the plugin sees: `{ "/data" = "plugin-data" }`. Default
    /// none.
    #[serde(default)]
    pub dirs: BTreeMap<String, PathBuf>,
    /// Events handled at once. Default 4.
    #[serde(default = "limits::default_plugin_in_flight")]
    pub max_in_flight: usize,
    /// Retry backoff of failed invocations.
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
    /// Sink or plugin ids to deliver to (fan-out when several).
    pub to: Vec<String>,
}
