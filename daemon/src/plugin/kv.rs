//! The plugins' key-value store: one SQLite file (`plugins.db` in the data directory, WAL, `synchronous =
//! NORMAL`: it survives a crash of the daemon, and loses at most the last writes on a power cut), one
//! namespace per plugin id. A plugin sees only its own keys. Expired keys read as absent and are removed
//! by [`Kv::prune`]. On a cluster the keys are the cluster's instead ([`Kv::share`]: the store's
//! [`SharedKv`] on PostgreSQL); `plugins.db` then keeps only the live channels' last payloads.
//!
//! The atomic operations ([`Kv::increment`], [`Kv::swap`]) are atomic among every caller of the store: on
//! SQLite they run under the one connection's lock, on PostgreSQL each is one statement.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use crate::event::now_ms;
use crate::store::{SharedKv, StoreError};

/// Longest key.
pub const MAX_KEY: usize = 512;
/// Largest value.
pub const MAX_VALUE: usize = 1024 * 1024;
/// Most keys `list` returns.
pub const MAX_LIST: usize = 1000;

/// The store, shared by every plugin of a daemon.
#[derive(Debug, Clone)]
pub struct Kv {
    conn: Arc<Mutex<Connection>>,
    shared: Option<Shared>,
}

/// The cluster's store, called from the plugins' blocking threads.
#[derive(Debug, Clone)]
struct Shared {
    kv: SharedKv,
    rt: tokio::runtime::Handle,
    timeout: Duration,
}

impl Shared {
    fn run<T>(&self, op: impl Future<Output = Result<T, StoreError>>) -> Result<T, String> {
        // The timer is made inside `block_on`: the calling thread need not be in the runtime's context.
        match self.rt.block_on(async { tokio::time::timeout(self.timeout, op).await }) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(format!("key-value store: {e}")),
            Err(_) => Err(format!("key-value store: no answer from the cluster database in {:?}", self.timeout)),
        }
    }
}

/// Refuses keys and values over the limits.
fn check(key: &str, value: &[u8]) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_KEY {
        return Err(format!("keys are 1 to {MAX_KEY} bytes"));
    }
    if value.len() > MAX_VALUE {
        return Err(format!("values are at most {MAX_VALUE} bytes"));
    }
    Ok(())
}

impl Kv {
    /// Opens (creating) `plugins.db` in `dir`.
    pub fn open(dir: &Path) -> Result<Kv, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let path = dir.join("plugins.db");
        let conn = Connection::open(&path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             PRAGMA busy_timeout = 5000;
             CREATE TABLE IF NOT EXISTS kv (
                 plugin TEXT NOT NULL,
                 key TEXT NOT NULL,
                 value BLOB NOT NULL,
                 expires_at_ms INTEGER,
                 PRIMARY KEY (plugin, key)
             ) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS live (
                 channel TEXT PRIMARY KEY,
                 payload TEXT NOT NULL
             ) WITHOUT ROWID;",
        )
        .map_err(|e| format!("cannot prepare {}: {e}", path.display()))?;
        Ok(Kv { conn: Arc::new(Mutex::new(conn)), shared: None })
    }

    /// Keeps the keys in the cluster's store from now on (call it before any plugin is loaded, inside the
    /// runtime; the plugins' calls then block their thread on it for at most `timeout` each).
    pub fn share(&mut self, kv: SharedKv, timeout: Duration) {
        self.shared = Some(Shared { kv, rt: tokio::runtime::Handle::current(), timeout });
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, String> {
        let conn = self.conn.lock().map_err(|_| "key-value store unavailable".to_owned())?;
        f(&conn).map_err(|e| format!("key-value store: {e}"))
    }

    /// The value of `key` for `plugin`, unless absent or expired.
    pub fn get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, String> {
        if let Some(s) = &self.shared {
            return s.run(s.kv.get(plugin, key));
        }
        self.with(|c| {
            c.prepare_cached(
                "SELECT value FROM kv WHERE plugin = ?1 AND key = ?2 AND (expires_at_ms IS NULL OR expires_at_ms > ?3)",
            )?
            .query_row(params![plugin, key, now_ms()], |r| r.get(0))
            .optional()
        })
    }

    /// The values of `keys` (none: unset or expired), in the order given (on a cluster, in one round trip).
    pub fn get_many(&self, plugin: &str, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, String> {
        if let Some(s) = &self.shared {
            return s.run(s.kv.get_many(plugin, keys));
        }
        keys.iter().map(|key| self.get(plugin, key)).collect()
    }

    /// Sets `key`, optionally expiring `ttl_ms` from now.
    pub fn set(&self, plugin: &str, key: &str, value: &[u8], ttl_ms: Option<u64>) -> Result<(), String> {
        check(key, value)?;
        let ttl_ms = ttl_ms.map(|t| i64::try_from(t).unwrap_or(i64::MAX));
        if let Some(s) = &self.shared {
            return s.run(s.kv.set(plugin, key, value, ttl_ms));
        }
        let expires = ttl_ms.map(|t| now_ms().saturating_add(t));
        self.with(|c| {
            c.prepare_cached("INSERT OR REPLACE INTO kv (plugin, key, value, expires_at_ms) VALUES (?1, ?2, ?3, ?4)")?
                .execute(params![plugin, key, value, expires])
                .map(|_| ())
        })
    }

    /// Removes `key`.
    pub fn delete(&self, plugin: &str, key: &str) -> Result<(), String> {
        if let Some(s) = &self.shared {
            return s.run(s.kv.delete(plugin, key));
        }
        self.with(|c| {
            c.prepare_cached("DELETE FROM kv WHERE plugin = ?1 AND key = ?2")?.execute(params![plugin, key]).map(|_| ())
        })
    }

    /// Live keys starting with `prefix`, in byte order, at most [`MAX_LIST`].
    pub fn list(&self, plugin: &str, prefix: &str) -> Result<Vec<String>, String> {
        self.keys(plugin, prefix, None, MAX_LIST)
    }

    /// Live keys starting with `prefix` that sort after `after`, in byte order, at most `limit`.
    pub fn keys(&self, plugin: &str, prefix: &str, after: Option<&str>, limit: usize) -> Result<Vec<String>, String> {
        if let Some(s) = &self.shared {
            return s.run(s.kv.keys(plugin, prefix, after, limit));
        }
        self.with(|c| {
            // SQLite compares TEXT with memcmp (the BINARY collation): byte order.
            let mut stmt = c.prepare_cached(
                "SELECT key FROM kv WHERE plugin = ?1 AND substr(key, 1, length(?2)) = ?2
                 AND (?5 IS NULL OR key > ?5)
                 AND (expires_at_ms IS NULL OR expires_at_ms > ?3) ORDER BY key LIMIT ?4",
            )?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            let rows = stmt.query_map(params![plugin, prefix, now_ms(), limit, after], |r| r.get(0))?;
            rows.collect()
        })
    }

    /// Adds `delta` to the decimal number at `key` (0 when unset or expired; a live key keeps its expiry)
    /// and returns the new number, atomically.
    pub fn increment(&self, plugin: &str, key: &str, delta: i64) -> Result<i64, String> {
        check(key, b"")?;
        if let Some(s) = &self.shared {
            return s.run(s.kv.increment(plugin, key, delta));
        }
        let conn = self.conn.lock().map_err(|_| "key-value store unavailable".to_owned())?;
        let now = now_ms();
        let current: Option<(Vec<u8>, Option<i64>)> = conn
            .prepare_cached(
                "SELECT value, expires_at_ms FROM kv WHERE plugin = ?1 AND key = ?2
                 AND (expires_at_ms IS NULL OR expires_at_ms > ?3)",
            )
            .and_then(|mut st| st.query_row(params![plugin, key, now], |r| Ok((r.get(0)?, r.get(1)?))).optional())
            .map_err(|e| format!("key-value store: {e}"))?;
        let (number, expires) = match current {
            None => (0, None),
            Some((value, expires)) => {
                let number = std::str::from_utf8(&value)
                    .ok()
                    .and_then(|text| text.parse::<i64>().ok())
                    .ok_or_else(|| format!("key-value store: key `{key}` does not hold a decimal number"))?;
                (number, expires)
            }
        };
        let sum = number
            .checked_add(delta)
            .ok_or_else(|| format!("key-value store: key `{key}`: the sum overflows a 64-bit number"))?;
        conn.prepare_cached("INSERT OR REPLACE INTO kv (plugin, key, value, expires_at_ms) VALUES (?1, ?2, ?3, ?4)")
            .and_then(|mut st| st.execute(params![plugin, key, sum.to_string().as_bytes(), expires]))
            .map_err(|e| format!("key-value store: {e}"))?;
        Ok(sum)
    }

    /// Sets `key` to `value` (with no expiry) if it holds `expected` (`None`: unset or expired), atomically.
    /// Returns whether it did.
    pub fn swap(&self, plugin: &str, key: &str, expected: Option<&[u8]>, value: &[u8]) -> Result<bool, String> {
        check(key, value)?;
        if let Some(s) = &self.shared {
            return s.run(s.kv.swap(plugin, key, expected, value));
        }
        self.with(|c| {
            let changed = match expected {
                Some(old) => c
                    .prepare_cached(
                        "UPDATE kv SET value = ?4, expires_at_ms = NULL WHERE plugin = ?1 AND key = ?2 AND value = ?3
                         AND (expires_at_ms IS NULL OR expires_at_ms > ?5)",
                    )?
                    .execute(params![plugin, key, old, value, now_ms()])?,
                None => c
                    .prepare_cached(
                        "INSERT INTO kv (plugin, key, value, expires_at_ms) VALUES (?1, ?2, ?3, NULL)
                         ON CONFLICT (plugin, key) DO UPDATE SET value = excluded.value, expires_at_ms = NULL
                         WHERE kv.expires_at_ms <= ?4",
                    )?
                    .execute(params![plugin, key, value, now_ms()])?,
            };
            Ok(changed == 1)
        })
    }

    /// Keeps `payload` as the last one of live channel `channel` (so that a restart does not blank a page).
    pub fn save_live(&self, channel: &str, payload: &str) -> Result<(), String> {
        self.with(|c| {
            c.prepare_cached("INSERT OR REPLACE INTO live (channel, payload) VALUES (?1, ?2)")?
                .execute(params![channel, payload])
                .map(|_| ())
        })
    }

    /// Every live channel's last payload.
    pub fn live_payloads(&self) -> Result<Vec<(String, String)>, String> {
        self.with(|c| {
            let mut stmt = c.prepare_cached("SELECT channel, payload FROM live ORDER BY channel")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
    }

    /// Deletes expired keys; returns how many.
    pub fn prune(&self) -> Result<usize, String> {
        if let Some(s) = &self.shared {
            return s.run(s.kv.prune()).map(|n| usize::try_from(n).unwrap_or(usize::MAX));
        }
        self.with(|c| c.execute("DELETE FROM kv WHERE expires_at_ms IS NOT NULL AND expires_at_ms <= ?1", [now_ms()]))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn plugins_see_only_their_own_keys_and_expired_keys_vanish() {
        let dir = tempfile::tempdir().unwrap();
        let kv = Kv::open(dir.path()).unwrap();
        kv.set("a", "count/x", b"1", None).unwrap();
        kv.set("a", "count/y", b"2", None).unwrap();
        kv.set("a", "other", b"3", None).unwrap();
        kv.set("b", "count/x", b"9", None).unwrap();
        assert_eq!(kv.get("a", "count/x").unwrap().as_deref(), Some(&b"1"[..]));
        assert_eq!(kv.get("b", "count/x").unwrap().as_deref(), Some(&b"9"[..]));
        assert_eq!(kv.list("a", "count/").unwrap(), vec!["count/x", "count/y"]);
        assert_eq!(kv.list("b", "").unwrap(), vec!["count/x"]);
        kv.delete("a", "count/x").unwrap();
        assert_eq!(kv.get("a", "count/x").unwrap(), None);
        kv.set("a", "t", b"v", Some(0)).unwrap();
        assert_eq!(kv.get("a", "t").unwrap(), None, "a TTL of 0 expires at once");
        assert_eq!(kv.prune().unwrap(), 1);
        assert!(kv.set("a", "", b"v", None).is_err());
        assert!(kv.set("a", &"k".repeat(MAX_KEY + 1), b"v", None).is_err());
        assert!(kv.set("a", "big", &vec![0; MAX_VALUE + 1], None).is_err());
        kv.save_live("dashboard", "{\"n\":1}").unwrap();
        kv.save_live("dashboard", "{\"n\":2}").unwrap();
        drop(kv);
        let again = Kv::open(dir.path()).unwrap();
        assert_eq!(again.get("a", "other").unwrap().as_deref(), Some(&b"3"[..]), "persisted");
        assert_eq!(again.live_payloads().unwrap(), vec![("dashboard".to_owned(), "{\"n\":2}".to_owned())]);
    }

    #[test]
    fn increments_and_swaps_are_atomic_and_keep_to_the_plugin_s_keys() {
        let dir = tempfile::tempdir().unwrap();
        let kv = Kv::open(dir.path()).unwrap();
        atomics_hold(&kv, &kv);
    }

    /// The atomic operations' meaning, on `kv`, and their atomicity among threads using `kv` and `other`
    /// (two handles to the same keys: the same store, or two nodes of a cluster). Call it from a thread that
    /// may block.
    pub(crate) fn atomics_hold(kv: &Kv, other: &Kv) {
        assert_eq!(kv.increment("a", "n", 5).unwrap(), 5, "unset counts from 0");
        assert_eq!(kv.increment("a", "n", -2).unwrap(), 3);
        assert_eq!(kv.get("a", "n").unwrap().as_deref(), Some(&b"3"[..]), "stored as decimal text");
        assert_eq!(kv.get("b", "n").unwrap(), None);
        kv.set("a", "text", b"x", None).unwrap();
        assert!(kv.increment("a", "text", 1).unwrap_err().contains("does not hold a decimal number"));
        kv.set("a", "max", i64::MAX.to_string().as_bytes(), None).unwrap();
        assert!(kv.increment("a", "max", 1).unwrap_err().contains("overflows"));
        kv.set("a", "gone", b"41", Some(0)).unwrap();
        assert_eq!(kv.increment("a", "gone", 1).unwrap(), 1, "an expired key counts from 0");

        // Compare-and-swap: by the value read; `None` means unset (or expired).
        assert!(kv.swap("a", "c", None, b"1").unwrap());
        assert!(!kv.swap("a", "c", None, b"2").unwrap(), "it is set now");
        assert!(!kv.swap("a", "c", Some(b"0"), b"2").unwrap(), "it holds 1, not 0");
        assert!(kv.swap("a", "c", Some(b"1"), b"2").unwrap());
        assert_eq!(kv.get("a", "c").unwrap().as_deref(), Some(&b"2"[..]));
        let keys = ["c", "unset", "n", "c"].map(String::from);
        let got = other.get_many("a", &keys).unwrap();
        assert_eq!(
            got,
            vec![Some(b"2".to_vec()), None, Some(b"3".to_vec()), Some(b"2".to_vec())],
            "in the order asked"
        );
        assert!(other.get_many("a", &[]).unwrap().is_empty());
        assert!(!kv.swap("b", "c", Some(b"2"), b"3").unwrap(), "another plugin's key is not this one");
        kv.set("a", "t", b"old", Some(0)).unwrap();
        assert!(!kv.swap("a", "t", Some(b"old"), b"new").unwrap(), "an expired value is not there");
        assert!(kv.swap("a", "t", None, b"new").unwrap(), "an expired key is unset");
        assert!(kv.swap("a", "", None, b"v").is_err());

        // Threads racing on one counter, half through increments, half through swap loops: none is lost.
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let kv = if t < 4 { kv.clone() } else { other.clone() };
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        if t % 2 == 0 {
                            kv.increment("a", "race", 1).unwrap();
                        } else {
                            loop {
                                let now = kv.get("a", "race").unwrap();
                                let n: i64 =
                                    now.as_deref().map_or(0, |v| std::str::from_utf8(v).unwrap().parse().unwrap());
                                if kv.swap("a", "race", now.as_deref(), (n + 1).to_string().as_bytes()).unwrap() {
                                    break;
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(kv.get("a", "race").unwrap().as_deref(), Some(&b"400"[..]));
    }

    #[test]
    fn keys_come_in_byte_order_pages_after_a_cursor() {
        let dir = tempfile::tempdir().unwrap();
        keys_page(&Kv::open(dir.path()).unwrap());
    }

    /// `keys`: byte order, prefix, cursor, limit; expired keys and other plugins' keys left out.
    pub(crate) fn keys_page(kv: &Kv) {
        for key in ["b", "a", "B", "é", "a/2", "a/1"] {
            kv.set("p", key, b"v", None).unwrap();
        }
        kv.set("p", "a/3", b"v", Some(0)).unwrap();
        kv.set("q", "a/0", b"v", None).unwrap();
        assert_eq!(kv.keys("p", "", None, 10).unwrap(), vec!["B", "a", "a/1", "a/2", "b", "é"]);
        assert_eq!(kv.keys("p", "", None, 2).unwrap(), vec!["B", "a"]);
        assert_eq!(kv.keys("p", "", Some("a"), 2).unwrap(), vec!["a/1", "a/2"]);
        assert_eq!(
            kv.keys("p", "a/", Some("a/1"), 10).unwrap(),
            vec!["a/2"],
            "expired and other plugins' keys left out"
        );
        assert!(kv.keys("p", "", Some("é"), 10).unwrap().is_empty());
    }
}
