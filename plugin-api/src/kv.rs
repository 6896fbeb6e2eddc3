//! The plugin's own key-value store: persisted by the daemon (it survives restarts and instances) and
//! invisible to other plugins. Keys are at most 512 bytes, values at most 1 MiB.
//!
//! ```no_run
//! use hookbridge_plugin::{Error, kv};
//!
//! fn seen_before(entry_id: &str) -> Result<bool, Error> {
//!     let key = format!("seen/{entry_id}");
//!     if kv::get(&key).is_some() {
//!         return Ok(true);
//!     }
//!     kv::set_with_ttl(&key, b"1", std::time::Duration::from_secs(24 * 3600))?;
//!     Ok(false)
//! }
//! ```

use std::fmt;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::__private::bindings::hookbridge::plugin::kv as host;
use crate::Error;

/// A key-value operation that the daemon refused or could not perform (e.g. a value over 1 MiB).
///
/// It converts into a [retryable](Error::retryable) [`Error`], so `?` works in [`Plugin::handle`](crate::Plugin::handle).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvError {
    key: String,
    message: String,
}

impl KvError {
    fn new(key: &str, message: impl Into<String>) -> Self {
        Self { key: key.to_owned(), message: message.into() }
    }

    /// The key of the failed operation.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// What went wrong.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for KvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "kv key `{}`: {}", self.key, self.message)
    }
}

impl std::error::Error for KvError {}

impl From<KvError> for Error {
    fn from(err: KvError) -> Self {
        Error::retryable(err.to_string())
    }
}

/// The value of `key`, if it is set and has not expired.
pub fn get(key: &str) -> Option<Vec<u8>> {
    host::get(key)
}

/// The value of `key` parsed as JSON, if it is set and has not expired.
///
/// # Errors
///
/// When the stored value is not JSON or does not fit `T`.
pub fn get_json<T: DeserializeOwned>(key: &str) -> Result<Option<T>, KvError> {
    get(key)
        .map(|value| serde_json::from_slice(&value))
        .transpose()
        .map_err(|err| KvError::new(key, format!("the stored value is not the JSON expected: {err}")))
}

/// Sets `key` to `value`, with no expiry.
///
/// # Errors
///
/// When the daemon refuses (key over 512 bytes, value over 1 MiB) or cannot store it.
pub fn set(key: &str, value: impl AsRef<[u8]>) -> Result<(), KvError> {
    host::set(key, value.as_ref(), None).map_err(|message| KvError::new(key, message))
}

/// Sets `key` to `value`; it expires `ttl` from now (rounded down to milliseconds).
///
/// # Errors
///
/// As [`set`].
pub fn set_with_ttl(key: &str, value: impl AsRef<[u8]>, ttl: Duration) -> Result<(), KvError> {
    let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    host::set(key, value.as_ref(), Some(ttl_ms)).map_err(|message| KvError::new(key, message))
}

/// Sets `key` to `value` serialized as JSON, with no expiry.
///
/// # Errors
///
/// As [`set`], or when `value` cannot be serialized.
pub fn set_json<T: Serialize + ?Sized>(key: &str, value: &T) -> Result<(), KvError> {
    let value = serde_json::to_vec(value)
        .map_err(|err| KvError::new(key, format!("cannot serialize the value as JSON: {err}")))?;
    set(key, value)
}

/// Removes `key` (no error if it was not set).
///
/// # Errors
///
/// When the daemon cannot remove it.
pub fn delete(key: &str) -> Result<(), KvError> {
    host::delete(key).map_err(|message| KvError::new(key, message))
}

/// The keys that start with `prefix`, in byte order, at most 1000.
pub fn list(prefix: &str) -> Vec<String> {
    host::list(prefix)
}
