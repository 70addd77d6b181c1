//! Conformance cases for streaming out: the transactional outbox, the relay lease, projection
//! checkpoints and the projection runner, on a backend's [`StreamingStore`].
//!
//! Stamped onto a backend with [`streaming_conformance_tests!`](crate::streaming_conformance_tests),
//! like the core suite: every `pub async fn` of this module is a case.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::watch;
use uuid::Uuid;

use es_core::contract::{
    AppendLimits, AppendRequest, AppendResult, Checkpoint, CheckpointStore, DeadLetter, Delivered,
    EpochStart, EventFilter, EventStore, EventStream, ExpectedVersion, HeldLease, LastRejection,
    LeaseStore, OutboxMessage, OutboxRecord, OutboxStore, Partitioning, ReadAll, ReadStream,
    Rejection, RelayStatus, StoreError, StoreFuture, StreamingStore, MAX_LEASE_NAME, MAX_LEASE_TTL,
};
use es_core::group::GroupConfig;
use es_core::outbox::{PublishOutcome, Publisher, Relay, RelayConfig, RelayStep, Translator};
use es_core::projection::{
    partition_checkpoint, AtLeastOnce, BatchError, HandlerError, Projection, ProjectionGroup,
    ProjectionRunner, ProjectionSink, ProjectionStatus, RunnerConfig,
};
use es_core::{DomainEvent, EventSchema, Metadata, NewEvent, PayloadError, RecordedEvent};
use es_core::{Repository, StreamId};

use crate::domain::{Ledger, LedgerCommand, LedgerEvent};

const PATIENCE: Duration = Duration::from_secs(60);

fn stream(name: &str) -> StreamId {
    StreamId::parse(name).expect("valid test stream id")
}

fn message(key: &StreamId, n: u64, source: Uuid) -> OutboxMessage {
    OutboxMessage {
        message_id: Uuid::now_v7(),
        source_event_id: source,
        topic: "ledger.public".into(),
        key: key.to_string(),
        message_type: "LedgerCredited".into(),
        schema_version: 1,
        payload: Bytes::from(json!({ "n": n, "text": "ünï \"q\"" }).to_string()),
        metadata: Metadata::new().with_causation_id(source).with_actor("test"),
    }
}

/// An append of `n` events with one outbox message per event.
fn append_with_outbox(
    s: &StreamId,
    expected: ExpectedVersion,
    first: u64,
    n: u64,
) -> AppendRequest {
    let events: Vec<NewEvent> = (first..first + n)
        .map(|i| NewEvent::from_value("Credited", 2, &json!({ "amount": i, "currency": "EUR" })))
        .collect();
    let outbox = events
        .iter()
        .zip(first..)
        .map(|(e, i)| message(s, i, e.event_id))
        .collect();
    AppendRequest::new(s.clone(), expected, events).with_outbox(outbox)
}

/// Appends `appends`, the `i`-th as 3 events with their outbox messages to `ledger-{i % 3}`.
async fn append_to_three_ledgers<S: StreamingStore>(store: &S, appends: std::ops::Range<u64>) {
    for i in appends {
        let s = stream(&format!("ledger-{}", i % 3));
        store
            .append(append_with_outbox(&s, ExpectedVersion::Any, i * 10, 3))
            .await
            .unwrap();
    }
}

fn n_of(record: &OutboxRecord) -> u64 {
    serde_json::from_slice::<serde_json::Value>(&record.message.payload).expect("JSON")["n"]
        .as_u64()
        .expect("n")
}

async fn patiently<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {PATIENCE:?}: {what}"))
}

// ---------------------------------------------------------------------------------------------
// The outbox

/// Outbox records are stored with the append and read back intact, in order.
pub async fn outbox_is_written_with_the_events<S: StreamingStore>(store: S) {
    let s = stream("ledger-1");
    let request = append_with_outbox(&s, ExpectedVersion::NoStream, 0, 3);
    let sent: Vec<OutboxMessage> = request.outbox.clone();
    let result = store.append(request).await.unwrap();
    assert_eq!(result.stream_version, 3);
    let pending = store.pending_outbox(100).await.unwrap();
    assert_eq!(pending.len(), 3);
    assert_eq!(store.outbox_len().await.unwrap(), 3);
    for (record, sent) in pending.iter().zip(&sent) {
        assert_eq!(record.stream_id, s);
        assert_eq!(record.message.message_id, sent.message_id);
        assert_eq!(record.message.source_event_id, sent.source_event_id);
        assert_eq!(record.message.topic, sent.topic);
        assert_eq!(record.message.key, sent.key);
        assert_eq!(record.message.message_type, sent.message_type);
        assert_eq!(record.message.schema_version, sent.schema_version);
        assert_eq!(record.message.metadata, sent.metadata);
        let stored: serde_json::Value = serde_json::from_slice(&record.message.payload).unwrap();
        let original: serde_json::Value = serde_json::from_slice(&sent.payload).unwrap();
        assert_eq!(stored, original);
    }
    assert!(pending.windows(2).all(|w| w[0].position < w[1].position));
    assert_eq!(
        store.pending_outbox(2).await.unwrap().len(),
        2,
        "limit is honoured"
    );
}

/// Conflicts, invalid batches and idempotent retries add nothing to the outbox.
pub async fn outbox_is_not_written_by_rejected_appends<S: StreamingStore>(store: S) {
    let s = stream("ledger-1");
    let first = append_with_outbox(&s, ExpectedVersion::NoStream, 0, 2);
    store.append(first.clone()).await.unwrap();
    // An exact retry: duplicate, nothing new.
    let retry = store.append(first).await.unwrap();
    assert!(retry.duplicate);
    // A conflict.
    let conflict = store
        .append(append_with_outbox(&s, ExpectedVersion::NoStream, 2, 2))
        .await;
    assert!(
        matches!(conflict, Err(StoreError::Conflict { .. })),
        "{conflict:?}"
    );
    // An oversized outbox payload.
    let mut big = append_with_outbox(&s, ExpectedVersion::Exact(2), 4, 1);
    big.outbox[0].payload = Bytes::from(format!(
        "\"{}\"",
        "x".repeat(AppendLimits::default().max_payload_bytes)
    ));
    let too_big = store.append(big).await;
    assert!(
        matches!(too_big, Err(StoreError::PayloadTooLarge { .. })),
        "{too_big:?}"
    );
    // Outbox messages without events.
    let empty = AppendRequest::new(s.clone(), ExpectedVersion::Any, Vec::new())
        .with_outbox(vec![message(&s, 9, Uuid::now_v7())]);
    let empty = store.append(empty).await;
    assert!(
        matches!(empty, Err(StoreError::InvalidRequest { .. })),
        "{empty:?}"
    );
    assert_eq!(store.outbox_len().await.unwrap(), 2);
    assert_eq!(store.stream_version(&s).await.unwrap(), 2);
}

/// Records come out in commit order across streams; delivered ones are gone, idempotently.
pub async fn outbox_keeps_commit_order_and_delivery_marks<S: StreamingStore>(store: S) {
    for i in 0..6u64 {
        let s = stream(if i % 2 == 0 { "ledger-a" } else { "ledger-b" });
        store
            .append(append_with_outbox(&s, ExpectedVersion::Any, i * 10, 2))
            .await
            .unwrap();
    }
    let pending = store.pending_outbox(100).await.unwrap();
    let order: Vec<u64> = pending.iter().map(n_of).collect();
    assert_eq!(order, vec![0, 1, 10, 11, 20, 21, 30, 31, 40, 41, 50, 51]);
    let generation = store
        .acquire_relay_lease("marker", Duration::from_secs(30))
        .await
        .unwrap()
        .expect("a free lease");
    let delivered: Vec<Delivered> = pending[..5].iter().map(Delivered::from).collect();
    // A mark whose message id does not match the record at the position removes nothing.
    let wrong = Delivered {
        position: pending[5].position,
        message_id: Uuid::now_v7(),
    };
    store.mark_delivered(generation, &[wrong]).await.unwrap();
    assert_eq!(store.outbox_len().await.unwrap(), 12);
    store.mark_delivered(generation, &delivered).await.unwrap();
    store.mark_delivered(generation, &delivered).await.unwrap();
    let rest = store.pending_outbox(100).await.unwrap();
    assert_eq!(
        rest.iter().map(n_of).collect::<Vec<_>>(),
        vec![21, 30, 31, 40, 41, 50, 51]
    );
    assert_eq!(store.outbox_len().await.unwrap(), 7);
    store.mark_delivered(generation, &[]).await.unwrap();
}

/// One owner at a time; renewals keep it; release or expiry hands it over.
pub async fn relay_lease_has_one_owner<S: StreamingStore>(store: S) {
    let long = Duration::from_secs(30);
    let a = store.acquire_relay_lease("a", long).await.unwrap();
    assert!(a.is_some());
    assert_eq!(store.acquire_relay_lease("b", long).await.unwrap(), None);
    assert_eq!(
        store.acquire_relay_lease("a", long).await.unwrap(),
        a,
        "a renewal keeps the generation"
    );
    store.release_relay_lease("b", a.unwrap()).await.unwrap();
    assert_eq!(
        store.acquire_relay_lease("b", long).await.unwrap(),
        None,
        "only the owner releases"
    );
    store.release_relay_lease("a", a.unwrap()).await.unwrap();
    assert!(store
        .acquire_relay_lease("b", Duration::from_millis(300))
        .await
        .unwrap()
        .is_some());
    assert_eq!(store.acquire_relay_lease("a", long).await.unwrap(), None);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        store
            .acquire_relay_lease("a", long)
            .await
            .unwrap()
            .is_some(),
        "an expired lease is taken over"
    );
    assert_eq!(store.acquire_relay_lease("b", long).await.unwrap(), None);
}

fn is_fenced<T: std::fmt::Debug>(result: &Result<T, StoreError>) -> bool {
    matches!(result, Err(StoreError::Fenced { .. }))
}

/// Every change of hands raises the lease's generation (releases do not reset it, an expired
/// lease taken back by its own owner counts); writes under an older generation are refused with
/// `Fenced` and change nothing.
pub async fn relay_lease_generations_fence_stale_owners<S: StreamingStore>(store: S) {
    let s = stream("ledger-fence");
    store
        .append(append_with_outbox(&s, ExpectedVersion::NoStream, 0, 4))
        .await
        .unwrap();
    let pending = store.pending_outbox(10).await.unwrap();
    let positions: Vec<Delivered> = pending.iter().map(Delivered::from).collect();
    let long = Duration::from_secs(30);
    let short = Duration::from_millis(300);

    let g1 = store.acquire_relay_lease("a", long).await.unwrap().unwrap();
    assert!(g1 >= 1);
    assert_eq!(
        store.acquire_relay_lease("a", long).await.unwrap(),
        Some(g1)
    );
    store.release_relay_lease("a", g1).await.unwrap();
    let g2 = store
        .acquire_relay_lease("b", short)
        .await
        .unwrap()
        .unwrap();
    assert!(g2 > g1, "taking a released lease raises the generation");
    // A stale owner releases nothing and writes nothing.
    store.release_relay_lease("a", g1).await.unwrap();
    assert_eq!(store.acquire_relay_lease("a", long).await.unwrap(), None);
    let marked = store.mark_delivered(g1, &positions[..1]).await;
    assert!(is_fenced(&marked), "{marked:?}");
    let parked = store
        .dead_letter(
            g1,
            &[Rejection {
                position: positions[1].position,
                message_id: positions[1].message_id,
                error: "stale".into(),
                attempts: 1,
            }],
        )
        .await;
    assert!(is_fenced(&parked), "{parked:?}");
    assert_eq!(store.outbox_len().await.unwrap(), 4, "nothing was written");
    assert!(store.dead_letters(10).await.unwrap().is_empty());

    // Expiry hands it over with a new generation; the old holder is fenced.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let g3 = store
        .acquire_relay_lease("a", short)
        .await
        .unwrap()
        .unwrap();
    assert!(g3 > g2);
    assert!(is_fenced(&store.mark_delivered(g2, &positions[..1]).await));
    // An owner taking its own lease back after it expired gets a new generation too.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let g4 = store.acquire_relay_lease("a", long).await.unwrap().unwrap();
    assert!(g4 > g3);
    assert!(is_fenced(&store.mark_delivered(g3, &positions[..1]).await));
    assert_eq!(store.outbox_len().await.unwrap(), 4);
    store.mark_delivered(g4, &positions[..1]).await.unwrap();
    assert_eq!(store.outbox_len().await.unwrap(), 3);

    let status = store.relay_status().await.unwrap();
    let lease = status.lease.expect("the lease is reported");
    assert_eq!(
        (lease.owner.as_str(), lease.generation, lease.held),
        ("a", g4, true)
    );
    store.release_relay_lease("a", g4).await.unwrap();
    let lease = store.relay_status().await.unwrap().lease.unwrap();
    assert_eq!((lease.generation, lease.held), (g4, false));
    let g5 = store.acquire_relay_lease("c", long).await.unwrap().unwrap();
    assert!(g5 > g4, "generations never go down, across releases too");
}

/// One publish call as the in-process broker saw it.
#[derive(Debug, Clone)]
pub struct PublishCall {
    /// The relay that made it.
    pub relay: String,
    /// When it began.
    pub started: Instant,
    /// When it returned, or was dropped (cut off by its relay).
    pub ended: Option<Instant>,
    /// Records handed over.
    pub records: usize,
    /// Whether it ran to the end (false: dropped).
    pub completed: bool,
}

/// An in-process broker for relay tests: records what was acknowledged and every publish call,
/// can fail batches or single records for a while, reject records for good, refuse topics in
/// its checks, and be slow. Clones (and [`for_relay`](Self::for_relay) handles) share all of it.
///
/// Like a Kafka broker behind one producer, it writes the records it accepts when a call hands
/// them over, in the order calls are made (so overlapping calls keep their order), and answers
/// after [`delay`](Self::delay): a call cut off before its answer has still written them.
///
/// By default it is not [gapless](Publisher::gapless): a record failing in one call does not
/// fail the records of its key in calls made after it, so the relay keeps one call in flight.
/// With [`gapless`](Self::gapless) set it plays what `es-kafka` does: after a failure it writes
/// nothing more (every record handed over fails) until a call starts with none in flight.
#[derive(Clone, Default)]
pub struct RecordingPublisher {
    /// Records written (acknowledged, or cut off before the answer), in order, with the relay
    /// that sent them.
    pub received: Arc<Mutex<Vec<(String, OutboxRecord)>>>,
    /// Batches to fail as a whole (transiently) before accepting again.
    pub fail_next: Arc<AtomicU32>,
    /// Message ids that fail transiently the next time they are sent; like a partition of an
    /// idempotent Kafka producer, the records after it in the same call with the same key fail
    /// with it (records of other keys go on).
    pub fail_once: Arc<Mutex<HashSet<Uuid>>>,
    /// Message ids the broker rejects for good.
    pub reject: Arc<Mutex<HashSet<Uuid>>>,
    /// Topics the publisher's checks refuse.
    pub refuse_topics: Arc<Mutex<HashSet<String>>>,
    /// Publish calls in progress now.
    pub in_flight: Arc<AtomicUsize>,
    /// Most publish calls seen in progress at once.
    pub max_in_flight: Arc<AtomicUsize>,
    /// Every publish call, in the order they began.
    pub calls: Arc<Mutex<Vec<PublishCall>>>,
    /// Which relay this handle stands for.
    pub relay: String,
    /// Pause inside every publish call.
    pub delay: Duration,
    /// Every `n`-th publish call (counted over all handles) pauses this long instead.
    pub slow_every: Option<(usize, Duration)>,
    /// Whether it is [gapless](Publisher::gapless).
    pub gapless: bool,
    /// A record failed: a gapless broker writes nothing more until a call starts with none in
    /// flight.
    pub broken: Arc<AtomicBool>,
    /// A call with a failed record answers only once this many calls have been in flight at
    /// once (or after 10 s): a test that needs later batches handed over before the failure
    /// settles gets them on a slow machine too. 0: no wait.
    pub settle_failures_at_in_flight: usize,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl RecordingPublisher {
    /// A handle of the same broker for another relay.
    pub fn for_relay(&self, relay: &str) -> Self {
        Self {
            relay: relay.to_owned(),
            ..self.clone()
        }
    }

    /// Message ids received, with how often.
    pub fn received_ids(&self) -> HashMap<Uuid, usize> {
        let mut ids = HashMap::new();
        for (_, r) in lock(&self.received).iter() {
            *ids.entry(r.message.message_id).or_insert(0) += 1;
        }
        ids
    }
}

/// Ends a [`PublishCall`] when the call returns or its future is dropped.
struct CallGuard<'a> {
    broker: &'a RecordingPublisher,
    index: usize,
    completed: bool,
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        let mut calls = lock(&self.broker.calls);
        calls[self.index].ended = Some(Instant::now());
        calls[self.index].completed = self.completed;
        self.broker.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The failures [`RecordingPublisher`] plays.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// Refused by the publisher's check.
    #[error("topic {0:?} is not a legal topic name")]
    IllegalTopic(String),
    /// Rejected for good.
    #[error("the message is larger than the broker accepts")]
    TooLarge,
    /// The whole batch failed.
    #[error("broker unavailable")]
    Unavailable,
    /// One key's records failed this time.
    #[error("the partition's leader moved")]
    LeaderMoved,
}

impl Publisher for RecordingPublisher {
    type Error = BrokerError;

    fn gapless(&self) -> bool {
        self.gapless
    }

    fn check(&self, record: &OutboxRecord) -> Result<(), BrokerError> {
        if lock(&self.refuse_topics).contains(&record.message.topic) {
            return Err(BrokerError::IllegalTopic(record.message.topic.clone()));
        }
        Ok(())
    }

    async fn publish(&self, records: &[OutboxRecord]) -> Vec<PublishOutcome<BrokerError>> {
        let index = {
            let mut calls = lock(&self.calls);
            calls.push(PublishCall {
                relay: self.relay.clone(),
                started: Instant::now(),
                ended: None,
                records: records.len(),
                completed: false,
            });
            calls.len() - 1
        };
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        if now == 1 {
            // Nothing else in flight: a fresh start, as `es-kafka` replaces its producer.
            self.broken.store(false, Ordering::SeqCst);
        }
        let mut call = CallGuard {
            broker: self,
            index,
            completed: false,
        };
        let delay = match self.slow_every {
            Some((every, slow)) if (index + 1) % every == 0 => slow,
            _ => self.delay,
        };
        // The broker writes what it accepts as soon as it is handed over, in hand-over order
        // across calls (as one Kafka producer keeps a partition's order across batches); the
        // answer comes after the delay, or never if the call is cut off.
        let refused = self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if refused && self.gapless {
            self.broken.store(true, Ordering::SeqCst);
        }
        let outcomes = if refused {
            PublishOutcome::all_failed(records.len(), BrokerError::Unavailable)
        } else {
            let mut received = lock(&self.received);
            let reject = lock(&self.reject);
            let mut fail_once = lock(&self.fail_once);
            let mut failed_keys = HashSet::new();
            records
                .iter()
                .map(|r| {
                    let id = r.message.message_id;
                    if reject.contains(&id) {
                        PublishOutcome::Rejected(BrokerError::TooLarge)
                    } else if self.gapless && self.broken.load(Ordering::SeqCst) {
                        PublishOutcome::Failed(BrokerError::Unavailable)
                    } else if fail_once.remove(&id) || failed_keys.contains(&r.message.key) {
                        failed_keys.insert(r.message.key.clone());
                        if self.gapless {
                            self.broken.store(true, Ordering::SeqCst);
                        }
                        PublishOutcome::Failed(BrokerError::LeaderMoved)
                    } else {
                        received.push((self.relay.clone(), r.clone()));
                        PublishOutcome::Acknowledged
                    }
                })
                .collect()
        };
        let failed = outcomes
            .iter()
            .any(|o| matches!(o, PublishOutcome::Failed(_)));
        if failed && self.settle_failures_at_in_flight > 0 {
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.max_in_flight.load(Ordering::SeqCst) < self.settle_failures_at_in_flight
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        tokio::time::sleep(delay).await;
        call.completed = true;
        outcomes
    }
}

fn relay_config(owner: &str, ttl: Duration) -> RelayConfig {
    RelayConfig {
        owner: owner.to_owned(),
        lease_ttl: ttl,
        publish_timeout: ttl / 2,
        batch_size: 7,
        max_in_flight: 3,
        idle_poll: Duration::from_millis(50),
        backoff: es_core::Backoff::new(Duration::from_millis(20), Duration::from_millis(100)),
        ..RelayConfig::default()
    }
}

/// Steps `relay` until it is idle; returns the steps.
async fn step_until_idle<S: StreamingStore, P: Publisher>(relay: &Relay<S, P>) -> Vec<RelayStep> {
    let mut steps = Vec::new();
    loop {
        let step = relay.step().await.unwrap();
        steps.push(step);
        if step == RelayStep::Idle {
            return steps;
        }
        assert!(steps.len() < 60, "the relay makes progress: {steps:?}");
    }
}

/// Runs passes of `relay` until it is idle; returns them.
async fn drain_until_idle<S: EventStore + OutboxStore, P: Publisher>(
    relay: &Relay<S, P>,
) -> Vec<RelayStep> {
    let mut passes = Vec::new();
    loop {
        let step = relay.drain().await.unwrap();
        passes.push(step);
        if step == RelayStep::Idle {
            return passes;
        }
        assert!(passes.len() < 10, "the relay makes progress: {passes:?}");
    }
}

/// The records of `received` in first-appearance order, by message id.
fn first_appearances(received: &[(String, OutboxRecord)]) -> Vec<OutboxRecord> {
    let mut seen = HashSet::new();
    received
        .iter()
        .filter(|(_, r)| seen.insert(r.message.message_id))
        .map(|(_, r)| r.clone())
        .collect()
}

/// A relay publishes every record, in order, retrying refused batches; when one record of a batch
/// fails (and the later records of its key with it), the records before it are marked and it and
/// the ones after it are sent again: records of other keys acknowledged after the failure come
/// twice, and per key, every record's first appearance is in outbox order.
pub async fn relay_publishes_everything_in_order<S: StreamingStore>(store: S) {
    for i in 0..10u64 {
        let s = stream(&format!("ledger-{}", i % 3));
        store
            .append(append_with_outbox(&s, ExpectedVersion::Any, i * 10, 3))
            .await
            .unwrap();
    }
    let pending = store.pending_outbox(100).await.unwrap();
    let broker = RecordingPublisher {
        fail_next: Arc::new(AtomicU32::new(2)),
        ..RecordingPublisher::default()
    };
    // Batches of 7: the second holds records 7-8 (ledger-2), 9-11 (ledger-0), 12-13 (ledger-1).
    // Record 9 fails once, with 10 and 11 (its key); 7 and 8 are marked; 12 and 13 are
    // acknowledged, not marked, and sent again with 9.
    lock(&broker.fail_once).insert(pending[9].message.message_id);
    let relay = Relay::new(
        store.clone(),
        broker.clone(),
        relay_config("r1", Duration::from_secs(30)),
    );
    let steps = step_until_idle(&relay).await;
    let failed: Vec<&RelayStep> = steps
        .iter()
        .filter(|s| matches!(s, RelayStep::PublishFailed { .. }))
        .collect();
    let whole = RelayStep::PublishFailed {
        delivered: 0,
        dead_lettered: 0,
        failed: 7,
    };
    let partial = RelayStep::PublishFailed {
        delivered: 2,
        dead_lettered: 0,
        failed: 3,
    };
    assert_eq!(failed, vec![&whole, &whole, &partial], "{steps:?}");
    let received = lock(&broker.received).clone();
    let firsts = first_appearances(&received);
    assert_eq!(firsts.len(), 30, "every record");
    for key in ["ledger-0", "ledger-1", "ledger-2"] {
        let of_key = |records: &[OutboxRecord]| -> Vec<u64> {
            records
                .iter()
                .filter(|r| r.message.key == key)
                .map(n_of)
                .collect()
        };
        assert_eq!(
            of_key(&firsts),
            of_key(&pending),
            "{key}: first seen in outbox order"
        );
    }
    let twice: std::collections::BTreeSet<usize> = broker
        .received_ids()
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(id, _)| {
            pending
                .iter()
                .position(|r| r.message.message_id == id)
                .expect("a pending record")
        })
        .collect();
    assert_eq!(twice.into_iter().collect::<Vec<_>>(), vec![12, 13]);
    assert_eq!(store.outbox_len().await.unwrap(), 0);
}

/// Two relays run at once: only the lease holder publishes; when it dies the other takes over
/// and nothing is lost.
pub async fn competing_relays_take_over<S: StreamingStore>(store: S) {
    let ttl = Duration::from_millis(400);
    let broker = RecordingPublisher {
        delay: Duration::from_millis(2),
        ..RecordingPublisher::default()
    };
    let (stop_a, stopped_a) = tokio::sync::oneshot::channel::<()>();
    let (stop_b, stopped_b) = tokio::sync::oneshot::channel::<()>();
    let a = tokio::spawn(
        Relay::new(store.clone(), broker.for_relay("a"), relay_config("a", ttl)).run(async {
            let _ = stopped_a.await;
        }),
    );
    // Let `a` take the lease first.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let b = tokio::spawn(
        Relay::new(store.clone(), broker.for_relay("b"), relay_config("b", ttl)).run(async {
            let _ = stopped_b.await;
        }),
    );
    for i in 0..20u64 {
        let s = stream(&format!("ledger-{}", i % 4));
        store
            .append(append_with_outbox(&s, ExpectedVersion::Any, i * 10, 2))
            .await
            .unwrap();
    }
    drained(&store, "relay a delivers").await;
    // Kill `a` without releasing its lease; `b` must take over once it expires.
    a.abort();
    let _ = a.await;
    drop(stop_a);
    for i in 20..30u64 {
        let s = stream(&format!("ledger-{}", i % 4));
        store
            .append(append_with_outbox(&s, ExpectedVersion::Any, i * 10, 2))
            .await
            .unwrap();
    }
    drained(&store, "relay b takes over").await;
    let _ = stop_b.send(());
    patiently("relay b shuts down", b).await.unwrap().unwrap();
    // One relay publishes at a time (it may keep several of its own batches in flight).
    assert_no_overlap(&lock(&broker.calls));
    let received = lock(&broker.received).clone();
    let by = |relay: &str| received.iter().filter(|(r, _)| r == relay).count();
    assert!(
        by("a") > 0 && by("b") > 0,
        "a published {}, b published {}",
        by("a"),
        by("b")
    );
    assert_eq!(
        broker.received_ids().len(),
        60,
        "every message was published"
    );
    // Per stream, the first delivery of each message follows outbox order.
    let mut last: HashMap<String, u64> = HashMap::new();
    for r in first_appearances(&received) {
        let prev = last.insert(r.stream_id.to_string(), r.position);
        assert!(prev.is_none_or(|p| p < r.position), "per-stream order");
    }
}

async fn drained<S: OutboxStore>(store: &S, what: &str) {
    patiently(what, async {
        while store.outbox_len().await.unwrap() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Dead-lettering moves records out of the outbox with their errors, atomically and only under
/// the current lease; the status shows them; re-queueing puts them back at the end of the
/// outbox with new positions and the same messages, and later appends come after them.
pub async fn dead_letters_are_parked_and_requeued<S: StreamingStore>(store: S) {
    for (i, name) in ["ledger-d1", "ledger-d2", "ledger-d1"].iter().enumerate() {
        store
            .append(append_with_outbox(
                &stream(name),
                ExpectedVersion::Any,
                i as u64 * 10,
                2,
            ))
            .await
            .unwrap();
    }
    let before = store.pending_outbox(100).await.unwrap();
    let ids: Vec<Uuid> = before.iter().map(|r| r.message.message_id).collect();
    let p: Vec<u64> = before.iter().map(|r| r.position).collect();
    assert_eq!(p.len(), 6);
    let empty = store.relay_status().await.unwrap();
    assert_eq!(
        empty,
        RelayStatus {
            pending: 6,
            ..RelayStatus::default()
        }
    );
    let generation = store
        .acquire_relay_lease("parker", Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    let since = chrono::Utc::now() - chrono::Duration::seconds(5);
    store
        .dead_letter(
            generation,
            &[
                Rejection {
                    position: p[1],
                    message_id: ids[1],
                    error: "too large: 2000000 bytes".into(),
                    attempts: 2,
                },
                Rejection {
                    position: p[4],
                    message_id: ids[4],
                    error: "invalid topic".into(),
                    attempts: 0,
                },
                Rejection {
                    position: p[5] + 1000,
                    message_id: ids[5],
                    error: "not in the outbox".into(),
                    attempts: 1,
                },
            ],
        )
        .await
        .unwrap();
    let pending: Vec<u64> = store
        .pending_outbox(100)
        .await
        .unwrap()
        .iter()
        .map(|r| r.position)
        .collect();
    assert_eq!(pending, vec![p[0], p[2], p[3], p[5]]);
    let dead = store.dead_letters(100).await.unwrap();
    assert_eq!(dead.len(), 2);
    for (letter, (i, error, attempts)) in dead
        .iter()
        .zip([(1, "too large: 2000000 bytes", 2), (4, "invalid topic", 0)])
    {
        let DeadLetter {
            record,
            error: stored,
            attempts: n,
            dead_at,
        } = letter;
        assert_eq!(record.position, before[i].position);
        assert_eq!(record.stream_id, before[i].stream_id);
        assert_eq!(record.message.message_id, before[i].message.message_id);
        assert_eq!(record.message.topic, before[i].message.topic);
        assert_eq!(record.message.key, before[i].message.key);
        assert_eq!(n_of(record), n_of(&before[i]));
        assert_eq!((stored.as_str(), *n), (error, attempts));
        assert!(*dead_at >= since, "dead_at {dead_at} is the store's time");
    }
    assert_eq!(store.dead_letters(1).await.unwrap().len(), 1, "limit");
    let status = store.relay_status().await.unwrap();
    assert_eq!((status.pending, status.dead_letters), (4, 2));
    let last = status.last_error.clone().expect("the last error");
    assert_eq!(
        (last.position, last.error.as_str()),
        (p[4], "invalid topic")
    );
    assert!(last.at >= since);
    assert!(status
        .lease
        .is_some_and(|l| l.held && l.generation == generation));
    requeue_puts_dead_letters_last(&store, &before, status.last_error).await;
}

/// The second half of [`dead_letters_are_parked_and_requeued`]: `before` is the outbox before
/// its records 1 and 4 were dead-lettered.
async fn requeue_puts_dead_letters_last<S: StreamingStore>(
    store: &S,
    before: &[OutboxRecord],
    last: Option<LastRejection>,
) {
    let p: Vec<u64> = before.iter().map(|r| r.position).collect();
    let requeued = store
        .requeue_dead_letters(&[p[4], p[1], p[5] + 2000])
        .await
        .unwrap();
    assert_eq!(requeued, 2);
    let after = store.pending_outbox(100).await.unwrap();
    let positions: Vec<u64> = after.iter().map(|r| r.position).collect();
    assert_eq!(positions[..4], [p[0], p[2], p[3], p[5]]);
    assert!(positions[4] > p[5] && positions[5] > positions[4]);
    assert_eq!(
        after[4..]
            .iter()
            .map(|r| r.message.message_id)
            .collect::<Vec<_>>(),
        vec![before[1].message.message_id, before[4].message.message_id],
        "re-queued at the end, in the order of their old positions, same messages"
    );
    assert_eq!(n_of(&after[4]), n_of(&before[1]));
    assert!(store.dead_letters(100).await.unwrap().is_empty());
    assert_eq!(store.requeue_dead_letters(&[p[1]]).await.unwrap(), 0);
    let status = store.relay_status().await.unwrap();
    assert_eq!((status.pending, status.dead_letters), (6, 0));
    assert_eq!(status.last_error, last, "the last error stays on record");

    // An append after the re-queue gets positions after the re-queued records.
    store
        .append(append_with_outbox(
            &stream("ledger-d3"),
            ExpectedVersion::Any,
            90,
            1,
        ))
        .await
        .unwrap();
    let newest = store.pending_outbox(100).await.unwrap();
    assert_eq!(newest.len(), 7);
    assert!(newest[6].position > positions[5]);
    assert_eq!(n_of(&newest[6]), 90);
}

/// A record the broker rejects for good and a record the publisher's checks refuse are
/// dead-lettered; every other record is published exactly once, in order (nothing around the
/// poison is sent twice), and the relay keeps going; the status shows them; a re-queued record
/// is published once the broker accepts it.
pub async fn relay_parks_poison_records_and_keeps_going<S: StreamingStore>(store: S) {
    for i in 0..10u64 {
        let mut request = append_with_outbox(
            &stream(&format!("ledger-{}", i % 3)),
            ExpectedVersion::Any,
            i * 10,
            2,
        );
        if i == 6 {
            request.outbox[0].topic = "no such topic!".into();
        }
        store.append(request).await.unwrap();
    }
    let all = store.pending_outbox(100).await.unwrap();
    let (too_large, bad_topic) = (&all[5], &all[12]);
    let broker = RecordingPublisher::default();
    lock(&broker.reject).insert(too_large.message.message_id);
    lock(&broker.refuse_topics).insert("no such topic!".into());
    let relay = Relay::new(
        store.clone(),
        broker.clone(),
        relay_config("poison", Duration::from_secs(30)),
    );
    let steps = step_until_idle(&relay).await;
    assert_eq!(
        steps,
        vec![
            RelayStep::DeadLettered {
                delivered: 6,
                dead_lettered: 1
            },
            RelayStep::DeadLettered {
                delivered: 6,
                dead_lettered: 1
            },
            RelayStep::Published(6),
            RelayStep::Idle,
        ]
    );
    let ids = broker.received_ids();
    assert_eq!(ids.len(), 18);
    assert!(ids.values().all(|n| *n == 1), "nothing was sent twice");
    let sent: Vec<u64> = lock(&broker.received)
        .iter()
        .map(|(_, r)| r.position)
        .collect();
    let expected: Vec<u64> = all
        .iter()
        .map(|r| r.position)
        .filter(|p| *p != too_large.position && *p != bad_topic.position)
        .collect();
    assert_eq!(sent, expected, "in outbox order");
    let calls = lock(&broker.calls).clone();
    assert!(
        calls.iter().map(|c| c.records).sum::<usize>() == 19,
        "the refused record was never sent: {calls:?}"
    );

    check_dead_letters(
        &store.dead_letters(10).await.unwrap(),
        [
            (too_large, "larger than the broker accepts", 1),
            (bad_topic, "not a legal topic name", 0),
        ],
    );
    let status = relay.status().await.unwrap();
    assert_eq!((status.pending, status.dead_letters), (0, 2));
    assert_eq!(status.last_error.unwrap().position, bad_topic.position);

    // The broker's limit is raised: the re-queued record goes through, last.
    lock(&broker.reject).clear();
    assert_eq!(
        store
            .requeue_dead_letters(&[too_large.position])
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        step_until_idle(&relay).await,
        vec![RelayStep::Published(1), RelayStep::Idle]
    );
    let received = lock(&broker.received).clone();
    let (_, last) = received.last().unwrap();
    assert_eq!(last.message.message_id, too_large.message.message_id);
    assert!(
        last.position > all[19].position,
        "with a new outbox position"
    );
    let status = store.relay_status().await.unwrap();
    assert_eq!((status.pending, status.dead_letters), (0, 1));
}

/// `dead` holds exactly the records of `expected`, in order, each with an error containing its
/// text and its attempts.
fn check_dead_letters<const N: usize>(
    dead: &[DeadLetter],
    expected: [(&OutboxRecord, &str, u32); N],
) {
    assert_eq!(dead.len(), N, "{dead:?}");
    for (letter, (record, error, attempts)) in dead.iter().zip(expected) {
        assert_eq!(letter.record.message.message_id, record.message.message_id);
        assert!(letter.error.contains(error), "{}", letter.error);
        assert_eq!(letter.attempts, attempts, "{letter:?}");
    }
}

/// Implements [`EventStore`] for a test wrapper `$wrapper<S>` with a field `inner: S` by passing
/// every call through: the wrappers below interfere with other traits only.
macro_rules! delegate_event_store {
    ($wrapper:ident) => {
        impl<S: EventStore> EventStore for $wrapper<S> {
            fn append(&self, request: AppendRequest) -> impl StoreFuture<AppendResult> {
                self.inner.append(request)
            }
            fn append_streams(
                &self,
                requests: Vec<AppendRequest>,
            ) -> impl StoreFuture<Vec<AppendResult>> {
                self.inner.append_streams(requests)
            }
            fn archive_stream(
                &self,
                stream: &StreamId,
                before: u64,
            ) -> impl StoreFuture<es_core::Archived> {
                self.inner.archive_stream(stream, before)
            }
            fn stream_version(&self, stream: &StreamId) -> impl StoreFuture<u64> {
                self.inner.stream_version(stream)
            }
            fn list_streams(
                &self,
                list: es_core::ListStreams,
            ) -> impl StoreFuture<es_core::StreamPage> {
                self.inner.list_streams(list)
            }
            fn read_stream(&self, stream: &StreamId, read: ReadStream) -> EventStream {
                self.inner.read_stream(stream, read)
            }
            fn read_all(&self, read: ReadAll) -> EventStream {
                self.inner.read_all(read)
            }
            fn partitioning(&self) -> Partitioning {
                self.inner.partitioning()
            }
            fn partition_head(&self, partition: u32) -> impl StoreFuture<u64> {
                self.inner.partition_head(partition)
            }
            fn wait_for_partition(
                &self,
                partition: u32,
                after: u64,
            ) -> impl Future<Output = ()> + Send {
                self.inner.wait_for_partition(partition, after)
            }
            fn partition_epochs(&self, partition: u32) -> impl StoreFuture<Vec<EpochStart>> {
                self.inner.partition_epochs(partition)
            }
            fn subscribe_partition(
                &self,
                partition: u32,
                after: u64,
                filter: EventFilter,
            ) -> EventStream {
                self.inner.subscribe_partition(partition, after, filter)
            }
        }
    };
}

/// A store handle that gets in a relay's way, where a relay is slow in real life. Its first `n`
/// delivery marks may stall before they reach the store (a relay paused between the broker's
/// acknowledgement and its mark: a GC pause, SIGSTOP, a slow network), recording what the store
/// answered them; its first [`OutboxStore::pending_outbox_after`] may hold its thread once the
/// store answered, before it returns (a slow synchronous step, or the relay's thread
/// preempted), so that whatever another thread wakes meanwhile is woken before the read
/// returns. Everything else goes straight through.
#[derive(Clone)]
pub struct Interfering<S> {
    inner: S,
    stalls: Arc<AtomicU32>,
    pause: Duration,
    /// How long the first `pending_outbox_after` holds its thread (taken by that read).
    read_hold: Arc<Mutex<Option<Duration>>>,
    /// Stalled marks the store refused as fenced.
    pub fenced: Arc<AtomicU32>,
    /// Stalled marks the store accepted.
    pub accepted: Arc<AtomicU32>,
}

impl<S> Interfering<S> {
    /// Stalls the first `n` marks through this handle for `pause` each.
    pub fn stalling_marks(inner: S, n: u32, pause: Duration) -> Self {
        Self {
            inner,
            stalls: Arc::new(AtomicU32::new(n)),
            pause,
            read_hold: Arc::default(),
            fenced: Arc::default(),
            accepted: Arc::default(),
        }
    }

    /// Holds the thread for `hold` in the poll that returns the first `pending_outbox_after`.
    pub fn slow_first_read_after(inner: S, hold: Duration) -> Self {
        let this = Self::stalling_marks(inner, 0, Duration::ZERO);
        *lock(&this.read_hold) = Some(hold);
        this
    }
}

delegate_event_store!(Interfering);

impl<S: OutboxStore> OutboxStore for Interfering<S> {
    fn acquire_relay_lease(&self, owner: &str, ttl: Duration) -> impl StoreFuture<Option<u64>> {
        self.inner.acquire_relay_lease(owner, ttl)
    }
    fn release_relay_lease(&self, owner: &str, generation: u64) -> impl StoreFuture<()> {
        self.inner.release_relay_lease(owner, generation)
    }
    fn pending_outbox(&self, limit: u64) -> impl StoreFuture<Vec<OutboxRecord>> {
        self.inner.pending_outbox(limit)
    }
    fn pending_outbox_after(&self, after: u64, limit: u64) -> impl StoreFuture<Vec<OutboxRecord>> {
        let this = self.clone();
        async move {
            let read = this.inner.pending_outbox_after(after, limit).await;
            let hold = lock(&this.read_hold).take();
            if let Some(hold) = hold {
                // Held in the poll that returns the read: not an await point.
                std::thread::sleep(hold);
            }
            read
        }
    }
    fn mark_delivered(&self, generation: u64, delivered: &[Delivered]) -> impl StoreFuture<()> {
        let this = self.clone();
        let positions = delivered.to_vec();
        async move {
            let stall = this
                .stalls
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if !stall {
                return this.inner.mark_delivered(generation, &positions).await;
            }
            tokio::time::sleep(this.pause).await;
            let result = this.inner.mark_delivered(generation, &positions).await;
            match &result {
                Err(StoreError::Fenced { .. }) => this.fenced.fetch_add(1, Ordering::SeqCst),
                _ => this.accepted.fetch_add(1, Ordering::SeqCst),
            };
            result
        }
    }
    fn dead_letter(&self, generation: u64, rejections: &[Rejection]) -> impl StoreFuture<()> {
        self.inner.dead_letter(generation, rejections)
    }
    fn dead_letters(&self, limit: u64) -> impl StoreFuture<Vec<DeadLetter>> {
        self.inner.dead_letters(limit)
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

/// Asserts that no two publish calls of different relays overlap in time.
pub fn assert_no_overlap(calls: &[PublishCall]) {
    for (i, a) in calls.iter().enumerate() {
        for b in &calls[i + 1..] {
            if a.relay == b.relay {
                continue;
            }
            let a_end = a.ended.expect("every publish call has ended");
            let b_end = b.ended.expect("every publish call has ended");
            assert!(
                a_end <= b.started || b_end <= a.started,
                "relays {} and {} published at once: {a:?} and {b:?}",
                a.relay,
                b.relay
            );
        }
    }
}

/// Two live relays on one store with a 1 s lease and a publisher that takes three times the
/// lease on every fourth call; relay `a`'s first delivery mark stalls for 2.5 s, past its lease.
/// The relays' publish calls never overlap (a relay cuts a publish off before its lease ends and
/// starts none it cannot finish), every record is published, and `a`'s stalled mark, arriving
/// after `b` took the lease over, is refused.
pub async fn two_relays_with_a_short_lease_never_publish_at_once<S: StreamingStore>(store: S) {
    let ttl = Duration::from_secs(1);
    let config = |owner: &str| RelayConfig {
        publish_timeout: Duration::from_millis(500),
        batch_size: 5,
        ..relay_config(owner, ttl)
    };
    let broker = RecordingPublisher {
        delay: Duration::from_millis(40),
        slow_every: Some((4, ttl * 3)),
        ..RecordingPublisher::default()
    };
    append_to_three_ledgers(&store, 0..12).await;
    let stalling = Interfering::stalling_marks(store.clone(), 1, Duration::from_millis(2500));
    let (stop_a, stopped_a) = tokio::sync::oneshot::channel::<()>();
    let (stop_b, stopped_b) = tokio::sync::oneshot::channel::<()>();
    let a = tokio::spawn(
        Relay::new(stalling.clone(), broker.for_relay("a"), config("a")).run(async {
            let _ = stopped_a.await;
        }),
    );
    // `a` takes the lease first.
    patiently("a takes the lease", async {
        while lock(&broker.calls).is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let b = tokio::spawn(
        Relay::new(store.clone(), broker.for_relay("b"), config("b")).run(async {
            let _ = stopped_b.await;
        }),
    );
    append_to_three_ledgers(&store, 12..20).await;
    drained(&store, "the relays deliver everything").await;
    patiently("a's stalled mark returns", async {
        while stalling.fenced.load(Ordering::SeqCst) + stalling.accepted.load(Ordering::SeqCst) == 0
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let _ = stop_a.send(());
    let _ = stop_b.send(());
    patiently("a stops", a).await.unwrap().unwrap();
    patiently("b stops", b).await.unwrap().unwrap();

    let calls = lock(&broker.calls).clone();
    assert_no_overlap(&calls);
    assert!(
        calls.iter().any(|c| !c.completed),
        "some publish calls ran past the publish timeout and were cut off: {calls:?}"
    );
    assert!(calls.iter().any(|c| c.relay == "b" && c.completed));
    assert_eq!(
        (
            stalling.fenced.load(Ordering::SeqCst),
            stalling.accepted.load(Ordering::SeqCst)
        ),
        (1, 0),
        "a's mark, sent after b took the lease, was refused"
    );
    assert_eq!(
        broker.received_ids().len(),
        60,
        "every record was published"
    );
    assert_eq!(store.outbox_len().await.unwrap(), 0);
    assert!(store.dead_letters(10).await.unwrap().is_empty());
}

/// Per key, the outbox positions of `received` (every appearance), in the order received.
fn positions_by_key(received: &[(String, OutboxRecord)]) -> HashMap<String, Vec<u64>> {
    let mut by_key: HashMap<String, Vec<u64>> = HashMap::new();
    for (_, r) in received {
        by_key
            .entry(r.message.key.clone())
            .or_default()
            .push(r.position);
    }
    by_key
}

/// Per key, the positions in the order of each record's *last* appearance: what a consumer that
/// lets a later copy win (an upsert by message id) ends up ordered by.
fn last_appearances(positions: &[u64]) -> Vec<u64> {
    let mut last: Vec<u64> = Vec::new();
    for p in positions {
        last.retain(|q| q != p);
        last.push(*p);
    }
    last
}

/// Asserts at-least-once (every record of `pending` was written) and, per key, that every
/// record's last copy is in outbox order and that the log ends with the key's records in outbox
/// order (the retry resent everything after a failure).
fn assert_at_least_once_in_order(received: &[(String, OutboxRecord)], pending: &[OutboxRecord]) {
    let written: HashSet<Uuid> = received.iter().map(|(_, r)| r.message.message_id).collect();
    for r in pending {
        assert!(
            written.contains(&r.message.message_id),
            "record {} was never written",
            r.position
        );
    }
    for (key, positions) in positions_by_key(received) {
        let last = last_appearances(&positions);
        let mut sorted = last.clone();
        sorted.sort_unstable();
        assert_eq!(
            last, sorted,
            "{key}: last copies in outbox order ({positions:?})"
        );
    }
}

/// A relay draining a long outbox keeps several batches in flight (never more than
/// `max_in_flight`), and the broker gets every record once, per key in outbox order.
pub async fn pipelined_relay_keeps_batches_in_flight_in_order<S: StreamingStore>(store: S) {
    append_to_three_ledgers(&store, 0..20).await;
    let pending = store.pending_outbox(100).await.unwrap();
    assert_eq!(pending.len(), 60);
    let broker = RecordingPublisher {
        delay: Duration::from_millis(30),
        gapless: true,
        ..RecordingPublisher::default()
    };
    let relay = Relay::new(
        store.clone(),
        broker.clone(),
        relay_config("r1", Duration::from_secs(30)),
    );
    // 60 records in batches of 7: 9 batches, the last one short, so the pass ends caught up.
    assert_eq!(relay.drain().await.unwrap(), RelayStep::Published(60));
    assert_eq!(relay.drain().await.unwrap(), RelayStep::Idle);
    let most = broker.max_in_flight.load(Ordering::SeqCst);
    assert_eq!(
        most, 3,
        "three batches in flight at most, and at times all three"
    );
    let received = lock(&broker.received).clone();
    let order: Vec<u64> = received.iter().map(|(_, r)| r.position).collect();
    let expected: Vec<u64> = pending.iter().map(|r| r.position).collect();
    assert_eq!(order, expected, "every record once, in outbox order");
    assert_eq!(store.outbox_len().await.unwrap(), 0);
}

/// A record fails while later batches are in flight, one of them holding later records of its
/// key. The gapless broker writes nothing after the failure (as `es-kafka`'s producer, purged,
/// does). The relay marks only the records before the failure, stops starting batches, lets
/// the ones in flight settle, and the next pass sends the failed record and everything after it
/// again: every record is written, and per key every record's first copy is in outbox order.
pub async fn pipelined_relay_resends_after_a_failure_mid_window<S: StreamingStore>(store: S) {
    append_to_three_ledgers(&store, 0..20).await;
    let pending = store.pending_outbox(100).await.unwrap();
    let broker = RecordingPublisher {
        delay: Duration::from_millis(40),
        gapless: true,
        settle_failures_at_in_flight: 3,
        ..RecordingPublisher::default()
    };
    // Batches of 7 with three in flight: record 9 (the second batch) fails; the third batch
    // (records 14..21) is handed over before the failure is answered and holds later records of
    // record 9's key.
    let failing = &pending[9];
    lock(&broker.fail_once).insert(failing.message.message_id);
    let key = failing.message.key.clone();
    assert!(
        pending[14..21].iter().any(|r| r.message.key == key),
        "the third batch holds the key"
    );
    let relay = Relay::new(
        store.clone(),
        broker.clone(),
        relay_config("r1", Duration::from_secs(30)),
    );
    let first = relay.drain().await.unwrap();
    // Failed: the rest of the second batch (5) and the third (7), and the fourth (7) too if its
    // read came back before the failure was settled (it is then not handed over). The broker
    // answers the failure only once the third batch is in flight.
    assert!(
        matches!(
            first,
            RelayStep::PublishFailed {
                delivered: 9,
                dead_lettered: 0,
                failed: 12 | 19,
            }
        ),
        "only the records before the failure are marked: {first:?}"
    );
    assert_eq!(broker.max_in_flight.load(Ordering::SeqCst), 3);
    let left = store.pending_outbox(100).await.unwrap();
    assert_eq!(
        left.first().map(|r| r.position),
        Some(failing.position),
        "no mark skipped past the failed record"
    );
    assert_eq!(left.len(), 51, "nothing after the failure was marked");
    let written: Vec<u64> = lock(&broker.received)
        .iter()
        .map(|(_, r)| r.position)
        .collect();
    assert_eq!(
        written,
        pending[..9].iter().map(|r| r.position).collect::<Vec<_>>(),
        "nothing handed over after the failure was written"
    );
    drain_until_idle(&relay).await;
    assert_eq!(store.outbox_len().await.unwrap(), 0);
    let received = lock(&broker.received).clone();
    assert_at_least_once_in_order(&received, &pending);
    assert_first_copies_in_order(&received);
    assert_eq!(received.len(), 60, "each record written once");
}

/// The same failure with a broker that is not gapless (it writes a later record of a key whose
/// earlier record failed): the relay, configured for three batches in flight, keeps one, so no
/// later record of the failed one's key is handed over before the retry, and per key every
/// record's first copy is in outbox order.
pub async fn relay_waits_for_each_batch_of_a_publisher_that_is_not_gapless<S: StreamingStore>(
    store: S,
) {
    append_to_three_ledgers(&store, 0..20).await;
    let pending = store.pending_outbox(100).await.unwrap();
    let broker = RecordingPublisher {
        delay: Duration::from_millis(20),
        ..RecordingPublisher::default()
    };
    lock(&broker.fail_once).insert(pending[9].message.message_id);
    let relay = Relay::new(
        store.clone(),
        broker.clone(),
        relay_config("r1", Duration::from_secs(30)),
    );
    assert_eq!(relay.config().max_in_flight, 3);
    let passes = drain_until_idle(&relay).await;
    assert!(
        matches!(passes[0], RelayStep::PublishFailed { delivered: 9, .. }),
        "{passes:?}"
    );
    assert_eq!(
        broker.max_in_flight.load(Ordering::SeqCst),
        1,
        "one batch at a time"
    );
    assert_eq!(store.outbox_len().await.unwrap(), 0);
    let received = lock(&broker.received).clone();
    assert_at_least_once_in_order(&received, &pending);
    assert_first_copies_in_order(&received);
}

/// Per key, the first copy of each record in `received` comes in outbox order.
fn assert_first_copies_in_order(received: &[(String, OutboxRecord)]) {
    for (key, positions) in positions_by_key(received) {
        let mut seen = HashSet::new();
        let firsts: Vec<u64> = positions.into_iter().filter(|p| seen.insert(*p)).collect();
        let mut sorted = firsts.clone();
        sorted.sort_unstable();
        assert_eq!(firsts, sorted, "{key}: first copies in outbox order");
    }
}

/// A batch is pushed into the relay's window, but its publish call only begins when the window
/// is next polled. If an earlier batch's failure is woken in between (the broker's answer comes
/// on another thread while the relay is finishing the read of the next batch), the relay
/// settles the failure first and *then* makes the later batch's call, with no call in flight:
/// a gapless publisher starts afresh (as `es-kafka` replaces its producer) and writes the later
/// records of the failed record's key before the retry writes the failed one. The read of the
/// second batch here takes longer than the first batch's answer (a store, or a relay thread
/// preempted, slower than the broker).
pub async fn pipelined_relay_makes_no_call_after_it_settled_a_failure<S: StreamingStore>(store: S) {
    append_to_three_ledgers(&store, 0..20).await;
    let pending = store.pending_outbox(100).await.unwrap();
    let broker = RecordingPublisher {
        delay: Duration::from_millis(50),
        gapless: true,
        ..RecordingPublisher::default()
    };
    // The first batch (records 0..7) fails at its first record; the second (7..14) holds later
    // records of its key.
    let failing = &pending[0];
    lock(&broker.fail_once).insert(failing.message.message_id);
    assert!(pending[7..14]
        .iter()
        .any(|r| r.message.key == failing.message.key));
    let slow = Interfering::slow_first_read_after(store.clone(), Duration::from_millis(300));
    let relay = Relay::new(
        slow,
        broker.clone(),
        relay_config("r1", Duration::from_secs(30)),
    );
    let first = relay.drain().await.unwrap();
    assert!(
        matches!(first, RelayStep::PublishFailed { delivered: 0, .. }),
        "{first:?}"
    );
    let written: Vec<u64> = lock(&broker.received)
        .iter()
        .map(|(_, r)| r.position)
        .collect();
    drain_until_idle(&relay).await;
    let received = lock(&broker.received).clone();
    assert_first_copies_in_order(&received);
    assert_at_least_once_in_order(&received, &pending);
    assert_eq!(
        written,
        Vec::<u64>::new(),
        "nothing after the failed record was written by the failing pass"
    );
}

/// A relay is dropped (its process killed) with batches in flight and its lease held; a second
/// relay takes over once the lease expires and resumes from the oldest unmarked record. Every
/// record is written, the ones the first relay had in flight twice, and per key in outbox order
/// (first copies and last copies alike: nothing failed).
pub async fn relay_killed_mid_window_is_resumed_by_another<S: StreamingStore>(store: S) {
    append_to_three_ledgers(&store, 0..20).await;
    let pending = store.pending_outbox(100).await.unwrap();
    let ttl = Duration::from_secs(1);
    // `a`'s broker answers after 10 s: a window handed over is still unanswered when `a` dies.
    let broker = RecordingPublisher {
        delay: Duration::from_secs(10),
        gapless: true,
        ..RecordingPublisher::default()
    };
    let a = Relay::new(store.clone(), broker.for_relay("a"), relay_config("a", ttl));
    // Kill `a` once its window is in flight: three batches handed over, none answered.
    patiently("a fills its window", async {
        tokio::select! {
            step = a.drain() => panic!("a's pass ended: {step:?}"),
            () = async {
                while lock(&broker.calls).len() < 3 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            } => {}
        }
    })
    .await;
    drop(a);
    assert_eq!(broker.in_flight.load(Ordering::SeqCst), 0);
    let written_by_a = lock(&broker.received).len();
    assert_eq!(written_by_a, 21, "a's three batches were handed over");
    assert_eq!(store.outbox_len().await.unwrap(), 60, "a marked nothing");
    let b_broker = RecordingPublisher {
        delay: Duration::ZERO,
        ..broker.for_relay("b")
    };
    let b = Relay::new(store.clone(), b_broker, relay_config("b", ttl));
    assert_eq!(
        b.drain().await.unwrap(),
        RelayStep::Standby,
        "a's lease still holds"
    );
    tokio::time::sleep(ttl).await;
    let mut published = 0;
    loop {
        match b.drain().await.unwrap() {
            RelayStep::Published(n) => published += n,
            RelayStep::Idle => break,
            other => panic!("b: {other:?}"),
        }
    }
    assert_eq!(
        published, 60,
        "b published everything, a having marked nothing"
    );
    assert_eq!(store.outbox_len().await.unwrap(), 0);
    let received = lock(&broker.received).clone();
    assert_at_least_once_in_order(&received, &pending);
    let twice: Vec<u64> = broker
        .received_ids()
        .into_iter()
        .filter(|(_, n)| *n == 2)
        .map(|(id, _)| {
            pending
                .iter()
                .find(|r| r.message.message_id == id)
                .expect("a pending record")
                .position
        })
        .collect();
    assert_eq!(twice.len(), 21, "what a had in flight came twice");
    assert_first_copies_in_order(&received);
}

/// A relay's lease passes to another relay while its pipeline is busy: its first mark stalls
/// past the lease (a paused process), it keeps publishing within its lease, and the mark comes
/// back refused. The relay stops (`Fenced`) without writing any later mark; the other relay
/// publishes what was not marked; their publish calls never overlap; every record is written,
/// per key with first and last copies in outbox order.
pub async fn relay_fenced_with_batches_in_flight_marks_nothing_more<S: StreamingStore>(store: S) {
    append_to_three_ledgers(&store, 0..20).await;
    let pending = store.pending_outbox(100).await.unwrap();
    let ttl = Duration::from_millis(800);
    let broker = RecordingPublisher {
        delay: Duration::from_millis(30),
        gapless: true,
        ..RecordingPublisher::default()
    };
    let stalling = Interfering::stalling_marks(store.clone(), 1, Duration::from_secs(2));
    let config = |owner: &str| RelayConfig {
        publish_timeout: Duration::from_millis(300),
        ..relay_config(owner, ttl)
    };
    let a = Relay::new(stalling.clone(), broker.for_relay("a"), config("a"));
    let a_pass = tokio::spawn(async move { a.drain().await });
    patiently("a takes the lease", async {
        while lock(&broker.calls).is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let b = Relay::new(store.clone(), broker.for_relay("b"), config("b"));
    patiently("b takes the lease once a's expires", async {
        while b.drain().await.unwrap() == RelayStep::Standby {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let a_step = patiently("a's pass ends", a_pass).await.unwrap().unwrap();
    assert_eq!(a_step, RelayStep::Fenced, "a's stalled mark was refused");
    assert_eq!(stalling.fenced.load(Ordering::SeqCst), 1);
    assert_eq!(stalling.accepted.load(Ordering::SeqCst), 0);
    loop {
        if b.drain().await.unwrap() == RelayStep::Idle {
            break;
        }
    }
    assert_eq!(store.outbox_len().await.unwrap(), 0);
    let calls = lock(&broker.calls).clone();
    assert_no_overlap(&calls);
    let a_calls = calls.iter().filter(|c| c.relay == "a").count();
    assert!(
        a_calls > 1,
        "a kept publishing while its mark stalled: {calls:?}"
    );
    let received = lock(&broker.received).clone();
    assert_at_least_once_in_order(&received, &pending);
    let by_a: HashSet<u64> = received
        .iter()
        .filter(|(relay, _)| relay == "a")
        .map(|(_, r)| r.position)
        .collect();
    let by_b: HashSet<u64> = received
        .iter()
        .filter(|(relay, _)| relay == "b")
        .map(|(_, r)| r.position)
        .collect();
    assert!(
        by_a.iter().all(|p| by_b.contains(p)),
        "a marked nothing: b published again everything a did"
    );
    assert_first_copies_in_order(&received);
}

// ---------------------------------------------------------------------------------------------
// Checkpoints and projections

/// A checkpoint never moves back; a reset starts it over; names are independent.
pub async fn checkpoints_only_move_forward<S: StreamingStore>(store: S) {
    let at = |position| Checkpoint {
        position,
        generation: 0,
    };
    assert_eq!(store.load_checkpoint("balances").await.unwrap(), at(0));
    assert!(store.save_checkpoint("balances", at(10)).await.unwrap());
    assert!(!store.save_checkpoint("balances", at(5)).await.unwrap());
    assert!(!store.save_checkpoint("balances", at(10)).await.unwrap());
    assert_eq!(store.load_checkpoint("balances").await.unwrap(), at(10));
    assert!(store.save_checkpoint("balances", at(11)).await.unwrap());
    assert_eq!(store.load_checkpoint("audit").await.unwrap(), at(0));
    let reset = store.reset_checkpoint("balances").await.unwrap();
    assert_eq!(reset.position, 0);
    assert_eq!(store.load_checkpoint("balances").await.unwrap(), reset);
    assert!(store
        .save_checkpoint(
            "balances",
            Checkpoint {
                position: 3,
                ..reset
            }
        )
        .await
        .unwrap());
    assert_eq!(store.load_checkpoint("audit").await.unwrap(), at(0));
}

/// Every reset starts a higher generation; a save naming an older one is refused with `Fenced`
/// and writes nothing, whatever its position.
pub async fn checkpoint_generations_fence_stale_saves<S: StreamingStore>(store: S) {
    let g0 = store.load_checkpoint("orders").await.unwrap();
    assert_eq!(g0, Checkpoint::default());
    assert!(store
        .save_checkpoint("orders", Checkpoint { position: 40, ..g0 })
        .await
        .unwrap());
    let g1 = store.reset_checkpoint("orders").await.unwrap();
    assert!(g1.generation > g0.generation && g1.position == 0);
    let stale = store
        .save_checkpoint("orders", Checkpoint { position: 50, ..g0 })
        .await;
    assert!(is_fenced(&stale), "{stale:?}");
    assert_eq!(store.load_checkpoint("orders").await.unwrap(), g1);
    assert!(store
        .save_checkpoint("orders", Checkpoint { position: 7, ..g1 })
        .await
        .unwrap());
    let g2 = store.reset_checkpoint("orders").await.unwrap();
    assert!(g2.generation > g1.generation);
    for old in [g0, g1] {
        let stale = store
            .save_checkpoint(
                "orders",
                Checkpoint {
                    position: 99,
                    ..old
                },
            )
            .await;
        assert!(is_fenced(&stale), "{stale:?}");
    }
    assert_eq!(store.load_checkpoint("orders").await.unwrap(), g2);
    // A reset of a projection that never saved starts above generation 0 too.
    let fresh = store.reset_checkpoint("fresh").await.unwrap();
    assert!(fresh.generation > 0);
    assert!(is_fenced(
        &store.save_checkpoint("fresh", Checkpoint::default()).await
    ));
}

/// Decodes a stored ledger event.
pub type LedgerDecoder = Arc<dyn Fn(&RecordedEvent) -> Vec<LedgerEvent> + Send + Sync>;

/// Balances per ledger, kept in memory; counts how often each position was handled.
#[derive(Clone, Default)]
pub struct Balances {
    /// Balance per stream.
    pub balances: Arc<Mutex<HashMap<String, i64>>>,
    /// Times each global position was handled.
    pub handled: Arc<Mutex<HashMap<u64, u32>>>,
    /// A position whose event always fails.
    pub poison: Option<u64>,
    /// A repository to decode events with.
    pub decode: Option<LedgerDecoder>,
}

impl Projection for Balances {
    fn name(&self) -> &'static str {
        "balances"
    }

    fn filter(&self) -> EventFilter {
        EventFilter::all().category("ledger")
    }

    async fn handle(&mut self, event: &RecordedEvent) -> Result<(), HandlerError> {
        if self.poison == Some(event.global_position) {
            return Err(format!("cannot handle the event at {}", event.global_position).into());
        }
        *self
            .handled
            .lock()
            .expect("lock")
            .entry(event.global_position)
            .or_insert(0) += 1;
        let decode = self.decode.as_ref().expect("a decoder");
        let mut balances = self.balances.lock().expect("lock");
        let balance = balances.entry(event.stream_id.to_string()).or_insert(0);
        for e in decode(event) {
            match e {
                LedgerEvent::Credited(c) => *balance += c.amount,
                LedgerEvent::Debited(d) => *balance -= d.amount,
                LedgerEvent::Opened(_) => {}
            }
        }
        Ok(())
    }

    async fn reset(&mut self) -> Result<(), HandlerError> {
        self.balances.lock().expect("lock").clear();
        self.handled.lock().expect("lock").clear();
        Ok(())
    }
}

async fn ledger_activity<S: StreamingStore>(
    repo: &Repository<S>,
    ids: &[&str],
    rounds: i64,
) -> u64 {
    let mut last = 0;
    for id in ids {
        last = repo
            .execute::<Ledger>(id, &LedgerCommand::Open)
            .await
            .unwrap()
            .positions[0];
    }
    for round in 1..=rounds {
        for id in ids {
            let r = repo
                .execute::<Ledger>(id, &LedgerCommand::Credit(round * 10))
                .await
                .unwrap();
            last = r.positions[0];
            if round % 3 == 0 {
                last = repo
                    .execute::<Ledger>(id, &LedgerCommand::Debit(round))
                    .await
                    .unwrap()
                    .positions[0];
            }
        }
    }
    last
}

fn balances_projection<S: StreamingStore>(repo: &Repository<S>) -> Balances {
    let repo = repo.clone();
    Balances {
        decode: Some(Arc::new(move |e| {
            repo.decode::<Ledger>(e).expect("decodes")
        })),
        ..Balances::default()
    }
}

fn expected_balance(rounds: i64) -> i64 {
    (1..=rounds)
        .map(|r| r * 10 - if r % 3 == 0 { r } else { 0 })
        .sum()
}

/// A projection catches up, follows live events, checkpoints, and resumes after a restart
/// without handling anything twice.
pub async fn projection_catches_up_and_resumes<S: StreamingStore>(store: S) {
    let repo = Repository::new(store.clone());
    let last = ledger_activity(&repo, &["p1", "p2"], 6).await;
    // Noise in another category, which the filter skips.
    store
        .append(AppendRequest::new(
            stream("order-1"),
            ExpectedVersion::Any,
            vec![NewEvent::from_value("Placed", 1, &json!({}))],
        ))
        .await
        .unwrap();
    let projection = balances_projection(&repo);
    let runner = ProjectionRunner::new(store.clone());
    let handle = runner.spawn(AtLeastOnce::new(projection.clone(), store.clone()));
    let status = patiently("catch up", handle.wait_for(last)).await;
    assert!(
        matches!(status, ProjectionStatus::Running { .. }),
        "{status:?}"
    );
    assert_eq!(
        projection.balances.lock().unwrap()["ledger-p1"],
        expected_balance(6)
    );
    // Live.
    let live = ledger_activity(&repo, &["p3"], 3).await;
    patiently("live events", handle.wait_for(live)).await;
    assert_eq!(
        projection.balances.lock().unwrap()["ledger-p3"],
        expected_balance(3)
    );
    assert!(handle.lag().await.unwrap() <= 1);
    let stopped = handle.shutdown().await;
    assert!(
        matches!(stopped, ProjectionStatus::Stopped { position } if position >= live),
        "{stopped:?}"
    );
    assert!(store.load_checkpoint("balances").await.unwrap().position >= live);
    // More events while it is down; a restart resumes from the checkpoint.
    let later = ledger_activity(&repo, &["p4"], 2).await;
    let handle = runner.spawn(AtLeastOnce::new(projection.clone(), store.clone()));
    patiently("resume", handle.wait_for(later)).await;
    assert_eq!(
        projection.balances.lock().unwrap()["ledger-p4"],
        expected_balance(2)
    );
    assert!(
        projection.handled.lock().unwrap().values().all(|n| *n == 1),
        "nothing was handled twice across a clean restart"
    );
    handle.shutdown().await;
}

/// Rebuilding drops the read model and replays to the same result.
pub async fn projection_rebuild_gives_identical_results<S: StreamingStore>(store: S) {
    let repo = Repository::new(store.clone());
    let last = ledger_activity(&repo, &["r1", "r2", "r3"], 5).await;
    let projection = balances_projection(&repo);
    let handle = ProjectionRunner::new(store.clone())
        .spawn(AtLeastOnce::new(projection.clone(), store.clone()));
    patiently("first build", handle.wait_for(last)).await;
    let before = projection.balances.lock().unwrap().clone();
    let handled_before = projection.handled.lock().unwrap().len();
    handle.rebuild().await.unwrap();
    patiently("rebuild", handle.wait_for(last)).await;
    assert_eq!(*projection.balances.lock().unwrap(), before);
    let handled = projection.handled.lock().unwrap().clone();
    assert_eq!(handled.len(), handled_before, "every event was replayed");
    assert!(
        handled.values().all(|n| *n == 1),
        "once each, after the reset"
    );
    handle.shutdown().await;
}

/// Where a [`GatedSink`] parks a call: armed, the next call signals that it is parked and waits
/// until the test releases it.
#[derive(Debug)]
pub struct Gate {
    armed: AtomicBool,
    parked: watch::Sender<bool>,
    open: watch::Sender<bool>,
}

impl Default for Gate {
    fn default() -> Self {
        Self {
            armed: AtomicBool::new(false),
            parked: watch::channel(false).0,
            open: watch::channel(false).0,
        }
    }
}

impl Gate {
    /// The next call through the gate parks.
    pub fn arm(&self) {
        self.parked.send_replace(false);
        self.open.send_replace(false);
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Waits until a call parked.
    pub async fn parked(&self) {
        let mut parked = self.parked.subscribe();
        let _ = parked.wait_for(|p| *p).await;
    }

    /// Lets the parked call go on.
    pub fn release(&self) {
        self.open.send_replace(true);
    }

    async fn pass(&self) {
        if self.armed.swap(false, Ordering::SeqCst) {
            let mut open = self.open.subscribe();
            self.parked.send_replace(true);
            let _ = open.wait_for(|o| *o).await;
        }
    }
}

/// A [`ProjectionSink`] with gates in front of `checkpoint` and `apply`, to interleave two
/// runners of one projection exactly; it counts the batches it passed on and those refused as
/// fenced.
pub struct GatedSink<K> {
    sink: K,
    /// Parks a `checkpoint` call (the runner loading its checkpoint).
    pub before_checkpoint: Arc<Gate>,
    /// Parks an `apply` call (a batch, before any of it is applied).
    pub before_apply: Arc<Gate>,
    /// Batches applied (successfully or not).
    pub batches: Arc<AtomicUsize>,
    /// Batches refused because the checkpoint's generation moved on.
    pub fenced: Arc<AtomicUsize>,
}

impl<K> GatedSink<K> {
    /// Wraps `sink`, every gate open.
    pub fn new(sink: K) -> Self {
        Self {
            sink,
            before_checkpoint: Arc::default(),
            before_apply: Arc::default(),
            batches: Arc::default(),
            fenced: Arc::default(),
        }
    }

    /// A handle on the gates and counters, to keep once the sink is handed to a runner.
    pub fn controls(&self) -> SinkControls {
        SinkControls {
            before_checkpoint: Arc::clone(&self.before_checkpoint),
            before_apply: Arc::clone(&self.before_apply),
            batches: Arc::clone(&self.batches),
            fenced: Arc::clone(&self.fenced),
        }
    }
}

/// The gates and counters of a [`GatedSink`].
#[derive(Debug, Clone)]
pub struct SinkControls {
    /// See [`GatedSink::before_checkpoint`].
    pub before_checkpoint: Arc<Gate>,
    /// See [`GatedSink::before_apply`].
    pub before_apply: Arc<Gate>,
    /// See [`GatedSink::batches`].
    pub batches: Arc<AtomicUsize>,
    /// See [`GatedSink::fenced`].
    pub fenced: Arc<AtomicUsize>,
}

impl<K: ProjectionSink> ProjectionSink for GatedSink<K> {
    fn name(&self) -> &str {
        self.sink.name()
    }

    fn filter(&self) -> EventFilter {
        self.sink.filter()
    }

    async fn checkpoint(&mut self) -> Result<u64, HandlerError> {
        self.before_checkpoint.pass().await;
        self.sink.checkpoint().await
    }

    async fn apply(&mut self, events: &[RecordedEvent], checkpoint: u64) -> Result<(), BatchError> {
        self.before_apply.pass().await;
        let result = self.sink.apply(events, checkpoint).await;
        if result.as_ref().is_err_and(BatchError::is_fenced) {
            self.fenced.fetch_add(1, Ordering::SeqCst);
        }
        self.batches.fetch_add(1, Ordering::SeqCst);
        result
    }

    async fn reset(&mut self) -> Result<(), HandlerError> {
        self.sink.reset().await
    }

    async fn claim(&mut self, partition: u32) -> Result<u64, HandlerError> {
        self.before_checkpoint.pass().await;
        self.sink.claim(partition).await
    }

    async fn reset_group(&mut self, partitions: u32) -> Result<(), HandlerError> {
        self.sink.reset_group(partitions).await
    }
}

/// An idempotent at-least-once read model shared by several runners (one table, many
/// processes): which ledger events it holds, by global position.
#[derive(Clone, Default)]
pub struct Ledgered {
    /// Event id by global position.
    pub events: Arc<Mutex<BTreeMap<u64, Uuid>>>,
}

impl Projection for Ledgered {
    fn name(&self) -> &'static str {
        "ledgered"
    }

    fn filter(&self) -> EventFilter {
        EventFilter::all().category("ledger")
    }

    async fn handle(&mut self, event: &RecordedEvent) -> Result<(), HandlerError> {
        lock(&self.events).insert(event.global_position, event.event_id);
        Ok(())
    }

    async fn reset(&mut self) -> Result<(), HandlerError> {
        lock(&self.events).clear();
        Ok(())
    }
}

/// Every ledger event of the feed, by global position: what a replay builds.
async fn replay_ledger<S: EventStore>(store: &S) -> BTreeMap<u64, Uuid> {
    store
        .read_all(ReadAll {
            filter: EventFilter::all().category("ledger"),
            ..ReadAll::default()
        })
        .map_ok(|e| (e.global_position, e.event_id))
        .try_collect()
        .await
        .expect("read the feed")
}

/// A projection is rebuilt while a second runner of it (sharing its read model) is in the middle
/// of a batch: the second runner is parked before applying a batch, the first rebuilds (drops the
/// read model, starts a new checkpoint generation) and is parked before it reloads its
/// checkpoint; the second runner's batch then runs, the first reloads. The second runner's save
/// names the old generation and is refused, so the first does not resume after it: once both
/// have caught up, the read model holds every ledger event of the feed (before checkpoint
/// generations, the events before the second runner's batch were missing).
pub async fn projection_rebuild_racing_a_second_runner<S: StreamingStore>(store: S) {
    let repo = Repository::new(store.clone());
    let last = ledger_activity(&repo, &["q1", "q2"], 4).await;
    let model = Ledgered::default();
    let runner = ProjectionRunner::with_config(
        store.clone(),
        RunnerConfig {
            max_attempts: 3,
            backoff: es_core::Backoff::new(Duration::from_millis(5), Duration::from_millis(50)),
            batch_size: 5,
            ..RunnerConfig::default()
        },
    );
    let a = GatedSink::new(AtLeastOnce::new(model.clone(), store.clone()));
    let b = GatedSink::new(AtLeastOnce::new(model.clone(), store.clone()));
    let (ga, gb) = (a.controls(), b.controls());
    let a = runner.spawn(a);
    let b = runner.spawn(b);
    patiently("a catches up", a.wait_for(last)).await;
    patiently("b catches up", b.wait_for(last)).await;

    // b receives the next event and parks before applying it; a applies it.
    gb.before_apply.arm();
    let next = repo
        .execute::<Ledger>("q1", &LedgerCommand::Credit(5))
        .await
        .unwrap()
        .positions[0];
    patiently("b parks", gb.before_apply.parked()).await;
    patiently("a applies it", a.wait_for(next)).await;

    // a rebuilds and parks before reloading its checkpoint.
    ga.before_checkpoint.arm();
    a.rebuild().await.unwrap();
    patiently("a parks", ga.before_checkpoint.parked()).await;
    assert!(lock(&model.events).is_empty(), "the read model was dropped");

    // b's batch runs against the rebuilt projection, then a reloads.
    let batches = gb.batches.load(Ordering::SeqCst);
    gb.before_apply.release();
    patiently("b's batch ends", async {
        while gb.batches.load(Ordering::SeqCst) == batches {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    ga.before_checkpoint.release();

    let later = ledger_activity(&repo, &["q3"], 2).await;
    let sa = patiently("a catches up again", a.wait_for(later)).await;
    let sb = patiently("b catches up again", b.wait_for(later)).await;
    assert!(matches!(sa, ProjectionStatus::Running { .. }), "{sa:?}");
    assert!(matches!(sb, ProjectionStatus::Running { .. }), "{sb:?}");
    a.shutdown().await;
    b.shutdown().await;
    let replay = replay_ledger(&store).await;
    let held = lock(&model.events).clone();
    let missing: Vec<&u64> = replay.keys().filter(|p| !held.contains_key(p)).collect();
    assert!(
        missing.is_empty(),
        "the read model lost events at {missing:?}"
    );
    assert_eq!(held, replay, "the read model equals a replay of the feed");
    assert_eq!(
        gb.fenced.load(Ordering::SeqCst),
        1,
        "b's stale batch was refused once"
    );
    let checkpoint = store.load_checkpoint("ledgered").await.unwrap();
    assert!(checkpoint.generation >= 1 && checkpoint.position >= later);
}

/// An event that keeps failing stops the projection with an error naming it; the events before
/// it are handled and checkpointed; nothing after it is handled.
pub async fn poisoned_event_stops_the_projection<S: StreamingStore>(store: S) {
    let repo = Repository::new(store.clone());
    ledger_activity(&repo, &["x"], 3).await;
    let poisoned = repo
        .execute::<Ledger>("x", &LedgerCommand::Credit(666))
        .await
        .unwrap();
    let poison_position = poisoned.positions[0];
    let after = repo
        .execute::<Ledger>("x", &LedgerCommand::Credit(1))
        .await
        .unwrap();
    let mut projection = balances_projection(&repo);
    projection.poison = Some(poison_position);
    let runner = ProjectionRunner::with_config(
        store.clone(),
        RunnerConfig {
            max_attempts: 3,
            backoff: es_core::Backoff::new(Duration::from_millis(5), Duration::from_millis(50)),
            batch_size: 1000,
            ..RunnerConfig::default()
        },
    );
    let handle = runner.spawn(AtLeastOnce::new(projection.clone(), store.clone()));
    let status = patiently("the projection stops", handle.wait_for(after.positions[0])).await;
    let ProjectionStatus::Failed(failure) = status else {
        panic!("expected the projection to fail, got {status:?}");
    };
    assert_eq!(failure.position(), Some(poison_position));
    let message = failure.to_string();
    let event_id = poisoned.event_ids[0].to_string();
    for part in [
        event_id.as_str(),
        "ledger-x",
        "Credited",
        "balances",
        "cannot handle",
    ] {
        assert!(message.contains(part), "the error names {part}: {message}");
    }
    assert_eq!(
        projection.balances.lock().unwrap()["ledger-x"],
        expected_balance(3)
    );
    let handled = projection.handled.lock().unwrap().clone();
    assert!(!handled.contains_key(&poison_position) && !handled.contains_key(&after.positions[0]));
    assert!(store.load_checkpoint("balances").await.unwrap().position < poison_position);
    handle.shutdown().await;
}

/// Integration events of the ledger's public contract.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerMoved {
    /// Signed amount.
    pub delta: i64,
}

/// The public message enum (hand-written `DomainEvent`, like the ledger's).
#[derive(Debug, Clone, PartialEq)]
pub enum LedgerMessage {
    /// Money moved.
    Moved(LedgerMoved),
}

impl DomainEvent for LedgerMessage {
    const EVENT_TYPES: &'static [EventSchema] = &[EventSchema {
        name: "ledger.moved",
        version: 3,
    }];
    fn event_type(&self) -> &'static str {
        "ledger.moved"
    }
    fn schema_version(&self) -> u32 {
        3
    }
    fn to_payload(&self) -> Result<Vec<u8>, serde_json::Error> {
        let Self::Moved(m) = self;
        serde_json::to_vec(m)
    }
    fn from_payload(event_type: &str, payload: &[u8]) -> Result<Self, PayloadError> {
        match event_type {
            "ledger.moved" => serde_json::from_slice(payload)
                .map(Self::Moved)
                .map_err(PayloadError::Invalid),
            other => Err(PayloadError::UnknownType(other.to_owned())),
        }
    }
    fn from_value(event_type: &str, payload: serde_json::Value) -> Result<Self, PayloadError> {
        match event_type {
            "ledger.moved" => serde_json::from_value(payload)
                .map(Self::Moved)
                .map_err(PayloadError::Invalid),
            other => Err(PayloadError::UnknownType(other.to_owned())),
        }
    }
}

/// Publishes credits and debits, not openings.
#[derive(Debug, Clone, Copy, Default)]
pub struct LedgerTranslator;

impl Translator<Ledger> for LedgerTranslator {
    type Message = LedgerMessage;
    fn topic(&self) -> &'static str {
        "ledger.public"
    }
    fn translate(&self, _: &StreamId, event: &LedgerEvent) -> Vec<LedgerMessage> {
        match event {
            LedgerEvent::Opened(_) => Vec::new(),
            LedgerEvent::Credited(c) => vec![LedgerMessage::Moved(LedgerMoved { delta: c.amount })],
            LedgerEvent::Debited(d) => vec![LedgerMessage::Moved(LedgerMoved { delta: -d.amount })],
        }
    }
}

/// The repository records translated integration events in the outbox with their sources.
pub async fn repository_translates_into_the_outbox<S: StreamingStore>(store: S) {
    let repo = Repository::builder(store.clone())
        .translator::<Ledger, _>(LedgerTranslator)
        .build()
        .unwrap();
    let metadata = Metadata::new()
        .with_correlation_id(Uuid::now_v7())
        .with_actor("teller");
    repo.execute_with::<Ledger>("t", &LedgerCommand::Open, &metadata)
        .await
        .unwrap();
    let credit = repo
        .execute_with::<Ledger>("t", &LedgerCommand::Credit(50), &metadata)
        .await
        .unwrap();
    let debit = repo
        .execute_with::<Ledger>("t", &LedgerCommand::Debit(20), &metadata)
        .await
        .unwrap();
    let rejected = repo
        .execute_with::<Ledger>("t", &LedgerCommand::Debit(1000), &metadata)
        .await;
    assert!(rejected.is_err());
    let pending = store.pending_outbox(100).await.unwrap();
    assert_eq!(
        pending.len(),
        2,
        "openings are not published; rejections publish nothing"
    );
    for (record, (source, delta)) in pending
        .iter()
        .zip([(credit.event_ids[0], 50), (debit.event_ids[0], -20)])
    {
        let m = &record.message;
        assert_eq!(
            (m.topic.as_str(), m.key.as_str()),
            ("ledger.public", "ledger-t")
        );
        assert_eq!(
            (m.message_type.as_str(), m.schema_version),
            ("ledger.moved", 3)
        );
        assert_eq!(m.source_event_id, source);
        assert_eq!(m.metadata.causation_id, Some(source));
        assert_eq!(m.metadata.correlation_id, metadata.correlation_id);
        assert_eq!(m.metadata.actor.as_deref(), Some("teller"));
        let payload: LedgerMoved = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(payload.delta, delta);
    }
}

// ---------------------------------------------------------------------------------------------
// Leases and consumer groups

/// The lease of the consumer-group cases: short, so that takeovers happen within the case.
const GROUP_TTL: Duration = Duration::from_secs(1);

/// Leases follow the rules of [`LeaseStore`]: one owner at a time; renewing keeps the
/// generation, taking a free, released or expired lease raises it, across releases too; a release
/// by anyone but the owner in its generation does nothing; leases of other names and groups are
/// independent; the held ones are listed in name order; bad arguments are `InvalidLease`.
pub async fn leases_follow_the_generation_rules<S: StreamingStore>(store: S) {
    let ttl = Duration::from_secs(30);
    let take = |name: &'static str, owner: &'static str| {
        let store = store.clone();
        async move { store.acquire_lease("g", name, owner, ttl).await.unwrap() }
    };
    assert_eq!(take("b", "x").await, Some(1), "a free lease is taken");
    assert_eq!(
        take("b", "x").await,
        Some(1),
        "renewing keeps the generation"
    );
    assert_eq!(take("b", "y").await, None, "held by another");
    assert_eq!(take("a", "y").await, Some(1), "another name is independent");
    assert_eq!(
        store.acquire_lease("h", "b", "y", ttl).await.unwrap(),
        Some(1),
        "another group is independent"
    );
    let held = |owner: &str, name: &str, generation| HeldLease {
        name: name.to_owned(),
        owner: owner.to_owned(),
        generation,
    };
    assert_eq!(
        store.held_leases("g").await.unwrap(),
        vec![held("y", "a", 1), held("x", "b", 1)],
        "held leases, in name order"
    );
    store.release_lease("g", "b", "y", 1).await.unwrap();
    store.release_lease("g", "b", "x", 7).await.unwrap();
    assert_eq!(
        take("b", "y").await,
        None,
        "only the owner in its generation releases"
    );
    store.release_lease("g", "b", "x", 1).await.unwrap();
    assert_eq!(
        store.held_leases("g").await.unwrap(),
        vec![held("y", "a", 1)],
        "a released lease is not held"
    );
    assert_eq!(
        take("b", "y").await,
        Some(2),
        "a released lease is taken anew"
    );
    store.release_lease("g", "b", "y", 2).await.unwrap();
    assert_eq!(
        take("b", "y").await,
        Some(3),
        "even by its last owner, anew"
    );

    // Expiry, on the store's clock.
    let short = Duration::from_millis(200);
    assert_eq!(
        store.acquire_lease("g", "c", "x", short).await.unwrap(),
        Some(1)
    );
    assert_eq!(
        store.acquire_lease("g", "c", "y", short).await.unwrap(),
        None
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        !store
            .held_leases("g")
            .await
            .unwrap()
            .iter()
            .any(|l| l.name == "c"),
        "an expired lease is not held"
    );
    assert_eq!(
        store.acquire_lease("g", "c", "y", short).await.unwrap(),
        Some(2),
        "an expired lease is taken anew"
    );

    let long = "n".repeat(MAX_LEASE_NAME + 1);
    for (group, name, owner, ttl) in [
        ("", "a", "x", ttl),
        ("g", "", "x", ttl),
        ("g", "a", "", ttl),
        ("g", long.as_str(), "x", ttl),
        ("g", "a", "x", Duration::ZERO),
        ("g", "a", "x", MAX_LEASE_TTL + Duration::from_secs(1)),
    ] {
        let result = store.acquire_lease(group, name, owner, ttl).await;
        assert!(
            matches!(result, Err(StoreError::InvalidLease { .. })),
            "({group:?}, {name:.10?}, {owner:?}, {ttl:?}): {result:?}"
        );
    }
    assert_eq!(
        store.held_leases("g").await.unwrap().len(),
        3,
        "bad calls changed nothing"
    );
}

/// Fencing a checkpoint starts a new generation at the same position, created at 0 if missing:
/// a save naming an earlier generation is then refused, whatever its position, and the holder of
/// the new generation goes on from where the earlier one stopped.
pub async fn fenced_checkpoints_refuse_earlier_holders<S: StreamingStore>(store: S) {
    let fresh = store.fence_checkpoint("orders#2").await.unwrap();
    assert_eq!(fresh.position, 0, "created at position 0");
    assert!(fresh.generation >= 1, "in a new generation");
    let first = Checkpoint {
        position: 40,
        generation: fresh.generation,
    };
    assert!(store.save_checkpoint("orders#2", first).await.unwrap());
    let second = store.fence_checkpoint("orders#2").await.unwrap();
    assert_eq!(second.position, 40, "the position is kept");
    assert!(second.generation > fresh.generation);
    let stale = store
        .save_checkpoint(
            "orders#2",
            Checkpoint {
                position: 90,
                ..first
            },
        )
        .await;
    assert!(is_fenced(&stale), "{stale:?}");
    assert_eq!(store.load_checkpoint("orders#2").await.unwrap(), second);
    assert!(store
        .save_checkpoint(
            "orders#2",
            Checkpoint {
                position: 50,
                ..second
            }
        )
        .await
        .unwrap());
    assert_eq!(
        store.load_checkpoint("orders#1").await.unwrap(),
        Checkpoint::default(),
        "other names are untouched"
    );
}

/// One handling of an event by a group's projection.
#[derive(Debug, Clone)]
struct Handling {
    worker: &'static str,
    partition: u32,
    position: u64,
    stream: StreamId,
    version: u64,
}

/// A read model shared by every worker of a group (one table, many processes): each handling,
/// in the order they happened, with the worker that made it.
#[derive(Clone)]
struct GroupLog {
    worker: &'static str,
    handled: Arc<Mutex<Vec<Handling>>>,
}

impl GroupLog {
    fn new() -> Self {
        Self {
            worker: "",
            handled: Arc::default(),
        }
    }

    fn of(&self, worker: &'static str) -> Self {
        Self {
            worker,
            handled: Arc::clone(&self.handled),
        }
    }

    fn handled_by(&self, worker: &str) -> HashSet<(u32, u64)> {
        lock(&self.handled)
            .iter()
            .filter(|h| h.worker == worker)
            .map(|h| (h.partition, h.position))
            .collect()
    }
}

impl Projection for GroupLog {
    fn name(&self) -> &'static str {
        "group-log"
    }

    fn filter(&self) -> EventFilter {
        EventFilter::all().category("ledger")
    }

    async fn handle(&mut self, event: &RecordedEvent) -> Result<(), HandlerError> {
        lock(&self.handled).push(Handling {
            worker: self.worker,
            partition: event.partition,
            position: event.global_position,
            stream: event.stream_id.clone(),
            version: event.stream_version,
        });
        Ok(())
    }

    async fn reset(&mut self) -> Result<(), HandlerError> {
        lock(&self.handled).clear();
        Ok(())
    }
}

fn group_runner<S: EventStore + LeaseStore>(store: &S) -> ProjectionRunner<S> {
    ProjectionRunner::with_config(
        store.clone(),
        RunnerConfig {
            max_attempts: 3,
            backoff: es_core::Backoff::new(Duration::from_millis(5), Duration::from_millis(50)),
            batch_size: 5,
            ..RunnerConfig::default()
        },
    )
}

/// Starts worker `name` of the group-log projection's consumer group over `store`.
fn group_worker<S: StreamingStore>(
    store: &S,
    name: &'static str,
    log: &GroupLog,
) -> ProjectionGroup {
    let (log, checkpoints) = (log.of(name), store.clone());
    group_runner(store).spawn_group(GroupConfig::new(name).lease_ttl(GROUP_TTL), move || {
        AtLeastOnce::new(log.clone(), checkpoints.clone())
    })
}

/// Ledger streams `g0`..`g11` (spread over every partition of a store with several).
fn group_ids() -> Vec<String> {
    (0..12).map(|i| format!("g{i}")).collect()
}

/// Credits every stream of [`group_ids`] `rounds` times, from a task of its own.
fn spawn_ledger_writer<S: StreamingStore>(
    repo: &Repository<S>,
    rounds: i64,
) -> tokio::task::JoinHandle<()> {
    let repo = repo.clone();
    tokio::spawn(async move {
        for round in 1..=rounds {
            for id in group_ids() {
                repo.execute::<Ledger>(&id, &LedgerCommand::Credit(round))
                    .await
                    .unwrap();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

/// The start of a group case: the store's partition count, a repository on it with the
/// group's ledgers opened, and an empty group log.
async fn group_case<S: StreamingStore>(store: &S) -> (usize, Repository<S>, GroupLog) {
    let repo = Repository::new(store.clone());
    open_group_ledgers(&repo).await;
    let partitions = store.partitioning().partitions().end as usize;
    (partitions, repo, GroupLog::new())
}

async fn open_group_ledgers<S: StreamingStore>(repo: &Repository<S>) {
    for id in group_ids() {
        repo.execute::<Ledger>(&id, &LedgerCommand::Open)
            .await
            .unwrap();
    }
}

/// Waits until every partition's checkpoint of the group-log projection covers its last ledger
/// event; then checks the log: every ledger event of every partition handled at least once, and
/// per stream no version handled before the version before it had been (a takeover replays from
/// the checkpoint, never skips ahead).
async fn check_group_log<S: StreamingStore>(store: &S, log: &GroupLog) {
    let partitioning = store.partitioning();
    let mut expected = HashSet::new();
    for partition in partitioning.partitions() {
        let events: Vec<RecordedEvent> = store
            .read_all(
                ReadAll {
                    filter: EventFilter::all().category("ledger"),
                    ..ReadAll::default()
                }
                .partition(partition),
            )
            .try_collect()
            .await
            .expect("read a partition");
        let last = events.last().map_or(0, |e| e.global_position);
        expected.extend(events.iter().map(|e| (partition, e.global_position)));
        let name = partition_checkpoint("group-log", partition);
        patiently("the group catches up with every partition", async {
            while store.load_checkpoint(&name).await.unwrap().position < last {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }
    let handled = lock(&log.handled).clone();
    let seen: HashSet<(u32, u64)> = handled.iter().map(|h| (h.partition, h.position)).collect();
    let missing: Vec<&(u32, u64)> = expected.iter().filter(|e| !seen.contains(e)).collect();
    assert!(missing.is_empty(), "never handled: {missing:?}");
    let mut reached: HashMap<&StreamId, u64> = HashMap::new();
    for h in &handled {
        let top = reached.entry(&h.stream).or_default();
        assert!(
            h.version <= *top + 1,
            "`{}` version {} handled (by {}) before version {}",
            h.stream,
            h.version,
            h.worker,
            *top + 1
        );
        *top = (*top).max(h.version);
    }
}

/// Polls until `done` holds.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    patiently(what, async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// Two workers of a projection's consumer group divide the partitions; one is killed (no
/// release) while writers append: the other holds every partition within the lease time and a
/// round or two, and the projection ends with every event handled, per stream in order.
pub async fn group_worker_killed_hands_its_partitions_over<S: StreamingStore>(store: S) {
    let (partitions, repo, log) = group_case(&store).await;
    let a = group_worker(&store, "a", &log);
    let b = group_worker(&store, "b", &log);
    until("a and b divide the partitions", || {
        let (oa, ob) = (a.owned(), b.owned());
        oa.len() + ob.len() == partitions
            && (partitions < 2 || (!oa.is_empty() && !ob.is_empty()))
            && oa.iter().all(|p| !ob.contains(p))
    })
    .await;
    let writer = spawn_ledger_writer(&repo, 6);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (victim, survivor) = if a.owned().contains(&0) {
        (a, b)
    } else {
        (b, a)
    };
    let killed = Instant::now();
    victim.kill();
    patiently(
        "survivor holds every partition",
        survivor.wait_owned(|owned| owned.len() == partitions),
    )
    .await;
    let handover = killed.elapsed();
    eprintln!("every partition taken over {handover:?} after the kill (lease {GROUP_TTL:?})");
    assert!(
        handover < GROUP_TTL * 2 + Duration::from_secs(3),
        "the survivor took every partition over only after {handover:?}"
    );
    writer.await.unwrap();
    check_group_log(&store, &log).await;
    survivor.shutdown().await;
}

/// A worker joins a group that one worker runs alone, then a third: each gets a share (on a store
/// with that many partitions) without two holding one partition; a worker shut down hands its
/// partitions over at once; every event is handled, per stream in order.
pub async fn group_worker_added_takes_its_share<S: StreamingStore>(store: S) {
    let (partitions, repo, log) = group_case(&store).await;
    let a = group_worker(&store, "a", &log);
    patiently(
        "a holds every partition",
        a.wait_owned(|owned| owned.len() == partitions),
    )
    .await;
    let writer = spawn_ledger_writer(&repo, 8);
    let b = group_worker(&store, "b", &log);
    let c = group_worker(&store, "c", &log);
    until("the three divide the partitions", || {
        let workers = [&a, &b, &c];
        let owned: Vec<Vec<u32>> = workers.iter().map(|w| w.owned()).collect();
        let total: usize = owned.iter().map(Vec::len).sum();
        let distinct: HashSet<&u32> = owned.iter().flatten().collect();
        total == partitions
            && distinct.len() == partitions
            && owned.iter().filter(|o| !o.is_empty()).count() == partitions.min(3)
    })
    .await;
    writer.await.unwrap();
    check_group_log(&store, &log).await;

    // A graceful shutdown releases at once: the others take its partitions within a round or two.
    let mut workers = vec![a, b, c];
    let index = workers
        .iter()
        .position(|w| !w.owned().is_empty())
        .expect("someone runs a partition");
    let leaving = workers.remove(index);
    let left = Instant::now();
    leaving.shutdown().await;
    until("the others take the released partitions", || {
        workers.iter().map(|w| w.owned().len()).sum::<usize>() == partitions
    })
    .await;
    eprintln!(
        "released partitions taken over {:?} after the shutdown began",
        left.elapsed()
    );
    spawn_ledger_writer(&repo, 2).await.unwrap();
    check_group_log(&store, &log).await;
    for worker in workers {
        worker.shutdown().await;
    }
}

/// A store handle for one worker of a consumer group whose process can be paused: while frozen,
/// its lease and checkpoint calls wait (as a paused process's would: its leases run out, and a
/// write it was about to make reaches the store only after the pause); reads of the feed go on,
/// so the work in hand keeps handling events until it needs the store.
#[derive(Clone)]
pub struct Freezable<S> {
    inner: S,
    frozen: watch::Sender<bool>,
}

impl<S> Freezable<S> {
    /// Wraps `inner`, not frozen.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            frozen: watch::channel(false).0,
        }
    }

    /// Pauses lease and checkpoint calls.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// Lets them go on.
    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }

    async fn thawed(&self) {
        let mut frozen = self.frozen.subscribe();
        let _ = frozen.wait_for(|f| !*f).await;
    }
}

delegate_event_store!(Freezable);

impl<S: CheckpointStore> CheckpointStore for Freezable<S> {
    fn load_checkpoint(&self, name: &str) -> impl StoreFuture<Checkpoint> {
        let (this, name) = (self.clone(), name.to_owned());
        async move {
            this.thawed().await;
            this.inner.load_checkpoint(&name).await
        }
    }
    fn save_checkpoint(&self, name: &str, checkpoint: Checkpoint) -> impl StoreFuture<bool> {
        let (this, name) = (self.clone(), name.to_owned());
        async move {
            this.thawed().await;
            this.inner.save_checkpoint(&name, checkpoint).await
        }
    }
    fn reset_checkpoint(&self, name: &str) -> impl StoreFuture<Checkpoint> {
        let (this, name) = (self.clone(), name.to_owned());
        async move {
            this.thawed().await;
            this.inner.reset_checkpoint(&name).await
        }
    }
    fn fence_checkpoint(&self, name: &str) -> impl StoreFuture<Checkpoint> {
        let (this, name) = (self.clone(), name.to_owned());
        async move {
            this.thawed().await;
            this.inner.fence_checkpoint(&name).await
        }
    }
}

impl<S: LeaseStore> LeaseStore for Freezable<S> {
    fn acquire_lease(
        &self,
        group: &str,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> impl StoreFuture<Option<u64>> {
        let this = self.clone();
        let (group, name, owner) = (group.to_owned(), name.to_owned(), owner.to_owned());
        async move {
            this.thawed().await;
            this.inner.acquire_lease(&group, &name, &owner, ttl).await
        }
    }
    fn release_lease(
        &self,
        group: &str,
        name: &str,
        owner: &str,
        generation: u64,
    ) -> impl StoreFuture<()> {
        let this = self.clone();
        let (group, name, owner) = (group.to_owned(), name.to_owned(), owner.to_owned());
        async move {
            this.thawed().await;
            this.inner
                .release_lease(&group, &name, &owner, generation)
                .await
        }
    }
    fn held_leases(&self, group: &str) -> impl StoreFuture<Vec<HeldLease>> {
        let (this, group) = (self.clone(), group.to_owned());
        async move {
            this.thawed().await;
            this.inner.held_leases(&group).await
        }
    }
}

/// A worker of a group is paused (its lease and checkpoint calls wait) after it handled a batch
/// of new events and before it recorded it; its leases run out and a second worker takes every
/// partition over, fencing their checkpoints, and handles the events again. When the paused
/// worker resumes, every checkpoint save it had in hand is refused (`Fenced`): no checkpoint
/// moves back or past what the new owner recorded. It then rejoins the group as a new member,
/// and every event is handled, per stream in order.
pub async fn group_stale_worker_never_records<S: StreamingStore>(store: S) {
    let (partitions, repo, log) = group_case(&store).await;
    let paused = Freezable::new(store.clone());
    let fenced = Arc::new(AtomicUsize::new(0));
    let a = {
        let (log, checkpoints, fenced) = (log.of("a"), paused.clone(), Arc::clone(&fenced));
        group_runner(&paused).spawn_group(GroupConfig::new("a").lease_ttl(GROUP_TTL), move || {
            let mut sink = GatedSink::new(AtLeastOnce::new(log.clone(), checkpoints.clone()));
            sink.fenced = Arc::clone(&fenced);
            sink
        })
    };
    patiently(
        "a holds every partition",
        a.wait_owned(|owned| owned.len() == partitions),
    )
    .await;
    check_group_log(&store, &log).await;

    // a is paused once it handled the next events but before it records them.
    paused.freeze();
    let mut fresh = HashSet::new();
    for id in group_ids() {
        let result = repo
            .execute::<Ledger>(&id, &LedgerCommand::Credit(7))
            .await
            .unwrap();
        let partition = store
            .partitioning()
            .partition_of(&stream(&format!("ledger-{id}")));
        fresh.insert((partition, result.positions[0]));
    }
    until("a handles new events (and waits to record them)", || {
        !fresh.is_disjoint(&log.handled_by("a"))
    })
    .await;
    let recorded: Vec<Checkpoint> = {
        let mut recorded = Vec::new();
        for partition in 0..partitions as u32 {
            let name = partition_checkpoint("group-log", partition);
            recorded.push(store.load_checkpoint(&name).await.unwrap());
        }
        recorded
    };

    // b takes every partition over once a's leases run out, and catches up.
    let b = group_worker(&store, "b", &log);
    patiently(
        "b holds every partition",
        b.wait_owned(|owned| owned.len() == partitions),
    )
    .await;
    check_group_log(&store, &log).await;
    assert!(
        fresh.is_subset(&log.handled_by("b")),
        "b handled again what a had not recorded"
    );
    let mut taken = Vec::new();
    for (partition, before) in recorded.iter().enumerate() {
        let name = partition_checkpoint("group-log", partition as u32);
        let now = store.load_checkpoint(&name).await.unwrap();
        assert!(
            now.generation > before.generation,
            "b fenced partition {partition}"
        );
        taken.push(now);
    }

    // a resumes: the saves it had in hand are refused.
    paused.thaw();
    until("a's saves in hand come back refused", || {
        fenced.load(Ordering::SeqCst) >= 1
    })
    .await;
    for (partition, taken) in taken.iter().enumerate() {
        let name = partition_checkpoint("group-log", partition as u32);
        let now = store.load_checkpoint(&name).await.unwrap();
        assert!(
            now.position >= taken.position,
            "partition {partition}'s checkpoint moved back: {taken:?} -> {now:?}"
        );
    }
    spawn_ledger_writer(&repo, 2).await.unwrap();
    check_group_log(&store, &log).await;
    a.shutdown().await;
    b.shutdown().await;
}

/// A worker's store stops answering (its lease and checkpoint calls hang, as behind a network
/// partition): by its own clock the worker stops every partition's work before its leases may
/// run out, without waiting for a store call to fail. Events appended after that are not handled
/// by it; a second worker takes the partitions over, and once the store answers again the first
/// one rejoins and every event is handled, per stream in order.
pub async fn group_worker_cut_off_stops_by_its_own_clock<S: StreamingStore>(store: S) {
    let (partitions, repo, log) = group_case(&store).await;
    let cut_off = Freezable::new(store.clone());
    let a = {
        let (log, checkpoints) = (log.of("a"), cut_off.clone());
        group_runner(&cut_off).spawn_group(GroupConfig::new("a").lease_ttl(GROUP_TTL), move || {
            AtLeastOnce::new(log.clone(), checkpoints.clone())
        })
    };
    patiently(
        "a holds every partition",
        a.wait_owned(|owned| owned.len() == partitions),
    )
    .await;
    check_group_log(&store, &log).await;

    cut_off.freeze();
    let frozen = Instant::now();
    // The lease, a round of renewals that could not happen, and slack for a loaded machine.
    let bound = GROUP_TTL * 2 + Duration::from_secs(1);
    let stopped = tokio::time::timeout(bound, a.wait_owned(<[u32]>::is_empty)).await;
    assert!(
        stopped.is_ok(),
        "a still runs {:?} {:?} after its store stopped answering (lease {GROUP_TTL:?})",
        a.owned(),
        frozen.elapsed()
    );
    eprintln!(
        "a stopped its partitions {:?} after its store stopped answering (lease {GROUP_TTL:?})",
        frozen.elapsed()
    );
    let before = log.handled_by("a");
    spawn_ledger_writer(&repo, 2).await.unwrap();
    let b = group_worker(&store, "b", &log);
    patiently(
        "b holds every partition",
        b.wait_owned(|owned| owned.len() == partitions),
    )
    .await;
    check_group_log(&store, &log).await;
    assert_eq!(
        log.handled_by("a"),
        before,
        "a handled events after it stopped its partitions"
    );

    cut_off.thaw();
    until("a rejoins and takes its share", || {
        let (oa, ob) = (a.owned(), b.owned());
        oa.len() + ob.len() == partitions
            && (partitions < 2 || !oa.is_empty())
            && oa.iter().all(|p| !ob.contains(p))
    })
    .await;
    spawn_ledger_writer(&repo, 2).await.unwrap();
    check_group_log(&store, &log).await;
    a.shutdown().await;
    b.shutdown().await;
}

/// A store handle for one worker whose lease and checkpoint calls fail at once while the store is
/// down (a refused connection, not a hang); reads of the feed go on.
#[derive(Clone)]
struct Unreachable<S> {
    inner: S,
    down: Arc<AtomicBool>,
}

impl<S> Unreachable<S> {
    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::unavailable("the store is down (test)"));
        }
        Ok(())
    }
}

delegate_event_store!(Unreachable);

impl<S: CheckpointStore> CheckpointStore for Unreachable<S> {
    fn load_checkpoint(&self, name: &str) -> impl StoreFuture<Checkpoint> {
        let (this, name) = (self.clone(), name.to_owned());
        async move {
            this.check()?;
            this.inner.load_checkpoint(&name).await
        }
    }
    fn save_checkpoint(&self, name: &str, checkpoint: Checkpoint) -> impl StoreFuture<bool> {
        let (this, name) = (self.clone(), name.to_owned());
        async move {
            this.check()?;
            this.inner.save_checkpoint(&name, checkpoint).await
        }
    }
    fn reset_checkpoint(&self, name: &str) -> impl StoreFuture<Checkpoint> {
        let (this, name) = (self.clone(), name.to_owned());
        async move {
            this.check()?;
            this.inner.reset_checkpoint(&name).await
        }
    }
    fn fence_checkpoint(&self, name: &str) -> impl StoreFuture<Checkpoint> {
        let (this, name) = (self.clone(), name.to_owned());
        async move {
            this.check()?;
            this.inner.fence_checkpoint(&name).await
        }
    }
}

impl<S: LeaseStore> LeaseStore for Unreachable<S> {
    fn acquire_lease(
        &self,
        group: &str,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> impl StoreFuture<Option<u64>> {
        let this = self.clone();
        let (group, name, owner) = (group.to_owned(), name.to_owned(), owner.to_owned());
        async move {
            this.check()?;
            this.inner.acquire_lease(&group, &name, &owner, ttl).await
        }
    }
    fn release_lease(
        &self,
        group: &str,
        name: &str,
        owner: &str,
        generation: u64,
    ) -> impl StoreFuture<()> {
        let this = self.clone();
        let (group, name, owner) = (group.to_owned(), name.to_owned(), owner.to_owned());
        async move {
            this.check()?;
            this.inner
                .release_lease(&group, &name, &owner, generation)
                .await
        }
    }
    fn held_leases(&self, group: &str) -> impl StoreFuture<Vec<HeldLease>> {
        let (this, group) = (self.clone(), group.to_owned());
        async move {
            this.check()?;
            this.inner.held_leases(&group).await
        }
    }
}

/// A worker's store refuses its lease and checkpoint calls (they fail at once) while its feed
/// still delivers: its partitions' work keeps retrying the batch in hand (a runner that retries
/// many times), handling its events again on each attempt. Once the worker stops its partitions
/// by its own clock (its leases may run out), its handler must run no more: a second worker may
/// take the partitions over, and a rebuild may drop the read model, meanwhile.
pub async fn group_worker_refused_by_its_store_stops_retrying_by_its_own_clock<
    S: StreamingStore,
>(
    store: S,
) {
    let (partitions, repo, log) = group_case(&store).await;
    let unreachable = Unreachable {
        inner: store.clone(),
        down: Arc::default(),
    };
    let runner = ProjectionRunner::with_config(
        unreachable.clone(),
        RunnerConfig {
            // Retries that outlast the lease many times over.
            max_attempts: 100_000,
            backoff: es_core::Backoff::new(Duration::from_millis(5), Duration::from_millis(50)),
            batch_size: 5,
            ..RunnerConfig::default()
        },
    );
    let a = {
        let (log, checkpoints) = (log.of("a"), unreachable.clone());
        runner.spawn_group(GroupConfig::new("a").lease_ttl(GROUP_TTL), move || {
            AtLeastOnce::new(log.clone(), checkpoints.clone())
        })
    };
    patiently(
        "a holds every partition",
        a.wait_owned(|owned| owned.len() == partitions),
    )
    .await;
    check_group_log(&store, &log).await;

    let handlings_by_a = || {
        lock(&log.handled)
            .iter()
            .filter(|h| h.worker == "a")
            .count()
    };
    let before = handlings_by_a();
    unreachable.down.store(true, Ordering::SeqCst);
    spawn_ledger_writer(&repo, 1).await.unwrap();
    until("a handles new events (and cannot record them)", || {
        handlings_by_a() > before
    })
    .await;
    let bound = GROUP_TTL * 2 + Duration::from_secs(1);
    let stopped = tokio::time::timeout(bound, a.wait_owned(<[u32]>::is_empty)).await;
    assert!(stopped.is_ok(), "a still runs {:?}", a.owned());
    // The stop reaches the work within one retry's backoff; generous for a loaded machine.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let at_stop = handlings_by_a();
    tokio::time::sleep(GROUP_TTL).await;
    let later = handlings_by_a();
    assert_eq!(
        later,
        at_stop,
        "a's handler ran {} more times after a stopped its partitions (its leases may have run \
         out)",
        later - at_stop
    );

    unreachable.down.store(false, Ordering::SeqCst);
    let b = group_worker(&store, "b", &log);
    until("a and b divide the partitions", || {
        let (oa, ob) = (a.owned(), b.owned());
        oa.len() + ob.len() == partitions && oa.iter().all(|p| !ob.contains(p))
    })
    .await;
    spawn_ledger_writer(&repo, 1).await.unwrap();
    check_group_log(&store, &log).await;
    a.shutdown().await;
    b.shutdown().await;
}

/// Three workers run a group while writers append; one is killed (its leases must run out) and
/// another rebuilds the projection: the whole group pauses, every partition's checkpoint starts
/// a new generation at 0, the read model is dropped, and the group resumes and replays. No work
/// runs while the model is dropped: after the drop every stream's events are handled from
/// version 1 in order (a stale work handling a later event first would break that), every event
/// is handled, and every partition's checkpoint is of a newer generation.
pub async fn group_rebuild_pauses_every_worker_and_replays<S: StreamingStore>(store: S) {
    let (partitions, repo, log) = group_case(&store).await;
    let a = group_worker(&store, "a", &log);
    let b = group_worker(&store, "b", &log);
    let c = group_worker(&store, "c", &log);
    until("the workers divide the partitions", || {
        let owned: Vec<Vec<u32>> = [&a, &b, &c].iter().map(|w| w.owned()).collect();
        let distinct: HashSet<&u32> = owned.iter().flatten().collect();
        owned.iter().map(Vec::len).sum::<usize>() == partitions && distinct.len() == partitions
    })
    .await;
    let writer = spawn_ledger_writer(&repo, 8);
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.kill();
    let mut before = Vec::new();
    for partition in 0..partitions as u32 {
        let name = partition_checkpoint("group-log", partition);
        before.push(store.load_checkpoint(&name).await.unwrap());
    }
    let started = Instant::now();
    b.rebuild().await.unwrap();
    eprintln!(
        "the group paused and dropped its read model {:?} after the rebuild began (lease \
         {GROUP_TTL:?})",
        started.elapsed()
    );
    writer.await.unwrap();
    check_group_log(&store, &log).await;
    for (partition, before) in before.iter().enumerate() {
        let name = partition_checkpoint("group-log", partition as u32);
        let now = store.load_checkpoint(&name).await.unwrap();
        assert!(
            now.generation > before.generation,
            "partition {partition}: {before:?} -> {now:?}"
        );
    }
    until("a and b run every partition again", || {
        a.owned().len() + b.owned().len() == partitions
    })
    .await;
    a.shutdown().await;
    b.shutdown().await;
}

/// A rebuild whose caller gives up while the pause waits (a worker was killed, its leases still
/// run): the group must not stay paused. The pause ends, the workers take every partition again,
/// and every event is handled, per stream in order.
pub async fn group_rebuild_dropped_midway_lets_the_group_resume<S: StreamingStore>(store: S) {
    let (partitions, repo, log) = group_case(&store).await;
    let a = group_worker(&store, "a", &log);
    let b = group_worker(&store, "b", &log);
    let c = group_worker(&store, "c", &log);
    until("the workers divide the partitions", || {
        let owned: Vec<Vec<u32>> = [&a, &b, &c].iter().map(|w| w.owned()).collect();
        let distinct: HashSet<&u32> = owned.iter().flatten().collect();
        owned.iter().map(Vec::len).sum::<usize>() == partitions && distinct.len() == partitions
    })
    .await;
    // Kill whoever runs partition 0: its leases run for most of a lease time yet, and the pause
    // waits for them.
    let mut workers = vec![a, b, c];
    let victim = workers
        .iter()
        .position(|w| w.owned().contains(&0))
        .expect("someone runs partition 0");
    workers.remove(victim).kill();
    let (b, a) = (workers.pop().unwrap(), workers.pop().unwrap());
    let gave_up = tokio::time::timeout(Duration::from_millis(100), b.rebuild()).await;
    assert!(gave_up.is_err(), "the rebuild was to be dropped mid-way");
    until("a and b run every partition again", || {
        a.owned().len() + b.owned().len() == partitions
    })
    .await;
    let held = store.held_leases("projection:group-log").await.unwrap();
    assert!(
        !held.iter().any(|l| l.name == "pause"),
        "the pause lease is still held: {held:?}"
    );
    spawn_ledger_writer(&repo, 2).await.unwrap();
    check_group_log(&store, &log).await;
    a.shutdown().await;
    b.shutdown().await;
}

/// Two workers rebuild at once: the pauses take turns (one waits for the other's to end), both
/// rebuilds succeed, the group resumes, and every event is handled, per stream in order, with
/// every partition's checkpoint of a newer generation.
pub async fn group_two_rebuilds_at_once_take_turns<S: StreamingStore>(store: S) {
    let (partitions, repo, log) = group_case(&store).await;
    let a = group_worker(&store, "a", &log);
    let b = group_worker(&store, "b", &log);
    until("a and b divide the partitions", || {
        a.owned().len() + b.owned().len() == partitions
    })
    .await;
    let writer = spawn_ledger_writer(&repo, 4);
    let mut before = Vec::new();
    for partition in 0..partitions as u32 {
        let name = partition_checkpoint("group-log", partition);
        before.push(store.load_checkpoint(&name).await.unwrap());
    }
    let (ra, rb) = tokio::join!(a.rebuild(), b.rebuild());
    ra.expect("a's rebuild");
    rb.expect("b's rebuild");
    writer.await.unwrap();
    check_group_log(&store, &log).await;
    for (partition, before) in before.iter().enumerate() {
        let name = partition_checkpoint("group-log", partition as u32);
        let now = store.load_checkpoint(&name).await.unwrap();
        assert!(
            now.generation > before.generation,
            "partition {partition}: {before:?} -> {now:?}"
        );
    }
    until("a and b run every partition again", || {
        a.owned().len() + b.owned().len() == partitions
    })
    .await;
    a.shutdown().await;
    b.shutdown().await;
}

/// The group-log read model whose drop takes three lease times, and checks meanwhile that the
/// group stays paused.
#[derive(Clone)]
struct SlowDrop {
    log: GroupLog,
    /// Set while the drop runs.
    dropping: Arc<AtomicBool>,
    /// Handlings that began while the drop ran.
    ran_while_dropping: Arc<AtomicUsize>,
}

impl Projection for SlowDrop {
    fn name(&self) -> &'static str {
        "group-log"
    }

    fn filter(&self) -> EventFilter {
        self.log.filter()
    }

    async fn handle(&mut self, event: &RecordedEvent) -> Result<(), HandlerError> {
        if self.dropping.load(Ordering::SeqCst) {
            self.ran_while_dropping.fetch_add(1, Ordering::SeqCst);
        }
        self.log.handle(event).await
    }

    async fn reset(&mut self) -> Result<(), HandlerError> {
        self.dropping.store(true, Ordering::SeqCst);
        tokio::time::sleep(GROUP_TTL * 3).await;
        let result = self.log.reset().await;
        self.dropping.store(false, Ordering::SeqCst);
        result
    }
}

/// A rebuild whose read-model drop takes three lease times: the pause lease is kept while it
/// runs, so no worker takes a partition and no handler runs until the drop is over; then the
/// group replays every event, per stream in order.
pub async fn group_rebuild_slower_than_the_lease_keeps_the_group_paused<S: StreamingStore>(
    store: S,
) {
    let (partitions, repo, log) = group_case(&store).await;
    let dropping = Arc::new(AtomicBool::new(false));
    let ran_while_dropping = Arc::new(AtomicUsize::new(0));
    let worker = |name: &'static str| {
        let model = SlowDrop {
            log: log.of(name),
            dropping: Arc::clone(&dropping),
            ran_while_dropping: Arc::clone(&ran_while_dropping),
        };
        let checkpoints = store.clone();
        group_runner(&store).spawn_group(GroupConfig::new(name).lease_ttl(GROUP_TTL), move || {
            AtLeastOnce::new(model.clone(), checkpoints.clone())
        })
    };
    let (a, b) = (worker("a"), worker("b"));
    until("a and b divide the partitions", || {
        a.owned().len() + b.owned().len() == partitions
    })
    .await;
    let writer = spawn_ledger_writer(&repo, 4);
    let watch = {
        let (store, dropping) = (store.clone(), Arc::clone(&dropping));
        tokio::spawn(async move {
            let mut checked = 0;
            loop {
                if dropping.load(Ordering::SeqCst) {
                    let held = store.held_leases("projection:group-log").await.unwrap();
                    if dropping.load(Ordering::SeqCst) {
                        assert!(
                            !held.iter().any(|l| l.name.starts_with("partition:")),
                            "a partition lease is held while the read model is dropped: \
                             {held:?}"
                        );
                        assert!(
                            held.iter().any(|l| l.name == "pause"),
                            "the pause lease ran out while the read model is dropped"
                        );
                        checked += 1;
                    }
                }
                if checked > 0 && !dropping.load(Ordering::SeqCst) {
                    return checked;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    a.rebuild().await.expect("the rebuild");
    let checked = patiently("the watch ends", watch).await.unwrap();
    assert!(checked > 10, "the group was checked {checked} times only");
    assert_eq!(
        ran_while_dropping.load(Ordering::SeqCst),
        0,
        "handlers ran while the read model was being dropped"
    );
    writer.await.unwrap();
    check_group_log(&store, &log).await;
    a.shutdown().await;
    b.shutdown().await;
}

/// The leases of one worker whose partition-lease calls wait at a gate the test opens: the
/// worker lists the group, then stalls before it takes a partition.
#[derive(Clone)]
struct GatedLeases<S> {
    inner: S,
    open: watch::Sender<bool>,
}

impl<S: LeaseStore> LeaseStore for GatedLeases<S> {
    fn acquire_lease(
        &self,
        group: &str,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> impl StoreFuture<Option<u64>> {
        let (this, group, name, owner) = (
            self.clone(),
            group.to_owned(),
            name.to_owned(),
            owner.to_owned(),
        );
        async move {
            if name.starts_with("partition:") {
                let mut open = this.open.subscribe();
                let _ = open.wait_for(|o| *o).await;
            }
            this.inner.acquire_lease(&group, &name, &owner, ttl).await
        }
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

/// A worker lists the group's leases before a pause begins and takes its partitions only after
/// the pause found none held (its partition-lease calls stall at a gate meanwhile): it must not
/// start work while the group is paused, and it takes its share once the pause ends.
pub async fn group_pause_holds_back_a_worker_that_took_partitions_late<S: StreamingStore>(
    store: S,
) {
    let partitions = 4;
    let config = |name: &str| GroupConfig::new(name).lease_ttl(GROUP_TTL);
    let started = Arc::new(AtomicUsize::new(0));
    let work = |started: Arc<AtomicUsize>| {
        move |mut claim: es_core::group::Claim| {
            started.fetch_add(1, Ordering::SeqCst);
            async move { claim.stopped().await }
        }
    };
    let group = format!("pause-{}", Uuid::now_v7().simple());
    let p = es_core::group::spawn_group(
        store.clone(),
        group.clone(),
        partitions,
        config("p"),
        work(Arc::new(AtomicUsize::new(0))),
    );
    patiently(
        "p holds every partition",
        p.wait_owned(|owned| owned.len() == partitions as usize),
    )
    .await;
    let gated = GatedLeases {
        inner: store.clone(),
        open: watch::channel(false).0,
    };
    let w = es_core::group::spawn_group(
        gated.clone(),
        group.clone(),
        partitions,
        config("w"),
        work(Arc::clone(&started)),
    );
    // w has joined and waits at the gate to take its share; p gives that share up.
    patiently(
        "p gives w's share up",
        p.wait_owned(|owned| owned.len() == partitions as usize / 2),
    )
    .await;
    let paused = p.pause().await.expect("the group pauses");
    assert!(p.owned().is_empty(), "p stopped its partitions");
    gated.open.send_replace(true);
    tokio::time::sleep(GROUP_TTL).await;
    assert!(
        w.owned().is_empty(),
        "w runs {:?} while the group is paused",
        w.owned()
    );
    assert_eq!(
        started.load(Ordering::SeqCst),
        0,
        "w started work while paused"
    );
    let held = store.held_leases(&group).await.unwrap();
    assert!(
        !held.iter().any(|l| l.name.starts_with("partition:")),
        "partition leases held while paused: {held:?}"
    );
    drop(paused);
    until("p and w take their shares again", || {
        p.owned().len() + w.owned().len() == partitions as usize && !w.owned().is_empty()
    })
    .await;
    p.shutdown().await;
    w.shutdown().await;
}

/// Two workers given the same member name by mistake are still two members: they divide the
/// partitions (on a store with several) instead of both running all of them, and every event is
/// handled, per stream in order.
pub async fn group_workers_sharing_a_name_divide_the_partitions<S: StreamingStore>(store: S) {
    let (partitions, repo, log) = group_case(&store).await;
    let first = group_worker(&store, "twin", &log);
    let second = group_worker(&store, "twin", &log);
    until("the twins divide the partitions", || {
        let (o1, o2) = (first.owned(), second.owned());
        o1.len() + o2.len() == partitions
            && (partitions < 2 || (!o1.is_empty() && !o2.is_empty()))
            && o1.iter().all(|p| !o2.contains(p))
    })
    .await;
    let members = store
        // The group of the group-log projection.
        .held_leases("projection:group-log")
        .await
        .unwrap()
        .into_iter()
        .filter(|l| l.name.starts_with("member:twin"))
        .count();
    assert_eq!(members, 2, "each twin holds a membership lease of its own");
    // Neither ever takes a partition the other runs while both run.
    let writer = spawn_ledger_writer(&repo, 4);
    while !writer.is_finished() {
        let (o1, o2) = (first.owned(), second.owned());
        assert!(
            o1.iter().all(|p| !o2.contains(p)),
            "both twins run a partition: {o1:?} and {o2:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    writer.await.unwrap();
    check_group_log(&store, &log).await;
    first.shutdown().await;
    second.shutdown().await;
}

/// Two workers of the relay group of a store divide its outboxes; the one publishing an outbox
/// is killed while records are appended: the other takes it over, every record is written, per
/// key in outbox order (last copies), and every outbox ends empty.
pub async fn relay_group_worker_killed_hands_its_outboxes_over<S: StreamingStore>(store: S) {
    let outboxes: Vec<S> = (0..store.outbox_partitions())
        .map(|p| store.outbox_partition(p).expect("an outbox"))
        .collect();
    let broker = RecordingPublisher::default();
    let config = |owner: &str| relay_config(owner, GROUP_TTL);
    let group = |name: &'static str| GroupConfig::new(name).lease_ttl(GROUP_TTL);
    let a = Relay::spawn_group(
        store.clone(),
        broker.for_relay("a"),
        config("a"),
        group("a"),
    );
    let b = Relay::spawn_group(
        store.clone(),
        broker.for_relay("b"),
        config("b"),
        group("b"),
    );
    until("a and b divide the outboxes", || {
        a.owned().len() + b.owned().len() == outboxes.len()
    })
    .await;
    let append = |range: std::ops::Range<u64>| {
        let store = store.clone();
        async move {
            for i in range {
                let s = stream(&format!("ledger-r{}", i % 6));
                store
                    .append(append_with_outbox(&s, ExpectedVersion::Any, i * 10, 2))
                    .await
                    .unwrap();
            }
        }
    };
    append(0..10).await;
    // Kill whoever publishes outbox 0, mid-stream.
    let (victim, survivor) = if a.owned().contains(&0) {
        (a, b)
    } else {
        (b, a)
    };
    victim.kill();
    append(10..30).await;
    patiently(
        "survivor holds every partition",
        survivor.wait_owned(|owned| owned.len() == outboxes.len()),
    )
    .await;
    for outbox in &outboxes {
        drained(outbox, "the survivor drains every outbox").await;
    }
    let received = lock(&broker.received).clone();
    let written: HashSet<u64> = received.iter().map(|(_, r)| n_of(r)).collect();
    let expected: HashSet<u64> = (0..30u64).flat_map(|i| [i * 10, i * 10 + 1]).collect();
    assert_eq!(written, expected, "every record was written");
    for (key, positions) in positions_by_key(&received) {
        let last = last_appearances(&positions);
        let mut sorted = last.clone();
        sorted.sort_unstable();
        assert_eq!(
            last, sorted,
            "{key}: last copies in outbox order ({positions:?})"
        );
    }
    survivor.shutdown().await;
}
