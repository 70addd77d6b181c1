//! Crypto-shredding reads when the key store fails: a key store that is briefly unreachable is
//! waited out, one that fails for good ends the read with the error and delivers nothing after
//! it, and a wrapped key store (a `MasterKey`) keeps no usable key in the store.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use es_core::contract::StoreFuture;
use es_core::personal::{Encrypted, KeyStore, MasterKey, Personal, StoredKey};
use es_core::{
    AppendRequest, EventStore, ExpectedVersion, NewEvent, ReadStream, RecordedEvent, StoreError,
    StreamId,
};
use es_memory::{InMemoryKeyStore, InMemoryStore};
use futures::{StreamExt, TryStreamExt};

/// Fails the next `failures` key loads, transiently or for good.
#[derive(Clone)]
struct Failing {
    inner: InMemoryKeyStore,
    failures: Arc<AtomicU32>,
    transient: bool,
}

impl KeyStore for Failing {
    fn create_key(
        &self,
        subject: &str,
        version: u32,
        material: Vec<u8>,
    ) -> impl StoreFuture<StoredKey> {
        self.inner.create_key(subject, version, material)
    }

    fn load_keys(&self, subjects: &[String]) -> impl StoreFuture<HashMap<String, StoredKey>> {
        let fail = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        let inner = self.inner.clone();
        let subjects = subjects.to_vec();
        let transient = self.transient;
        async move {
            if fail {
                return Err(if transient {
                    StoreError::unavailable("key store restarting")
                } else {
                    StoreError::backend("key store refused")
                });
            }
            inner.load_keys(&subjects).await
        }
    }

    fn forget(&self, subject: &str) -> impl StoreFuture<bool> {
        self.inner.forget(subject)
    }
}

async fn write_two(store: &Encrypted<InMemoryStore, Failing>) -> StreamId {
    let stream = StreamId::new("customer", "f").unwrap();
    let events = (0..2)
        .map(|i| {
            let payload = serde_json::to_vec(&Personal::new("s", format!("v{i}"))).unwrap();
            NewEvent::new("Secret", 1, payload).unwrap()
        })
        .collect();
    store
        .append(AppendRequest::new(
            stream.clone(),
            ExpectedVersion::NoStream,
            events,
        ))
        .await
        .unwrap();
    stream
}

#[tokio::test]
async fn a_briefly_unreachable_key_store_is_waited_out() {
    let keys = Failing {
        inner: InMemoryKeyStore::new(),
        failures: Arc::new(AtomicU32::new(0)),
        transient: true,
    };
    let store = Encrypted::new(InMemoryStore::new(), keys.clone());
    let stream = write_two(&store).await;
    keys.failures.store(3, Ordering::SeqCst);
    let read: Vec<RecordedEvent> = store
        .read_stream(&stream, ReadStream::forward())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(read.len(), 2);
    assert_eq!(
        keys.failures.load(Ordering::SeqCst),
        0,
        "it retried through the failures"
    );
    let p: Personal<String> = serde_json::from_slice(&read[1].payload).unwrap();
    assert_eq!(p.value().unwrap(), "v1");
}

#[tokio::test]
async fn a_failing_key_store_ends_the_read_with_its_error() {
    let keys = Failing {
        inner: InMemoryKeyStore::new(),
        failures: Arc::new(AtomicU32::new(0)),
        transient: false,
    };
    let store = Encrypted::new(InMemoryStore::new(), keys.clone());
    let stream = write_two(&store).await;
    keys.failures.store(1, Ordering::SeqCst);
    let items: Vec<Result<RecordedEvent, StoreError>> = store
        .read_stream(&stream, ReadStream::forward())
        .collect()
        .await;
    assert_eq!(items.len(), 1, "the error, and nothing after it");
    assert!(
        matches!(&items[0], Err(StoreError::Backend(_))),
        "{items:?}"
    );
}

#[tokio::test]
async fn a_master_key_wraps_the_stored_keys() {
    let keys = InMemoryKeyStore::new();
    let master = MasterKey::new(&[9; 32]);
    let store = Encrypted::new(InMemoryStore::new(), keys.clone()).with_key_wrap(master);
    let stream = StreamId::new("customer", "m").unwrap();
    let payload = serde_json::to_vec(&Personal::new("m", "secret")).unwrap();
    store
        .append(AppendRequest::new(
            stream.clone(),
            ExpectedVersion::NoStream,
            vec![NewEvent::new("Secret", 1, payload).unwrap()],
        ))
        .await
        .unwrap();
    let stored = keys.load_keys(&["m".to_owned()]).await.unwrap();
    let StoredKey::Active { material, .. } = &stored["m"] else {
        panic!("a key")
    };
    assert_eq!(material.len(), 24 + 32 + 16, "nonce, wrapped key, tag");

    // With the right master key it reads; with another, the key does not unwrap: an error.
    let read: Vec<RecordedEvent> = store
        .read_stream(&stream, ReadStream::forward())
        .try_collect()
        .await
        .unwrap();
    let p: Personal<String> = serde_json::from_slice(&read[0].payload).unwrap();
    assert_eq!(p.value().unwrap(), "secret");
    let wrong = Encrypted::new(store.inner().clone(), keys).with_key_wrap(MasterKey::new(&[8; 32]));
    let err = wrong
        .read_stream(&stream, ReadStream::forward())
        .try_collect::<Vec<_>>()
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
}
