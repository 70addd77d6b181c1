//! [`Encrypted`]: a store whose personal values are sealed on the way in and opened on the way
//! out.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryFutureExt};
use serde_json::Value;

use super::{
    may_hold_sealed, may_hold_values, open, random_key, seal, subjects, KeyRing, KeyStore, KeyWrap,
    PlainKeys, StoredKey, SubjectKey, SEALED_TAG, VALUE_TAG,
};
use crate::contract::{
    pages_of, AppendRequest, AppendResult, Checkpoint, CheckpointStore, DeadLetter, Delivered,
    EpochStart, EventPages, EventStore, EventStream, FeedPosition, HeldLease, LeaseStore,
    OutboxRecord, OutboxStore, Partitioning, ReadAll, ReadStream, Rejection, RelayStatus,
    SnapshotRecord, SnapshotStore, StoreError, StoreFuture,
};
use crate::event::RecordedEvent;
use crate::retry::Backoff;
use crate::stream_id::StreamId;

/// The version of the keys [`Encrypted`] creates.
const KEY_VERSION: u32 = 1;
/// Most events of a read whose keys are fetched in one round trip.
const OPEN_CHUNK: usize = 256;
/// Attempts to load the keys of a chunk of events read while the key store is unreachable,
/// before the read fails (with the last error); the pauses between them follow
/// [`KEY_RETRY`], about 10 s in all.
const KEY_ATTEMPTS: u32 = 20;
/// The pauses between those attempts.
const KEY_RETRY: Backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));

/// A store whose [`Personal`](super::Personal) values are encrypted with their subject's key
/// from a [`KeyStore`]: events, snapshots and outbox messages are sealed before the inner store
/// sees them, and everything read (streams, the feed, subscriptions, snapshots, the outbox and
/// its dead letters) is opened on the way out, erased where the key was destroyed by
/// [`forget`](Self::forget).
///
/// It implements every store trait its inner store does, so a repository, a projection runner or
/// a relay runs on it unchanged. Payloads without personal values pass through after a byte
/// search; metadata, stream ids, outbox keys and topics are never encrypted (keep personal data
/// out of them).
///
/// ```
/// use es_core::personal::{Encrypted, Personal};
/// use es_core::{AppendRequest, EventStore, ExpectedVersion, NewEvent, ReadStream, StreamId};
/// use es_memory::{InMemoryKeyStore, InMemoryStore};
/// use futures::TryStreamExt;
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let store = Encrypted::new(InMemoryStore::new(), InMemoryKeyStore::new());
/// let stream = StreamId::new("customer", "7")?;
/// let email = Personal::new("customer-7", "ada@example.com");
/// let event = NewEvent::new("EmailChanged", 1, serde_json::to_vec(&email)?)?;
/// store.append(AppendRequest::new(stream.clone(), ExpectedVersion::NoStream, vec![event])).await?;
///
/// // The inner store holds only the sealed form.
/// let raw: Vec<_> = store.inner().read_stream(&stream, ReadStream::forward()).try_collect().await?;
/// assert!(!String::from_utf8_lossy(&raw[0].payload).contains("ada@"));
///
/// store.forget("customer-7").await?;
/// let read: Vec<_> = store.read_stream(&stream, ReadStream::forward()).try_collect().await?;
/// let email: Personal<String> = serde_json::from_slice(&read[0].payload)?;
/// assert!(email.is_erased());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
pub struct Encrypted<S, K> {
    inner: S,
    keys: K,
    wrap: Arc<dyn KeyWrap>,
}

impl<S: Clone, K: Clone> Clone for Encrypted<S, K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            keys: self.keys.clone(),
            wrap: Arc::clone(&self.wrap),
        }
    }
}

impl<S: std::fmt::Debug, K: std::fmt::Debug> std::fmt::Debug for Encrypted<S, K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encrypted")
            .field("inner", &self.inner)
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl<S, K: KeyStore> Encrypted<S, K> {
    /// `inner`, with its personal values encrypted by keys kept in `keys`, stored as they are
    /// ([`PlainKeys`]).
    pub fn new(inner: S, keys: K) -> Self {
        Self {
            inner,
            keys,
            wrap: Arc::new(PlainKeys),
        }
    }

    /// Wraps the subject keys with `wrap` before they are stored (a key management service, a
    /// [`MasterKey`](super::MasterKey)). Every process sharing the key store must use the same.
    pub fn with_key_wrap(mut self, wrap: impl KeyWrap) -> Self {
        self.wrap = Arc::new(wrap);
        self
    }

    /// The inner store: what it returns is sealed.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The key store.
    pub fn key_store(&self) -> &K {
        &self.keys
    }

    /// Forgets `subject`: destroys its key in the key store, so every personal value about it,
    /// stored before or after, reads as erased. Idempotent; returns whether a key was destroyed
    /// by this call.
    pub async fn forget(&self, subject: &str) -> Result<bool, StoreError> {
        super::check_subject(subject).map_err(StoreError::backend)?;
        self.keys.forget(subject).await
    }

    /// The keys to seal values of `subjects`, created where missing (`None`: forgotten).
    async fn write_keys(&self, subjects: BTreeSet<String>) -> Result<KeyRing, StoreError> {
        let list: Vec<String> = subjects.into_iter().collect();
        let mut stored = self.keys.load_keys(&list).await?;
        for subject in list {
            if stored.contains_key(&subject) {
                continue;
            }
            let key = random_key()?;
            let material = self.wrap.wrap(&subject, &key).await?;
            let now = self
                .keys
                .create_key(&subject, KEY_VERSION, material)
                .await?;
            stored.insert(subject, now);
        }
        self.unwrap_keys(stored).await
    }

    /// The keys to open values of `subjects` (`None`: forgotten). A subject with neither a key
    /// nor a tombstone was never forgotten: its sealed values were written with a key this key
    /// store does not hold (it lost its data, or it is not the key store they were written
    /// with), so reading them is [`StoreError::Corrupt`], not an erasure.
    async fn read_keys(&self, subjects: BTreeSet<String>) -> Result<KeyRing, StoreError> {
        let list: Vec<String> = subjects.into_iter().collect();
        let stored = self.keys.load_keys(&list).await?;
        if let Some(missing) = list.iter().find(|s| !stored.contains_key(*s)) {
            return Err(StoreError::Corrupt {
                location: format!("the key of subject `{missing}`"),
                reason: format!(
                    "values sealed for `{missing}` are stored, but the key store holds neither \
                     a key nor a tombstone for it: it lost the key, or it is not the key store \
                     they were written with"
                ),
            });
        }
        self.unwrap_keys(stored).await
    }

    async fn unwrap_keys(
        &self,
        stored: std::collections::HashMap<String, StoredKey>,
    ) -> Result<KeyRing, StoreError> {
        let mut ring = KeyRing::with_capacity(stored.len());
        for (subject, key) in stored {
            let key = match key {
                StoredKey::Active { version, material } => {
                    let raw = self.wrap.unwrap(&subject, &material).await?;
                    Some(
                        SubjectKey::new(version, &raw).ok_or_else(|| StoreError::Corrupt {
                            location: format!("the key of subject `{subject}`"),
                            reason: format!("a key has 32 bytes, this one {}", raw.len()),
                        })?,
                    )
                }
                StoredKey::Forgotten => None,
            };
            ring.insert(subject, key);
        }
        Ok(ring)
    }

    /// Seals the personal values of an append's events and outbox messages.
    async fn seal_request(&self, request: &mut AppendRequest) -> Result<(), StoreError> {
        let stream_id = request.stream_id.clone();
        let payloads = request
            .events
            .iter_mut()
            .map(|e| &mut e.payload)
            .chain(request.outbox.iter_mut().map(|m| &mut m.payload))
            .collect();
        self.seal_payloads(&stream_id, payloads).await
    }

    /// Seals the payloads of `payloads` that hold personal values, with one key fetch for all.
    async fn seal_payloads(
        &self,
        stream_id: &StreamId,
        payloads: Vec<&mut Bytes>,
    ) -> Result<(), StoreError> {
        let invalid = |reason: String| StoreError::InvalidRequest {
            stream_id: stream_id.clone(),
            reason,
        };
        let mut parsed = Vec::new();
        let mut wanted = BTreeSet::new();
        for payload in payloads {
            if !may_hold_values(payload) {
                continue;
            }
            let Ok(value) = serde_json::from_slice::<Value>(payload) else {
                // Not JSON: left for the inner store to refuse.
                continue;
            };
            subjects(&value, VALUE_TAG, &mut wanted).map_err(invalid)?;
            parsed.push((payload, value));
        }
        if wanted.is_empty() {
            return Ok(());
        }
        let ring = self.write_keys(wanted).await?;
        for (payload, mut value) in parsed {
            seal(&mut value, &ring)?;
            *payload = Bytes::from(serde_json::to_vec(&value).map_err(StoreError::backend)?);
        }
        Ok(())
    }

    /// Opens the payloads that hold sealed values, with one key fetch for all. `location` names
    /// each for errors.
    async fn open_payloads(&self, payloads: Vec<(&mut Bytes, String)>) -> Result<(), StoreError> {
        let mut parsed = Vec::new();
        let mut wanted = BTreeSet::new();
        for (payload, location) in payloads {
            if !may_hold_sealed(payload) {
                continue;
            }
            let Ok(value) = serde_json::from_slice::<Value>(payload) else {
                continue;
            };
            subjects(&value, SEALED_TAG, &mut wanted).map_err(|reason| StoreError::Corrupt {
                location: location.clone(),
                reason,
            })?;
            parsed.push((payload, value, location));
        }
        if wanted.is_empty() {
            return Ok(());
        }
        let ring = self.read_keys(wanted).await?;
        for (payload, mut value, location) in parsed {
            open(&mut value, &ring, &|| location.clone())?;
            *payload = Bytes::from(serde_json::to_vec(&value).map_err(StoreError::backend)?);
        }
        Ok(())
    }

    async fn open_events(&self, events: &mut [RecordedEvent]) -> Result<(), StoreError> {
        let payloads = events
            .iter_mut()
            .map(|e| {
                let location = format!(
                    "`{}` version {} (position {})",
                    e.stream_id, e.stream_version, e.global_position
                );
                (&mut e.payload, location)
            })
            .collect();
        self.open_payloads(payloads).await
    }

    /// [`open_events`](Self::open_events), retrying while the key store is unreachable
    /// ([`StoreError::is_transient`]), so that a subscription or a projection rides out a key
    /// store restart as it rides out one of the event store.
    async fn open_events_patiently(&self, events: &mut [RecordedEvent]) -> Result<(), StoreError> {
        let mut delays = KEY_RETRY.delays();
        let mut attempt = 1;
        loop {
            match self.open_events(events).await {
                Err(err) if err.is_transient() && attempt < KEY_ATTEMPTS => {
                    tracing::warn!(error = %err, attempt, "loading subject keys failed; retrying");
                    delays.sleep().await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn open_outbox(&self, records: &mut [OutboxRecord]) -> Result<(), StoreError> {
        let payloads = records
            .iter_mut()
            .map(|r| {
                let location = format!("outbox record {} of `{}`", r.position, r.stream_id);
                (&mut r.message.payload, location)
            })
            .collect();
        self.open_payloads(payloads).await
    }
}

impl<S: EventStore, K: KeyStore> Encrypted<S, K> {
    /// `events`, opened a ready chunk at a time (one key fetch per chunk); the stream ends after
    /// its first error, so that nothing after a failed chunk is delivered out of order.
    fn open_stream(&self, events: EventStream) -> EventStream {
        let this = self.clone();
        events
            .ready_chunks(OPEN_CHUNK)
            .then(move |chunk| {
                let this = this.clone();
                async move {
                    let mut out: Vec<Result<RecordedEvent, StoreError>> = Vec::new();
                    let mut ready = Vec::new();
                    let mut failure = None;
                    for item in chunk {
                        match item {
                            Ok(event) => ready.push(event),
                            Err(err) => {
                                failure = Some(err);
                                break;
                            }
                        }
                    }
                    match this.open_events_patiently(&mut ready).await {
                        Ok(()) => {
                            out.extend(ready.into_iter().map(Ok));
                            out.extend(failure.map(Err));
                        }
                        Err(StoreError::Corrupt { .. }) => {
                            // A value that does not open (altered, malformed): deliver the
                            // events before it, then its own error, so that the reader stops
                            // at the event that is wrong.
                            for mut event in ready {
                                match this.open_events(std::slice::from_mut(&mut event)).await {
                                    Ok(()) => out.push(Ok(event)),
                                    Err(err) => {
                                        out.push(Err(err));
                                        break;
                                    }
                                }
                            }
                        }
                        Err(err) => out.push(Err(err)),
                    }
                    futures::stream::iter(out)
                }
            })
            .flatten()
            .scan(false, |failed, item| {
                let next = (!*failed).then(|| {
                    *failed = item.is_err();
                    item
                });
                std::future::ready(next)
            })
            .boxed()
    }
}

impl<S: EventStore, K: KeyStore> EventStore for Encrypted<S, K> {
    fn append(&self, mut request: AppendRequest) -> impl StoreFuture<AppendResult> {
        async move {
            self.seal_request(&mut request).await?;
            self.inner.append(request).await
        }
    }

    fn append_streams(
        &self,
        mut requests: Vec<AppendRequest>,
    ) -> impl StoreFuture<Vec<AppendResult>> {
        async move {
            for request in &mut requests {
                self.seal_request(request).await?;
            }
            self.inner.append_streams(requests).await
        }
    }

    fn archive_stream(
        &self,
        stream: &StreamId,
        before: u64,
    ) -> impl StoreFuture<crate::contract::Archived> {
        self.inner.archive_stream(stream, before)
    }

    fn stream_version(&self, stream: &StreamId) -> impl StoreFuture<u64> {
        self.inner.stream_version(stream)
    }

    fn list_streams(
        &self,
        list: crate::contract::ListStreams,
    ) -> impl StoreFuture<crate::contract::StreamPage> {
        self.inner.list_streams(list)
    }

    fn read_stream(&self, stream: &StreamId, read: ReadStream) -> EventStream {
        self.open_stream(self.inner.read_stream(stream, read))
    }

    fn read_stream_pages(&self, stream: &StreamId, read: ReadStream) -> EventPages {
        pages_of(self.read_stream(stream, read))
    }

    fn read_all(&self, read: ReadAll) -> EventStream {
        self.open_stream(self.inner.read_all(read))
    }

    fn partitioning(&self) -> Partitioning {
        self.inner.partitioning()
    }

    fn partition_head(&self, partition: u32) -> impl StoreFuture<u64> {
        self.inner.partition_head(partition)
    }

    fn head_position(&self) -> impl StoreFuture<u64> {
        self.inner.head_position()
    }

    fn wait_for_partition(&self, partition: u32, after: u64) -> impl Future<Output = ()> + Send {
        self.inner.wait_for_partition(partition, after)
    }

    fn wait_for_append(&self, after: u64) -> impl Future<Output = ()> + Send {
        self.inner.wait_for_append(after)
    }

    fn partition_epochs(&self, partition: u32) -> impl StoreFuture<Vec<EpochStart>> {
        self.inner.partition_epochs(partition)
    }

    fn epochs(&self) -> impl StoreFuture<Vec<EpochStart>> {
        self.inner.epochs()
    }

    fn subscribe(&self, after: u64, filter: crate::contract::EventFilter) -> EventStream {
        self.open_stream(self.inner.subscribe(after, filter))
    }

    fn subscribe_partition(
        &self,
        partition: u32,
        after: u64,
        filter: crate::contract::EventFilter,
    ) -> EventStream {
        self.open_stream(self.inner.subscribe_partition(partition, after, filter))
    }

    fn subscribe_all(
        &self,
        from: &FeedPosition,
        filter: crate::contract::EventFilter,
    ) -> EventStream {
        self.open_stream(self.inner.subscribe_all(from, filter))
    }
}

impl<S: SnapshotStore, K: KeyStore> SnapshotStore for Encrypted<S, K> {
    fn load_snapshot(&self, stream: &StreamId) -> impl StoreFuture<Option<SnapshotRecord>> {
        let stream = stream.clone();
        async move {
            let Some(mut record) = self.inner.load_snapshot(&stream).await? else {
                return Ok(None);
            };
            let location = format!("the snapshot of `{stream}` at version {}", record.version);
            self.open_payloads(vec![(&mut record.payload, location)])
                .await?;
            Ok(Some(record))
        }
    }

    fn save_snapshot(&self, mut snapshot: SnapshotRecord) -> impl StoreFuture<bool> {
        async move {
            let stream_id = snapshot.stream_id.clone();
            self.seal_payloads(&stream_id, vec![&mut snapshot.payload])
                .await?;
            self.inner.save_snapshot(snapshot).await
        }
    }

    fn delete_snapshot(&self, stream: &StreamId, version: u64) -> impl StoreFuture<bool> {
        self.inner.delete_snapshot(stream, version)
    }
}

impl<S: OutboxStore, K: KeyStore> OutboxStore for Encrypted<S, K> {
    fn outbox_partition(&self, partition: u32) -> Result<Self, StoreError> {
        Ok(Self {
            inner: self.inner.outbox_partition(partition)?,
            keys: self.keys.clone(),
            wrap: Arc::clone(&self.wrap),
        })
    }

    fn outbox_partitions(&self) -> u32 {
        self.inner.outbox_partitions()
    }

    fn acquire_relay_lease(&self, owner: &str, ttl: Duration) -> impl StoreFuture<Option<u64>> {
        self.inner.acquire_relay_lease(owner, ttl)
    }

    fn release_relay_lease(&self, owner: &str, generation: u64) -> impl StoreFuture<()> {
        self.inner.release_relay_lease(owner, generation)
    }

    fn pending_outbox(&self, limit: u64) -> impl StoreFuture<Vec<OutboxRecord>> {
        self.inner
            .pending_outbox(limit)
            .and_then(move |mut records| async move {
                self.open_outbox(&mut records).await?;
                Ok(records)
            })
    }

    fn pending_outbox_after(&self, after: u64, limit: u64) -> impl StoreFuture<Vec<OutboxRecord>> {
        self.inner
            .pending_outbox_after(after, limit)
            .and_then(move |mut records| async move {
                self.open_outbox(&mut records).await?;
                Ok(records)
            })
    }

    fn mark_delivered(&self, generation: u64, delivered: &[Delivered]) -> impl StoreFuture<()> {
        self.inner.mark_delivered(generation, delivered)
    }

    fn dead_letter(&self, generation: u64, rejections: &[Rejection]) -> impl StoreFuture<()> {
        self.inner.dead_letter(generation, rejections)
    }

    fn dead_letters(&self, limit: u64) -> impl StoreFuture<Vec<DeadLetter>> {
        self.inner
            .dead_letters(limit)
            .and_then(move |mut letters| async move {
                let payloads = letters
                    .iter_mut()
                    .map(|l| {
                        let location = format!(
                            "dead letter {} of `{}`",
                            l.record.position, l.record.stream_id
                        );
                        (&mut l.record.message.payload, location)
                    })
                    .collect();
                self.open_payloads(payloads).await?;
                Ok(letters)
            })
    }

    fn requeue_dead_letters(&self, positions: &[u64]) -> impl StoreFuture<u64> {
        self.inner.requeue_dead_letters(positions)
    }

    fn outbox_len(&self) -> impl StoreFuture<u64> {
        self.inner.outbox_len()
    }

    fn relay_status(&self) -> impl StoreFuture<RelayStatus> {
        self.inner.relay_status()
    }
}

impl<S: CheckpointStore, K: KeyStore> CheckpointStore for Encrypted<S, K> {
    fn load_checkpoint(&self, name: &str) -> impl StoreFuture<Checkpoint> {
        self.inner.load_checkpoint(name)
    }

    fn save_checkpoint(&self, name: &str, checkpoint: Checkpoint) -> impl StoreFuture<bool> {
        self.inner.save_checkpoint(name, checkpoint)
    }

    fn reset_checkpoint(&self, name: &str) -> impl StoreFuture<Checkpoint> {
        self.inner.reset_checkpoint(name)
    }

    fn fence_checkpoint(&self, name: &str) -> impl StoreFuture<Checkpoint> {
        self.inner.fence_checkpoint(name)
    }
}

impl<S: LeaseStore, K: KeyStore> LeaseStore for Encrypted<S, K> {
    fn acquire_lease(
        &self,
        group: &str,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> impl StoreFuture<Option<u64>> {
        self.inner.acquire_lease(group, name, owner, ttl)
    }

    fn release_lease(
        &self,
        group: &str,
        name: &str,
        owner: &str,
        generation: u64,
    ) -> impl StoreFuture<()> {
        self.inner.release_lease(group, name, owner, generation)
    }

    fn held_leases(&self, group: &str) -> impl StoreFuture<Vec<HeldLease>> {
        self.inner.held_leases(group)
    }
}
