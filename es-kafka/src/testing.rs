//! End-to-end cases against a real broker, written once over any [`StreamingStore`]: ledger
//! commands through a repository with a translator, the outbox, the [`Relay`] with a
//! [`KafkaPublisher`], the broker, and a consumer that checks every integration event arrived
//! exactly as translated, in per-stream order, with its headers.
//!
//! Each case takes a fresh store and a broker, creates a topic of its own (so cases can share a
//! broker) and panics with what went wrong. A backend runs them from its tests:
//!
//! ```no_run
//! # #[tokio::main]
//! # async fn main() {
//! use es_kafka::{testing, KafkaConfig};
//!
//! let config = KafkaConfig::new(es_test_support::kafka_brokers());
//! let store = es_memory::InMemoryStore::new(); // the backend's fresh store
//! let delivery = testing::relay_delivers_every_message_in_order(store, config).await;
//! assert!(delivery.duplicates.is_empty());
//! # }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use es_core::outbox::{PublishOutcome, RelayError};
use es_core::{
    AppendRequest, ExpectedVersion, Metadata, NewEvent, OutboxMessage, OutboxRecord, OutboxStore,
    Publisher, Relay, RelayConfig, Repository, StreamId, StreamingStore, Translator,
};
use es_test_support::{KafkaBroker, KafkaStorage};
use es_testkit::domain::{Ledger, LedgerCommand, LedgerEvent};
use es_testkit::streaming::{LedgerMessage, LedgerTranslator};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::{headers, ConsumedMessage, KafkaConfig, KafkaPublisher, TopicConsumer};

/// How long a case waits for anything before it fails.
pub const PATIENCE: Duration = Duration::from_secs(120);

/// Partitions of the topics the cases create.
pub const PARTITIONS: u32 = 3;

/// The integration events of [`LedgerTranslator`], sent to a topic of the caller's choosing.
#[derive(Debug, Clone)]
pub struct LedgerToTopic {
    /// Where the messages go.
    pub topic: String,
}

impl Translator<Ledger> for LedgerToTopic {
    type Message = LedgerMessage;

    fn topic(&self) -> &str {
        &self.topic
    }

    fn translate(&self, stream: &StreamId, event: &LedgerEvent) -> Vec<LedgerMessage> {
        LedgerTranslator.translate(stream, event)
    }
}

/// A topic name no other test uses.
pub fn unique_topic(prefix: &str) -> String {
    format!("{prefix}-{}", Uuid::now_v7().simple())
}

/// Creates a fresh topic and a repository over `store` that translates ledger events into it.
pub async fn setup<S: StreamingStore>(
    store: &S,
    config: &KafkaConfig,
    prefix: &str,
) -> (String, Repository<S>) {
    let topic = unique_topic(prefix);
    crate::ensure_topic(config, &topic, PARTITIONS)
        .await
        .unwrap_or_else(|e| panic!("cannot create topic {topic} on {}: {e}", config.brokers()));
    let repo = Repository::builder(store.clone())
        .translator::<Ledger, _>(LedgerToTopic {
            topic: topic.clone(),
        })
        .build()
        .expect("repository with the ledger translator");
    (topic, repo)
}

/// The integration events a run of commands must publish: per stream (the message key), the
/// source event id and amount of each, in order.
#[derive(Debug, Clone, Default)]
pub struct Expected {
    /// Per stream id: `(source event id, signed amount)` in stream order.
    pub streams: BTreeMap<String, Vec<(Uuid, i64)>>,
    /// The correlation id the commands carried.
    pub correlation_id: Option<Uuid>,
    /// The actor the commands carried.
    pub actor: Option<String>,
}

impl Expected {
    /// Number of messages.
    pub fn len(&self) -> usize {
        self.streams.values().map(Vec::len).sum()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Metadata the cases' commands carry, so the headers can be checked.
pub fn command_metadata() -> Metadata {
    Metadata::new()
        .with_correlation_id(Uuid::now_v7())
        .with_actor("kafka-e2e")
}

/// Runs ledger commands on each of `ledgers`, interleaved: opens them unless `open` is false,
/// then `rounds` credits each, with a debit every third round and a rejected debit (which must
/// publish nothing) in the first. Adds what must be published to `expected`.
pub async fn ledger_activity<S: StreamingStore>(
    repo: &Repository<S>,
    ledgers: &[String],
    rounds: std::ops::RangeInclusive<i64>,
    open: bool,
    metadata: &Metadata,
    expected: &mut Expected,
) {
    expected.correlation_id = metadata.correlation_id;
    expected.actor.clone_from(&metadata.actor);
    if open {
        for id in ledgers {
            repo.execute_with::<Ledger>(id, &LedgerCommand::Open, metadata)
                .await
                .unwrap_or_else(|e| panic!("open {id}: {e}"));
        }
    }
    let first = *rounds.start();
    for round in rounds {
        for id in ledgers {
            let mut commands = vec![LedgerCommand::Credit(round * 10)];
            if round % 3 == 0 {
                commands.push(LedgerCommand::Debit(round));
            }
            for command in commands {
                let done = repo
                    .execute_with::<Ledger>(id, &command, metadata)
                    .await
                    .unwrap_or_else(|e| panic!("{command:?} on {id}: {e}"));
                let delta = match command {
                    LedgerCommand::Credit(a) => a,
                    LedgerCommand::Debit(a) => -a,
                    _ => unreachable!("only credits and debits"),
                };
                expected
                    .streams
                    .entry(done.stream_id.to_string())
                    .or_default()
                    .push((done.event_ids[0], delta));
            }
            if round == first {
                let rejected = repo
                    .execute_with::<Ledger>(id, &LedgerCommand::Debit(i64::MAX), metadata)
                    .await;
                assert!(rejected.is_err(), "an uncovered debit is rejected");
            }
        }
    }
}

/// A message as read by some consumer, reduced to what the checks compare.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    /// Partition.
    pub partition: i32,
    /// Offset in the partition.
    pub offset: i64,
    /// The key as text.
    pub key: String,
    /// The value parsed as JSON.
    pub payload: Value,
    /// Headers by name.
    pub headers: BTreeMap<String, String>,
}

impl From<&ConsumedMessage> for Received {
    fn from(m: &ConsumedMessage) -> Self {
        Self {
            partition: m.partition,
            offset: m.offset,
            key: m.key_str().expect("a UTF-8 key").to_owned(),
            payload: m.json().expect("a JSON value"),
            headers: m
                .headers
                .iter()
                .map(|(k, v)| {
                    let v = v
                        .as_deref()
                        .map(String::from_utf8_lossy)
                        .unwrap_or_default();
                    (k.clone(), v.into_owned())
                })
                .collect(),
        }
    }
}

/// What a consumer received, once checked. `Display` gives a one-line summary.
#[derive(Debug, Clone, Default)]
pub struct Delivery {
    /// Messages read, duplicates included.
    pub messages: usize,
    /// Distinct message ids.
    pub distinct: usize,
    /// Message ids read more than once, with how often.
    pub duplicates: BTreeMap<Uuid, usize>,
}

impl std::fmt::Display for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let extra: usize = self.duplicates.values().map(|n| n - 1).sum();
        write!(
            f,
            "{} messages read, {} distinct, {} ids duplicated ({extra} extra copies)",
            self.messages,
            self.distinct,
            self.duplicates.len()
        )
    }
}

fn header<'a>(m: &'a Received, name: &str) -> &'a str {
    m.headers.get(name).map_or_else(
        || {
            panic!(
                "message at {}/{} lacks header `{name}`: {m:?}",
                m.partition, m.offset
            )
        },
        String::as_str,
    )
}

/// Checks `received` (in any order) against `expected`: every message arrived; taking each
/// `message_id`'s first appearance, each stream's messages are exactly the translated ones in
/// stream order with increasing outbox positions, all in one partition; every copy of a message
/// is identical; the headers say what the record said; nothing else is in the topic.
pub fn check_delivery(expected: &Expected, received: &[Received]) -> Delivery {
    let mut received = received.to_vec();
    received.sort_by_key(|m| (m.partition, m.offset));
    let mut copies: HashMap<Uuid, &Received> = HashMap::new();
    let mut delivery = Delivery {
        messages: received.len(),
        ..Delivery::default()
    };
    let mut firsts: BTreeMap<&str, Vec<&Received>> = BTreeMap::new();
    for m in &received {
        assert!(
            expected.streams.contains_key(&m.key),
            "a message nobody sent (key {}): {m:?}",
            m.key
        );
        let id: Uuid = header(m, headers::MESSAGE_ID)
            .parse()
            .expect("message_id is a UUID");
        if let Some(first) = copies.get(&id) {
            assert_eq!(
                (&first.key, &first.payload, &first.headers),
                (&m.key, &m.payload, &m.headers),
                "a duplicate of {id} differs from its first copy"
            );
            *delivery.duplicates.entry(id).or_insert(1) += 1;
            continue;
        }
        copies.insert(id, m);
        firsts.entry(m.key.as_str()).or_default().push(m);
    }
    delivery.distinct = copies.len();
    for (stream, wanted) in &expected.streams {
        let got = firsts.get(stream.as_str()).cloned().unwrap_or_default();
        let got_pairs: Vec<(Uuid, i64)> = got
            .iter()
            .map(|m| {
                let source = header(m, headers::SOURCE_EVENT_ID)
                    .parse()
                    .expect("source_event_id is a UUID");
                let delta = m.payload["delta"]
                    .as_i64()
                    .unwrap_or_else(|| panic!("payload without delta: {m:?}"));
                (source, delta)
            })
            .collect();
        assert_eq!(
            &got_pairs,
            wanted,
            "stream {stream}: messages (source event, delta) in first-delivery order; \
             {} expected, {} distinct received",
            wanted.len(),
            got.len()
        );
        let partitions: std::collections::BTreeSet<i32> = got.iter().map(|m| m.partition).collect();
        assert!(
            partitions.len() <= 1,
            "stream {stream} spans partitions {partitions:?}"
        );
        let positions: Vec<u64> = got
            .iter()
            .map(|m| {
                header(m, headers::OUTBOX_POSITION)
                    .parse()
                    .expect("a number")
            })
            .collect();
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "stream {stream}: outbox positions increase: {positions:?}"
        );
        for m in got {
            check_headers(expected, stream, m);
        }
    }
    delivery
}

fn check_headers(expected: &Expected, stream: &str, m: &Received) {
    assert_eq!(header(m, headers::MESSAGE_TYPE), "ledger.moved");
    assert_eq!(header(m, headers::SCHEMA_VERSION), "3");
    assert_eq!(header(m, headers::STREAM_ID), stream);
    assert_eq!(header(m, headers::CONTENT_TYPE), "application/json");
    assert_eq!(
        header(m, headers::CAUSATION_ID),
        header(m, headers::SOURCE_EVENT_ID),
        "the repository makes the source event the cause"
    );
    if let Some(correlation) = expected.correlation_id {
        assert_eq!(header(m, headers::CORRELATION_ID), correlation.to_string());
    }
    if let Some(actor) = &expected.actor {
        assert_eq!(header(m, headers::ACTOR), actor);
    }
    let recorded_at = header(m, headers::RECORDED_AT);
    assert!(
        chrono::DateTime::parse_from_rfc3339(recorded_at).is_ok(),
        "recorded_at is RFC 3339: {recorded_at}"
    );
}

/// A relay running in a task.
#[derive(Debug)]
pub struct RunningRelay {
    stop: tokio::sync::oneshot::Sender<()>,
    task: JoinHandle<Result<(), RelayError>>,
}

impl RunningRelay {
    /// Spawns `Relay::new(store, publisher, config).run(..)`.
    pub fn spawn<S: StreamingStore, P: Publisher>(
        store: S,
        publisher: P,
        config: RelayConfig,
    ) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(Relay::new(store, publisher, config).run(async move {
            let _ = stopped.await;
        }));
        Self { stop, task }
    }

    /// Asks it to stop and waits; it must stop cleanly.
    pub async fn shutdown(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("the relay stops")
            .expect("the relay task did not panic")
            .expect("the relay stopped without error");
    }

    /// Kills the task where it is, as a crash would: no lease release, nothing marked.
    pub async fn abort(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// A relay configuration for the cases: small batches, short pauses, a publish time-out of three
/// quarters of the lease.
pub fn relay_config(owner: &str, batch_size: u64, lease_ttl: Duration) -> RelayConfig {
    RelayConfig {
        owner: owner.to_owned(),
        lease_ttl,
        publish_timeout: lease_ttl * 3 / 4,
        batch_size,
        max_in_flight: 4,
        idle_poll: Duration::from_millis(50),
        backoff: es_core::Backoff::new(Duration::from_millis(50), Duration::from_millis(300)),
        ..RelayConfig::default()
    }
}

/// Waits until the outbox is empty.
pub async fn drain<S: OutboxStore>(store: &S, what: &str) {
    let start = Instant::now();
    loop {
        let left = store.outbox_len().await.expect("outbox length");
        if left == 0 {
            return;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "{what}: {left} outbox records still pending after {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads `topic` as a member of a new consumer group until `expected` distinct messages came.
pub async fn consume_all(config: &KafkaConfig, topic: &str, expected: usize) -> Vec<Received> {
    let group = format!("check-{}", Uuid::now_v7().simple());
    let consumer = TopicConsumer::subscribe(config, topic, &group).expect("a consumer");
    let mut ids = std::collections::HashSet::new();
    let messages = consumer
        .recv_until(PATIENCE, |got| {
            if let Some(id) = got.last().and_then(ConsumedMessage::message_id) {
                ids.insert(id);
            }
            ids.len() >= expected
        })
        .await
        .expect("consuming");
    assert!(
        ids.len() >= expected,
        "only {} of {expected} messages arrived in {topic} within {PATIENCE:?}",
        ids.len()
    );
    messages.iter().map(Received::from).collect()
}

/// Reads the whole of `topic` now (no group).
pub async fn read_all(config: &KafkaConfig, topic: &str) -> Vec<Received> {
    crate::read_topic(config, topic, PATIENCE)
        .await
        .unwrap_or_else(|e| panic!("reading {topic}: {e}"))
        .iter()
        .map(Received::from)
        .collect()
}

/// Appends `n` events to one stream (`ledger-k`), each with one outbox message to `topic`: the
/// outbox then holds `n` records of one key, which are returned in outbox order.
pub async fn one_key_outbox<S: StreamingStore>(
    store: &S,
    topic: &str,
    n: u64,
) -> Vec<OutboxRecord> {
    let stream = StreamId::new("ledger", "k").expect("a stream id");
    for i in 0..n {
        let event = NewEvent::from_value("Credited", 1, &json!({ "n": i }));
        let message = OutboxMessage {
            message_id: Uuid::now_v7(),
            source_event_id: event.event_id,
            topic: topic.to_owned(),
            key: stream.to_string(),
            message_type: "ledger.credited".into(),
            schema_version: 1,
            payload: json!({ "n": i }).to_string().into(),
            metadata: Metadata::new(),
        };
        store
            .append(
                AppendRequest::new(stream.clone(), ExpectedVersion::Any, vec![event])
                    .with_outbox(vec![message]),
            )
            .await
            .unwrap_or_else(|e| panic!("append with an outbox message: {e}"));
    }
    store.pending_outbox(n).await.expect("the outbox")
}

/// The outbox positions of `received` (in topic order), each at its first copy only.
pub fn first_positions(received: &[Received]) -> Vec<u64> {
    let mut seen = std::collections::HashSet::new();
    received
        .iter()
        .map(|m| {
            header(m, headers::OUTBOX_POSITION)
                .parse::<u64>()
                .expect("outbox_position is a number")
        })
        .filter(|p| seen.insert(*p))
        .collect()
}

/// Wraps a publisher: counts calls, failures and acknowledged batches, remembers the message
/// ids of each acknowledged batch, and pauses after each acknowledgement (before the relay can
/// mark the batch delivered), which is where a crash costs the most. Clones share the counters.
/// The pause is part of the publish call, so keep it below the relay's publish time-out.
pub struct Instrumented<P> {
    inner: Arc<P>,
    /// Pause after an acknowledged batch.
    pub pause_after_ack: Duration,
    /// Publish calls.
    pub calls: Arc<AtomicUsize>,
    /// Publish calls in which some record was not acknowledged.
    pub failures: Arc<AtomicUsize>,
    /// Message ids of each acknowledged batch, in order.
    pub acked: Arc<Mutex<Vec<Vec<Uuid>>>>,
}

impl<P> Clone for Instrumented<P> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
            pause_after_ack: self.pause_after_ack,
            calls: Arc::clone(&self.calls),
            failures: Arc::clone(&self.failures),
            acked: Arc::clone(&self.acked),
        }
    }
}

impl<P> Instrumented<P> {
    /// Wraps `inner`.
    pub fn new(inner: P, pause_after_ack: Duration) -> Self {
        Self {
            inner: Arc::new(inner),
            pause_after_ack,
            calls: Arc::default(),
            failures: Arc::default(),
            acked: Arc::default(),
        }
    }

    /// Batches acknowledged so far.
    pub fn acked_batches(&self) -> usize {
        self.acked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl<P: Publisher> Publisher for Instrumented<P> {
    type Error = P::Error;

    fn check(&self, record: &OutboxRecord) -> Result<(), P::Error> {
        self.inner.check(record)
    }

    async fn publish(&self, records: &[OutboxRecord]) -> Vec<PublishOutcome<P::Error>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let result = self.inner.publish(records).await;
        if result.iter().all(PublishOutcome::is_acknowledged) {
            let ids = records.iter().map(|r| r.message.message_id).collect();
            self.acked
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(ids);
            tokio::time::sleep(self.pause_after_ack).await;
        } else {
            self.failures.fetch_add(1, Ordering::SeqCst);
        }
        result
    }
}

fn ledgers(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

fn publisher(config: &KafkaConfig) -> KafkaPublisher {
    KafkaPublisher::new(config.clone()).expect("a Kafka producer")
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < PATIENCE,
            "timed out after {PATIENCE:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The cases

/// Commands before and while the relay runs; the crate's consumer (a consumer-group member)
/// reads every integration event exactly as translated, per stream in order, with its headers,
/// and no duplicates in a run without faults.
pub async fn relay_delivers_every_message_in_order<S: StreamingStore>(
    store: S,
    config: KafkaConfig,
) -> Delivery {
    let (topic, repo) = setup(&store, &config, "e2e").await;
    let metadata = command_metadata();
    let ids = ledgers("acct", 6);
    let mut expected = Expected::default();
    ledger_activity(&repo, &ids, 1..=5, true, &metadata, &mut expected).await;
    let relay = RunningRelay::spawn(
        store.clone(),
        publisher(&config),
        relay_config("e2e", 50, Duration::from_secs(10)),
    );
    // Live: appended while the relay runs.
    ledger_activity(&repo, &ids, 6..=10, false, &metadata, &mut expected).await;
    drain(&store, "relay").await;
    let received = consume_all(&config, &topic, expected.len()).await;
    let delivery = check_delivery(&expected, &received);
    assert_eq!(delivery.distinct, expected.len());
    assert!(
        delivery.duplicates.is_empty(),
        "no duplicates without faults: {:?}",
        delivery.duplicates
    );
    relay.shutdown().await;
    delivery
}

/// The script an outside client runs (kafka-python).
pub const READ_TOPIC_PY: &str = include_str!("testing/read_topic.py");

/// The Python interpreter for the outside-client case: `$PYTHON`, else `python3`.
pub fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

/// Reads `topic` with kafka-python in a [`python`] child process until `expected` distinct
/// messages came. Panics saying what to install when Python or kafka-python is missing.
pub fn read_with_kafka_python(config: &KafkaConfig, topic: &str, expected: usize) -> Vec<Received> {
    let python = python();
    let probe = Command::new(&python).args(["-c", "import kafka"]).output();
    match probe {
        Err(e) => panic!(
            "`{python}` is needed for the outside-client test ({e}): install python3, or point \
             $PYTHON at an interpreter"
        ),
        Ok(out) if !out.status.success() => panic!(
            "kafka-python is needed for the outside-client test: `{python} -m pip install \
             kafka-python` (or run .ci/run)\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Ok(_) => {}
    }
    let group = format!("python-{}", Uuid::now_v7().simple());
    let out = Command::new(&python)
        .args(["-c", READ_TOPIC_PY, config.brokers(), topic, &group])
        .arg(expected.to_string())
        .arg(PATIENCE.as_secs().to_string())
        .output()
        .unwrap_or_else(|e| panic!("run {python}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the kafka-python reader failed ({}):\n{}\n{stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).expect("a JSON line");
            Received {
                partition: v["partition"].as_i64().expect("partition") as i32,
                offset: v["offset"].as_i64().expect("offset"),
                key: v["key"].as_str().expect("a key").to_owned(),
                payload: serde_json::from_str(v["value"].as_str().expect("a value"))
                    .expect("a JSON value"),
                headers: serde_json::from_value(v["headers"].clone()).expect("headers"),
            }
        })
        .collect()
}

/// The same topic read by an outside client (kafka-python): every message, as translated, in
/// per-stream order, with the headers.
pub async fn outside_client_reads_every_message<S: StreamingStore>(
    store: S,
    config: KafkaConfig,
) -> Delivery {
    let (topic, repo) = setup(&store, &config, "python").await;
    let metadata = command_metadata();
    let mut expected = Expected::default();
    ledger_activity(
        &repo,
        &ledgers("py", 4),
        1..=6,
        true,
        &metadata,
        &mut expected,
    )
    .await;
    let relay = RunningRelay::spawn(
        store.clone(),
        publisher(&config),
        relay_config("python", 20, Duration::from_secs(10)),
    );
    drain(&store, "relay").await;
    relay.shutdown().await;
    let n = expected.len();
    let received = {
        let config = config.clone();
        let topic = topic.clone();
        tokio::task::spawn_blocking(move || read_with_kafka_python(&config, &topic, n))
            .await
            .expect("the reader thread")
    };
    let delivery = check_delivery(&expected, &received);
    assert_eq!(delivery.distinct, n);
    assert!(delivery.duplicates.is_empty(), "{:?}", delivery.duplicates);
    delivery
}

/// Relays killed mid-batch: first right after the broker acknowledged a batch and before the
/// relay marked it (its whole batch is published again by the relay that takes over, after the
/// lease expires), then several times at arbitrary moments. Every message arrives; duplicates
/// are only whole re-sent batches, identical, and detectable by `message_id`.
pub async fn relay_killed_mid_batch_loses_nothing<S: StreamingStore>(
    store: S,
    config: KafkaConfig,
) -> Delivery {
    const BATCH: u64 = 40;
    let (topic, repo) = setup(&store, &config, "abort").await;
    let metadata = command_metadata();
    let mut expected = Expected::default();
    ledger_activity(
        &repo,
        &ledgers("k", 8),
        1..=30,
        true,
        &metadata,
        &mut expected,
    )
    .await;
    let total = expected.len();

    // 1. Killed between acknowledgement and marking.
    let lease = Duration::from_secs(3);
    let slow = Instrumented::new(publisher(&config), Duration::from_secs(1));
    // One batch in flight, so that the kill lands between the third batch's acknowledgement and
    // its mark, after the first two were marked.
    let a = RunningRelay::spawn(
        store.clone(),
        slow.clone(),
        RelayConfig {
            max_in_flight: 1,
            ..relay_config("a", BATCH, lease)
        },
    );
    wait_until("three batches acknowledged", || slow.acked_batches() >= 3).await;
    a.abort().await;
    let unmarked = slow.acked.lock().unwrap_or_else(PoisonError::into_inner)[2].clone();
    let pending = store.outbox_len().await.unwrap();
    assert_eq!(
        pending,
        total as u64 - 2 * BATCH,
        "two batches were marked, the third was not"
    );

    // 2. Once `a`'s lease has expired: restarted relays (same owner, so each takes the lease at
    //    once), killed at arbitrary moments: while sending, waiting for acknowledgements, or
    //    pausing.
    tokio::time::sleep(lease).await;
    let mut noise = Uuid::new_v4().as_u128();
    for round in 0..4 {
        let flaky = Instrumented::new(publisher(&config), Duration::from_millis(50));
        let relay = RunningRelay::spawn(
            store.clone(),
            flaky.clone(),
            relay_config("b", BATCH, Duration::from_secs(2)),
        );
        let after = Duration::from_millis(300 + (noise % 400) as u64);
        noise /= 401;
        tokio::time::sleep(after).await;
        relay.abort().await;
        tracing::debug!(round, ?after, acked = flaky.acked_batches(), "relay killed");
    }

    // 3. A relay that is left to finish.
    let last = RunningRelay::spawn(
        store.clone(),
        publisher(&config),
        relay_config("b", BATCH, Duration::from_secs(2)),
    );
    drain(&store, "the last relay").await;
    last.shutdown().await;

    let received = read_all(&config, &topic).await;
    let delivery = check_delivery(&expected, &received);
    assert_eq!(delivery.distinct, total, "every message was delivered");
    for id in &unmarked {
        assert!(
            delivery.duplicates.contains_key(id),
            "the batch acknowledged but not marked was published again ({id})"
        );
    }
    // `a` had one batch in flight; each of the four relays killed later up to `max_in_flight`.
    let window = relay_config("b", BATCH, lease).max_in_flight;
    let extra: usize = delivery.duplicates.values().map(|n| n - 1).sum();
    assert!(
        extra <= (1 + 4 * window) * BATCH as usize,
        "duplicates only from re-sent batches (the batches in flight of each killed relay): \
         {extra}"
    );
    delivery
}

/// The broker is killed (SIGKILL) while commands keep coming and the relay runs; the relay keeps
/// retrying; once the broker is back (same port, same data) every message is there.
///
/// `broker` must keep its data across restarts ([`KafkaStorage::Sqlite`]).
pub async fn relay_rides_out_a_broker_restart<S: StreamingStore>(
    store: S,
    broker: &mut KafkaBroker,
) -> Delivery {
    let config = KafkaConfig::new(broker.brokers()).with_delivery_timeout(Duration::from_secs(2));
    let (topic, repo) = setup(&store, &config, "restart").await;
    let metadata = command_metadata();
    let ids = ledgers("r", 5);
    let mut expected = Expected::default();
    ledger_activity(&repo, &ids, 1..=10, true, &metadata, &mut expected).await;
    let counting = Instrumented::new(publisher(&config), Duration::ZERO);
    let relay = RunningRelay::spawn(
        store.clone(),
        counting.clone(),
        relay_config("r", 25, Duration::from_secs(10)),
    );
    drain(&store, "before the broker stops").await;

    broker.kill9().expect("kill the broker");
    let failures_before = counting.failures.load(Ordering::SeqCst);
    // Commands go on while the broker is down: they wait in the outbox.
    ledger_activity(&repo, &ids, 11..=20, false, &metadata, &mut expected).await;
    wait_until("the relay retries against the dead broker", || {
        counting.failures.load(Ordering::SeqCst) >= failures_before + 2
    })
    .await;
    assert!(
        store.outbox_len().await.unwrap() > 0,
        "records wait while the broker is down"
    );

    broker.restart().expect("restart the broker");
    ledger_activity(&repo, &ids, 21..=25, false, &metadata, &mut expected).await;
    drain(&store, "after the broker restarted").await;
    relay.shutdown().await;

    let received = read_all(&config, &topic).await;
    let delivery = check_delivery(&expected, &received);
    assert_eq!(delivery.distinct, expected.len(), "nothing was lost");
    delivery
}

/// Starts a broker with durable storage under `dir` for [`relay_rides_out_a_broker_restart`].
pub fn durable_broker(dir: &std::path::Path) -> KafkaBroker {
    KafkaBroker::start(dir, KafkaStorage::Sqlite).unwrap_or_else(|e| panic!("{e}"))
}

// ---------------------------------------------------------------------------------------------
// Records Kafka can never accept

/// Appends one event with one outbox message to `topic` on ledger `id`, the message's payload
/// `{"delta": n}` padded with `pad` bytes of filler; returns the message id.
async fn append_message<S: StreamingStore>(
    store: &S,
    id: &str,
    topic: &str,
    n: i64,
    pad: usize,
) -> Uuid {
    let stream = StreamId::new("ledger", id).expect("a stream id");
    let event = NewEvent::from_value("Credited", 2, &json!({ "amount": n, "currency": "EUR" }));
    let mut payload = json!({ "delta": n });
    if pad > 0 {
        payload["pad"] = Value::String("x".repeat(pad));
    }
    let message = OutboxMessage {
        message_id: Uuid::now_v7(),
        source_event_id: event.event_id,
        topic: topic.to_owned(),
        key: stream.to_string(),
        message_type: "ledger.moved".into(),
        schema_version: 3,
        payload: payload.to_string().into(),
        metadata: Metadata::new().with_causation_id(event.event_id),
    };
    let id = message.message_id;
    store
        .append(
            AppendRequest::new(stream, ExpectedVersion::Any, vec![event])
                .with_outbox(vec![message]),
        )
        .await
        .unwrap_or_else(|e| panic!("append with an outbox message: {e}"));
    id
}

/// What [`poison_records_are_dead_lettered`] saw.
#[derive(Debug, Clone)]
pub struct PoisonReport {
    /// Messages in the topic at the end, duplicates included.
    pub messages: usize,
    /// The dead letters before the re-queue, as `(outbox position, error)`.
    pub dead_letters: Vec<(u64, String)>,
}

impl std::fmt::Display for PoisonReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} messages in the topic; dead letters:", self.messages)?;
        for (position, error) in &self.dead_letters {
            write!(f, " [{position}] {error};")?;
        }
        Ok(())
    }
}

/// Records Kafka can never accept, among others, relayed to a real broker by a
/// [`KafkaPublisher`] whose `message.max.bytes` is 64 KiB: a message of about 200 KB (under the
/// store's payload limit of 1 MiB) and one to an invalid topic name. The publisher's checks
/// refuse both, so the relay dead-letters them without sending them (tansu 0.6 enforces neither
/// a message size nor topic name rules, so this exercises the checks; a broker's own refusal
/// takes the classification path tested by [`producer_refusals_are_permanent`]). Every other
/// record is published exactly once, in per-key order; the status counts the two dead letters
/// and names the last error. With the limit raised to 512 KiB, the re-queued large record is
/// published, after the others, with a new outbox position.
pub async fn poison_records_are_dead_lettered<S: StreamingStore>(
    store: S,
    config: KafkaConfig,
) -> PoisonReport {
    const LIMIT: usize = 64 * 1024;
    let topic = unique_topic("poison");
    crate::ensure_topic(&config, &topic, PARTITIONS)
        .await
        .unwrap_or_else(|e| panic!("cannot create topic {topic}: {e}"));
    let mut sent = Vec::new();
    let (mut large, mut misdirected) = (Uuid::nil(), Uuid::nil());
    for i in 0..12i64 {
        let id = format!("poison{}", i % 3);
        match i {
            4 => large = append_message(&store, &id, &topic, i, 200_000).await,
            8 => misdirected = append_message(&store, &id, "not a topic!", i, 0).await,
            _ => sent.push(append_message(&store, &id, &topic, i, 0).await),
        }
    }
    let pending = store.pending_outbox(100).await.expect("the outbox");
    let position_of = |id: Uuid| {
        pending
            .iter()
            .find(|r| r.message.message_id == id)
            .map(|r| r.position)
            .expect("a pending record")
    };
    let (large_at, misdirected_at) = (position_of(large), position_of(misdirected));
    let limited = KafkaPublisher::new(config.clone().with_max_message_bytes(LIMIT))
        .expect("a Kafka producer");
    let relay = RunningRelay::spawn(
        store.clone(),
        limited,
        relay_config("poison", 5, Duration::from_secs(10)),
    );
    drain(&store, "the relay passes the poison records").await;
    relay.shutdown().await;

    let status = store.relay_status().await.expect("the relay status");
    assert_eq!((status.pending, status.dead_letters), (0, 2), "{status:?}");
    let last = status.last_error.expect("the last error");
    assert_eq!(last.position, misdirected_at);
    let dead = store.dead_letters(10).await.expect("the dead letters");
    let report = PoisonReport {
        messages: 0,
        dead_letters: dead
            .iter()
            .map(|d| (d.record.position, d.error.clone()))
            .collect(),
    };
    assert_eq!(
        dead.iter().map(|d| d.record.position).collect::<Vec<_>>(),
        vec![large_at, misdirected_at]
    );
    assert!(
        dead[0].error.contains("message.max.bytes") && dead[0].attempts == 0,
        "{:?}",
        dead[0]
    );
    assert!(
        dead[1].error.contains("invalid topic name") && dead[1].attempts == 0,
        "{:?}",
        dead[1]
    );

    let received = read_all(&config, &topic).await;
    check_published_once(&received, &sent);

    sent.push(large);
    let messages = requeue_after_raising_the_limit(&store, &config, &topic, &pending, &sent).await;
    PoisonReport { messages, ..report }
}

/// The end of [`poison_records_are_dead_lettered`]: with the limit raised, the re-queued large
/// record (the last of `sent`) is published once, with a new outbox position.
async fn requeue_after_raising_the_limit<S: StreamingStore>(
    store: &S,
    config: &KafkaConfig,
    topic: &str,
    before: &[OutboxRecord],
    sent: &[Uuid],
) -> usize {
    let large = *sent.last().expect("the large record");
    let large_at = before
        .iter()
        .find(|r| r.message.message_id == large)
        .map(|r| r.position)
        .expect("a pending record");
    assert_eq!(
        store
            .requeue_dead_letters(&[large_at])
            .await
            .expect("re-queue"),
        1
    );
    let raised = KafkaPublisher::new(config.clone().with_max_message_bytes(512 * 1024))
        .expect("a Kafka producer");
    let relay = RunningRelay::spawn(
        store.clone(),
        raised,
        relay_config("poison", 5, Duration::from_secs(10)),
    );
    drain(store, "the relay publishes the re-queued record").await;
    relay.shutdown().await;
    let received = read_all(config, topic).await;
    check_published_once(&received, sent);
    let requeued = received
        .iter()
        .find(|m| header(m, headers::MESSAGE_ID) == large.to_string())
        .expect("the re-queued record was published");
    let new_position: u64 = header(requeued, headers::OUTBOX_POSITION)
        .parse()
        .expect("a number");
    assert!(
        before.iter().all(|r| r.position < new_position),
        "the re-queued record has a new, higher outbox position"
    );
    assert_eq!(
        requeued.payload["pad"].as_str().map(str::len),
        Some(200_000)
    );
    let status = store.relay_status().await.expect("the relay status");
    assert_eq!((status.pending, status.dead_letters), (0, 1));
    received.len()
}

/// Every message of `sent` is in `received` exactly once, nothing else is, and per key the
/// outbox positions increase.
fn check_published_once(received: &[Received], sent: &[Uuid]) {
    let ids: Vec<Uuid> = received
        .iter()
        .map(|m| header(m, headers::MESSAGE_ID).parse().expect("a UUID"))
        .collect();
    let distinct: std::collections::HashSet<&Uuid> = ids.iter().collect();
    assert_eq!(ids.len(), distinct.len(), "no message was published twice");
    let mut wanted = sent.to_vec();
    wanted.sort();
    let mut got = ids.clone();
    got.sort();
    assert_eq!(got, wanted, "exactly the publishable messages");
    let mut by_key: BTreeMap<&str, Vec<(i64, u64)>> = BTreeMap::new();
    for m in received {
        let position = header(m, headers::OUTBOX_POSITION)
            .parse()
            .expect("a number");
        by_key
            .entry(m.key.as_str())
            .or_default()
            .push((m.offset, position));
    }
    for (key, mut messages) in by_key {
        messages.sort_unstable();
        assert!(
            messages.windows(2).all(|w| w[0].1 < w[1].1),
            "{key}: outbox positions increase along the partition: {messages:?}"
        );
    }
}

/// An outbox record built by hand for the publisher cases.
fn record(position: u64, topic: &str, payload: &Value) -> OutboxRecord {
    OutboxRecord {
        position,
        stream_id: StreamId::new("ledger", "refused").expect("a stream id"),
        // A fixed time: its header's length must not vary between records.
        recorded_at: chrono::DateTime::from_timestamp_micros(1_700_000_000_123_456)
            .expect("a valid time"),
        message: OutboxMessage {
            message_id: Uuid::now_v7(),
            source_event_id: Uuid::now_v7(),
            topic: topic.to_owned(),
            key: "ledger-refused".into(),
            message_type: "ledger.moved".into(),
            schema_version: 3,
            payload: payload.to_string().into(),
            metadata: Metadata::new(),
        },
    }
}

/// On a real producer and broker: [`KafkaPublisher::check`] draws the line exactly where
/// librdkafka does (a record of exactly `message.max.bytes` passes and is acknowledged, one byte
/// more is refused by both), and a record librdkafka refuses is reported
/// [`PublishOutcome::Rejected`] (permanent, by its error code), while the records around it in
/// the same batch are acknowledged and written.
pub async fn producer_refusals_are_permanent(config: KafkaConfig) {
    const LIMIT: usize = 16 * 1024;
    let topic = unique_topic("refused");
    crate::ensure_topic(&config, &topic, 1)
        .await
        .unwrap_or_else(|e| panic!("cannot create topic {topic}: {e}"));
    let publisher = KafkaPublisher::new(config.clone().with_max_message_bytes(LIMIT))
        .expect("a Kafka producer");
    // Find the padding that makes a message exactly LIMIT bytes as the check counts them.
    let padded = |pad: usize| record(2, &topic, &json!({ "delta": 2, "pad": "x".repeat(pad) }));
    let mut pad = LIMIT;
    while pad > 0 && publisher.check(&padded(pad)).is_err() {
        pad -= 1;
    }
    let fits = padded(pad);
    let over = padded(pad + 1);
    assert!(matches!(
        publisher.check(&over),
        Err(crate::RecordError::TooLarge { size, limit }) if size == LIMIT + 1 && limit == LIMIT
    ));
    let batch = [
        record(1, &topic, &json!({ "delta": 1 })),
        fits.clone(),
        over,
        record(4, &topic, &json!({ "delta": 4 })),
    ];
    let outcomes = Publisher::publish(&publisher, &batch).await;
    assert!(outcomes[0].is_acknowledged(), "{:?}", outcomes[0]);
    assert!(
        outcomes[1].is_acknowledged(),
        "a message of exactly message.max.bytes is sent: {:?}",
        outcomes[1]
    );
    assert!(
        matches!(
            &outcomes[2],
            PublishOutcome::Rejected(e @ crate::PublishError::Refused(_))
                if e.code() == Some(rdkafka::types::RDKafkaErrorCode::MessageSizeTooLarge)
        ),
        "{:?}",
        outcomes[2]
    );
    assert!(outcomes[3].is_acknowledged(), "{:?}", outcomes[3]);
    let ids: Vec<String> = read_all(&config, &topic)
        .await
        .iter()
        .map(|m| header(m, headers::MESSAGE_ID).to_owned())
        .collect();
    let expected: Vec<String> = [&batch[0], &fits, &batch[3]]
        .iter()
        .map(|r| r.message.message_id.to_string())
        .collect();
    assert_eq!(
        ids, expected,
        "the records around the refused one, in order"
    );
}

// ---------------------------------------------------------------------------------------------
// Stamping the store cases onto a backend

#[doc(hidden)]
pub mod __private {
    pub use tokio;
}

/// Stamps every case of this module that runs on a store (`pub async fn case<S:
/// StreamingStore>(store: S, config: KafkaConfig)`) onto a backend, each as a named
/// `#[tokio::test]` that prints the case's report.
///
/// `$factory` is callable with no arguments and returns a future of a fresh, empty store;
/// `$config` is an expression of the [`KafkaConfig`] of the broker. The list of cases is checked
/// against this module's source by a unit test, so a new store case cannot be left out.
///
/// ```no_run
/// es_kafka::kafka_store_tests!(
///     || async { es_memory::InMemoryStore::new() },
///     es_kafka::KafkaConfig::new("127.0.0.1:9092"),
/// );
/// ```
#[macro_export]
macro_rules! kafka_store_tests {
    ($factory:expr, $config:expr $(,)?) => {
        $crate::__kafka_store_cases!($factory, $config;
            relay_delivers_every_message_in_order,
            outside_client_reads_every_message,
            relay_killed_mid_batch_loses_nothing,
            poison_records_are_dead_lettered,
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __kafka_store_cases {
    ($factory:expr, $config:expr; $($case:ident),+ $(,)?) => {
        $(
            #[$crate::testing::__private::tokio::test(
                flavor = "multi_thread",
                worker_threads = 4,
                crate = "::es_kafka::testing::__private::tokio"
            )]
            async fn $case() {
                let report = $crate::testing::$case(($factory)().await, $config).await;
                eprintln!("{report}");
            }
        )+
    };
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    /// The cases `kafka_store_tests!` stamps are exactly the store cases of this module.
    #[test]
    fn the_stamping_macro_lists_every_store_case() {
        let source = include_str!("testing.rs");
        let defined: BTreeSet<&str> = source
            .split("pub async fn ")
            .skip(1)
            .filter_map(|rest| {
                let (name, signature) = rest.split_once('<')?;
                let signature = signature.split_once('{')?.0;
                let compact: String = signature.split_whitespace().collect();
                compact
                    .replace(",)", ")")
                    .starts_with("S:StreamingStore>(store:S,config:KafkaConfig)")
                    .then_some(name)
            })
            .collect();
        let body = source
            .split("macro_rules! kafka_store_tests {")
            .nth(1)
            .and_then(|m| m.split(';').nth(1))
            .and_then(|m| m.split(')').next())
            .expect("the macro's case list");
        let listed: BTreeSet<&str> = body
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        assert!(defined.len() >= 4, "{defined:?}");
        assert_eq!(
            listed, defined,
            "kafka_store_tests! must list every store case"
        );
    }
}
