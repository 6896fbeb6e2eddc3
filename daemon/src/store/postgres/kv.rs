//! The plugins' key-value store on a cluster: table `plugin_kv` (schema version 3), one namespace per plugin
//! id, shared by every node. Each operation is one statement, so the atomic ones are atomic cluster-wide: an
//! increment is an upsert that adds to the row it locks; a compare-and-swap is an update (or, for a key that
//! was unset, an upsert) whose `WHERE` holds the value the caller read, which PostgreSQL re-checks against
//! the newest row version when another transaction updated it first. Expiry is on the server's clock, so
//! nodes with skewed clocks agree on it.

use deadpool_postgres::Pool;
use tokio_postgres::error::SqlState;

use super::pg_error;
use crate::store::StoreError;

/// The shared store. Cheap to clone.
#[derive(Clone)]
pub struct SharedKv {
    pool: Pool,
}

impl std::fmt::Debug for SharedKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedKv").finish_non_exhaustive()
    }
}

/// The condition of a row that has not expired.
const LIVE: &str = "(expires_at_ms IS NULL OR expires_at_ms > hookbridge.now_ms())";

impl SharedKv {
    pub(super) fn new(pool: Pool) -> SharedKv {
        SharedKv { pool }
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool.get().await.map_err(pg_error)
    }

    /// The value of `key`, unless unset or expired.
    pub async fn get(&self, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let sql = format!("SELECT value FROM hookbridge.plugin_kv WHERE plugin = $1 AND key = $2 AND {LIVE}");
        let row = self.client().await?.query_opt(&sql, &[&plugin, &key]).await.map_err(pg_error)?;
        Ok(row.map(|r| r.get(0)))
    }

    /// The values of `keys` (none for a key unset or expired), in the order given: one round trip.
    pub async fn get_many(&self, plugin: &str, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let sql = format!(
            "SELECT k.i, kv.value FROM unnest($2::text[]) WITH ORDINALITY AS k(key, i)
             LEFT JOIN hookbridge.plugin_kv kv ON kv.plugin = $1 AND kv.key = k.key AND {LIVE} ORDER BY k.i"
        );
        let rows = self.client().await?.query(&sql, &[&plugin, &keys]).await.map_err(pg_error)?;
        Ok(rows.iter().map(|r| r.get(1)).collect())
    }

    /// Sets `key`, expiring `ttl_ms` from now on the server's clock.
    pub async fn set(&self, plugin: &str, key: &str, value: &[u8], ttl_ms: Option<i64>) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute(
                "INSERT INTO hookbridge.plugin_kv (plugin, key, value, expires_at_ms)
                 VALUES ($1, $2, $3, hookbridge.now_ms() + $4::bigint)
                 ON CONFLICT (plugin, key) DO UPDATE SET value = excluded.value, expires_at_ms = excluded.expires_at_ms",
                &[&plugin, &key, &value, &ttl_ms],
            )
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    /// Removes `key`.
    pub async fn delete(&self, plugin: &str, key: &str) -> Result<(), StoreError> {
        self.client()
            .await?
            .execute("DELETE FROM hookbridge.plugin_kv WHERE plugin = $1 AND key = $2", &[&plugin, &key])
            .await
            .map_err(pg_error)?;
        Ok(())
    }

    /// Live keys that start with `prefix` and sort after `after`, in byte order, at most `limit`.
    pub async fn keys(
        &self,
        plugin: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let sql = format!(
            "SELECT key FROM hookbridge.plugin_kv WHERE plugin = $1 AND starts_with(key, $2)
             AND ($3::text IS NULL OR key COLLATE \"C\" > $3) AND {LIVE}
             ORDER BY key COLLATE \"C\" LIMIT $4"
        );
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.client().await?.query(&sql, &[&plugin, &prefix, &after, &limit]).await.map_err(pg_error)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Adds `delta` to the decimal number at `key` (0 when unset or expired; the expiry of a live key is
    /// kept) and returns the new number.
    pub async fn increment(&self, plugin: &str, key: &str, delta: i64) -> Result<i64, StoreError> {
        let row = self
            .client()
            .await?
            .query_one(
                "INSERT INTO hookbridge.plugin_kv AS kv (plugin, key, value) VALUES ($1, $2, convert_to($3::bigint::text, 'UTF8'))
                 ON CONFLICT (plugin, key) DO UPDATE SET
                     value = convert_to((CASE WHEN kv.expires_at_ms <= hookbridge.now_ms() THEN 0
                                         ELSE convert_from(kv.value, 'UTF8')::bigint END + $3::bigint)::text, 'UTF8'),
                     expires_at_ms = CASE WHEN kv.expires_at_ms <= hookbridge.now_ms() THEN NULL ELSE kv.expires_at_ms END
                 RETURNING convert_from(value, 'UTF8')::bigint",
                &[&plugin, &key, &delta],
            )
            .await
            .map_err(|e| match e.code() {
                Some(c) if *c == SqlState::INVALID_TEXT_REPRESENTATION || *c == SqlState::CHARACTER_NOT_IN_REPERTOIRE => {
                    StoreError::Postgres(format!("key `{key}` does not hold a decimal number"))
                }
                Some(c) if *c == SqlState::NUMERIC_VALUE_OUT_OF_RANGE => {
                    StoreError::Postgres(format!("key `{key}`: the sum overflows a 64-bit number"))
                }
                _ => pg_error(e),
            })?;
        Ok(row.get(0))
    }

    /// Sets `key` to `value` (with no expiry) if it holds `expected` (`None`: unset or expired). Returns
    /// whether it did.
    pub async fn swap(
        &self,
        plugin: &str,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
    ) -> Result<bool, StoreError> {
        let client = self.client().await?;
        let changed = match expected {
            Some(old) => {
                let sql = format!(
                    "UPDATE hookbridge.plugin_kv SET value = $4, expires_at_ms = NULL
                     WHERE plugin = $1 AND key = $2 AND value = $3 AND {LIVE}"
                );
                client.execute(&sql, &[&plugin, &key, &old, &value]).await
            }
            None => {
                client
                    .execute(
                        "INSERT INTO hookbridge.plugin_kv AS kv (plugin, key, value) VALUES ($1, $2, $3)
                         ON CONFLICT (plugin, key) DO UPDATE SET value = excluded.value, expires_at_ms = NULL
                         WHERE kv.expires_at_ms <= hookbridge.now_ms()",
                        &[&plugin, &key, &value],
                    )
                    .await
            }
        };
        Ok(changed.map_err(pg_error)? == 1)
    }

    /// Deletes expired keys; returns how many.
    pub async fn prune(&self) -> Result<u64, StoreError> {
        self.client()
            .await?
            .execute("DELETE FROM hookbridge.plugin_kv WHERE expires_at_ms <= hookbridge.now_ms()", &[])
            .await
            .map_err(pg_error)
    }
}
