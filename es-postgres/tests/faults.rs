//! Failures: the server killed with SIGKILL mid-append and restarted, and connections terminated
//! in the middle of an append. Acknowledged appends survive exactly once with their outbox
//! records, batches stay whole, subscribers and relays resume without loss, errors are typed,
//! retries are idempotent.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use es_core::{
    AppendRequest, AppendResult, EventFilter, EventStore, ExpectedVersion, Metadata, NewEvent,
    OutboxMessage, OutboxRecord, OutboxStore, ReadAll, RecordedEvent, Relay, RelayConfig,
    StoreError, StreamId,
};
use es_test_support::{scratch_dir, PgServer};
use es_testkit::streaming::RecordingPublisher;
use es_testkit::support::{check_feed, tail_until_done};
use futures::{StreamExt, TryStreamExt};
use serde_json::json;
use sqlx::AssertSqlSafe;
use uuid::Uuid;

const PATIENCE: Duration = Duration::from_secs(120);

fn event(n: u64) -> NewEvent {
    NewEvent::from_value("Happened", 1, &json!({ "n": n }))
}

/// `request` with one outbox message per event, keyed by the stream.
fn with_messages(request: AppendRequest) -> AppendRequest {
    let messages = request
        .events
        .iter()
        .map(|e| OutboxMessage {
            message_id: Uuid::now_v7(),
            source_event_id: e.event_id,
            topic: "orders.public".into(),
            key: request.stream_id.to_string(),
            message_type: "OrderHappened".into(),
            schema_version: 1,
            payload: e.payload.clone(),
            metadata: Metadata::new().with_causation_id(e.event_id),
        })
        .collect();
    request.with_outbox(messages)
}

/// Checks the outbox against the feed: a record for exactly the messages of stored appends, once
/// each; outbox order is commit order (the order of the source events' global positions), so
/// per-stream order holds.
fn check_outbox(
    records: &[OutboxRecord],
    attempted: &[(AppendRequest, Option<AppendResult>)],
    by_id: &HashMap<Uuid, &RecordedEvent>,
) {
    let by_message: HashMap<Uuid, &OutboxRecord> =
        records.iter().map(|r| (r.message.message_id, r)).collect();
    assert_eq!(
        by_message.len(),
        records.len(),
        "an outbox record is stored twice"
    );
    let mut expected = 0;
    for (request, result) in attempted {
        let stored = by_id.contains_key(&request.events[0].event_id);
        for m in &request.outbox {
            assert_eq!(
                by_message.contains_key(&m.message_id),
                stored,
                "outbox record of an append that is {} (acknowledged: {})",
                if stored {
                    "stored is missing"
                } else {
                    "absent is present"
                },
                result.is_some()
            );
        }
        if stored {
            expected += request.outbox.len();
        }
    }
    assert_eq!(records.len(), expected, "unexpected outbox records");
    assert!(records.windows(2).all(|w| {
        w[0].position < w[1].position
            && by_id[&w[0].message.source_event_id].global_position
                < by_id[&w[1].message.source_event_id].global_position
    }));
}

/// Appends `request` until it is answered by something other than `Unavailable`.
async fn append_retrying(
    store: &es_postgres::PgStore,
    request: &AppendRequest,
    deadline: tokio::time::Instant,
) -> Result<AppendResult, StoreError> {
    loop {
        match store.append(request.clone()).await {
            Err(err) if err.is_transient() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
}

/// kill -9 of the server while 8 writers append through two stores and two subscribers tail the
/// feed; then a restart. Every acknowledged append is stored exactly once at the positions it was
/// given, every batch is whole or absent, and both subscribers deliver the whole feed in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[allow(clippy::too_many_lines)] // one scenario, checked end to end
async fn kill9_during_concurrent_appends() {
    let dir = scratch_dir("es-postgres-kill9");
    let mut server = PgServer::start(&dir, &[]).expect("start PostgreSQL");
    let url = server.url("postgres");
    let schema = common::unique_schema("kill");
    let a = common::store_on(&url, &schema).await;
    let b = common::store_on(&url, &schema).await;

    let subscribers = [tail_until_done(&a), tail_until_done(&b)];

    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..8u64 {
        let store = if w % 2 == 0 { a.clone() } else { b.clone() };
        let stop = Arc::clone(&stop);
        writers.push(tokio::spawn(async move {
            // (request, acknowledged result) for every batch attempted.
            let mut attempted: Vec<(AppendRequest, Option<AppendResult>)> = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let stream = StreamId::new("order", &format!("w{w}-{}", i % 5)).unwrap();
                let batch = (0..=i % 4).map(|k| event(i * 10 + k)).collect();
                let request =
                    with_messages(AppendRequest::new(stream, ExpectedVersion::Any, batch));
                match store.append(request.clone()).await {
                    Ok(result) => attempted.push((request, Some(result))),
                    Err(err) => {
                        assert!(err.is_transient(), "a crash is `Unavailable`, got {err:?}");
                        attempted.push((request, None));
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                i += 1;
            }
            attempted
        }));
    }

    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.kill9().expect("kill -9");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.restart().expect("restart");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stop.store(true, Ordering::Relaxed);

    let mut attempted = Vec::new();
    for w in writers {
        attempted.extend(tokio::time::timeout(PATIENCE, w).await.unwrap().unwrap());
    }
    let acknowledged = attempted.iter().filter(|(_, r)| r.is_some()).count();
    let failed = attempted.len() - acknowledged;
    assert!(
        acknowledged > 50,
        "only {acknowledged} appends were acknowledged"
    );
    assert!(failed > 0, "the crash failed no append");

    let deadline = tokio::time::Instant::now() + PATIENCE;
    let done = event(0);
    let done = NewEvent {
        event_type: "Done".into(),
        ..done
    };
    let done_request = AppendRequest::new(
        StreamId::new("control", "1").unwrap(),
        ExpectedVersion::Any,
        vec![done.clone()],
    );
    append_retrying(&a, &done_request, deadline).await.unwrap();

    let all: Vec<RecordedEvent> = a.read_all(ReadAll::after(0)).try_collect().await.unwrap();
    let by_id: HashMap<Uuid, &RecordedEvent> = all.iter().map(|e| (e.event_id, e)).collect();
    assert_eq!(by_id.len(), all.len(), "an event is stored twice");
    for (request, result) in &attempted {
        let present = request
            .events
            .iter()
            .filter(|e| by_id.contains_key(&e.event_id))
            .count();
        assert!(
            present == 0 || present == request.events.len(),
            "half a batch is stored: {present} of {}",
            request.events.len()
        );
        if let Some(result) = result {
            assert_eq!(
                present,
                request.events.len(),
                "an acknowledged append was lost"
            );
            for (e, position) in request.events.iter().zip(&result.positions) {
                let stored = by_id[&e.event_id];
                assert_eq!(stored.global_position, *position);
                assert_eq!(stored.stream_id, request.stream_id);
            }
        }
    }
    let records = a.pending_outbox(u64::MAX).await.unwrap();
    check_outbox(&records, &attempted, &by_id);
    let expected_feed: HashSet<Uuid> = all.iter().map(|e| e.event_id).collect();

    // Retrying an append whose outcome was unknown gives its original result or writes it now,
    // with its outbox records, still once.
    for (request, _) in attempted.iter().filter(|(_, r)| r.is_none()) {
        let retried = append_retrying(&a, request, deadline).await.unwrap();
        assert_eq!(retried.positions.len(), request.events.len());
    }
    let after_retries: Vec<RecordedEvent> =
        a.read_all(ReadAll::after(0)).try_collect().await.unwrap();
    let by_id_after: HashMap<Uuid, &RecordedEvent> =
        after_retries.iter().map(|e| (e.event_id, e)).collect();
    let records = a.pending_outbox(u64::MAX).await.unwrap();
    check_outbox(&records, &attempted, &by_id_after);
    assert!(attempted
        .iter()
        .all(|(r, _)| by_id_after.contains_key(&r.events[0].event_id)));

    let [sa, sb] = subscribers;
    for (name, task) in [("subscriber a", sa), ("subscriber b", sb)] {
        let seen = tokio::time::timeout(PATIENCE, task).await.unwrap().unwrap();
        check_feed(name, &seen, &expected_feed);
    }
    drop((a, b));
    let _ = server.stop();
}

/// Terminates the connection of an append that is blocked inside the append function, after it
/// allocated its positions: the caller gets `Unavailable`, nothing is written, the retry
/// succeeds, a second retry is reported as a duplicate, and later appends are not held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn terminated_connection_mid_append() {
    let url = es_test_support::database_url();
    let schema = common::unique_schema("term");
    let store = common::store_on(&url, &schema).await;
    let admin = common::pool(&url, 2).await;
    let stream = StreamId::new("order", "t").unwrap();
    store
        .append(AppendRequest::new(
            stream.clone(),
            ExpectedVersion::NoStream,
            vec![event(0)],
        ))
        .await
        .unwrap();

    // Hold a lock that makes the append's INSERT wait (after its positions are allocated).
    let mut blocker = admin.begin().await.unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "LOCK TABLE \"{schema}\".events IN EXCLUSIVE MODE"
    )))
    .execute(&mut *blocker)
    .await
    .unwrap();

    let request = AppendRequest::new(
        stream.clone(),
        ExpectedVersion::Exact(1),
        vec![event(1), event(2), event(3)],
    );
    let pending = {
        let store = store.clone();
        let request = request.clone();
        tokio::spawn(async move { store.append(request).await })
    };
    let pid = loop {
        let pid: Option<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE strpos(query, $1) > 0 \
             AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()",
        )
        .bind(format!("\"{schema}\".append_events("))
        .fetch_optional(&admin)
        .await
        .unwrap();
        if let Some(pid) = pid {
            break pid;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&admin)
        .await
        .unwrap();
    assert!(terminated);
    let result = tokio::time::timeout(PATIENCE, pending)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(result, Err(StoreError::Unavailable(_))),
        "a dropped connection is `Unavailable`: {result:?}"
    );
    blocker.rollback().await.unwrap();

    assert_eq!(
        store.stream_version(&stream).await.unwrap(),
        1,
        "nothing written"
    );
    let retried = store.append(request.clone()).await.unwrap();
    assert!(!retried.duplicate);
    assert_eq!(retried.stream_version, 4);
    let again = store.append(request.clone()).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.positions, retried.positions);
    // The aborted allocation left a gap, nothing more; appends and reads go on.
    let later = store
        .append(AppendRequest::new(
            stream.clone(),
            ExpectedVersion::Exact(4),
            vec![event(4)],
        ))
        .await
        .unwrap();
    assert_eq!(later.stream_version, 5);
    let all: Vec<RecordedEvent> = store
        .read_all(ReadAll::after(0))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(all.len(), 5);
    assert!(all
        .windows(2)
        .all(|w| w[0].global_position < w[1].global_position));
}

/// The listener reconnects after its connection is terminated: a subscriber with a long polling
/// interval still sees appends from another store promptly.
/// A store that only appends never listens (it would receive every other process's
/// notifications for nothing); its first wait for an append starts the listener, which then
/// wakes the subscription on another store's commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_listens_only_once_it_waits_for_appends() {
    let url = es_test_support::database_url();
    let schema = common::unique_schema("lazy");
    let admin = common::pool(&url, 2).await;
    let listeners = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE query = $1 AND state = 'idle'",
        )
        .bind(format!("LISTEN \"{schema}_events\""))
        .fetch_one(&admin)
        .await
        .unwrap()
    };
    let writer = common::store_on(&url, &schema).await;
    let stream = StreamId::new("order", "lazy").unwrap();
    for round in 0..20 {
        writer
            .append(AppendRequest::new(
                stream.clone(),
                ExpectedVersion::Any,
                vec![event(round)],
            ))
            .await
            .unwrap();
    }
    assert_eq!(listeners().await, 0, "an appending store does not listen");
    let reader = es_postgres::PgStore::builder(common::pool(&url, 4).await)
        .schema(&schema)
        .poll_interval(Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    let head = reader.head_position().await.unwrap();
    let mut sub = reader.subscribe(head, EventFilter::all());
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sub.next())
            .await
            .is_err(),
        "nothing after the head yet"
    );
    let started = Instant::now();
    while listeners().await != 1 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the waiting store listens"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    writer
        .append(AppendRequest::new(
            stream.clone(),
            ExpectedVersion::Any,
            vec![event(20)],
        ))
        .await
        .unwrap();
    let e = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("woken by NOTIFY well before the 60 s polling interval")
        .unwrap()
        .unwrap();
    assert_eq!(e.stream_version, 21);
    assert_eq!(
        listeners().await,
        1,
        "still one listener: the writer's store never listens"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn listener_reconnects_after_its_connection_is_terminated() {
    let url = es_test_support::database_url();
    let schema = common::unique_schema("listen");
    let writer = common::store_on(&url, &schema).await;
    let reader = es_postgres::PgStore::builder(common::pool(&url, 8).await)
        .schema(&schema)
        .poll_interval(Duration::from_secs(60))
        .build()
        .await
        .unwrap();
    let admin = common::pool(&url, 2).await;
    let mut sub = reader.subscribe(0, EventFilter::all());
    // Nothing to deliver yet: the subscription waits, which starts the store's listener.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sub.next())
            .await
            .is_err(),
        "an empty schema delivers nothing"
    );
    let stream = StreamId::new("order", "l").unwrap();
    for round in 0..3u64 {
        if round > 0 {
            let killed: i64 = sqlx::query_scalar(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE query = $1 AND pid <> pg_backend_pid()",
            )
            .bind(format!("LISTEN \"{schema}_events\""))
            .fetch_one(&admin)
            .await
            .unwrap();
            assert!(killed >= 1, "no listener connection found");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        writer
            .append(AppendRequest::new(
                stream.clone(),
                ExpectedVersion::Any,
                vec![event(round)],
            ))
            .await
            .unwrap();
        let e = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("woken by NOTIFY well before the 60 s polling interval")
            .unwrap()
            .unwrap();
        assert_eq!(e.stream_version, round + 1);
    }
}

/// An outbox relay keeps publishing while PostgreSQL is killed with SIGKILL and restarted under
/// concurrent appends with outbox messages. Afterwards every message of every stored append
/// reached the broker, nothing of an append that was not stored did, per-stream order held, and
/// the only duplicates are re-sent copies of the same record (same message id and position), so
/// a consumer detects them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[allow(clippy::too_many_lines)] // one scenario, checked end to end
async fn relay_survives_a_postgres_restart() {
    let dir = scratch_dir("es-postgres-relay-restart");
    let mut server = PgServer::start(&dir, &[]).expect("start PostgreSQL");
    let url = server.url("postgres");
    let schema = common::unique_schema("relay");
    let store = common::store_on(&url, &schema).await;

    let broker = RecordingPublisher {
        relay: "relay-1".into(),
        delay: Duration::from_millis(1),
        gapless: true,
        ..RecordingPublisher::default()
    };
    let (stop_relay, relay_stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(
        Relay::new(
            store.clone(),
            broker.clone(),
            RelayConfig {
                owner: "relay-1".into(),
                lease_ttl: Duration::from_secs(2),
                publish_timeout: Duration::from_millis(1500),
                batch_size: 25,
                max_in_flight: 4,
                idle_poll: Duration::from_millis(50),
                backoff: es_core::Backoff::new(
                    Duration::from_millis(50),
                    Duration::from_millis(200),
                ),
                ..RelayConfig::default()
            },
        )
        .run(async {
            let _ = relay_stopped.await;
        }),
    );

    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let store = store.clone();
        let stop = Arc::clone(&stop);
        writers.push(tokio::spawn(async move {
            let mut attempted: Vec<(AppendRequest, Option<AppendResult>)> = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let stream = StreamId::new("order", &format!("w{w}-{}", i % 3)).unwrap();
                let batch = (0..=i % 3).map(|k| event(i * 10 + k)).collect();
                let request =
                    with_messages(AppendRequest::new(stream, ExpectedVersion::Any, batch));
                match store.append(request.clone()).await {
                    Ok(result) => attempted.push((request, Some(result))),
                    Err(err) => {
                        assert!(err.is_transient(), "a crash is `Unavailable`, got {err:?}");
                        attempted.push((request, None));
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            attempted
        }));
    }

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let published_before = broker.received.lock().unwrap().len();
    server.kill9().expect("kill -9");
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.restart().expect("restart");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut attempted = Vec::new();
    for w in writers {
        attempted.extend(tokio::time::timeout(PATIENCE, w).await.unwrap().unwrap());
    }
    assert!(
        published_before > 0,
        "the relay published nothing before the crash"
    );
    assert!(
        attempted.iter().any(|(_, r)| r.is_none()),
        "the crash failed no append"
    );
    // Appends whose outcome is unknown are retried (idempotently) until they are stored.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    for (request, result) in &mut attempted {
        if result.is_none() {
            *result = Some(append_retrying(&store, request, deadline).await.unwrap());
        }
    }
    tokio::time::timeout(PATIENCE, async {
        while store.outbox_len().await.map_or(true, |n| n > 0) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the relay drains the outbox");
    let _ = stop_relay.send(());
    tokio::time::timeout(PATIENCE, relay)
        .await
        .unwrap()
        .unwrap()
        .expect("the relay only met transient failures");

    let all: Vec<RecordedEvent> = store
        .read_all(ReadAll::after(0))
        .try_collect()
        .await
        .unwrap();
    let by_id: HashMap<Uuid, &RecordedEvent> = all.iter().map(|e| (e.event_id, e)).collect();
    let sent: HashMap<Uuid, &OutboxMessage> = attempted
        .iter()
        .flat_map(|(r, _)| r.outbox.iter())
        .map(|m| (m.message_id, m))
        .collect();
    let received = broker.received.lock().unwrap().clone();
    let mut first: HashMap<Uuid, &OutboxRecord> = HashMap::new();
    let mut duplicates = 0;
    for (_, record) in &received {
        let id = record.message.message_id;
        let m = sent
            .get(&id)
            .expect("only messages that were appended are published");
        assert!(
            by_id.contains_key(&m.source_event_id),
            "a message of an append that was not stored was published"
        );
        assert_eq!(record.message.payload, m.payload);
        match first.get(&id) {
            Some(earlier) => {
                duplicates += 1;
                assert_eq!(
                    *earlier, record,
                    "a duplicate is the same record, detectable"
                );
            }
            None => {
                first.insert(id, record);
            }
        }
    }
    assert_eq!(
        first.len(),
        sent.len(),
        "every stored message was published"
    );
    // Per stream, first deliveries follow the source events' stream versions.
    let mut last: HashMap<&StreamId, u64> = HashMap::new();
    let mut seen = HashSet::new();
    for (_, record) in &received {
        if seen.insert(record.message.message_id) {
            let version = by_id[&record.message.source_event_id].stream_version;
            let prev = last.insert(&record.stream_id, version).unwrap_or(0);
            assert!(
                version > prev,
                "per-stream order in what the broker received"
            );
        }
    }
    eprintln!(
        "relay across a restart: {} messages, {} deliveries, {duplicates} duplicates",
        sent.len(),
        received.len()
    );
    drop(store);
    let _ = server.stop();
}
