//! The Redis key store of crypto-shredding: one string key per subject under the store's prefix,
//! all in one hash slot.

use std::collections::HashMap;

use es_core::contract::{StoreError, StoreFuture};
use es_core::personal::{KeyStore, StoredKey};
use redis::Value;

use crate::conn::Connection;
use crate::error::store_error;
use crate::script;
use crate::RedisStore;

/// What a forgotten subject's key holds.
const TOMBSTONE: &[u8] = b"forgotten";
/// The first byte of a key that holds a subject key; the version (4 bytes, big-endian) and the
/// key material follow.
const ACTIVE: u8 = b'K';

/// Subject keys under the store's prefix, for [`es_core::personal::Encrypted`] over a
/// [`RedisStore`] (see [`RedisStore::key_store`]). Cheap to clone.
///
/// Subject `s` has the string key `<prefix>:{<prefix>:$subjects}:s` (one hash tag for all, so
/// that one `MGET` loads many on a cluster too). It is created with `SET .. NX GET` (the first
/// writer wins, every other gets its key back) and forgotten with `SET .. GET`, which replaces
/// the key's bytes with a tombstone in one command; only commands of the documented ACL line are
/// used. The old bytes stay in the AOF and RDB files, and on replicas that have not applied the
/// command, until they are rewritten.
#[derive(Clone)]
pub struct RedisKeyStore {
    conn: Connection,
    base: String,
}

impl std::fmt::Debug for RedisKeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisKeyStore")
            .field("keys", &format_args!("{}<subject>", self.base))
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// The key store under this store's prefix, on its connection.
    pub fn key_store(&self) -> RedisKeyStore {
        let prefix = self.keys().prefix();
        RedisKeyStore {
            conn: self.inner.conn.clone(),
            base: format!("{prefix}:{{{prefix}:$subjects}}:"),
        }
    }
}

impl RedisKeyStore {
    /// The Redis key of `subject`'s key.
    pub fn key_of(&self, subject: &str) -> String {
        format!("{}{subject}", self.base)
    }
}

fn decode(value: Value, subject: &str) -> Result<Option<StoredKey>, StoreError> {
    let bytes = match value {
        Value::Nil => return Ok(None),
        Value::BulkString(bytes) => bytes,
        other => {
            return Err(corrupt(subject, format!("unexpected reply {other:?}")));
        }
    };
    if bytes == TOMBSTONE {
        return Ok(Some(StoredKey::Forgotten));
    }
    match bytes.split_first() {
        Some((&ACTIVE, rest)) if rest.len() > 4 => {
            let (version, material) = rest.split_at(4);
            let version = u32::from_be_bytes(version.try_into().unwrap_or([0; 4]));
            Ok(Some(StoredKey::Active {
                version,
                material: material.to_vec(),
            }))
        }
        _ => Err(corrupt(subject, "neither a key nor a tombstone".to_owned())),
    }
}

fn corrupt(subject: &str, reason: String) -> StoreError {
    StoreError::Corrupt {
        location: format!("the key of subject `{subject}`"),
        reason,
    }
}

impl KeyStore for RedisKeyStore {
    fn create_key(
        &self,
        subject: &str,
        version: u32,
        material: Vec<u8>,
    ) -> impl StoreFuture<StoredKey> {
        let mut conn = self.conn.clone();
        let key = self.key_of(subject);
        let subject = subject.to_owned();
        async move {
            let mut value = Vec::with_capacity(5 + material.len());
            value.push(ACTIVE);
            value.extend_from_slice(&version.to_be_bytes());
            value.extend_from_slice(&material);
            let mut cmd = redis::cmd("SET");
            cmd.arg(&key).arg(&value).arg("NX").arg("GET");
            let reply = script::query(&mut conn, &cmd)
                .await
                .map_err(|e| store_error(e, || format!("the key of subject `{subject}`")))?;
            Ok(decode(reply, &subject)?.unwrap_or(StoredKey::Active { version, material }))
        }
    }

    fn load_keys(&self, subjects: &[String]) -> impl StoreFuture<HashMap<String, StoredKey>> {
        let mut conn = self.conn.clone();
        let keys: Vec<String> = subjects.iter().map(|s| self.key_of(s)).collect();
        let subjects = subjects.to_vec();
        async move {
            let mut found = HashMap::new();
            if subjects.is_empty() {
                return Ok(found);
            }
            let mut cmd = redis::cmd("MGET");
            cmd.arg(&keys);
            let reply = script::query(&mut conn, &cmd)
                .await
                .map_err(|e| store_error(e, || "the subject keys".to_owned()))?;
            let Value::Array(values) = reply else {
                return Err(corrupt(&subjects[0], format!("MGET replied {reply:?}")));
            };
            for (subject, value) in subjects.into_iter().zip(values) {
                if let Some(key) = decode(value, &subject)? {
                    found.insert(subject, key);
                }
            }
            Ok(found)
        }
    }

    fn forget(&self, subject: &str) -> impl StoreFuture<bool> {
        let mut conn = self.conn.clone();
        let key = self.key_of(subject);
        let subject = subject.to_owned();
        async move {
            let mut cmd = redis::cmd("SET");
            cmd.arg(&key).arg(TOMBSTONE).arg("GET");
            let reply = script::query(&mut conn, &cmd)
                .await
                .map_err(|e| store_error(e, || format!("the key of subject `{subject}`")))?;
            Ok(matches!(
                decode(reply, &subject)?,
                Some(StoredKey::Active { .. })
            ))
        }
    }
}
