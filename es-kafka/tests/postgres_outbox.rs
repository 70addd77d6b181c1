//! End to end on PostgreSQL against a real Kafka-protocol broker (the shared one,
//! `KAFKA_BROKERS`): ledger commands through a repository with a translator, the outbox written
//! in the append transaction, the relay, the broker, and consumers that check every integration
//! event arrived as translated, in per-stream order.
//!
//! The generic cases of `es_kafka::testing` run on a store in a fresh schema each of the shared
//! server (`DATABASE_URL`); the last case kills a PostgreSQL server of its own with SIGKILL while
//! commands and the relay run, and restarts it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use es_core::{
    EventFilter, EventStore, Metadata, ReadAll, RecordedEvent, Repository, RepositoryError,
};
use es_kafka::testing::{self, Expected, Instrumented, RunningRelay};
use es_kafka::KafkaPublisher;
use es_postgres::PgStore;
use es_test_support::{scratch_dir, PgServer};
use es_testkit::domain::{Ledger, LedgerCommand, LedgerEvent};
use futures::TryStreamExt;
use uuid::Uuid;

mod common;

es_kafka::kafka_store_tests!(common::fresh_pg_store, common::config());

/// Records published per relay batch in the restart case.
const BATCH: u64 = 20;

/// Commands acknowledged and failed by the command loops of the restart case.
#[derive(Default)]
struct Commands {
    /// Event ids of acknowledged commands.
    acked: Mutex<Vec<Uuid>>,
    /// Commands that failed because the store was unavailable (their outcome is unknown).
    failed: AtomicUsize,
}

impl Commands {
    fn acked(&self) -> usize {
        self.acked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// Credits (and a debit every fifth command) on ledger `id` until `stop` is set. A command that
/// fails because PostgreSQL is down is counted and the loop goes on; any other error fails the
/// test.
async fn command_loop(
    repo: Repository<PgStore>,
    id: String,
    metadata: Metadata,
    commands: Arc<Commands>,
    stop: Arc<AtomicBool>,
) {
    let mut n = 0i64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let command = if n % 5 == 0 {
            LedgerCommand::Debit(1)
        } else {
            LedgerCommand::Credit(n)
        };
        match repo.execute_with::<Ledger>(&id, &command, &metadata).await {
            Ok(done) => commands
                .acked
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend(done.event_ids),
            Err(RepositoryError::Store { source, .. }) if source.is_transient() => {
                commands.failed.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(err) => panic!("{command:?} on {id}: {err}"),
        }
    }
}

/// Waits until `done` holds, failing the test after `testing::PATIENCE`.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < testing::PATIENCE,
            "timed out after {:?}: {what}",
            testing::PATIENCE
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What the relay must publish: one message per stored credit or debit, per ledger stream in
/// stream order, as the translator makes them. Built from the events in the store, so that
/// commands whose outcome the crash made unknown count exactly when they were stored.
async fn expected_from_store(
    store: &PgStore,
    repo: &Repository<PgStore>,
    metadata: &Metadata,
) -> (Expected, Vec<RecordedEvent>) {
    let events: Vec<RecordedEvent> = store
        .read_all(ReadAll::after(0).filter(EventFilter::all().category("ledger")))
        .try_collect()
        .await
        .expect("read the ledger events");
    let mut expected = Expected {
        correlation_id: metadata.correlation_id,
        actor: metadata.actor.clone(),
        ..Expected::default()
    };
    for event in &events {
        for decoded in repo.decode::<Ledger>(event).expect("a ledger event") {
            let delta = match decoded {
                LedgerEvent::Credited(c) => c.amount,
                LedgerEvent::Debited(d) => -d.amount,
                LedgerEvent::Opened(_) => continue,
            };
            expected
                .streams
                .entry(event.stream_id.to_string())
                .or_default()
                .push((event.event_id, delta));
        }
    }
    (expected, events)
}

/// PostgreSQL is killed with SIGKILL while ledger commands run and the relay publishes to the
/// broker, then restarted; commands go on, the outbox drains. Every integration event of every
/// stored command reached the topic (including commands whose acknowledgement the crash cut
/// off), per-stream order held, every acknowledged command is stored, and duplicates are only
/// what at-least-once delivery allows: identical copies (same message id) of records the relay
/// published again because the crash kept it from marking them delivered, never records marked
/// before the crash.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[allow(clippy::too_many_lines)] // one scenario, checked end to end
async fn relay_to_kafka_survives_a_postgres_restart() {
    let dir = scratch_dir("es-kafka-postgres-restart");
    let mut server = PgServer::start(&dir, &[]).expect("start PostgreSQL");
    let url = server.url("postgres");
    let store = common::pg_store_on(&url, &common::unique_schema("kafka")).await;
    let config = common::config();
    let (topic, repo) = testing::setup(&store, &config, "pg-restart").await;
    let metadata = testing::command_metadata();
    let ledgers: Vec<String> = (0..4).map(|i| format!("pg{i}")).collect();

    // Before the relay starts: opened ledgers and some movements waiting in the outbox.
    let mut before = Expected::default();
    testing::ledger_activity(&repo, &ledgers, 1..=3, true, &metadata, &mut before).await;
    let publisher = Instrumented::new(
        KafkaPublisher::new(config.clone()).expect("a Kafka producer"),
        Duration::ZERO,
    );
    let relay = RunningRelay::spawn(
        store.clone(),
        publisher.clone(),
        testing::relay_config("pg-restart", BATCH, Duration::from_secs(2)),
    );

    let commands = Arc::new(Commands::default());
    let stop = Arc::new(AtomicBool::new(false));
    let loops: Vec<_> = ledgers
        .iter()
        .map(|id| {
            tokio::spawn(command_loop(
                repo.clone(),
                id.clone(),
                metadata.clone(),
                Arc::clone(&commands),
                Arc::clone(&stop),
            ))
        })
        .collect();

    // Mid-stream: commands are being acknowledged and the relay is publishing.
    wait_until("commands and relay batches before the crash", || {
        commands.acked() >= 40 && publisher.acked_batches() >= 3
    })
    .await;
    // Batches acknowledged before this one were marked delivered before it was published.
    let acked_before_kill = publisher.acked_batches();
    server.kill9().expect("kill -9 PostgreSQL");
    let failed_before = commands.failed.load(Ordering::SeqCst);
    wait_until("commands fail while PostgreSQL is down", || {
        commands.failed.load(Ordering::SeqCst) >= failed_before + 4
    })
    .await;
    server.restart().expect("restart PostgreSQL");
    let acked_at_restart = commands.acked();
    wait_until("commands succeed again after the restart", || {
        commands.acked() >= acked_at_restart + 40
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for task in loops {
        tokio::time::timeout(testing::PATIENCE, task)
            .await
            .expect("a command loop stops")
            .expect("a command loop did not panic");
    }
    // More commands once everything is back, as a plain run would do them.
    let mut after = Expected::default();
    testing::ledger_activity(&repo, &ledgers, 100..=102, false, &metadata, &mut after).await;
    testing::drain(&store, "the relay after the restart").await;
    relay.shutdown().await;

    let (expected, stored) = expected_from_store(&store, &repo, &metadata).await;
    let stored_ids: HashSet<Uuid> = stored.iter().map(|e| e.event_id).collect();
    let acked: Vec<Uuid> = commands
        .acked
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let acked: Vec<Uuid> = acked
        .into_iter()
        .chain(before.streams.values().flatten().map(|(id, _)| *id))
        .chain(after.streams.values().flatten().map(|(id, _)| *id))
        .collect();
    let lost: Vec<&Uuid> = acked.iter().filter(|id| !stored_ids.contains(id)).collect();
    assert!(lost.is_empty(), "acknowledged commands lost: {lost:?}");
    let failed = commands.failed.load(Ordering::SeqCst);
    assert!(failed > 0, "the crash failed no command");
    let unknown = expected.len() - acked.len();
    assert!(
        unknown <= failed,
        "{unknown} stored movements were never acknowledged, more than the {failed} failed commands"
    );

    let received = testing::read_all(&config, &topic).await;
    let delivery = testing::check_delivery(&expected, &received);
    assert_eq!(delivery.distinct, expected.len(), "nothing was lost");

    // Duplicates: the broker was never at fault, so each copy in the topic is one acknowledged
    // publication by the relay, and a record published twice was not marked delivered in between.
    assert_eq!(
        publisher.failures.load(Ordering::SeqCst),
        0,
        "the broker never failed a batch"
    );
    let batches = publisher
        .acked
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let mut publications: HashMap<Uuid, usize> = HashMap::new();
    for id in batches.iter().flatten() {
        *publications.entry(*id).or_default() += 1;
    }
    let mut copies: BTreeMap<Uuid, usize> = BTreeMap::new();
    for m in &received {
        let id: Uuid = m.headers[es_kafka::headers::MESSAGE_ID]
            .parse()
            .expect("message_id is a UUID");
        *copies.entry(id).or_default() += 1;
    }
    for (id, n) in &copies {
        assert_eq!(
            publications.get(id),
            Some(n),
            "message {id}: copies in the topic match the relay's acknowledged publications"
        );
    }
    let marked_before_kill: HashSet<Uuid> = batches[..acked_before_kill - 1]
        .iter()
        .flatten()
        .copied()
        .collect();
    for id in delivery.duplicates.keys() {
        assert!(
            !marked_before_kill.contains(id),
            "message {id} was marked delivered before the crash and published again"
        );
    }
    eprintln!(
        "relay to Kafka across a PostgreSQL restart: {} movements stored, {} commands failed, \
         {unknown} stored without acknowledgement; {delivery}",
        expected.len(),
        failed
    );
    drop(store);
    let _ = server.stop();
}
