//! Configuration: parse one TOML file, validate all of it, report every problem with file, line and key.
//!
//! Loading is two steps, as in Vector: [`types`] is the file's shape (closed, documented, defaults), and
//! [`Config`] is the validated result (secrets resolved, paths absolute, routes compiled and checked against
//! sources and sinks). Building running components from a [`Config`] is the bridge's job, not this module's.

mod errors;
mod plugins;
pub mod secret;
mod sinks;
pub mod types;
pub mod units;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use axum::http::HeaderName;
use serde::Deserialize;
use serde::de::IntoDeserializer;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

pub use errors::{ConfigError, ConfigErrors};
pub use plugins::PluginSpec;
pub use secret::{Env, ProcessEnv, SecretSpec, SecretString};
use sinks::de_sink;
pub use sinks::{
    AmqpSinkSpec, FileSinkSpec, HttpSinkSpec, KafkaSinkSpec, RetryPolicy, SinkKind, SinkSpec, kafka_topic_name,
};
use types::*;

use crate::route::RouteTable;
use crate::verify::{HmacScheme, Locator, Scheme};

/// A validated source.
#[derive(Debug, Clone)]
pub struct Source {
    /// The id (`[sources.<id>]`).
    pub id: String,
    /// URL path it is served at.
    pub path: String,
    /// Verification scheme and settings.
    pub scheme: Scheme,
    /// How its content-keyed webhooks dedup.
    pub dedup: SourceDedup,
    /// Its metric children, resolved at first use (`Default::default()`).
    pub metrics: crate::metrics::SourceMetrics,
}

/// How a source's webhooks whose dedup key is their content dedup (see [`crate::store::Dedup::Content`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceDedup {
    /// How long the provider waits for an answer (`provider_timeout`).
    pub provider_timeout: std::time::Duration,
    /// Copies this close together are a retry whatever the first answer (`retry_window`).
    pub retry_window: std::time::Duration,
}

impl Default for SourceDedup {
    fn default() -> Self {
        SourceDedup {
            provider_timeout: crate::limits::DEFAULT_PROVIDER_TIMEOUT,
            retry_window: std::time::Duration::ZERO,
        }
    }
}

/// The validated `[admin]` section.
#[derive(Debug, Clone)]
pub struct AdminSpec {
    /// Listener address.
    pub listen: std::net::SocketAddr,
    /// Bearer token.
    pub token: SecretString,
    /// TLS (paths absolute), if the admin listener terminates it.
    pub tls: Option<crate::tls::TlsSpec>,
}

/// The validated listener settings of `[server]` that are not plain values.
#[derive(Debug, Clone, Default)]
pub struct Listeners {
    /// Token of the internal listener, when configured.
    pub internal_token: Option<SecretString>,
    /// TLS of the webhook listener (paths absolute).
    pub tls: Option<crate::tls::TlsSpec>,
    /// TLS of the internal listener (paths absolute).
    pub internal_tls: Option<crate::tls::TlsSpec>,
}

/// A whole validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from (for messages), if any.
    pub origin: Option<PathBuf>,
    /// `[server]`.
    pub server: ServerConfig,
    /// `[storage]`, with `data_dir` made absolute.
    pub storage: StorageConfig,
    /// `[storage.postgres]` resolved, when `storage.backend = "postgres"`.
    pub postgres: Option<crate::store::PostgresSpec>,
    /// `[admin]`, if the admin API is on.
    pub admin: Option<AdminSpec>,
    /// `[server]`'s secrets and TLS files, resolved.
    pub listeners: Listeners,
    /// `[sources.*]` by id.
    pub sources: BTreeMap<String, Source>,
    /// `[sinks.*]` by id.
    pub sinks: BTreeMap<String, SinkSpec>,
    /// `[[routes]]`, as written (compiled again by the bridge; validation compiled them once already).
    pub routes: Vec<RouteConfig>,
}

/// `[storage.postgres]` checked and resolved (for `backend = "postgres"`), errors into `errs`.
fn postgres_spec(
    storage: &StorageConfig,
    root: &DeTable<'_>,
    errs: &mut ConfigErrors,
    base: &Path,
    env: &dyn Env,
) -> Option<crate::store::PostgresSpec> {
    let Some(pg) = &storage.postgres else {
        if storage.backend == StorageBackend::Postgres {
            errs.locate(
                "storage.backend",
                root,
                "backend = \"postgres\" needs a [storage.postgres] section with its url",
            );
        }
        return None;
    };
    if storage.backend != StorageBackend::Postgres {
        errs.locate("storage.postgres", root, "is used only with storage.backend = \"postgres\"");
        return None;
    }
    let mut ok = true;
    let url = match pg.url.resolve(base, env) {
        Ok(url) => Some(url),
        Err(m) => {
            errs.locate("storage.postgres.url", root, &m);
            None
        }
    };
    if let Some(url) = &url
        && let Err(e) = crate::store::PostgresSpec::parse_url(url.expose())
    {
        errs.locate("storage.postgres.url", root, &e);
        ok = false;
    }
    for (key, bad) in [
        ("storage.postgres.pool_size", pg.pool_size == 0 || pg.pool_size > 1000),
        ("storage.postgres.statement_timeout", pg.statement_timeout.0.is_zero()),
        ("storage.postgres.connect_timeout", pg.connect_timeout.0.is_zero()),
    ] {
        if bad {
            errs.locate(
                key,
                root,
                if key.ends_with("pool_size") { "must be between 1 and 1000" } else { "must be more than 0" },
            );
            ok = false;
        }
    }
    if pg.lease.0 < std::time::Duration::from_secs(1) {
        errs.locate("storage.postgres.lease", root, "must be at least 1s (it is renewed every third of it)");
        ok = false;
    }
    let node_id = match &pg.node_id {
        Some(id) => id.clone(),
        None => crate::store::PostgresSpec::default_node_id(),
    };
    if node_id.is_empty() || node_id.len() > 128 || node_id.chars().any(|c| c.is_control()) {
        errs.locate("storage.postgres.node_id", root, "must be 1 to 128 printable characters");
        ok = false;
    }
    let tls = match (pg.tls, &pg.ca_file) {
        (crate::config::types::PgTlsMode::Off, Some(_)) => {
            errs.locate("storage.postgres.ca_file", root, "is used only with tls = \"verify-full\"");
            ok = false;
            crate::store::PgTls::Off
        }
        (crate::config::types::PgTlsMode::Off, None) => crate::store::PgTls::Off,
        (crate::config::types::PgTlsMode::VerifyFull, ca) => {
            let tls = crate::store::PgTls::VerifyFull { ca_file: ca.as_ref().map(|p| base.join(p)) };
            if let Err(e) = tls.check() {
                let key = if ca.is_some() { "storage.postgres.ca_file" } else { "storage.postgres.tls" };
                errs.locate(key, root, &e);
                ok = false;
            }
            tls
        }
    };
    let url = url?;
    ok.then_some(crate::store::PostgresSpec {
        url,
        pool_size: pg.pool_size,
        statement_timeout: pg.statement_timeout.0,
        connect_timeout: pg.connect_timeout.0,
        lease: pg.lease.0,
        node_id,
        tls,
    })
}

/// Paths that webhooks may not use because the daemon serves something else there.
const RESERVED_PATHS: [&str; 4] = ["/healthz", "/readyz", "/metrics", "/dashboard"];
/// Path prefixes the daemon serves (live channels).
const RESERVED_PREFIXES: [&str; 1] = ["/live/"];

impl Config {
    /// Reads and validates a config file, with secrets from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        Self::load_with_env(path, &ProcessEnv)
    }

    /// Reads and validates a config file, with secrets from `env`.
    pub fn load_with_env(path: &Path, env: &dyn Env) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors::single(path, format!("cannot read config file: {e}")))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let base = if base.as_os_str().is_empty() { PathBuf::from(".") } else { base };
        Self::parse(&text, Some(path), &base, env)
    }

    /// Parses and validates config text. `origin` names it in messages; relative paths are relative to
    /// `base`.
    pub fn parse(text: &str, origin: Option<&Path>, base: &Path, env: &dyn Env) -> Result<Config, ConfigErrors> {
        let mut errs = ConfigErrors::new(origin, text);
        let (root, syntax) = DeTable::parse_recoverable(text);
        if !syntax.is_empty() {
            for e in syntax {
                errs.push_span(e.span(), "", e.message().to_owned());
            }
            return Err(errs);
        }
        let root = root.into_inner();
        let mut server = None;
        let mut storage = None;
        let mut admin_raw = None;
        let mut raw_sources = Vec::new();
        let mut raw_sinks = Vec::new();
        let mut raw_routes = Vec::new();
        let mut raw_plugins = Vec::new();
        for (key, value) in root.iter() {
            let name: &str = key.get_ref();
            match name {
                "server" => server = de::<ServerConfig>(&mut errs, "server", value),
                "storage" => storage = de::<StorageConfig>(&mut errs, "storage", value),
                "admin" => admin_raw = de::<AdminConfig>(&mut errs, "admin", value),
                "sources" | "sinks" | "plugins" => match value.get_ref() {
                    DeValue::Table(table) => {
                        for (id, entry) in table.iter() {
                            let id: &str = id.get_ref();
                            let at = format!("{name}.{id}");
                            if !valid_id(id) {
                                errs.push_span(
                                    Some(entry.span()),
                                    &at,
                                    "ids use only letters, digits, '-' and '_'".into(),
                                );
                            }
                            if name == "sources" {
                                raw_sources.push((id.to_owned(), entry.span(), de_source(&mut errs, &at, entry)));
                            } else if name == "plugins" {
                                raw_plugins.push((id.to_owned(), de::<PluginConfig>(&mut errs, &at, entry)));
                            } else {
                                raw_sinks.push((id.to_owned(), entry.span(), de_sink(&mut errs, &at, entry)));
                            }
                        }
                    }
                    _ => errs.push_span(Some(value.span()), name, format!("`{name}` must be a table of tables")),
                },
                "routes" => match value.get_ref() {
                    DeValue::Array(items) => {
                        for (i, item) in items.iter().enumerate() {
                            let at = format!("routes[{i}]");
                            raw_routes.push((item.span(), de::<RouteConfig>(&mut errs, &at, item)));
                        }
                    }
                    _ => errs.push_span(Some(value.span()), "routes", "write routes as [[routes]] tables".into()),
                },
                other => errs.push_span(
                    Some(key.span()),
                    other,
                    "unknown section (expected server, storage, admin, sources, sinks, plugins, routes)".into(),
                ),
            }
        }

        let server = server.unwrap_or_default();
        let mut storage = storage.unwrap_or_default();
        storage.data_dir = base.join(&storage.data_dir);
        if storage.dedup_window > storage.retention {
            errs.locate(
                "storage.dedup_window",
                &root,
                "must not be longer than storage.retention (events are the dedup memory)",
            );
        }
        for (key, zero) in [
            ("server.max_concurrency", server.max_concurrency == 0),
            ("server.max_unverified", server.max_unverified == 0),
            ("server.max_connections", server.max_connections == 0),
            ("server.max_body_size", server.max_body_size.0 == 0),
            ("server.request_timeout", server.request_timeout.0.is_zero()),
            ("server.body_timeout", server.body_timeout.0.is_zero()),
            ("server.header_timeout", server.header_timeout.0.is_zero()),
            ("server.shutdown_timeout", server.shutdown_timeout.0.is_zero()),
        ] {
            if zero {
                errs.locate(key, &root, "must be more than 0");
            }
        }
        let postgres = postgres_spec(&storage, &root, &mut errs, base, env);
        if storage.backend == StorageBackend::Embedded
            && storage.engine == crate::store::Engine::Log
            && server.max_body_size.0 > 64 << 20
        {
            // A log frame holds 80 MiB: the body, its headers (at most 1 MiB) and its fields.
            errs.locate("server.max_body_size", &root, "must be at most 64MiB with storage.engine = \"log\"");
        }
        if server.max_header_size.0 < 1024 || server.max_header_size.0 > 1 << 20 {
            errs.locate("server.max_header_size", &root, "must be between 1KiB and 1MiB");
        }
        let tls_spec = |t: &types::TlsConfig| crate::tls::TlsSpec {
            cert: base.join(&t.cert),
            key: base.join(&t.key),
            client_ca: t.client_ca.as_ref().map(|c| base.join(c)),
        };
        let mut listeners = Listeners {
            internal_token: None,
            tls: server.tls.as_ref().map(tls_spec),
            internal_tls: server.internal_tls.as_ref().map(tls_spec),
        };
        // TLS files are read here too, so that `check` and a reload refuse what the listener could not load.
        for (key, spec) in [("server.tls", &listeners.tls), ("server.internal_tls", &listeners.internal_tls)] {
            if let Some(spec) = spec
                && let Err(e) = crate::tls::Acceptor::new(spec)
            {
                errs.locate(key, &root, &e.to_string());
            }
        }
        if let Some(t) = &server.internal_token {
            match t.resolve(base, env) {
                Ok(token) if token.expose().len() >= 16 => listeners.internal_token = Some(token),
                Ok(_) => errs.locate("server.internal_token", &root, "use a token of at least 16 characters"),
                Err(m) => errs.locate("server.internal_token", &root, &m),
            }
        }
        if server.internal_listen == server.listen {
            errs.locate(
                "server.internal_listen",
                &root,
                "the internal listener needs its own address, not server.listen",
            );
        }

        let admin = match admin_raw {
            None => None,
            Some(a) => {
                let tls = a.tls.as_ref().map(tls_spec);
                if let Some(spec) = &tls
                    && let Err(e) = crate::tls::Acceptor::new(spec)
                {
                    errs.locate("admin.tls", &root, &e.to_string());
                }
                match a.token.resolve(base, env) {
                    Ok(token) if token.expose().len() >= 16 => Some(AdminSpec { listen: a.listen, token, tls }),
                    Ok(_) => {
                        errs.locate("admin.token", &root, "use a token of at least 16 characters");
                        None
                    }
                    Err(m) => {
                        errs.locate("admin.token", &root, &m);
                        None
                    }
                }
            }
        };
        if let Some(a) = &admin {
            if a.listen == server.listen {
                errs.locate("admin.listen", &root, "the admin API needs its own address, not server.listen");
            }
            if a.listen == server.internal_listen {
                errs.locate("admin.listen", &root, "the admin API needs its own address, not server.internal_listen");
            }
        }

        // Sources.
        let mut sources = BTreeMap::new();
        let mut paths: BTreeMap<String, String> = BTreeMap::new();
        for (id, span, raw) in raw_sources {
            let Some(raw) = raw else { continue };
            let at = format!("sources.{id}");
            let path = raw.path().map(str::to_owned).unwrap_or_else(|| format!("/hooks/{id}"));
            if !path.starts_with('/') || path.contains(['?', '#', ' ']) || path.contains("//") {
                errs.locate(
                    &format!("{at}.path"),
                    &root,
                    &format!("path {path:?} must start with '/' and be a plain path"),
                );
            } else if RESERVED_PATHS.contains(&path.as_str())
                || RESERVED_PREFIXES.iter().any(|p| path.starts_with(p) || path == p.trim_end_matches('/'))
            {
                errs.locate(&format!("{at}.path"), &root, &format!("path {path} is reserved by the daemon"));
            } else if let Some(other) = paths.insert(path.clone(), id.clone()) {
                errs.push_span(Some(span), &at, format!("path {path} is already used by source {other:?}"));
            }
            let (provider_timeout, retry_window) = raw.dedup();
            let dedup = SourceDedup {
                provider_timeout: provider_timeout.map_or(crate::limits::DEFAULT_PROVIDER_TIMEOUT, |d| d.0),
                retry_window: retry_window.map_or(std::time::Duration::ZERO, |d| d.0),
            };
            if dedup.provider_timeout.is_zero() || dedup.provider_timeout > crate::limits::MAX_PROVIDER_TIMEOUT {
                errs.locate(
                    &format!("{at}.provider_timeout"),
                    &root,
                    "must be more than 0s (every answer would count as unseen, and every copy as a retry) and at most 1h",
                );
            }
            if let Some(scheme) = raw.into_scheme(&at, &root, &mut errs, base, env) {
                if matches!(scheme, Scheme::None { .. }) {
                    tracing::warn!(source = %id, "source has kind = \"none\": its webhooks are not verified");
                }
                sources.insert(id.clone(), Source { id, path, scheme, dedup, metrics: Default::default() });
            }
        }

        if sources.is_empty() && !errs.mentions("sources") {
            errs.locate(
                "sources",
                &root,
                "no source is defined: the daemon would accept no webhook (add a [sources.<id>] section)",
            );
        }

        // Sinks.
        let mut sinks = BTreeMap::new();
        for (id, _span, raw) in raw_sinks {
            let Some(raw) = raw else { continue };
            let at = format!("sinks.{id}");
            if let Some(spec) = raw.validate(&id, &at, &root, &mut errs, base, env) {
                sinks.insert(id, spec);
            }
        }
        // Plugins share the sinks' namespace: routes name either in `to`.
        for (id, raw) in raw_plugins {
            let Some(raw) = raw else { continue };
            if sinks.contains_key(&id) {
                errs.locate(&format!("plugins.{id}"), &root, &format!("{id:?} is already the id of a sink"));
                continue;
            }
            if let Some(spec) = plugins::validate(&id, raw, &root, &mut errs, base, env) {
                sinks.insert(id, spec);
            }
        }

        // Routes: names, cross-references, globs and predicates.
        let mut routes = Vec::new();
        let mut names = BTreeMap::new();
        for (i, (span, raw)) in raw_routes.into_iter().enumerate() {
            let Some(r) = raw else { continue };
            let at = format!("routes[{i}]");
            if r.name.trim().is_empty() {
                errs.locate(&format!("{at}.name"), &root, "a route needs a non-empty name");
            } else if let Some(first) = names.insert(r.name.clone(), i) {
                errs.locate(
                    &format!("{at}.name"),
                    &root,
                    &format!("route name {:?} is already used by routes[{first}]", r.name),
                );
            }
            for (j, s) in r.sources.iter().enumerate() {
                if !sources.contains_key(s) && !errs.mentions(&format!("sources.{s}")) {
                    errs.locate(&format!("{at}.sources[{j}]"), &root, &format!("no source {s:?} is defined"));
                }
            }
            // A route that only Clockify sources feed names Clockify's event types: a misspelt one would
            // match nothing, silently.
            let clockify_only = {
                let feeding: Vec<&Source> = if r.sources.is_empty() {
                    sources.values().collect()
                } else {
                    r.sources.iter().filter_map(|s| sources.get(s)).collect()
                };
                !feeding.is_empty()
                    && feeding.iter().all(|s| matches!(s.scheme, Scheme::Clockify { .. } | Scheme::ClockifyAddon(_)))
            };
            for (j, e) in r.events.iter().enumerate() {
                let glob = e.contains(['*', '?', '[']);
                if clockify_only && !glob && !crate::addon::CLOCKIFY_EVENTS.contains(&e.as_str()) {
                    let closest = crate::addon::CLOCKIFY_EVENTS
                        .iter()
                        .min_by_key(|known| strsim::levenshtein(known, e))
                        .filter(|known| strsim::levenshtein(known, e) <= 3)
                        .map(|known| format!("; did you mean {known:?}?"))
                        .unwrap_or_default();
                    errs.locate(
                        &format!("{at}.events[{j}]"),
                        &root,
                        &format!(
                            "{e:?} is not a Clockify event type (the sources of this route are Clockify's){closest}"
                        ),
                    );
                }
            }
            for (j, t) in r.to.iter().enumerate() {
                if !sinks.contains_key(t)
                    && !errs.mentions(&format!("sinks.{t}"))
                    && !errs.mentions(&format!("plugins.{t}"))
                {
                    errs.locate(&format!("{at}.to[{j}]"), &root, &format!("no sink or plugin {t:?} is defined"));
                }
            }
            let _ = span;
            routes.push(r);
        }
        // Clockify accepts at most 10 webhooks in an add-on manifest.
        for source in sources.values() {
            if let Scheme::ClockifyAddon(a) = &source.scheme {
                let manifest = crate::addon::manifest(&source.id, a, &routes);
                let n = manifest["webhooks"].as_array().map(Vec::len).unwrap_or(0);
                if n > 10 {
                    errs.locate(
                        &format!("sources.{}", source.id),
                        &root,
                        &format!(
                            "the routes give this add-on {n} webhook events; Clockify allows at most 10 in a manifest"
                        ),
                    );
                }
            }
        }
        if let Err(route_errors) = RouteTable::compile(&routes) {
            for e in route_errors {
                errs.locate(&format!("routes[{}].{}", e.index, e.field), &root, &e.message);
            }
        }

        if errs.is_empty() {
            Ok(Config {
                origin: origin.map(Path::to_path_buf),
                server,
                storage,
                postgres,
                admin,
                listeners,
                sources,
                sinks,
                routes,
            })
        } else {
            Err(errs)
        }
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Deserializes one section, recording an error (with its span and key path) on failure.
pub(crate) fn de<T: for<'de> Deserialize<'de>>(
    errs: &mut ConfigErrors,
    at: &str,
    value: &Spanned<DeValue<'_>>,
) -> Option<T> {
    let span = value.span();
    let deserializer = value.clone().into_deserializer();
    match serde_path_to_error::deserialize::<_, T>(deserializer) {
        Ok(v) => Some(v),
        Err(e) => {
            let path = e.path().to_string();
            let key = if path == "." || path.is_empty() { at.to_owned() } else { format!("{at}.{path}") };
            let inner = e.into_inner();
            errs.push_span(inner.span().or(Some(span)), &key, inner.message().to_owned());
            None
        }
    }
}

/// The `kind` of a source or sink table.
pub(crate) fn kind_of<'a>(errs: &mut ConfigErrors, at: &str, entry: &'a Spanned<DeValue<'_>>) -> Option<&'a str> {
    let DeValue::Table(table) = entry.get_ref() else {
        errs.push_span(Some(entry.span()), at, "must be a table".into());
        return None;
    };
    match table.iter().find(|(k, _)| k.get_ref() == "kind").map(|(_, v)| v) {
        Some(v) => match v.get_ref() {
            DeValue::String(s) => Some(s.as_ref()),
            _ => {
                errs.push_span(Some(v.span()), &format!("{at}.kind"), "`kind` must be a string".into());
                None
            }
        },
        None => {
            errs.push_span(Some(entry.span()), at, "missing `kind`".into());
            None
        }
    }
}

enum RawSource {
    Clockify(ClockifySourceConfig),
    Clockodo(ClockodoSourceConfig),
    Hmac(HmacSourceConfig),
    Standard(StandardSourceConfig),
    Addon(AddonSourceConfig),
    None(NoneSourceConfig),
}

fn de_source(errs: &mut ConfigErrors, at: &str, entry: &Spanned<DeValue<'_>>) -> Option<RawSource> {
    match kind_of(errs, at, entry)? {
        "clockify" => de(errs, at, entry).map(RawSource::Clockify),
        "clockodo" => de(errs, at, entry).map(RawSource::Clockodo),
        "hmac" => de(errs, at, entry).map(RawSource::Hmac),
        "standard-webhooks" => de(errs, at, entry).map(RawSource::Standard),
        "clockify-addon" => de(errs, at, entry).map(RawSource::Addon),
        "none" => de(errs, at, entry).map(RawSource::None),
        other => {
            errs.push_span(
                Some(entry.span()),
                &format!("{at}.kind"),
                format!("unknown source kind {other:?} (expected clockify, clockify-addon, clockodo, hmac, standard-webhooks, none)"),
            );
            None
        }
    }
}

impl RawSource {
    /// `provider_timeout` and `retry_window` (Standard Webhooks dedups by its signed `webhook-id` only).
    fn dedup(&self) -> (Option<units::HumanDuration>, Option<units::HumanDuration>) {
        match self {
            RawSource::Clockify(c) => (c.provider_timeout, c.retry_window),
            RawSource::Clockodo(c) => (c.provider_timeout, c.retry_window),
            RawSource::Hmac(c) => (c.provider_timeout, c.retry_window),
            RawSource::Addon(c) => (c.provider_timeout, c.retry_window),
            RawSource::None(c) => (c.provider_timeout, c.retry_window),
            RawSource::Standard(_) => (None, None),
        }
    }

    fn path(&self) -> Option<&str> {
        match self {
            RawSource::Clockify(c) => c.path.as_deref(),
            RawSource::Clockodo(c) => c.path.as_deref(),
            RawSource::Hmac(c) => c.path.as_deref(),
            RawSource::Standard(c) => c.path.as_deref(),
            RawSource::Addon(c) => c.path.as_deref(),
            RawSource::None(c) => c.path.as_deref(),
        }
    }

    fn into_scheme(
        self,
        at: &str,
        root: &DeTable<'_>,
        errs: &mut ConfigErrors,
        base: &Path,
        env: &dyn Env,
    ) -> Option<Scheme> {
        match self {
            RawSource::Clockify(c) => {
                let secrets = resolve_secrets(at, &c.secrets, root, errs, base, env)?;
                Some(Scheme::Clockify { secrets })
            }
            RawSource::Clockodo(c) => {
                let secrets = resolve_secrets(at, &c.secrets, root, errs, base, env)?;
                Some(Scheme::Clockodo { secrets })
            }
            RawSource::Hmac(c) => {
                let secrets = resolve_secrets(at, &c.secrets, root, errs, base, env);
                let event = locator(at, "event", c.event_header, c.event_pointer, true, root, errs);
                if c.id_header.is_some() {
                    // The signature covers the body only: with the dedup key from a header, a captured request
                    // replays under a new id and is delivered again.
                    errs.locate(
                        &format!("{at}.id_header"),
                        root,
                        "the hmac signature does not cover headers, so a replayed request could carry a new id: use \
                         id_pointer (a field of the signed body), or leave it out (the body's SHA-256 is the key)",
                    );
                }
                let id = locator(at, "id", None, c.id_pointer, false, root, errs);
                if HeaderName::from_bytes(c.header.as_bytes()).is_err() {
                    errs.locate(&format!("{at}.header"), root, &format!("{:?} is not a valid header name", c.header));
                    return None;
                }
                if !HmacScheme::valid_prefix(&c.prefix) {
                    errs.locate(
                        &format!("{at}.prefix"),
                        root,
                        "use printable ASCII, not starting with a space: no header value could carry this prefix",
                    );
                    return None;
                }
                let timestamp = match (&c.timestamp_header, &c.timestamp_tolerance, &c.signed_payload) {
                    (None, None, None) => None,
                    (None, _, _) => {
                        errs.locate(
                            &format!("{at}.timestamp_header"),
                            root,
                            "timestamp_tolerance and signed_payload need timestamp_header",
                        );
                        return None;
                    }
                    (Some(header), tolerance, payload) => {
                        let tolerance = tolerance.map_or(crate::limits::default_standard_tolerance().0, |t| t.0);
                        if HeaderName::from_bytes(header.as_bytes()).is_err() {
                            errs.locate(
                                &format!("{at}.timestamp_header"),
                                root,
                                &format!("{header:?} is not a valid header name"),
                            );
                            return None;
                        }
                        if tolerance < std::time::Duration::from_secs(1) {
                            // Timestamps are whole seconds.
                            errs.locate(&format!("{at}.timestamp_tolerance"), root, "must be at least 1s");
                            return None;
                        }
                        if header.eq_ignore_ascii_case(&c.header) {
                            errs.locate(
                                &format!("{at}.timestamp_header"),
                                root,
                                "must be another header than the signature's",
                            );
                            return None;
                        }
                        let template = payload.as_deref().unwrap_or("{timestamp}.{body}");
                        match crate::verify::SignedTimestamp::new(header, tolerance, template) {
                            Ok(t) => Some(t),
                            Err(m) => {
                                errs.locate(&format!("{at}.signed_payload"), root, &m);
                                return None;
                            }
                        }
                    }
                };
                Some(Scheme::Hmac(
                    HmacScheme::new(&c.header, c.prefix, c.encoding, c.algorithm, secrets?, event??, id?)
                        .with_timestamp(timestamp),
                ))
            }
            RawSource::Addon(c) => {
                let pem = match (&c.public_key, &c.public_key_file) {
                    (Some(_), Some(_)) => {
                        errs.locate(at, root, "set only one of `public_key` and `public_key_file`");
                        return None;
                    }
                    (Some(pem), None) => pem.clone(),
                    (None, Some(file)) => match std::fs::read_to_string(base.join(file)) {
                        Ok(pem) => pem,
                        Err(e) => {
                            errs.locate(
                                &format!("{at}.public_key_file"),
                                root,
                                &format!("cannot read {}: {e}", file.display()),
                            );
                            return None;
                        }
                    },
                    (None, None) => crate::verify::CLOCKIFY_PUBLIC_KEY.to_owned(),
                };
                if c.addon_key.trim().is_empty() {
                    errs.locate(&format!("{at}.addon_key"), root, "the add-on key must not be empty");
                    return None;
                }
                if !(c.base_url.starts_with("https://") || c.base_url.starts_with("http://")) {
                    errs.locate(
                        &format!("{at}.base_url"),
                        root,
                        "must be the public http(s) URL of this source's path",
                    );
                    return None;
                }
                let name = c.name.clone().unwrap_or_else(|| c.addon_key.clone());
                match crate::verify::AddonScheme::new(c.addon_key, name, c.base_url, c.scopes, &pem) {
                    Ok(s) => Some(Scheme::ClockifyAddon(s)),
                    Err(m) => {
                        errs.locate(&format!("{at}.public_key"), root, &m);
                        None
                    }
                }
            }
            RawSource::Standard(c) => {
                let secrets = resolve_secrets(at, &c.secrets, root, errs, base, env)?;
                let mut ok = true;
                for (i, secret) in secrets.iter().enumerate() {
                    if crate::verify::standard_key_bytes(secret.expose()).is_none() {
                        errs.locate(
                            &format!("{at}.secrets[{i}]"),
                            root,
                            "not a Standard Webhooks secret (whsec_ followed by base64)",
                        );
                        ok = false;
                    }
                }
                let pointer = if c.event_header.is_none() && c.event_pointer.is_none() {
                    Some("/type".to_owned())
                } else {
                    c.event_pointer
                };
                let event = locator(at, "event", c.event_header, pointer, true, root, errs)??;
                if c.tolerance.0.is_zero() {
                    errs.locate(&format!("{at}.tolerance"), root, "must be more than 0");
                    ok = false;
                }
                ok.then_some(Scheme::Standard(crate::verify::StandardScheme {
                    secrets,
                    tolerance: c.tolerance.0,
                    event,
                }))
            }
            RawSource::None(c) => {
                let event = locator(at, "event", c.event_header, c.event_pointer, true, root, errs);
                let id = locator(at, "id", c.id_header, c.id_pointer, false, root, errs);
                Some(Scheme::None { event: event??, id: id? })
            }
        }
    }
}

fn resolve_secrets(
    at: &str,
    specs: &[SecretSpec],
    root: &DeTable<'_>,
    errs: &mut ConfigErrors,
    base: &Path,
    env: &dyn Env,
) -> Option<Vec<crate::config::SecretString>> {
    if specs.is_empty() {
        errs.locate(&format!("{at}.secrets"), root, "at least one secret is needed");
        return None;
    }
    let mut out = Vec::new();
    let mut ok = true;
    for (i, spec) in specs.iter().enumerate() {
        match spec.resolve(base, env) {
            Ok(s) => out.push(s),
            Err(message) => {
                errs.locate(&format!("{at}.secrets[{i}]"), root, &message);
                ok = false;
            }
        }
    }
    ok.then_some(out)
}

/// `<what>_header` / `<what>_pointer`: at most one (exactly one when `required`).
/// Returns `None` on error, `Some(None)` when absent and optional.
fn locator(
    at: &str,
    what: &str,
    header: Option<String>,
    pointer: Option<String>,
    required: bool,
    root: &DeTable<'_>,
    errs: &mut ConfigErrors,
) -> Option<Option<Locator>> {
    match (header, pointer) {
        (Some(_), Some(_)) => {
            errs.locate(at, root, &format!("set only one of `{what}_header` and `{what}_pointer`"));
            None
        }
        (Some(h), None) => {
            if HeaderName::from_bytes(h.as_bytes()).is_err() {
                errs.locate(&format!("{at}.{what}_header"), root, &format!("{h:?} is not a valid header name"));
                return None;
            }
            Some(Some(Locator::Header(h.to_ascii_lowercase())))
        }
        (None, Some(p)) => {
            if !p.starts_with('/') {
                errs.locate(
                    &format!("{at}.{what}_pointer"),
                    root,
                    &format!("{p:?} is not a JSON pointer (it starts with '/', e.g. \"/event\")"),
                );
                return None;
            }
            Some(Some(Locator::Pointer(p)))
        }
        (None, None) if required => {
            errs.locate(at, root, &format!("set `{what}_header` or `{what}_pointer`: where the {what} is found"));
            None
        }
        (None, None) => Some(None),
    }
}
