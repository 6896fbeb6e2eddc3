//! The plugins' key-value store: one SQLite file (`plugins.db` in the data directory, WAL, `synchronous =
//! NORMAL`: it survives a crash of the daemon, and loses at most the last writes on a power cut), one
//! namespace per plugin id. A plugin sees only its own keys. Expired keys read as absent and are removed
//! by [`Kv::prune`].

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};

use crate::event::now_ms;

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
        Ok(Kv { conn: Arc::new(Mutex::new(conn)) })
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, String> {
        let conn = self.conn.lock().map_err(|_| "key-value store unavailable".to_owned())?;
        f(&conn).map_err(|e| format!("key-value store: {e}"))
    }

    /// The value of `key` for `plugin`, unless absent or expired.
    pub fn get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, String> {
        self.with(|c| {
            c.prepare_cached(
                "SELECT value FROM kv WHERE plugin = ?1 AND key = ?2 AND (expires_at_ms IS NULL OR expires_at_ms > ?3)",
            )?
            .query_row(params![plugin, key, now_ms()], |r| r.get(0))
            .optional()
        })
    }

    /// Sets `key`, optionally expiring `ttl_ms` from now.
    pub fn set(&self, plugin: &str, key: &str, value: &[u8], ttl_ms: Option<u64>) -> Result<(), String> {
        if key.is_empty() || key.len() > MAX_KEY {
            return Err(format!("keys are 1 to {MAX_KEY} bytes"));
        }
        if value.len() > MAX_VALUE {
            return Err(format!("values are at most {MAX_VALUE} bytes"));
        }
        let expires = ttl_ms.map(|t| now_ms().saturating_add(i64::try_from(t).unwrap_or(i64::MAX)));
        self.with(|c| {
            c.prepare_cached("INSERT OR REPLACE INTO kv (plugin, key, value, expires_at_ms) VALUES (?1, ?2, ?3, ?4)")?
                .execute(params![plugin, key, value, expires])
                .map(|_| ())
        })
    }

    /// Removes `key`.
    pub fn delete(&self, plugin: &str, key: &str) -> Result<(), String> {
        self.with(|c| {
            c.prepare_cached("DELETE FROM kv WHERE plugin = ?1 AND key = ?2")?.execute(params![plugin, key]).map(|_| ())
        })
    }

    /// Live keys starting with `prefix`, in byte order, at most [`MAX_LIST`].
    pub fn list(&self, plugin: &str, prefix: &str) -> Result<Vec<String>, String> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT key FROM kv WHERE plugin = ?1 AND substr(key, 1, length(?2)) = ?2
                 AND (expires_at_ms IS NULL OR expires_at_ms > ?3) ORDER BY key LIMIT ?4",
            )?;
            let rows = stmt.query_map(params![plugin, prefix, now_ms(), MAX_LIST as i64], |r| r.get(0))?;
            rows.collect()
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
        self.with(|c| c.execute("DELETE FROM kv WHERE expires_at_ms IS NOT NULL AND expires_at_ms <= ?1", [now_ms()]))
    }
}

#[cfg(test)]
mod tests {
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
}
