//! `[plugins.<id>]` sections: validated into [`SinkSpec`]s of kind [`SinkKind::Plugin`], so that routes,
//! dispatch, retries and dead letters treat a plugin like any sink. Loading and type-checking the component
//! itself is the plugin host's job ([`crate::plugin`]), done by `check` and at start-up.

use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::de::DeTable;

use super::types::PluginConfig;
use super::{ConfigErrors, Env, RetryPolicy, SecretString, SinkKind, SinkSpec};
use crate::limits;

/// A validated plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginSpec {
    /// Absolute path of the component.
    pub path: PathBuf,
    /// The `config` table with `secrets` merged in, as JSON (a secret: it may hold API keys).
    pub config: SecretString,
    /// Allowed HTTP hosts, lower-case, as written (`host`, `host:port`, `*.domain`).
    pub allowed_hosts: Vec<String>,
    /// Memory limit in bytes.
    pub memory_limit: u64,
    /// Wall time per invocation.
    pub time_limit: Duration,
    /// Fuel per invocation.
    pub fuel: Option<u64>,
    /// Outbound request timeout.
    pub http_timeout: Duration,
    /// Outbound requests per second.
    pub http_rate_limit: u32,
    /// Granted environment variables.
    pub env: Vec<(String, SecretString)>,
    /// Granted read-only folders: (guest path, host path).
    pub dirs: Vec<(String, PathBuf)>,
}

pub(crate) fn validate(
    id: &str,
    c: PluginConfig,
    root: &DeTable<'_>,
    errs: &mut ConfigErrors,
    base: &Path,
    env: &dyn Env,
) -> Option<SinkSpec> {
    let at = format!("plugins.{id}");
    let mut ok = true;
    let mut error = |key: &str, message: &str| {
        errs.locate(&format!("{at}.{key}"), root, message);
        ok = false;
    };
    let path = base.join(&c.path);
    if !path.is_file() {
        error("path", &format!("{} is not a file (build plugins with scripts/build-plugins)", path.display()));
    }
    let mut config = c.config;
    for (key, spec) in &c.secrets {
        match spec.resolve(base, env) {
            Ok(v) => {
                config.insert(key.clone(), serde_json::Value::String(v.expose().to_owned()));
            }
            Err(m) => error(&format!("secrets.{key}"), &m),
        }
    }
    let mut hosts = Vec::new();
    for (i, h) in c.allowed_hosts.iter().enumerate() {
        let h = h.trim().to_ascii_lowercase();
        let name = h.strip_prefix("*.").unwrap_or(&h);
        let (host, port) = match name.rsplit_once(':') {
            Some((host, port)) if !host.contains(':') => (host, Some(port)),
            _ => (name, None),
        };
        let host_ok = !host.is_empty() && host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'));
        if !host_ok || port.is_some_and(|p| p.parse::<u16>().is_err()) || h.contains('/') {
            error(&format!("allowed_hosts[{i}]"), &format!("{h:?} is not a host, host:port or *.domain"));
        }
        hosts.push(h);
    }
    if c.memory_limit.0 < 1024 * 1024 || c.memory_limit.0 > limits::PLUGIN_MAX_MEMORY {
        error("memory_limit", "must be between 1MiB and 1GiB");
    }
    if c.time_limit.0 < Duration::from_millis(1) || c.time_limit.0 > Duration::from_secs(300) {
        error("time_limit", "must be between 1ms and 5m");
    }
    if c.fuel == Some(0) {
        error("fuel", "must be at least 1 (leave it out for no limit)");
    }
    if c.http_timeout.0.is_zero() {
        error("http_timeout", "must be more than 0");
    }
    if c.http_rate_limit == 0 {
        error("http_rate_limit", "must be at least 1");
    }
    if c.max_in_flight == 0 {
        error("max_in_flight", "must be at least 1");
    }
    let max_backoff = c.retry.max_backoff.unwrap_or_else(limits::default_max_backoff).0;
    if c.retry.initial_backoff.0.is_zero() || c.retry.initial_backoff.0 > max_backoff {
        error("retry", "initial_backoff must be more than 0 and at most max_backoff");
    }
    if c.retry.max_age.0.is_zero() {
        error("retry.max_age", "must be more than 0");
    }
    let mut granted_env = Vec::new();
    for (name, spec) in &c.env {
        match spec.resolve(base, env) {
            Ok(v) => granted_env.push((name.clone(), v)),
            Err(m) => error(&format!("env.{name}"), &m),
        }
    }
    let mut dirs = Vec::new();
    for (guest, host) in &c.dirs {
        let host = base.join(host);
        if !guest.starts_with('/') {
            error(&format!("dirs.{guest}"), "the path the plugin sees must be absolute, e.g. \"/data\"");
        } else if !host.is_dir() {
            error(&format!("dirs.{guest}"), &format!("{} is not a folder", host.display()));
        }
        dirs.push((guest.clone(), host));
    }
    let config = serde_json::Value::Object(config).to_string();
    ok.then(|| SinkSpec {
        id: id.to_owned(),
        kind: SinkKind::Plugin(PluginSpec {
            path,
            config: SecretString::new(config),
            allowed_hosts: hosts,
            memory_limit: c.memory_limit.0,
            time_limit: c.time_limit.0,
            fuel: c.fuel,
            http_timeout: c.http_timeout.0,
            http_rate_limit: c.http_rate_limit,
            env: granted_env,
            dirs,
        }),
        max_in_flight: c.max_in_flight,
        retry: RetryPolicy {
            initial_backoff: c.retry.initial_backoff.0,
            max_backoff,
            max_age: c.retry.max_age.0,
            max_attempts: c.retry.max_attempts,
        },
    })
}
