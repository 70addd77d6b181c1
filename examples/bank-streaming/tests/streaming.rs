//! The bank-streaming pieces against the real servers: PostgreSQL at `DATABASE_URL` and a Kafka
//! broker at `KAFKA_BROKERS` (`cargo xtask db up`, then `source target/es-services/dev/env`).
//!
//! Every test works in a PostgreSQL schema of its own, and the Kafka test in a topic of its own,
//! so tests can share the servers and run in parallel.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use es_core::{
    AppendRequest, AtLeastOnce, DomainEvent, EventStore, ExpectedVersion, Metadata, NewEvent,
    Projection, ProjectionRunner, ReadAll, ReadStream, Relay, RelayConfig, Repository,
    RepositoryError, StreamId, Translator,
};
use es_kafka::{headers, ConsumedMessage, KafkaConfig, KafkaPublisher};
use es_postgres::{ExactlyOnce, PgStore};
use example_bank::{AccountCommand, AccountError, BankAccount, PublicTranslator, CATEGORY};
use example_bank_streaming::{
    aggregate_balances, balance_rows, bank_repository, caught_up, create_balance_table,
    outbox_drained, MemoryBalances, MemoryCheckpoints, PgBalances, PublicTranslatorTo,
};
use futures::TryStreamExt;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

/// How long a test waits for a projection, the relay or the broker before it fails.
const PATIENCE: Duration = Duration::from_secs(120);

/// A store on a fresh schema of the shared PostgreSQL server.
async fn fresh_store(prefix: &str) -> PgStore {
    let schema = es_testkit::support::unique_name(&format!("t_bank_{prefix}"), '_');
    let url = es_test_support::database_url();
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(10))
        .test_before_acquire(false)
        .connect(&url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to DATABASE_URL={url}: {e}"));
    PgStore::builder(pool)
        .schema(&schema)
        .poll_interval(Duration::from_millis(200))
        .build()
        .await
        .unwrap_or_else(|e| panic!("cannot build the store in schema {schema}: {e}"))
}

/// The teller's metadata on every command of the workload.
fn teller() -> Metadata {
    Metadata::new()
        .with_correlation_id(Uuid::now_v7())
        .with_actor("teller:test")
}

/// A small deterministic pseudo-random sequence (xorshift), so runs are repeatable.
struct Dice(u64);

impl Dice {
    fn roll(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

/// What a workload did.
#[derive(Debug, Default)]
struct Activity {
    /// Account ids, in the order they were opened.
    ids: Vec<String>,
    /// Commands accepted.
    accepted: usize,
    /// Commands rejected by the account (insufficient funds, zero amounts).
    rejected: usize,
}

/// Opens `accounts` accounts named `<prefix>-<n>` and runs `per_account` deposits and
/// withdrawals on each; the accounts run concurrently, each one's commands in order. Some
/// withdrawals overdraw and some amounts are zero: those are rejected and must publish nothing.
async fn workload(
    repo: &Repository<PgStore>,
    prefix: &str,
    accounts: usize,
    per_account: usize,
    seed: u64,
) -> Activity {
    let currencies = ["EUR", "CHF", "USD"];
    let ids: Vec<String> = (0..accounts).map(|n| format!("{prefix}-{n}")).collect();
    let runs = ids.iter().enumerate().map(|(n, id)| {
        let mut dice = Dice(seed.wrapping_mul(31).wrapping_add(n as u64 + 1) | 1);
        let mut script = vec![AccountCommand::OpenAccount {
            owner: format!("Owner {n}"),
            currency: currencies[n % currencies.len()].to_owned(),
        }];
        for _ in 0..per_account {
            let amount = dice.roll(6_000) * 5;
            script.push(if dice.roll(3) == 0 {
                AccountCommand::WithdrawMoney { amount }
            } else {
                AccountCommand::DepositMoney { amount }
            });
        }
        async move {
            let (mut accepted, mut rejected) = (0, 0);
            for command in &script {
                match repo
                    .execute_with::<BankAccount>(id, command, &teller())
                    .await
                {
                    Ok(_) => accepted += 1,
                    Err(RepositoryError::Domain {
                        source:
                            AccountError::InsufficientFunds { .. } | AccountError::InvalidAmount,
                        ..
                    }) => rejected += 1,
                    Err(other) => panic!("{id}: {command:?} failed: {other}"),
                }
            }
            (accepted, rejected)
        }
    });
    let mut activity = Activity {
        ids: ids.clone(),
        ..Activity::default()
    };
    for (accepted, rejected) in futures::future::join_all(runs).await {
        activity.accepted += accepted;
        activity.rejected += rejected;
    }
    activity
}

/// Stores an account the way an older release wrote it: `AccountOpened` at schema version 1,
/// without a currency (the upcaster adds EUR).
async fn legacy_account(store: &PgStore, id: &str) {
    let stream = StreamId::new(CATEGORY, id).expect("a valid stream id");
    let events = vec![
        NewEvent::new("AccountOpened", 1, r#"{"owner":"Old Timer"}"#).expect("an event"),
        NewEvent::new("MoneyDeposited", 1, r#"{"amount":4200}"#).expect("an event"),
    ];
    store
        .append(AppendRequest::new(
            stream,
            ExpectedVersion::NoStream,
            events,
        ))
        .await
        .expect("appending the legacy events");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_models_equal_each_other_and_the_aggregates() {
    let store = fresh_store("rm").await;
    let repo = bank_repository(store.clone(), PublicTranslator).expect("the repository");
    create_balance_table(&store).await.expect("the table");
    let runner = ProjectionRunner::new(store.clone());

    // The PostgreSQL read model follows the commands live; the in-memory one starts afterwards
    // and catches up from position 0.
    let pg = runner.spawn(ExactlyOnce::new(&store, PgBalances::new(repo.clone())));
    legacy_account(&store, "legacy").await;
    repo.execute_with::<BankAccount>(
        "legacy",
        &AccountCommand::WithdrawMoney { amount: 200 },
        &teller(),
    )
    .await
    .expect("a withdrawal from the upcast account");
    let activity = workload(&repo, "acct", 6, 25, 7).await;
    assert!(
        activity.accepted > 6 && activity.rejected > 0,
        "the workload should accept and reject commands: {activity:?}"
    );
    let memory = MemoryBalances::new(repo.clone());
    let in_memory = memory.balances();
    let mem = runner.spawn(AtLeastOnce::new(memory, MemoryCheckpoints::default()));

    let head = store.head_position().await.expect("the head");
    caught_up(&pg, head, PATIENCE)
        .await
        .expect("the PostgreSQL read model");
    caught_up(&mem, head, PATIENCE)
        .await
        .expect("the in-memory read model");

    let mut ids = activity.ids.clone();
    ids.push("legacy".to_owned());
    let aggregates = aggregate_balances(&repo, &ids)
        .await
        .expect("the aggregates");
    let pg_rows = balance_rows(&store).await.expect("the rows");
    let mem_rows = in_memory.snapshot();
    assert_eq!(pg_rows, mem_rows, "the two read models differ");
    assert_eq!(
        pg_rows, aggregates,
        "the read models differ from the aggregates"
    );
    let legacy = &aggregates["legacy"];
    assert_eq!(
        (legacy.currency.as_str(), legacy.balance, legacy.version),
        ("EUR", 4000, 3),
        "the upcast account"
    );

    pg.shutdown().await;
    mem.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_read_model_skips_events_delivered_again() {
    let store = fresh_store("dup").await;
    let repo = bank_repository(store.clone(), PublicTranslator).expect("the repository");
    workload(&repo, "acct", 3, 10, 11).await;
    let events: Vec<_> = store
        .read_all(ReadAll::after(0))
        .try_collect()
        .await
        .expect("the feed");

    // Every event handled once, then the whole feed again, as after a crash that lost the
    // checkpoint: the balances must not change.
    let mut memory = MemoryBalances::new(repo.clone());
    for event in &events {
        memory.handle(event).await.expect("handling");
    }
    let once = memory.balances().snapshot();
    for event in &events {
        memory.handle(event).await.expect("handling again");
    }
    assert_eq!(memory.balances().snapshot(), once);
    let ids: Vec<String> = once.keys().cloned().collect();
    assert_eq!(ids.len(), 3);
    assert_eq!(
        once,
        aggregate_balances(&repo, &ids)
            .await
            .expect("the aggregates")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuilding_from_position_zero_gives_identical_rows() {
    let store = fresh_store("rb").await;
    let repo = bank_repository(store.clone(), PublicTranslator).expect("the repository");
    create_balance_table(&store).await.expect("the table");
    let activity = workload(&repo, "acct", 5, 20, 23).await;
    let runner = ProjectionRunner::new(store.clone());
    let pg = runner.spawn(ExactlyOnce::new(&store, PgBalances::new(repo.clone())));
    let head = store.head_position().await.expect("the head");
    caught_up(&pg, head, PATIENCE).await.expect("the first run");
    let before = balance_rows(&store).await.expect("the rows");
    assert_eq!(
        before,
        aggregate_balances(&repo, &activity.ids)
            .await
            .expect("the aggregates")
    );

    pg.rebuild().await.expect("the rebuild starts");
    caught_up(&pg, head, PATIENCE).await.expect("the rebuild");
    let after = balance_rows(&store).await.expect("the rows");
    assert_eq!(after, before, "the rebuilt read model differs");

    // After the rebuild it follows new commands as before.
    let more = workload(&repo, "later", 2, 5, 29).await;
    let head = store.head_position().await.expect("the head");
    caught_up(&pg, head, PATIENCE).await.expect("new commands");
    let ids = activity.ids.iter().chain(&more.ids);
    assert_eq!(
        balance_rows(&store).await.expect("the rows"),
        aggregate_balances(&repo, ids)
            .await
            .expect("the aggregates")
    );
    pg.shutdown().await;
}

/// One integration event as the translator produces it, or as it arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Published {
    source_event_id: String,
    message_type: String,
    schema_version: String,
    payload: Vec<u8>,
}

/// What the bank's translator makes of `id`'s stored events, in stream order.
async fn translated(repo: &Repository<PgStore>, id: &str) -> Vec<Published> {
    let stream = StreamId::new(CATEGORY, id).expect("a valid stream id");
    let stored: Vec<_> = repo
        .store()
        .read_stream(&stream, ReadStream::forward())
        .try_collect()
        .await
        .expect("the stream");
    let mut out = Vec::new();
    for event in &stored {
        for typed in repo.decode::<BankAccount>(event).expect("decoding") {
            for message in PublicTranslator.translate(&stream, &typed) {
                out.push(Published {
                    source_event_id: event.event_id.to_string(),
                    message_type: message.event_type().to_owned(),
                    schema_version: message.schema_version().to_string(),
                    payload: message.to_payload().expect("serializing"),
                });
            }
        }
    }
    out
}

fn header(m: &ConsumedMessage, name: &str) -> String {
    m.header(name)
        .unwrap_or_else(|| panic!("message at offset {} lacks header {name}", m.offset))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integration_events_arrive_in_kafka_as_translated_in_stream_order() {
    let store = fresh_store("kafka").await;
    let kafka = KafkaConfig::new(es_test_support::kafka_brokers());
    let topic = format!("bank.accounts.test-{}", Uuid::now_v7().simple());
    es_kafka::ensure_topic(&kafka, &topic, 3)
        .await
        .unwrap_or_else(|e| panic!("cannot create topic {topic}: {e}"));
    let repo = bank_repository(
        store.clone(),
        PublicTranslatorTo {
            topic: topic.clone(),
        },
    )
    .expect("the repository");

    // The relay runs while the commands do, in small batches, so publishing interleaves with
    // appends.
    let relay = Relay::new(
        store.clone(),
        KafkaPublisher::new(kafka.clone()).expect("the publisher"),
        RelayConfig {
            owner: format!("test-{}", Uuid::now_v7()),
            batch_size: 7,
            idle_poll: Duration::from_millis(50),
            backoff: es_core::Backoff::new(Duration::from_millis(50), Duration::from_millis(500)),
            ..RelayConfig::default()
        },
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(relay.run(async {
        let _ = stopped.await;
    }));
    let activity = workload(&repo, "acct", 6, 20, 41).await;
    assert!(activity.rejected > 0, "some commands must be rejected");
    outbox_drained(&store, PATIENCE)
        .await
        .expect("the relay delivers everything");
    let _ = stop.send(());
    relay
        .await
        .expect("the relay task")
        .expect("the relay stops cleanly");

    let received = es_kafka::read_topic(&kafka, &topic, PATIENCE)
        .await
        .unwrap_or_else(|e| panic!("reading {topic}: {e}"));

    // Per key (the stream id), the first copy of each message in offset order; any later copy
    // (at-least-once delivery) must be identical.
    let mut by_key: BTreeMap<String, Vec<Published>> = BTreeMap::new();
    let mut first_copy: HashMap<String, Published> = HashMap::new();
    let mut partition_of: HashMap<String, i32> = HashMap::new();
    let mut last_position: HashMap<String, u64> = HashMap::new();
    for m in &received {
        let key = m.key_str().expect("a text key").to_owned();
        assert_eq!(header(m, headers::STREAM_ID), key, "stream_id header");
        assert_eq!(header(m, headers::ACTOR), "teller:test", "actor header");
        let partition = *partition_of.entry(key.clone()).or_insert(m.partition);
        assert_eq!(partition, m.partition, "{key} spans partitions");
        let message = Published {
            source_event_id: header(m, headers::SOURCE_EVENT_ID),
            message_type: header(m, headers::MESSAGE_TYPE),
            schema_version: header(m, headers::SCHEMA_VERSION),
            payload: m.payload.to_vec(),
        };
        let id = header(m, headers::MESSAGE_ID);
        if let Some(first) = first_copy.get(&id) {
            assert_eq!(first, &message, "a duplicate of {id} differs");
            continue;
        }
        let position = m.outbox_position().expect("an outbox_position header");
        let last = last_position.insert(key.clone(), position).unwrap_or(0);
        assert!(
            position > last,
            "{key}: outbox position {position} after {last}"
        );
        first_copy.insert(id, message.clone());
        by_key.entry(key).or_default().push(message);
    }

    let mut expected: BTreeMap<String, Vec<Published>> = BTreeMap::new();
    for id in &activity.ids {
        let stream = StreamId::new(CATEGORY, id).expect("a valid stream id");
        expected.insert(stream.to_string(), translated(&repo, id).await);
    }
    let total: usize = expected.values().map(Vec::len).sum();
    assert_eq!(
        total, activity.accepted,
        "every accepted command translates into one message"
    );
    assert_eq!(
        by_key.keys().collect::<BTreeSet<_>>(),
        expected.keys().collect::<BTreeSet<_>>(),
        "streams in the topic"
    );
    for (key, messages) in &expected {
        assert_eq!(&by_key[key], messages, "the messages of {key}");
    }
}
