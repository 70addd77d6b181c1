//! End to end on Redis against the shared Kafka-protocol broker (`KAFKA_BROKERS`, started by
//! `cargo xtask test`): repository -> outbox (written by the append script) -> relay -> Kafka ->
//! consumers.
//!
//! The generic cases of `es_kafka::testing` run on the shared Redis server (`REDIS_URL`), each
//! under a key prefix of its own. The last test kills a Redis server of its own (`appendonly
//! yes`, `appendfsync always`) with SIGKILL while commands run and the relay publishes, restarts
//! it from its AOF, and checks that every integration event reaches the topic, in per-stream
//! order, duplicates (from batches re-sent after a crash) identical and detectable by message id.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use es_core::{
    Aggregate, EventStore, Metadata, OutboxStore, ReadStream, Repository, RepositoryError,
    RetryPolicy, StreamId,
};
use es_kafka::testing::{self, Expected, Instrumented, LedgerToTopic, RunningRelay};
use es_kafka::{KafkaConfig, KafkaPublisher};
use es_redis::RedisStore;
use es_test_support::{scratch_dir, RedisServer};
use es_testkit::domain::{Ledger, LedgerCommand};
use futures::TryStreamExt;
use uuid::Uuid;

mod common;

es_kafka::kafka_store_tests!(common::fresh_redis_store, common::config());

// ---------------------------------------------------------------------------------------------
// Redis killed and restarted from its AOF while commands run and the relay publishes.

/// Ledgers per writer task.
const LEDGERS: usize = 3;
/// Writer tasks.
const WRITERS: usize = 4;

async fn wait_until_available(store: &RedisStore) {
    let started = Instant::now();
    while store.head_position().await.is_err() {
        assert!(
            started.elapsed() < testing::PATIENCE,
            "the Redis server did not come back within {:?}",
            testing::PATIENCE
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads `stream`'s version, waiting out the server being away.
async fn version_of(store: &RedisStore, stream: &StreamId) -> u64 {
    loop {
        match store.stream_version(stream).await {
            Ok(v) => return v,
            Err(err) if err.is_transient() => wait_until_available(store).await,
            Err(err) => panic!("version of {stream}: {err}"),
        }
    }
}

/// Runs `command` on ledger `stream` (whose version the caller tracks: each writer is the only
/// one on its ledgers) until its outcome is known; returns the id of the event it stored, or
/// `None` if the ledger rejected it.
///
/// A store failure that outlasts the repository's retries leaves the outcome unknown (the append
/// may have been committed with the reply lost); once the server is back, the stream's version
/// tells: one more than before means the command was stored, and its event is read back;
/// unchanged means it was not, and the command runs again. Counts such commands in `unknown`.
async fn run_command(
    repo: &Repository<RedisStore>,
    store: &RedisStore,
    unknown: &AtomicUsize,
    stream: &StreamId,
    version: &mut u64,
    command: &LedgerCommand,
    metadata: &Metadata,
) -> Option<Uuid> {
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < testing::PATIENCE,
            "{command:?} on {stream}: no outcome within {:?}",
            testing::PATIENCE
        );
        match repo
            .execute_with::<Ledger>(stream.id(), command, metadata)
            .await
        {
            Ok(done) => {
                assert_eq!(done.version, *version + done.event_ids.len() as u64);
                *version = done.version;
                return done.event_ids.first().copied();
            }
            Err(RepositoryError::Domain { .. }) => return None,
            Err(RepositoryError::Store { source, .. }) if source.is_transient() => {
                unknown.fetch_add(1, Ordering::Relaxed);
                wait_until_available(store).await;
                let now = version_of(store, stream).await;
                if now == *version {
                    continue;
                }
                assert_eq!(now, *version + 1, "{stream}: one event per command");
                let stored: Vec<_> = store
                    .read_stream(stream, ReadStream::forward().from(now).limit(1))
                    .try_collect()
                    .await
                    .unwrap_or_else(|e| panic!("read back {stream} at {now}: {e}"));
                *version = now;
                return Some(stored[0].event_id);
            }
            Err(other) => panic!("{command:?} on {stream}: {other}"),
        }
    }
}

/// Opens its ledgers, then credits (and every third round debits) them round-robin until `stop`;
/// returns what must be published.
async fn writer(
    repo: Repository<RedisStore>,
    store: RedisStore,
    w: usize,
    stop: Arc<AtomicBool>,
    unknown: Arc<AtomicUsize>,
    metadata: Metadata,
) -> Expected {
    let mut expected = Expected {
        correlation_id: metadata.correlation_id,
        actor: metadata.actor.clone(),
        ..Expected::default()
    };
    let streams: Vec<StreamId> = (0..LEDGERS)
        .map(|k| StreamId::new(Ledger::CATEGORY, &format!("crash{w}x{k}")).unwrap())
        .collect();
    let mut versions = [0u64; LEDGERS];
    for (stream, version) in streams.iter().zip(&mut versions) {
        let opened = run_command(
            &repo,
            &store,
            &unknown,
            stream,
            version,
            &LedgerCommand::Open,
            &metadata,
        )
        .await;
        assert!(opened.is_some(), "{stream} opens");
        expected.streams.insert(stream.to_string(), Vec::new());
    }
    let mut round = 1i64;
    while !stop.load(Ordering::Relaxed) {
        for (stream, version) in streams.iter().zip(&mut versions) {
            let mut commands = vec![LedgerCommand::Credit(round * 10)];
            if round % 3 == 0 {
                commands.push(LedgerCommand::Debit(round));
            }
            for command in commands {
                let delta = match command {
                    LedgerCommand::Credit(a) => a,
                    LedgerCommand::Debit(a) => -a,
                    _ => unreachable!("only credits and debits"),
                };
                let id = run_command(
                    &repo, &store, &unknown, stream, version, &command, &metadata,
                )
                .await
                .unwrap_or_else(|| panic!("{command:?} on {stream} is covered"));
                expected
                    .streams
                    .get_mut(&stream.to_string())
                    .expect("opened above")
                    .push((id, delta));
            }
        }
        round += 1;
    }
    expected
}

/// Waits until the relay has had `batches` batches acknowledged by the broker.
async fn wait_for_batches(publisher: &Instrumented<KafkaPublisher>, batches: usize) {
    let started = Instant::now();
    while publisher.acked_batches() < batches {
        assert!(
            started.elapsed() < testing::PATIENCE,
            "only {} of {batches} batches acknowledged within {:?}",
            publisher.acked_batches(),
            testing::PATIENCE
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A fresh topic, and a repository over `store` that translates ledger events into it and
/// re-sends a batch (same event ids) while the store is unavailable for up to about 10 s.
async fn crash_repository(
    store: &RedisStore,
    config: &KafkaConfig,
) -> (String, Repository<RedisStore>) {
    let topic = testing::unique_topic("redis-crash");
    es_kafka::ensure_topic(config, &topic, testing::PARTITIONS)
        .await
        .unwrap_or_else(|e| panic!("cannot create topic {topic} on {}: {e}", config.brokers()));
    let repo = Repository::builder(store.clone())
        .translator::<Ledger, _>(LedgerToTopic {
            topic: topic.clone(),
        })
        .retry_policy(RetryPolicy {
            max_attempts: 5,
            max_transient_attempts: 10,
            backoff: es_core::Backoff::new(Duration::from_millis(20), Duration::from_millis(500)),
        })
        .build()
        .expect("repository with the ledger translator");
    (topic, repo)
}

/// Every ledger holds its opening and then exactly the events whose messages were expected:
/// the events survived the crashes too, once each.
async fn check_stored(store: &RedisStore, expected: &Expected) {
    for (stream, sent) in &expected.streams {
        let stream = StreamId::parse(stream).unwrap();
        let stored: Vec<Uuid> = store
            .read_stream(&stream, ReadStream::forward())
            .map_ok(|e| e.event_id)
            .try_collect()
            .await
            .unwrap();
        let moved: Vec<Uuid> = sent.iter().map(|(id, _)| *id).collect();
        assert_eq!(
            stored[1..],
            moved[..],
            "{stream}: the opening, then exactly the published movements"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_mid_stream_loses_no_message() {
    let dir = scratch_dir("es-kafka-redis-kill9");
    let mut server =
        RedisServer::start(&dir, &["--appendonly", "yes", "--appendfsync", "always"]).unwrap();
    let store = RedisStore::builder(server.url())
        .prefix(common::unique_prefix("kafka-crash"))
        .poll_interval(Duration::from_millis(200))
        .response_timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    let config = common::config();
    let (topic, repo) = crash_repository(&store, &config).await;

    let publisher = Instrumented::new(
        KafkaPublisher::new(config.clone()).expect("a Kafka producer"),
        Duration::ZERO,
    );
    let relay = RunningRelay::spawn(
        store.clone(),
        publisher.clone(),
        testing::relay_config("crash", 25, Duration::from_secs(5)),
    );

    let metadata = testing::command_metadata();
    let stop = Arc::new(AtomicBool::new(false));
    let unknown = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            tokio::spawn(writer(
                repo.clone(),
                store.clone(),
                w,
                Arc::clone(&stop),
                Arc::clone(&unknown),
                metadata.clone(),
            ))
        })
        .collect();

    // Each crash comes once the relay has published more since the last restart, so it hits
    // the relay mid-stream with commands running.
    for crash in 0..2 {
        wait_for_batches(&publisher, publisher.acked_batches() + 3).await;
        tokio::task::block_in_place(|| server.kill9()).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        tokio::task::block_in_place(|| server.restart()).unwrap();
        eprintln!(
            "crash {crash}: {} batches acknowledged before it",
            publisher.acked_batches()
        );
    }
    wait_for_batches(&publisher, publisher.acked_batches() + 3).await;
    stop.store(true, Ordering::Relaxed);

    let mut expected = Expected::default();
    for w in writers {
        let part = tokio::time::timeout(testing::PATIENCE, w)
            .await
            .expect("the writer stops")
            .expect("the writer did not panic");
        expected.correlation_id = part.correlation_id;
        expected.actor = part.actor;
        expected.streams.extend(part.streams);
    }
    testing::drain(&store, "the relay after the crashes").await;
    relay.shutdown().await;

    let received = testing::read_all(&config, &topic).await;
    let delivery = testing::check_delivery(&expected, &received);
    assert_eq!(
        delivery.distinct,
        expected.len(),
        "every integration event reached the topic"
    );
    eprintln!(
        "{} integration events expected ({} commands had an outcome left unknown by a crash); \
         {delivery}; {} publish calls failed",
        expected.len(),
        unknown.load(Ordering::Relaxed),
        publisher.failures.load(Ordering::SeqCst)
    );

    check_stored(&store, &expected).await;
    assert_eq!(store.outbox_len().await.unwrap(), 0);
}
