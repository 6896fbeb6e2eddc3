//! Sink sections: `[sinks.<id>]` as written ([`super::types`]) to validated [`SinkSpec`]s.

use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::http::HeaderName;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::types::*;
use super::{ConfigErrors, Env, SecretString, de, kind_of};
use crate::limits;
use crate::template::Template;

/// Retry policy of a sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// First backoff.
    pub initial_backoff: Duration,
    /// Cap.
    pub max_backoff: Duration,
    /// Dead-letter a delivery whose event is older than this.
    pub max_age: Duration,
    /// Dead-letter after this many attempts.
    pub max_attempts: Option<u32>,
}

/// A validated `http` sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSinkSpec {
    /// Target.
    pub url: reqwest::Url,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Extra headers (values are secrets).
    pub headers: Vec<(HeaderName, SecretString)>,
}

/// A validated `file` sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSinkSpec {
    /// Absolute path of the JSON-lines file.
    pub path: PathBuf,
}

/// A validated `kafka` sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaSinkSpec {
    /// librdkafka producer properties, hookbridge's own and the operator's (values may be secrets).
    pub properties: Vec<(String, SecretString)>,
    /// Topic template.
    pub topic: Template,
    /// Key template.
    pub key: Option<Template>,
    /// `message.timeout.ms`: the longest one send may take.
    pub message_timeout: Duration,
}

/// A validated `amqp` sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpSinkSpec {
    /// Broker URL (a secret: it may hold a password).
    pub url: SecretString,
    /// Exchange name (`""`: the default exchange).
    pub exchange: String,
    /// Exchange type (`direct`, `fanout`, `topic`, `headers`).
    pub exchange_type: String,
    /// Declare the exchange when connecting.
    pub declare: bool,
    /// Declare it durable.
    pub durable: bool,
    /// Routing key template.
    pub routing_key: Template,
    /// Publish `mandatory`.
    pub mandatory: bool,
    /// Connect and confirm timeout.
    pub timeout: Duration,
}

/// What kind of sink, with its settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkKind {
    /// POST to a URL.
    Http(HttpSinkSpec),
    /// Append JSON lines to a file.
    File(FileSinkSpec),
    /// Produce to Kafka.
    Kafka(KafkaSinkSpec),
    /// Publish to an AMQP 0-9-1 exchange.
    Amqp(AmqpSinkSpec),
    /// Run a WebAssembly plugin (`[plugins.<id>]`).
    Plugin(super::plugins::PluginSpec),
}

impl SinkKind {
    /// The `kind` as written.
    pub fn name(&self) -> &'static str {
        match self {
            SinkKind::Http(_) => "http",
            SinkKind::File(_) => "file",
            SinkKind::Kafka(_) => "kafka",
            SinkKind::Amqp(_) => "amqp",
            SinkKind::Plugin(_) => "plugin",
        }
    }
}

/// A validated sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkSpec {
    /// The id (`[sinks.<id>]`).
    pub id: String,
    /// Kind and settings.
    pub kind: SinkKind,
    /// Deliveries in flight at once.
    pub max_in_flight: usize,
    /// Retry backoff.
    pub retry: RetryPolicy,
}

pub(crate) enum RawSink {
    Http(HttpSinkConfig),
    File(FileSinkConfig),
    Kafka(Box<KafkaSinkConfig>),
    Amqp(Box<AmqpSinkConfig>),
}

pub(crate) fn de_sink(errs: &mut ConfigErrors, at: &str, entry: &Spanned<DeValue<'_>>) -> Option<RawSink> {
    match kind_of(errs, at, entry)? {
        "http" => de(errs, at, entry).map(RawSink::Http),
        "file" => de(errs, at, entry).map(RawSink::File),
        "kafka" => de(errs, at, entry).map(|c| RawSink::Kafka(Box::new(c))),
        "amqp" => de(errs, at, entry).map(|c| RawSink::Amqp(Box::new(c))),
        other => {
            errs.push_span(
                Some(entry.span()),
                &format!("{at}.kind"),
                format!("unknown sink kind {other:?} (expected http, file, kafka, amqp)"),
            );
            None
        }
    }
}

/// What every sink validation needs: where the section is, for messages, and how to resolve secrets.
struct Ctx<'a, 'b> {
    at: &'a str,
    root: &'a DeTable<'b>,
    errs: &'a mut ConfigErrors,
    base: &'a Path,
    env: &'a dyn Env,
    ok: bool,
}

impl Ctx<'_, '_> {
    fn error(&mut self, key: &str, message: &str) {
        let key = if key.is_empty() { self.at.to_owned() } else { format!("{}.{key}", self.at) };
        self.errs.locate(&key, self.root, message);
        self.ok = false;
    }

    fn template(&mut self, key: &str, text: &str) -> Option<Template> {
        match Template::parse(text) {
            Ok(t) => Some(t),
            Err(m) => {
                self.error(key, &format!("invalid template {text:?}: {m}"));
                None
            }
        }
    }

    fn secret(&mut self, key: &str, spec: &super::SecretSpec) -> Option<SecretString> {
        match spec.resolve(self.base, self.env) {
            Ok(v) => Some(v),
            Err(m) => {
                self.error(key, &m);
                None
            }
        }
    }
}

impl RawSink {
    pub(crate) fn validate(
        self,
        id: &str,
        at: &str,
        root: &DeTable<'_>,
        errs: &mut ConfigErrors,
        base: &Path,
        env: &dyn Env,
    ) -> Option<SinkSpec> {
        let (max_in_flight, retry, broker) = match &self {
            RawSink::Http(c) => (c.max_in_flight, c.retry, false),
            RawSink::File(c) => (c.max_in_flight, c.retry, false),
            RawSink::Kafka(c) => (c.max_in_flight, c.retry, true),
            RawSink::Amqp(c) => (c.max_in_flight, c.retry, true),
        };
        let mut cx = Ctx { at, root, errs, base, env, ok: true };
        if max_in_flight == 0 {
            cx.error("max_in_flight", "must be at least 1");
        }
        let max_backoff = retry
            .max_backoff
            .unwrap_or_else(
                || if broker { limits::default_broker_max_backoff() } else { limits::default_max_backoff() },
            )
            .0;
        if retry.initial_backoff.0.is_zero() || retry.initial_backoff.0 > max_backoff {
            cx.error("retry", "initial_backoff must be more than 0 and at most max_backoff");
        }
        if retry.max_attempts == Some(0) {
            cx.error("retry.max_attempts", "must be at least 1");
        }
        if retry.max_age.0.is_zero() {
            cx.error("retry.max_age", "must be more than 0");
        }
        let kind = match self {
            RawSink::Http(c) => http(&mut cx, c).map(SinkKind::Http),
            RawSink::File(c) => Some(SinkKind::File(FileSinkSpec { path: base.join(&c.path) })),
            RawSink::Kafka(c) => kafka(&mut cx, *c).map(SinkKind::Kafka),
            RawSink::Amqp(c) => amqp(&mut cx, *c).map(SinkKind::Amqp),
        };
        let kind = kind.filter(|_| cx.ok)?;
        Some(SinkSpec {
            id: id.to_owned(),
            kind,
            max_in_flight,
            retry: RetryPolicy {
                initial_backoff: retry.initial_backoff.0,
                max_backoff,
                max_age: retry.max_age.0,
                max_attempts: retry.max_attempts,
            },
        })
    }
}

fn http(cx: &mut Ctx<'_, '_>, c: HttpSinkConfig) -> Option<HttpSinkSpec> {
    let url = match reqwest::Url::parse(&c.url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Some(u),
        Ok(_) => {
            cx.error("url", &format!("{:?} is not an http(s) URL", c.url));
            None
        }
        Err(e) => {
            cx.error("url", &format!("invalid URL {:?}: {e}", c.url));
            None
        }
    };
    if c.timeout.0.is_zero() {
        cx.error("timeout", "must be more than 0");
    }
    let mut headers = Vec::new();
    for (name, spec) in &c.headers {
        let key = format!("headers.{name}");
        let Ok(h) = HeaderName::from_bytes(name.as_bytes()) else {
            cx.error(&key, &format!("{name:?} is not a valid header name"));
            continue;
        };
        match cx.secret(&key, spec) {
            Some(v) if axum::http::HeaderValue::from_str(v.expose()).is_ok() => headers.push((h, v)),
            Some(_) => cx.error(&key, "the value is not a valid header value"),
            None => {}
        }
    }
    Some(HttpSinkSpec { url: url?, timeout: c.timeout.0, headers })
}

/// librdkafka properties that hookbridge sets for its delivery guarantees and health reporting.
const KAFKA_RESERVED: [&str; 9] = [
    "bootstrap.servers",
    "acks",
    "request.required.acks",
    "enable.idempotence",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "statistics.interval.ms",
    "max.in.flight.requests.per.connection",
    "max.in.flight",
];

/// Whether this build has librdkafka's TLS (and with it SCRAM).
const KAFKA_TLS: bool = cfg!(feature = "kafka-tls");
/// Whether this build has librdkafka's Kerberos (GSSAPI).
const KAFKA_GSSAPI: bool = cfg!(feature = "kafka-gssapi");

fn kafka(cx: &mut Ctx<'_, '_>, c: KafkaSinkConfig) -> Option<KafkaSinkSpec> {
    let mut props: Vec<(String, SecretString)> = Vec::new();
    let mut set = |k: &str, v: &str| props.push((k.to_owned(), SecretString::new(v)));
    if c.brokers.is_empty() {
        cx.error("brokers", "list at least one broker, as host:port");
    }
    for (i, b) in c.brokers.iter().enumerate() {
        let valid = b.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if !valid {
            cx.error(&format!("brokers[{i}]"), &format!("{b:?} is not host:port"));
        }
    }
    set("bootstrap.servers", &c.brokers.join(","));
    let topic = cx.template("topic", &c.topic);
    if let Some(t) = &topic
        && !t.as_str().contains('{')
        && let Err(m) = kafka_topic_name(t.as_str())
    {
        cx.error("topic", &m);
    }
    let key = c.key.as_deref().and_then(|k| cx.template("key", k));
    if c.message_timeout.0 < Duration::from_millis(1) || c.message_timeout.0 > Duration::from_secs(3600) {
        cx.error("message_timeout", "must be between 1ms and 1h");
    }
    if c.queue_max_messages == 0 {
        cx.error("queue_max_messages", "must be at least 1");
    }
    if c.linger.0 > Duration::from_secs(5) {
        cx.error("linger", "must be at most 5s");
    }
    set("acks", "all");
    set("enable.idempotence", "true");
    set("message.timeout.ms", &c.message_timeout.0.as_millis().to_string());
    set("queue.buffering.max.messages", &c.queue_max_messages.to_string());
    set("linger.ms", &c.linger.0.as_millis().to_string());
    set("compression.type", c.compression.as_str());
    set("statistics.interval.ms", "1000");
    let protocol = c.security_protocol.as_deref().unwrap_or("plaintext").to_ascii_lowercase();
    match protocol.as_str() {
        "plaintext" | "sasl_plaintext" => {}
        "ssl" | "sasl_ssl" if KAFKA_TLS => {}
        "ssl" | "sasl_ssl" => cx.error(
            "security_protocol",
            "this hookbridge was built without TLS for Kafka; rebuild with `--features kafka-tls` (needs libssl-dev)",
        ),
        other => cx.error(
            "security_protocol",
            &format!("unknown protocol {other:?} (expected plaintext, ssl, sasl_plaintext, sasl_ssl)"),
        ),
    }
    set("security.protocol", &protocol);
    let sasl = protocol.starts_with("sasl_");
    match (&c.sasl_mechanism, sasl) {
        (Some(m), true) => {
            match m.as_str() {
                "PLAIN" | "OAUTHBEARER" => {}
                "SCRAM-SHA-256" | "SCRAM-SHA-512" if KAFKA_TLS => {}
                "SCRAM-SHA-256" | "SCRAM-SHA-512" => cx.error(
                    "sasl_mechanism",
                    "SCRAM needs the `kafka-tls` build feature (rebuild with `--features kafka-tls`)",
                ),
                "GSSAPI" if KAFKA_GSSAPI => {}
                "GSSAPI" => cx.error(
                    "sasl_mechanism",
                    "GSSAPI needs the `kafka-gssapi` build feature (rebuild with `--features kafka-gssapi`)",
                ),
                other => cx.error(
                    "sasl_mechanism",
                    &format!("unknown mechanism {other:?} (expected PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER, GSSAPI)"),
                ),
            }
            set("sasl.mechanism", m);
        }
        (None, true) => cx.error("sasl_mechanism", "required with a sasl_* security_protocol"),
        (Some(_), false) => cx.error("sasl_mechanism", "needs security_protocol sasl_plaintext or sasl_ssl"),
        (None, false) => {}
    }
    if !sasl && (c.sasl_username.is_some() || c.sasl_password.is_some()) {
        cx.error("sasl_username", "SASL credentials need security_protocol sasl_plaintext or sasl_ssl");
    }
    if let Some(u) = &c.sasl_username {
        set("sasl.username", u);
    }
    if let Some(p) = &c.sasl_password
        && let Some(v) = cx.secret("sasl_password", p)
    {
        props.push(("sasl.password".to_owned(), v));
    }
    for (key, path) in [
        ("ssl.ca.location", &c.ssl_ca_location),
        ("ssl.certificate.location", &c.ssl_certificate_location),
        ("ssl.key.location", &c.ssl_key_location),
    ] {
        if let Some(p) = path {
            let full = cx.base.join(p);
            if !full.is_file() {
                cx.error(&key.replace('.', "_"), &format!("{} is not a readable file", full.display()));
            }
            props.push((key.to_owned(), SecretString::new(full.display().to_string())));
        }
    }
    if let Some(p) = &c.ssl_key_password
        && let Some(v) = cx.secret("ssl_key_password", p)
    {
        props.push(("ssl.key.password".to_owned(), v));
    }
    for (k, v) in &c.options {
        if KAFKA_RESERVED.contains(&k.as_str()) || props.iter().any(|(p, _)| p == k) {
            cx.error(&format!("options.{k}"), "hookbridge sets this property itself (use the sink's own setting)");
            continue;
        }
        props.push((k.clone(), SecretString::new(v.as_str())));
    }
    // librdkafka checks each name and value without connecting, so `check` reports what it would refuse.
    // Its own description is used, never the error's text as a whole (which repeats the value).
    for (k, v) in &props {
        let mut probe = rdkafka::ClientConfig::new();
        probe.set(k, v.expose());
        if let Err(e) = probe.create_native_config() {
            let why = match &e {
                rdkafka::error::KafkaError::ClientConfig(_, description, _, _) => description.clone(),
                _ => "invalid".to_owned(),
            };
            let at = if c.options.contains_key(k) { format!("options.{k}") } else { "options".to_owned() };
            cx.error(&at, &format!("librdkafka refuses {k:?}: {why}"));
        }
    }
    Some(KafkaSinkSpec { properties: props, topic: topic?, key, message_timeout: c.message_timeout.0 })
}

/// Checks a rendered Kafka topic name: 1 to 249 characters from `[a-zA-Z0-9._-]`, not `.` or `..`.
pub fn kafka_topic_name(name: &str) -> Result<(), String> {
    let legal = name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if name.is_empty() || name.len() > 249 || !legal || name == "." || name == ".." {
        return Err(format!(
            "{name:?} is not a valid Kafka topic name (1-249 characters from a-z, A-Z, 0-9, '.', '_', '-')"
        ));
    }
    Ok(())
}

fn amqp(cx: &mut Ctx<'_, '_>, c: AmqpSinkConfig) -> Option<AmqpSinkSpec> {
    let url = cx.secret("url", &c.url)?;
    if let Err(e) = url.expose().parse::<lapin::uri::AMQPUri>() {
        // Some of the parser's messages repeat the URL, which may hold a password.
        let e = if url.expose().is_empty() { e } else { e.replace(url.expose(), "<url>") };
        cx.error("url", &format!("not an amqp:// or amqps:// URL: {e}"));
    }
    let kinds = ["direct", "fanout", "topic", "headers"];
    if !kinds.contains(&c.exchange.kind.as_str()) {
        cx.error(
            "exchange.type",
            &format!("unknown exchange type {:?} (expected {})", c.exchange.kind, kinds.join(", ")),
        );
    }
    if c.exchange.name.is_empty() && c.exchange.declare && c.exchange.kind != "direct" {
        cx.error("exchange", "the default exchange (name \"\") cannot be declared; set declare = false");
    }
    if c.exchange.name.starts_with("amq.") && c.exchange.declare {
        // Declaring a built-in exchange works only with its exact settings; leave them alone.
        cx.error("exchange.declare", "exchanges named amq.* are built in; set declare = false to use one");
    }
    if c.exchange.name.len() > 255 {
        cx.error("exchange.name", "must be at most 255 bytes");
    }
    let routing_key = cx.template("routing_key", &c.routing_key);
    if c.timeout.0.is_zero() {
        cx.error("timeout", "must be more than 0");
    }
    Some(AmqpSinkSpec {
        url,
        declare: c.exchange.declare && !c.exchange.name.is_empty(),
        exchange: c.exchange.name,
        exchange_type: c.exchange.kind,
        durable: c.exchange.durable,
        routing_key: routing_key?,
        mandatory: c.mandatory,
        timeout: c.timeout.0,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{Config, ProcessEnv};

    fn parse(sinks: &str) -> Result<Config, String> {
        let text = format!(
            "[sources.c]\nkind = \"clockify\"\nsecrets = [\"s\"]\n{sinks}\n[[routes]]\nname = \"r\"\nto = [\"x\"]\n"
        );
        Config::parse(&text, None, Path::new("."), &ProcessEnv).map_err(|e| e.to_string())
    }

    #[test]
    fn broker_sinks_get_their_defaults() {
        let c = parse(
            "[sinks.x]\nkind = \"amqp\"\nurl = \"amqp://u:p@h:5672/%2f\"\nexchange = { name = \"e\" }\nrouting_key = \"{event}\"",
        )
        .unwrap();
        let s = &c.sinks["x"];
        assert_eq!(s.max_in_flight, 256);
        assert_eq!(s.retry.max_backoff, Duration::from_secs(60), "broker sinks back off at most a minute");
        let SinkKind::Amqp(a) = &s.kind else { panic!("{s:?}") };
        assert!(a.declare && a.durable && a.mandatory);
        assert_eq!((a.exchange_type.as_str(), a.timeout), ("topic", Duration::from_secs(10)));

        let c = parse("[sinks.x]\nkind = \"kafka\"\nbrokers = [\"h:9092\"]\ntopic = \"t.{event}\"").unwrap();
        let SinkKind::Kafka(k) = &c.sinks["x"].kind else { panic!() };
        let prop = |name: &str| k.properties.iter().find(|(p, _)| p == name).map(|(_, v)| v.expose().to_owned());
        assert_eq!(prop("acks").as_deref(), Some("all"));
        assert_eq!(prop("enable.idempotence").as_deref(), Some("true"));
        assert_eq!(prop("message.timeout.ms").as_deref(), Some("30000"));
        assert_eq!(prop("bootstrap.servers").as_deref(), Some("h:9092"));
        let http = parse("[sinks.x]\nkind = \"http\"\nurl = \"http://h/\"").unwrap();
        assert_eq!(http.sinks["x"].retry.max_backoff, Duration::from_secs(3600));
    }

    #[test]
    fn errors_never_repeat_a_broker_password() {
        // A URL the AMQP parser refuses is echoed by the parser itself: hookbridge must not pass it on.
        let e = parse(
            "[sinks.x]\nkind = \"amqp\"\nurl = \"amqp:user:hunter2\"\nexchange = { name = \"e\" }\nrouting_key = \"k\"",
        )
        .unwrap_err();
        assert!(e.contains("sinks.x.url") && !e.contains("hunter2"), "{e}");
        let e = parse(
            "[sinks.x]\nkind = \"kafka\"\nbrokers = [\"h:1\"]\ntopic = \"t\"\noptions = { \"socket.timeout.ms\" = \"hunter2\" }",
        )
        .unwrap_err();
        assert!(e.contains("socket.timeout.ms") && !e.contains("hunter2"), "{e}");
    }

    #[test]
    fn tls_and_sasl_need_the_build_features_they_use() {
        let e = parse("[sinks.x]\nkind = \"kafka\"\nbrokers = [\"h:1\"]\ntopic = \"t\"\nsecurity_protocol = \"ssl\"");
        assert_eq!(e.is_ok(), KAFKA_TLS, "{e:?}");
        if let Err(e) = e {
            assert!(e.contains("--features kafka-tls"), "{e}");
        }
        let e = parse("[sinks.x]\nkind = \"kafka\"\nbrokers = [\"h:1\"]\ntopic = \"t\"\nsasl_username = \"u\"")
            .unwrap_err();
        assert!(e.contains("sasl_plaintext or sasl_ssl"), "{e}");
        let ok = parse(
            "[sinks.x]\nkind = \"kafka\"\nbrokers = [\"h:1\"]\ntopic = \"t\"\nsecurity_protocol = \"sasl_plaintext\"\nsasl_mechanism = \"PLAIN\"\nsasl_username = \"u\"\nsasl_password = \"p\"",
        );
        assert!(ok.is_ok(), "{ok:?}");
    }
}
