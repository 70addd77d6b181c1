//! Conformance cases for streaming out: the transactional outbox, the relay lease, projection
//! checkpoints and the projection runner, on a backend's [`StreamingStore`].
//!
//! Stamped onto a backend with [`streaming_conformance_tests!`](crate::streaming_conformance_tests),
//! like the core suite.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use super::domain::{Ledger, LedgerCommand, LedgerEvent};
use crate::event::{DomainEvent, EventSchema, Metadata, NewEvent, PayloadError, RecordedEvent};
use crate::outbox::{
    OutboxMessage, OutboxRecord, Publisher, Relay, RelayConfig, RelayStep, Translator,
};
use crate::projection::{
    AtLeastOnce, HandlerError, Projection, ProjectionRunner, ProjectionStatus, RunnerConfig,
};
use crate::repository::Repository;
use crate::store::{
    AppendLimits, AppendRequest, EventFilter, ExpectedVersion, StoreError, StreamingStore,
};
use crate::stream_id::StreamId;

const PATIENCE: Duration = Duration::from_secs(60);

/// Stamps every streaming case onto a backend as a named `#[tokio::test]`; the factory returns a
/// fresh, empty [`StreamingStore`].
#[macro_export]
macro_rules! streaming_conformance_tests {
    ($factory:expr) => {
        $crate::__streaming_cases!($factory;
            outbox_is_written_with_the_events,
            outbox_is_not_written_by_rejected_appends,
            outbox_keeps_commit_order_and_delivery_marks,
            relay_lease_has_one_owner,
            relay_publishes_everything_in_order,
            competing_relays_take_over,
            checkpoints_only_move_forward,
            projection_catches_up_and_resumes,
            projection_rebuild_gives_identical_results,
            poisoned_event_stops_the_projection,
            repository_translates_into_the_outbox,
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __streaming_cases {
    ($factory:expr; $($case:ident),+ $(,)?) => {
        $(
            #[$crate::__private::tokio::test(flavor = "multi_thread", worker_threads = 4, crate = "::es_core::__private::tokio")]
            async fn $case() {
                let store = ($factory)().await;
                $crate::testing::streaming::$case(store).await;
            }
        )+
    };
}

fn stream(name: &str) -> StreamId {
    StreamId::parse(name).expect("valid test stream id")
}

fn message(n: u64, source: Uuid) -> OutboxMessage {
    OutboxMessage {
        message_id: Uuid::now_v7(),
        source_event_id: source,
        topic: "ledger.public".into(),
        key: "ledger-1".into(),
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
        .map(|(e, i)| message(i, e.event_id))
        .collect();
    AppendRequest::new(s.clone(), expected, events).with_outbox(outbox)
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
        .with_outbox(vec![message(9, Uuid::now_v7())]);
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
    let delivered: Vec<u64> = pending[..5].iter().map(|r| r.position).collect();
    store.mark_delivered(&delivered).await.unwrap();
    store.mark_delivered(&delivered).await.unwrap();
    let rest = store.pending_outbox(100).await.unwrap();
    assert_eq!(
        rest.iter().map(n_of).collect::<Vec<_>>(),
        vec![21, 30, 31, 40, 41, 50, 51]
    );
    assert_eq!(store.outbox_len().await.unwrap(), 7);
    store.mark_delivered(&[]).await.unwrap();
}

/// One owner at a time; renewals keep it; release or expiry hands it over.
pub async fn relay_lease_has_one_owner<S: StreamingStore>(store: S) {
    let long = Duration::from_secs(30);
    assert!(store.acquire_relay_lease("a", long).await.unwrap());
    assert!(!store.acquire_relay_lease("b", long).await.unwrap());
    assert!(
        store.acquire_relay_lease("a", long).await.unwrap(),
        "renewal"
    );
    store.release_relay_lease("b").await.unwrap();
    assert!(
        !store.acquire_relay_lease("b", long).await.unwrap(),
        "only the owner releases"
    );
    store.release_relay_lease("a").await.unwrap();
    assert!(store
        .acquire_relay_lease("b", Duration::from_millis(300))
        .await
        .unwrap());
    assert!(!store.acquire_relay_lease("a", long).await.unwrap());
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        store.acquire_relay_lease("a", long).await.unwrap(),
        "an expired lease is taken over"
    );
    assert!(!store.acquire_relay_lease("b", long).await.unwrap());
}

/// An in-process broker for relay tests: records what was acknowledged, can refuse batches,
/// and counts overlapping publish calls.
#[derive(Clone, Default)]
pub struct RecordingPublisher {
    /// Records acknowledged, in order, with the relay that sent them.
    pub received: Arc<Mutex<Vec<(String, OutboxRecord)>>>,
    /// Batches to refuse before accepting again.
    pub fail_next: Arc<AtomicU32>,
    /// Publish calls in progress now, and the most seen at once.
    pub in_flight: Arc<AtomicUsize>,
    /// Most publish calls seen in progress at once.
    pub max_in_flight: Arc<AtomicUsize>,
    /// Which relay this handle stands for.
    pub relay: String,
    /// Pause inside every publish call.
    pub delay: Duration,
}

impl RecordingPublisher {
    /// A handle of the same broker for another relay.
    pub fn for_relay(&self, relay: &str) -> Self {
        Self {
            relay: relay.to_owned(),
            ..self.clone()
        }
    }
}

impl Publisher for RecordingPublisher {
    async fn publish(&self, records: &[OutboxRecord]) -> Result<(), HandlerError> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        let refused = self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if !refused {
            let mut received = self.received.lock().expect("publisher lock");
            received.extend(records.iter().map(|r| (self.relay.clone(), r.clone())));
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        if refused {
            Err("broker unavailable".into())
        } else {
            Ok(())
        }
    }
}

fn relay_config(owner: &str, ttl: Duration) -> RelayConfig {
    RelayConfig {
        owner: owner.to_owned(),
        lease_ttl: ttl,
        batch_size: 7,
        idle_poll: Duration::from_millis(50),
        max_backoff: Duration::from_millis(100),
    }
}

/// A relay publishes every record once per acknowledged batch, in order, retrying refusals.
pub async fn relay_publishes_everything_in_order<S: StreamingStore>(store: S) {
    for i in 0..10u64 {
        let s = stream(&format!("ledger-{}", i % 3));
        store
            .append(append_with_outbox(&s, ExpectedVersion::Any, i * 10, 3))
            .await
            .unwrap();
    }
    let broker = RecordingPublisher {
        fail_next: Arc::new(AtomicU32::new(2)),
        ..RecordingPublisher::default()
    };
    let relay = Relay::new(
        store.clone(),
        broker.clone(),
        relay_config("r1", Duration::from_secs(30)),
    );
    let mut steps = Vec::new();
    loop {
        let step = relay.step().await.unwrap();
        steps.push(step);
        if step == RelayStep::Idle {
            break;
        }
        assert!(steps.len() < 50, "the relay makes progress: {steps:?}");
    }
    assert_eq!(
        steps
            .iter()
            .filter(|s| **s == RelayStep::PublishFailed)
            .count(),
        2
    );
    let received = broker.received.lock().unwrap().clone();
    let sent: Vec<u64> = received.iter().map(|(_, r)| n_of(r)).collect();
    let expected: Vec<u64> = (0..10u64).flat_map(|i| i * 10..i * 10 + 3).collect();
    assert_eq!(sent, expected, "every record once, in outbox order");
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
    patiently("relay a delivers", async {
        while store.outbox_len().await.unwrap() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
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
    patiently("relay b takes over", async {
        while store.outbox_len().await.unwrap() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let _ = stop_b.send(());
    patiently("relay b shuts down", b).await.unwrap().unwrap();
    assert_eq!(
        broker.max_in_flight.load(Ordering::SeqCst),
        1,
        "one relay publishes at a time"
    );
    let received = broker.received.lock().unwrap().clone();
    let by = |relay: &str| received.iter().filter(|(r, _)| r == relay).count();
    assert!(
        by("a") > 0 && by("b") > 0,
        "a published {}, b published {}",
        by("a"),
        by("b")
    );
    let mut ids = HashMap::new();
    for (_, r) in &received {
        *ids.entry(r.message.message_id).or_insert(0) += 1;
    }
    assert_eq!(ids.len(), 60, "every message was published");
    // Per stream, the first delivery of each message follows outbox order.
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut seen = std::collections::HashSet::new();
    for (_, r) in &received {
        if seen.insert(r.message.message_id) {
            let prev = last.insert(r.stream_id.to_string(), r.position);
            assert!(prev.is_none_or(|p| p < r.position), "per-stream order");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Checkpoints and projections

/// A checkpoint never moves back; a reset removes it; names are independent.
pub async fn checkpoints_only_move_forward<S: StreamingStore>(store: S) {
    assert_eq!(store.load_checkpoint("balances").await.unwrap(), 0);
    assert!(store.save_checkpoint("balances", 10).await.unwrap());
    assert!(!store.save_checkpoint("balances", 5).await.unwrap());
    assert!(!store.save_checkpoint("balances", 10).await.unwrap());
    assert_eq!(store.load_checkpoint("balances").await.unwrap(), 10);
    assert!(store.save_checkpoint("balances", 11).await.unwrap());
    assert_eq!(store.load_checkpoint("audit").await.unwrap(), 0);
    store.reset_checkpoint("balances").await.unwrap();
    assert_eq!(store.load_checkpoint("balances").await.unwrap(), 0);
    assert!(store.save_checkpoint("balances", 3).await.unwrap());
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
    assert!(store.load_checkpoint("balances").await.unwrap() >= live);
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
            backoff: Duration::from_millis(5),
            batch_size: 1000,
        },
    );
    let handle = runner.spawn(AtLeastOnce::new(projection.clone(), store.clone()));
    let status = patiently("the projection stops", handle.wait_for(after.positions[0])).await;
    let ProjectionStatus::Failed(failure) = status else {
        panic!("expected the projection to fail, got {status:?}");
    };
    assert_eq!(failure.position, Some(poison_position));
    let event_id = poisoned.event_ids[0].to_string();
    for part in [
        event_id.as_str(),
        "ledger-x",
        "Credited",
        "balances",
        "cannot handle",
    ] {
        assert!(
            failure.message.contains(part),
            "the error names {part}: {}",
            failure.message
        );
    }
    assert_eq!(
        projection.balances.lock().unwrap()["ledger-x"],
        expected_balance(3)
    );
    let handled = projection.handled.lock().unwrap().clone();
    assert!(!handled.contains_key(&poison_position) && !handled.contains_key(&after.positions[0]));
    assert!(store.load_checkpoint("balances").await.unwrap() < poison_position);
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
