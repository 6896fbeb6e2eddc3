//! Secrets in the config: where they come from (inline, `${ENV}`, a file, a systemd credential) and a
//! wrapper that never prints its value.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A resolved secret. `Debug` and `Display` print `REDACTED`; the value is reachable only through
/// [`SecretString::expose`], so it cannot slip into a log line by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(String);

impl SecretString {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        SecretString(value.into())
    }
    /// The secret itself. Call only where the value is used (comparison, signing, an outgoing header).
    pub fn expose(&self) -> &str {
        &self.0
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

impl fmt::Debug for SecretSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSpec::Text(_) => f.write_str("SecretSpec::Text(REDACTED)"),
            SecretSpec::From(from) => write!(f, "SecretSpec::From({from:?})"),
        }
    }
}

/// The table form of [`SecretSpec`]: exactly one key.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretFrom {
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
                (Some(name), None, None) => {
                    env.var(name).ok_or_else(|| format!("environment variable {name} is not set"))?
                }
                (None, Some(path), None) => read_secret_file(&base.join(path))?,
                (None, None, Some(name)) => {
                    let dir = env.var("CREDENTIALS_DIRECTORY").ok_or_else(|| {
                        format!("credential {name:?} asked for, but $CREDENTIALS_DIRECTORY is not set (use LoadCredential= in the unit)")
                    })?;
                    if name.contains('/') {
                        return Err(format!("credential name {name:?} must not contain '/'"));
                    }
                    read_secret_file(&Path::new(&dir).join(name))?
                }
                _ => {
                    return Err("a secret table takes exactly one of `env`, `file`, `credential`".into());
                }
            },
        };
        if value.is_empty() {
            return Err("the secret is empty".into());
        }
        Ok(SecretString(value))
    }
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
            let name = &tail[..end];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("invalid environment variable name {name:?} in ${{...}}"));
            }
            out.push_str(&env.var(name).ok_or_else(|| format!("environment variable {name} is not set"))?);
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
        let spec = SecretSpec::Text("${MISSING}".into());
        assert_eq!(spec.resolve(base, &env()).err(), Some("environment variable MISSING is not set".into()));
    }

    #[test]
    fn reads_files_and_credentials() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("s"), "from-file\n").unwrap();
        let spec = SecretSpec::From(SecretFrom { env: None, file: Some("s".into()), credential: None });
        assert_eq!(spec.resolve(dir.path(), &env()).unwrap().expose(), "from-file");
        let mut e = env();
        e.0.insert("CREDENTIALS_DIRECTORY".into(), dir.path().display().to_string());
        let spec = SecretSpec::From(SecretFrom { env: None, file: None, credential: Some("s".into()) });
        assert_eq!(spec.resolve(Path::new("/"), &e).unwrap().expose(), "from-file");
    }

    #[test]
    fn never_prints_the_value() {
        let s = SecretString::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "REDACTED REDACTED");
        assert!(!format!("{:?}", SecretSpec::Text("hunter2".into())).contains("hunter2"));
    }
}
