//! Secrets in the config: where they come from (inline, `${ENV}`, a file, a systemd credential) and a
//! wrapper that never prints its value.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Deserialize;

/// A resolved secret. `Debug` and `Display` print `REDACTED`; the value is reachable only through
/// [`SecretString::expose`], so it cannot slip into a log line by accident. A secret may be valid only
/// within a window (`not_before` / `not_after`), for planned rotations.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString {
    value: String,
    not_before: Option<SystemTime>,
    not_after: Option<SystemTime>,
}

impl SecretString {
    /// Wraps a value, valid at all times.
    pub fn new(value: impl Into<String>) -> Self {
        SecretString { value: value.into(), not_before: None, not_after: None }
    }
    /// The same secret, valid only from `not_before` and until `not_after` (each optional).
    pub fn with_window(mut self, not_before: Option<SystemTime>, not_after: Option<SystemTime>) -> Self {
        self.not_before = not_before;
        self.not_after = not_after;
        self
    }
    /// The secret itself. Call only where the value is used (comparison, signing, an outgoing header).
    pub fn expose(&self) -> &str {
        &self.value
    }
    /// Whether the secret may be used at `t`.
    pub fn usable_at(&self, t: SystemTime) -> bool {
        self.not_before.is_none_or(|nb| t >= nb) && self.not_after.is_none_or(|na| t <= na)
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("REDACTED")
    }
}

impl fmt::Display for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("REDACTED")
    }
}

/// How a secret is written in the config file.
///
/// - `"literal"`: inline (fine for tests, not for production files);
/// - `"${NAME}"`: `${NAME}` is replaced by the environment variable `NAME` (also inside a longer string,
///   e.g. `"Bearer ${TOKEN}"`; `$$` is a literal `$`);
/// - `{ env = "NAME" }`: the whole value of an environment variable;
/// - `{ file = "path" }`: the contents of a file (trailing newline removed; relative to the config file);
/// - `{ credential = "name" }`: a systemd credential, `$CREDENTIALS_DIRECTORY/name` (`LoadCredential=`).
#[derive(Clone, Deserialize)]
#[serde(
    untagged,
    expecting = "a secret: a string (\"${ENV_VAR}\" expands), or a table { env = \"NAME\" }, { file = \"path\" } or { credential = \"name\" }"
)]
pub enum SecretSpec {
    /// Inline text, with `${NAME}` expansion.
    Text(String),
    /// A table naming where to read it.
    From(SecretFrom),
}

/// The error for a list or table of secrets given something else, naming its kind only: serde's own
/// message would quote the value, and a secret put in the wrong place must not reach `check`'s output or a
/// reload's log.
fn refuse<E: serde::de::Error>(what: &'static str, got: &str) -> E {
    E::custom(format!("expected {what}, found {got} (its value is not shown: it may be a secret)"))
}

macro_rules! quiet_refusals {
    ($what:expr) => {
        fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Err(refuse($what, "a boolean"))
        }
        fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Err(refuse($what, "a number"))
        }
        fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Err(refuse($what, "a number"))
        }
        fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Err(refuse($what, "a number"))
        }
        fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Err(refuse($what, "a string"))
        }
    };
}

/// Deserializes a list of secrets (`secrets = ["${SECRET}"]`) without ever quoting what was given instead.
pub(crate) fn secret_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<SecretSpec>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Vec<SecretSpec>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of secrets")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(s) = seq.next_element()? {
                out.push(s);
            }
            Ok(out)
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
            Err(refuse("a list of secrets, e.g. [\"${SECRET}\"]", "a table"))
        }
        quiet_refusals!("a list of secrets, e.g. [\"${SECRET}\"]");
    }
    d.deserialize_any(V)
}

/// Deserializes a table of secrets (`headers = { Authorization = "Bearer ${TOKEN}" }`) without ever quoting
/// what was given instead.
pub(crate) fn secret_map<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<std::collections::BTreeMap<String, SecretSpec>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = std::collections::BTreeMap<String, SecretSpec>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a table of secrets")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = std::collections::BTreeMap::new();
            while let Some((k, v)) = map.next_entry::<String, SecretSpec>()? {
                out.insert(k, v);
            }
            Ok(out)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
            Err(refuse("a table of secrets, e.g. { name = \"${SECRET}\" }", "a list"))
        }
        quiet_refusals!("a table of secrets, e.g. { name = \"${SECRET}\" }");
    }
    d.deserialize_any(V)
}

impl fmt::Debug for SecretFrom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretFrom")
            .field("value", &self.value.as_ref().map(|_| "REDACTED"))
            .field("env", &self.env)
            .field("file", &self.file)
            .field("credential", &self.credential)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish()
    }
}

impl fmt::Debug for SecretSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSpec::Text(_) => f.write_str("SecretSpec::Text(REDACTED)"),
            SecretSpec::From(from) => write!(f, "SecretSpec::From({from:?})"),
        }
    }
}

/// The table form of [`SecretSpec`]: exactly one of `value`, `env`, `file`, `credential`, and optionally a
/// validity window (RFC 3339 times) for a planned rotation.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretFrom {
    /// The secret inline (with `${NAME}` expansion), when a window is needed.
    pub value: Option<String>,
    /// Not accepted before this time, e.g. `"2026-12-01T00:00:00Z"`.
    pub not_before: Option<String>,
    /// Not accepted after this time.
    pub not_after: Option<String>,
    /// Name of an environment variable holding the secret.
    pub env: Option<String>,
    /// Path of a file holding the secret (relative paths are relative to the config file's folder).
    pub file: Option<PathBuf>,
    /// Name of a systemd credential, read from `$CREDENTIALS_DIRECTORY/<name>`.
    pub credential: Option<String>,
}

/// Where secrets are looked up; tests pass their own environment instead of the process's.
pub trait Env {
    /// The value of an environment variable, if set.
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl SecretSpec {
    /// Resolves the secret. `base` is the config file's folder. The error never contains the value.
    pub fn resolve(&self, base: &Path, env: &dyn Env) -> Result<SecretString, String> {
        let value = match self {
            SecretSpec::Text(text) => expand(text, env)?,
            SecretSpec::From(from) => match (&from.env, &from.file, &from.credential) {
                (None, None, None) if from.value.is_some() => expand(from.value.as_deref().unwrap_or(""), env)?,
                (Some(name), None, None) if from.value.is_none() => {
                    env.var(name).ok_or_else(|| format!("environment variable {name} is not set"))?
                }
                (None, Some(path), None) if from.value.is_none() => read_secret_file(&base.join(path))?,
                (None, None, Some(name)) if from.value.is_none() => {
                    let dir = env.var("CREDENTIALS_DIRECTORY").ok_or_else(|| {
                        format!("credential {name:?} asked for, but $CREDENTIALS_DIRECTORY is not set (use LoadCredential= in the unit)")
                    })?;
                    if name.contains('/') {
                        return Err(format!("credential name {name:?} must not contain '/'"));
                    }
                    read_secret_file(&Path::new(&dir).join(name))?
                }
                _ => {
                    return Err("a secret table takes exactly one of `value`, `env`, `file`, `credential`".into());
                }
            },
        };
        if value.is_empty() {
            return Err("the secret is empty".into());
        }
        let (not_before, not_after) = match self {
            SecretSpec::Text(_) => (None, None),
            SecretSpec::From(from) => (time(from.not_before.as_deref())?, time(from.not_after.as_deref())?),
        };
        if let (Some(nb), Some(na)) = (not_before, not_after)
            && nb >= na
        {
            return Err("not_before must be earlier than not_after".into());
        }
        Ok(SecretString::new(value).with_window(not_before, not_after))
    }
}

fn time(text: Option<&str>) -> Result<Option<SystemTime>, String> {
    text.map(|t| {
        humantime::parse_rfc3339_weak(t)
            .map_err(|e| format!("invalid time {t:?} ({e}); write e.g. \"2026-12-01T00:00:00Z\""))
    })
    .transpose()
}

fn read_secret_file(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read secret file {}: {e}", path.display()))?;
    Ok(text.trim_end_matches(['\n', '\r']).to_owned())
}

/// Replaces `${NAME}` by the environment variable `NAME`; `$$` is a literal `$`. A `$` followed by anything
/// else is kept as it is, so secrets containing `$` need no escaping unless they contain `${` or `$$`.
fn expand(text: &str, env: &dyn Env) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('{') {
            let end = tail.find('}').ok_or("unterminated ${...} in secret")?;
            // `${NAME:-default}`: the default when NAME is unset or empty, as in a shell.
            let (name, default) = match tail[..end].split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (&tail[..end], None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("invalid environment variable name {name:?} in ${{...}}"));
            }
            let value = match (env.var(name).filter(|v| !v.is_empty()), default) {
                (Some(v), _) => v,
                (None, Some(d)) => d.to_owned(),
                (None, None) => return Err(format!("environment variable {name} is not set")),
            };
            out.push_str(&value);
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    pub struct MapEnv(pub HashMap<String, String>);
    impl Env for MapEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).cloned()
        }
    }

    fn env() -> MapEnv {
        MapEnv(HashMap::from([("TOKEN".to_owned(), "s3cr3t".to_owned())]))
    }

    #[test]
    fn expands_environment_variables() {
        let base = Path::new(".");
        let spec = SecretSpec::Text("Bearer ${TOKEN}".into());
        assert_eq!(spec.resolve(base, &env()).map(|s| s.expose().to_owned()), Ok("Bearer s3cr3t".into()));
        let spec = SecretSpec::Text("a$$b$c".into());
        assert_eq!(spec.resolve(base, &env()).map(|s| s.expose().to_owned()), Ok("a$b$c".into()));
        let spec = SecretSpec::Text("${MISSING:-fallback}/${TOKEN:-unused}".into());
        assert_eq!(spec.resolve(base, &env()).map(|s| s.expose().to_owned()), Ok("fallback/s3cr3t".into()));
        let spec = SecretSpec::Text("${MISSING}".into());
        assert_eq!(spec.resolve(base, &env()).err(), Some("environment variable MISSING is not set".into()));
    }

    #[test]
    fn reads_files_and_credentials() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("s"), "from-file\n").unwrap();
        let spec = SecretSpec::From(SecretFrom {
            value: None,
            not_before: None,
            not_after: None,
            env: None,
            file: Some("s".into()),
            credential: None,
        });
        assert_eq!(spec.resolve(dir.path(), &env()).unwrap().expose(), "from-file");
        let mut e = env();
        e.0.insert("CREDENTIALS_DIRECTORY".into(), dir.path().display().to_string());
        let spec = SecretSpec::From(SecretFrom {
            value: None,
            not_before: Some("2020-01-01T00:00:00Z".into()),
            not_after: Some("2020-02-01T00:00:00Z".into()),
            env: None,
            file: None,
            credential: Some("s".into()),
        });
        let windowed = spec.resolve(Path::new("/"), &e).unwrap();
        assert_eq!(windowed.expose(), "from-file");
        assert!(windowed.usable_at(humantime::parse_rfc3339("2020-01-15T00:00:00Z").unwrap()));
        assert!(!windowed.usable_at(humantime::parse_rfc3339("2020-02-02T00:00:00Z").unwrap()));
        assert!(!windowed.usable_at(humantime::parse_rfc3339("2019-12-31T00:00:00Z").unwrap()));
    }

    #[test]
    fn never_prints_the_value() {
        let s = SecretString::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "REDACTED REDACTED");
        assert!(!format!("{:?}", SecretSpec::Text("hunter2".into())).contains("hunter2"));
    }
}
