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

use es_core::outbox::RelayError;
use es_core::projection::HandlerError;
use es_core::testing::domain::{Ledger, LedgerCommand, LedgerEvent};
use es_core::testing::streaming::{LedgerMessage, LedgerTranslator};
use es_core::{
    Metadata, OutboxRecord, OutboxStore, Publisher, Relay, RelayConfig, Repository, StreamId,
    StreamingStore, Translator,
};
use es_test_support::{KafkaBroker, KafkaStorage};
use serde_json::Value;
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
                    .entry(done.stream.to_string())
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

/// A relay configuration for the cases: small batches, short pauses.
pub fn relay_config(owner: &str, batch_size: u64, lease_ttl: Duration) -> RelayConfig {
    RelayConfig {
        owner: owner.to_owned(),
        lease_ttl,
        batch_size,
        idle_poll: Duration::from_millis(50),
        max_backoff: Duration::from_millis(300),
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

/// Wraps a publisher: counts calls, failures and acknowledged batches, remembers the message
/// ids of each acknowledged batch, and pauses after each acknowledgement (before the relay can
/// mark the batch delivered), which is where a crash costs the most. Clones share the counters.
pub struct Instrumented<P> {
    inner: Arc<P>,
    /// Pause after an acknowledged batch.
    pub pause_after_ack: Duration,
    /// Publish calls.
    pub calls: Arc<AtomicUsize>,
    /// Failed publish calls.
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
    async fn publish(&self, records: &[OutboxRecord]) -> Result<(), HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let result = self.inner.publish(records).await;
        if result.is_ok() {
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
    let slow = Instrumented::new(publisher(&config), Duration::from_secs(2));
    let a = RunningRelay::spawn(
        store.clone(),
        slow.clone(),
        relay_config("a", BATCH, Duration::from_millis(500)),
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

    // 2. Restarted relays (same owner, so each takes the lease at once), killed at arbitrary
    //    moments: while sending, waiting for acknowledgements, or pausing.
    let mut noise = Uuid::new_v4().as_u128();
    for round in 0..4 {
        let flaky = Instrumented::new(publisher(&config), Duration::from_millis(50));
        let relay = RunningRelay::spawn(
            store.clone(),
            flaky.clone(),
            relay_config("b", BATCH, Duration::from_millis(500)),
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
        relay_config("b", BATCH, Duration::from_millis(500)),
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
    let extra: usize = delivery.duplicates.values().map(|n| n - 1).sum();
    assert!(
        extra <= 5 * BATCH as usize,
        "duplicates only from re-sent batches (one per killed relay): {extra}"
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
