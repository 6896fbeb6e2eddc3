//! The plugin's own key-value store: persisted by the daemon (it survives restarts and instances) and
//! invisible to other plugins. Keys are at most 512 bytes, values at most 1 MiB. On a cluster (the daemons'
//! PostgreSQL backend) every node sees the same keys.
//!
//! Two events can be handled at once (a sink's `max_in_flight`, or two nodes of a cluster), so reading a key
//! and then writing it races: use [`increment`] for counters and [`update`] (compare-and-swap) for anything
//! else that depends on the value before. Those two, and the batches ([`get_many`], [`set_many`],
//! [`delete_many`]), go through the standard `wasi:keyvalue` interfaces; they see the same keys as [`get`] and
//! [`set`].
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
use crate::__private::bindings::wasi::keyvalue::{atomics, batch, store};
use crate::Error;

/// How many times [`update`] tries before it gives up (each failed try means another event changed the key).
pub const MAX_UPDATE_TRIES: usize = 64;

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

impl KvError {
    fn store(key: &str, err: store::Error) -> Self {
        let message = match err {
            store::Error::NoSuchStore => "no such store".to_owned(),
            store::Error::AccessDenied => "access denied".to_owned(),
            store::Error::Other(message) => message,
        };
        KvError::new(key, message)
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

/// The plugin's bucket of the standard interface.
fn bucket(key: &str) -> Result<store::Bucket, KvError> {
    store::open("default").map_err(|err| KvError::store(key, err))
}

/// Atomically adds `delta` to the number at `key` (0 when unset) and returns the new number. The number is
/// stored as decimal text: [`get`] reads it as, e.g., `b"42"`.
///
/// # Errors
///
/// When `key` holds something that is not a decimal number, the sum overflows an `i64`, or the daemon cannot
/// store it.
///
/// ```no_run
/// # fn main() -> Result<(), hookbridge_plugin::kv::KvError> {
/// let seen = hookbridge_plugin::kv::increment("count/NEW_TIME_ENTRY", 1)?;
/// # Ok(()) }
/// ```
pub fn increment(key: &str, delta: i64) -> Result<i64, KvError> {
    atomics::increment(&bucket(key)?, key, delta).map_err(|err| KvError::store(key, err))
}

/// Atomically replaces the value of `key` with what `f` makes of the current one (`None`: unset), by
/// compare-and-swap: when another event changed the key in between, `f` runs again on the new value (at most
/// [`MAX_UPDATE_TRIES`] times). Returns the value written.
///
/// # Errors
///
/// When the daemon cannot read or store the key, or the key changed under every try.
///
/// ```no_run
/// # fn main() -> Result<(), hookbridge_plugin::kv::KvError> {
/// // Keep the latest of the timestamps seen, whatever order events arrive in.
/// let seen_ms: i64 = 1_700_000_000_000;
/// hookbridge_plugin::kv::update("last-seen", |current| {
///     let current = current.and_then(|v| std::str::from_utf8(v).ok()?.parse::<i64>().ok()).unwrap_or(0);
///     current.max(seen_ms).to_string().into_bytes()
/// })?;
/// # Ok(()) }
/// ```
pub fn update(key: &str, mut f: impl FnMut(Option<&[u8]>) -> Vec<u8>) -> Result<Vec<u8>, KvError> {
    let mut cas = atomics::Cas::new(&bucket(key)?, key).map_err(|err| KvError::store(key, err))?;
    for _ in 0..MAX_UPDATE_TRIES {
        let current = cas.current().map_err(|err| KvError::store(key, err))?;
        let value = f(current.as_deref());
        match atomics::swap(cas, &value) {
            Ok(()) => return Ok(value),
            Err(atomics::CasError::CasFailed(fresh)) => cas = fresh,
            Err(atomics::CasError::StoreError(err)) => return Err(KvError::store(key, err)),
        }
    }
    Err(KvError::new(key, format!("changed by other events under each of {MAX_UPDATE_TRIES} tries")))
}

/// A key and its value (`None`: unset), as [`get_many`] gives them.
pub type Entry = (String, Option<Vec<u8>>);

/// Each of `keys` with its value (`None`: unset), in the order given.
///
/// # Errors
///
/// When the daemon cannot read them.
pub fn get_many(keys: &[&str]) -> Result<Vec<Entry>, KvError> {
    let first = keys.first().copied().unwrap_or_default();
    let keys: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
    batch::get_many(&bucket(first)?, &keys).map_err(|err| KvError::store(first, err))
}

/// Sets every pair, with no expiry (each pair atomically; the batch as a whole is not).
///
/// # Errors
///
/// As [`set`]; pairs before the failing one may have been set.
pub fn set_many(pairs: &[(&str, &[u8])]) -> Result<(), KvError> {
    let first = pairs.first().map(|(k, _)| *k).unwrap_or_default();
    let pairs: Vec<(String, Vec<u8>)> = pairs.iter().map(|(k, v)| ((*k).to_owned(), v.to_vec())).collect();
    batch::set_many(&bucket(first)?, &pairs).map_err(|err| KvError::store(first, err))
}

/// Removes every key (no error for keys that were not set).
///
/// # Errors
///
/// When the daemon cannot remove them; keys before the failing one may have been removed.
pub fn delete_many(keys: &[&str]) -> Result<(), KvError> {
    let first = keys.first().copied().unwrap_or_default();
    let keys: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
    batch::delete_many(&bucket(first)?, &keys).map_err(|err| KvError::store(first, err))
}
