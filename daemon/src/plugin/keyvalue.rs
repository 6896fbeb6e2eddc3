//! `wasi:keyvalue@0.2.0-draft2` (store, atomics, batch) for plugins: the standard interface over the same
//! keys as hookbridge's own `kv` import ([`super::kv::Kv`], the plugin's namespace). A plugin has one bucket,
//! opened as `default` (or the empty identifier); a `cas` handle remembers the value it read, and `swap`
//! succeeds only if the key still holds it (compare by value: a key changed and changed back counts as
//! unchanged, which is what a read-modify-write needs).

use wasmtime::component::Resource;

use super::State;
use super::bindings::wasi::keyvalue::{atomics, batch, store};
use super::kv::MAX_LIST;

/// A bucket: the plugin's namespace (the state knows which plugin it is).
#[derive(Debug)]
pub struct Bucket;

/// A compare-and-swap in progress.
#[derive(Debug)]
pub struct Cas {
    key: String,
    current: Option<Vec<u8>>,
}

fn other(e: impl std::fmt::Display) -> store::Error {
    store::Error::Other(e.to_string())
}

impl State {
    /// Checks that `bucket` is one this invocation opened.
    fn bucket(&self, bucket: &Resource<Bucket>) -> Result<(), store::Error> {
        self.table.get(bucket).map(|_| ()).map_err(other)
    }

    /// A key operation's result, with failures logged as the plugin's.
    fn kv_result<T>(&self, what: &str, r: Result<T, String>) -> Result<T, store::Error> {
        r.map_err(|e| {
            tracing::warn!(plugin = %self.plugin, error = %e, "wasi:keyvalue {what} failed");
            store::Error::Other(e)
        })
    }
}

impl store::Host for State {
    fn open(&mut self, identifier: String) -> Result<Resource<Bucket>, store::Error> {
        if !identifier.is_empty() && identifier != "default" {
            return Err(store::Error::NoSuchStore);
        }
        self.table.push(Bucket).map_err(other)
    }
}

impl store::HostBucket for State {
    fn get(&mut self, bucket: Resource<Bucket>, key: String) -> Result<Option<Vec<u8>>, store::Error> {
        self.bucket(&bucket)?;
        let r = self.kv.get(&self.plugin, &key);
        self.kv_result("get", r)
    }

    fn set(&mut self, bucket: Resource<Bucket>, key: String, value: Vec<u8>) -> Result<(), store::Error> {
        self.bucket(&bucket)?;
        let r = self.kv.set(&self.plugin, &key, &value, None);
        self.kv_result("set", r)
    }

    fn delete(&mut self, bucket: Resource<Bucket>, key: String) -> Result<(), store::Error> {
        self.bucket(&bucket)?;
        let r = self.kv.delete(&self.plugin, &key);
        self.kv_result("delete", r)
    }

    fn exists(&mut self, bucket: Resource<Bucket>, key: String) -> Result<bool, store::Error> {
        self.bucket(&bucket)?;
        let r = self.kv.get(&self.plugin, &key).map(|v| v.is_some());
        self.kv_result("exists", r)
    }

    fn list_keys(
        &mut self,
        bucket: Resource<Bucket>,
        cursor: Option<String>,
    ) -> Result<store::KeyResponse, store::Error> {
        self.bucket(&bucket)?;
        // One more than a page tells whether another page follows.
        let r = self.kv.keys(&self.plugin, "", cursor.as_deref(), MAX_LIST + 1);
        let mut keys = self.kv_result("list-keys", r)?;
        let cursor = if keys.len() > MAX_LIST {
            keys.truncate(MAX_LIST);
            keys.last().cloned()
        } else {
            None
        };
        Ok(store::KeyResponse { keys, cursor })
    }

    fn drop(&mut self, bucket: Resource<Bucket>) -> wasmtime::Result<()> {
        self.table.delete(bucket)?;
        Ok(())
    }
}

impl atomics::HostCas for State {
    fn new(&mut self, bucket: Resource<Bucket>, key: String) -> Result<Resource<Cas>, store::Error> {
        self.bucket(&bucket)?;
        let r = self.kv.get(&self.plugin, &key);
        let current = self.kv_result("cas", r)?;
        self.table.push(Cas { key, current }).map_err(other)
    }

    fn current(&mut self, cas: Resource<Cas>) -> Result<Option<Vec<u8>>, store::Error> {
        Ok(self.table.get(&cas).map_err(other)?.current.clone())
    }

    fn drop(&mut self, cas: Resource<Cas>) -> wasmtime::Result<()> {
        self.table.delete(cas)?;
        Ok(())
    }
}

impl atomics::Host for State {
    fn increment(&mut self, bucket: Resource<Bucket>, key: String, delta: i64) -> Result<i64, store::Error> {
        self.bucket(&bucket)?;
        let r = self.kv.increment(&self.plugin, &key, delta);
        self.kv_result("increment", r)
    }

    fn swap(&mut self, cas: Resource<Cas>, value: Vec<u8>) -> Result<(), atomics::CasError> {
        let Cas { key, current } = self.table.delete(cas).map_err(|e| atomics::CasError::StoreError(other(e)))?;
        let r = self.kv.swap(&self.plugin, &key, current.as_deref(), &value);
        if self.kv_result("swap", r).map_err(atomics::CasError::StoreError)? {
            return Ok(());
        }
        // Lost the race: a fresh handle, holding what the key holds now, to try again with.
        let r = self.kv.get(&self.plugin, &key);
        let current = self.kv_result("cas", r).map_err(atomics::CasError::StoreError)?;
        let fresh = self.table.push(Cas { key, current }).map_err(|e| atomics::CasError::StoreError(other(e)))?;
        Err(atomics::CasError::CasFailed(fresh))
    }
}

impl batch::Host for State {
    fn get_many(
        &mut self,
        bucket: Resource<Bucket>,
        keys: Vec<String>,
    ) -> Result<Vec<(String, Option<Vec<u8>>)>, store::Error> {
        self.bucket(&bucket)?;
        let r = self.kv.get_many(&self.plugin, &keys);
        let values = self.kv_result("get-many", r)?;
        Ok(keys.into_iter().zip(values).collect())
    }

    fn set_many(&mut self, bucket: Resource<Bucket>, key_values: Vec<(String, Vec<u8>)>) -> Result<(), store::Error> {
        self.bucket(&bucket)?;
        for (key, value) in key_values {
            let r = self.kv.set(&self.plugin, &key, &value, None);
            self.kv_result("set-many", r)?;
        }
        Ok(())
    }

    fn delete_many(&mut self, bucket: Resource<Bucket>, keys: Vec<String>) -> Result<(), store::Error> {
        self.bucket(&bucket)?;
        for key in keys {
            let r = self.kv.delete(&self.plugin, &key);
            self.kv_result("delete-many", r)?;
        }
        Ok(())
    }
}
