//! The in-memory key store of crypto-shredding.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use es_core::contract::StoreFuture;
use es_core::personal::{KeyStore, StoredKey};

/// Subject keys in memory, for [`es_core::personal::Encrypted`] over an
/// [`InMemoryStore`](crate::InMemoryStore) (or any store, in tests). Cheap to clone; clones share
/// the keys. [`forget`](KeyStore::forget) drops the key's bytes from the map and keeps a
/// tombstone; nothing is persisted.
#[derive(Clone, Default)]
pub struct InMemoryKeyStore {
    keys: Arc<Mutex<HashMap<String, StoredKey>>>,
}

impl std::fmt::Debug for InMemoryKeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("InMemoryKeyStore")
            .field("subjects", &keys.len())
            .finish()
    }
}

impl InMemoryKeyStore {
    /// An empty key store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl KeyStore for InMemoryKeyStore {
    fn create_key(
        &self,
        subject: &str,
        version: u32,
        material: Vec<u8>,
    ) -> impl StoreFuture<StoredKey> {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        let now = keys
            .entry(subject.to_owned())
            .or_insert(StoredKey::Active { version, material })
            .clone();
        std::future::ready(Ok(now))
    }

    fn load_keys(&self, subjects: &[String]) -> impl StoreFuture<HashMap<String, StoredKey>> {
        let keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        let found = subjects
            .iter()
            .filter_map(|s| keys.get(s).map(|k| (s.clone(), k.clone())))
            .collect();
        std::future::ready(Ok(found))
    }

    fn forget(&self, subject: &str) -> impl StoreFuture<bool> {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        let old = keys.insert(subject.to_owned(), StoredKey::Forgotten);
        std::future::ready(Ok(matches!(old, Some(StoredKey::Active { .. }))))
    }
}
