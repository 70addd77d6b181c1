//! The append script run on hand-made groups (`REDIS_URL`): a group must behave exactly like
//! its appends run one at a time, and one append's failure must not touch the others.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use es_core::{
    AppendRequest, AppendResult, EventStore, ExpectedVersion, Metadata, NewEvent, OutboxMessage,
    OutboxRecord, OutboxStore, ReadAll, StoreError, StreamId,
};
use es_memory::InMemoryStore;
use futures::TryStreamExt;
use proptest::prelude::*;
use serde_json::json;
use uuid::Uuid;

use es_core::contract::position::{epoch_of, first_of_epoch, EpochStart, EPOCH_BITS};

use crate::RedisStore;

async fn store(name: &str) -> RedisStore {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let prefix = format!(
        "t:unit-{name}:{}:{}:{}",
        std::process::id(),
        Uuid::now_v7().simple(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    RedisStore::builder(es_test_support::redis_url())
        .prefix(prefix)
        .build()
        .await
        .expect("a Redis server at REDIS_URL")
}

/// A position's sequence within its epoch: a store's first incarnation numbers its positions
/// (and outbox positions) `first_of_epoch(e)`, `+1`, ..., whose sequences are 1, 2, ....
fn seq(position: u64) -> u64 {
    position - (epoch_of(position) << EPOCH_BITS)
}

fn seqs(positions: &[u64]) -> Vec<u64> {
    positions.iter().copied().map(seq).collect()
}

/// Runs `requests` as one script call.
async fn group(
    store: &RedisStore,
    requests: &[AppendRequest],
) -> Vec<Result<AppendResult, StoreError>> {
    let refs: Vec<&AppendRequest> = requests.iter().collect();
    store.inner.appender.execute(&refs).await
}

fn stream(name: &str) -> StreamId {
    StreamId::parse(name).unwrap()
}

fn event(n: u64) -> NewEvent {
    NewEvent::from_value("Noted", 1, &json!({ "n": n }))
}

fn message(source: &NewEvent, n: u64) -> OutboxMessage {
    OutboxMessage {
        message_id: Uuid::now_v7(),
        source_event_id: source.event_id,
        topic: "notes".into(),
        key: "k".into(),
        message_type: "note.added".into(),
        schema_version: 2,
        payload: Bytes::from(json!({ "n": n }).to_string()),
        metadata: Metadata::new().with_causation_id(source.event_id),
    }
}

fn append(s: &str, expected: ExpectedVersion, events: Vec<NewEvent>) -> AppendRequest {
    AppendRequest::new(stream(s), expected, events)
}

async fn redis(store: &RedisStore, cmd: &redis::Cmd) {
    let mut conn = store.connection();
    let _: redis::Value = cmd.query_async(&mut conn).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_in_one_group_see_each_other() {
    let store = store("see").await;
    let first = append(
        "order-1",
        ExpectedVersion::NoStream,
        vec![event(1), event(2)],
    );
    let second = append("order-1", ExpectedVersion::Exact(2), vec![event(3)]);
    let stale = append("order-1", ExpectedVersion::Exact(2), vec![event(4)]);
    let retry = first.clone();
    let overlap = append(
        "order-2",
        ExpectedVersion::Any,
        vec![first.events[0].clone(), event(5)],
    );
    let empty = append("order-1", ExpectedVersion::Exact(3), Vec::new());
    let other = append("order-2", ExpectedVersion::NoStream, vec![event(6)]);
    let results = group(
        &store,
        &[first, second, stale, retry, overlap, empty, other],
    )
    .await;
    let ok = |i: usize| results[i].as_ref().unwrap().clone();
    assert_eq!(
        (ok(0).stream_version, seqs(&ok(0).positions)),
        (2, vec![1, 2])
    );
    assert_eq!((ok(1).stream_version, seqs(&ok(1).positions)), (3, vec![3]));
    assert!(
        matches!(results[2], Err(StoreError::Conflict { actual: 3, .. })),
        "{:?}",
        results[2]
    );
    assert_eq!(
        ok(3),
        AppendResult {
            stream_version: 2,
            positions: ok(0).positions,
            duplicate: true
        }
    );
    assert!(
        matches!(results[4], Err(StoreError::DuplicateEvent { .. })),
        "{:?}",
        results[4]
    );
    assert_eq!((ok(5).stream_version, ok(5).positions.len()), (3, 0));
    assert_eq!((ok(6).stream_version, seqs(&ok(6).positions)), (1, vec![4]));
    assert_eq!(store.head_position().await.unwrap(), ok(6).positions[0]);
    assert_eq!(store.stream_version(&stream("order-1")).await.unwrap(), 3);
    assert_eq!(store.stream_version(&stream("order-2")).await.unwrap(), 1);
}

/// A close and later appends to the same stream in one script call (as group commit gathers
/// them): the appends after the close are refused with `StreamClosed` at the tombstone's
/// version, the close sent again in the same call is an exact retry, an append before the close
/// and appends to another stream go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_in_a_group_refuses_the_appends_after_it() {
    let store = store("close-group").await;
    let before = append("order-c", ExpectedVersion::NoStream, vec![event(1)]);
    let close = AppendRequest::close(stream("order-c"), ExpectedVersion::Any);
    let after_any = append("order-c", ExpectedVersion::Any, vec![event(2)]);
    let after_exact = append("order-c", ExpectedVersion::Exact(2), vec![event(3)]);
    let after_empty = append("order-c", ExpectedVersion::Exact(2), Vec::new());
    let retry = close.clone();
    let other = append("order-d", ExpectedVersion::NoStream, vec![event(4)]);
    let results = group(
        &store,
        &[
            before,
            close,
            after_any,
            after_exact,
            after_empty,
            retry,
            other,
        ],
    )
    .await;
    let ok = |i: usize| results[i].as_ref().unwrap().clone();
    assert_eq!(ok(0).stream_version, 1);
    assert_eq!(ok(1).stream_version, 2);
    for (i, result) in results.iter().enumerate().take(5).skip(2) {
        assert!(
            matches!(result, Err(StoreError::StreamClosed { version: 2, .. })),
            "{i}: {result:?}"
        );
    }
    assert_eq!(
        ok(5),
        AppendResult {
            stream_version: 2,
            positions: ok(1).positions,
            duplicate: true
        }
    );
    assert_eq!(ok(6).stream_version, 1);
    assert_eq!(store.stream_version(&stream("order-c")).await.unwrap(), 2);
    // And in the next call, from the closed key.
    let later = group(
        &store,
        &[append("order-c", ExpectedVersion::Any, vec![event(5)])],
    )
    .await;
    assert!(
        matches!(&later[0], Err(StoreError::StreamClosed { version: 2, .. })),
        "{later:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_stream_fails_alone() {
    let store = store("corrupt").await;
    let keys = store.keys().clone();
    // A stream whose events key is not a stream, and one with an entry beyond its version.
    redis(
        &store,
        redis::cmd("SET")
            .arg(keys.events(&stream("order-bad")))
            .arg("x"),
    )
    .await;
    redis(
        &store,
        redis::cmd("XADD")
            .arg(keys.events(&stream("order-ahead")))
            .arg("5-0")
            .arg("x")
            .arg("y"),
    )
    .await;
    // A version key that is not a string.
    redis(
        &store,
        redis::cmd("HSET")
            .arg(keys.version(&stream("order-hash")))
            .arg("a")
            .arg("b"),
    )
    .await;
    let good = |s: &str, n: u64| {
        let e = event(n);
        let m = message(&e, n);
        append(s, ExpectedVersion::Any, vec![e]).with_outbox(vec![m])
    };
    let requests = [
        good("order-1", 1),
        good("order-bad", 2),
        good("order-2", 3),
        good("order-ahead", 4),
        good("order-3", 5),
        good("order-hash", 6),
    ];
    let results = group(&store, &requests).await;
    for (i, r) in results.iter().enumerate() {
        if i % 2 == 0 {
            assert_eq!(
                seqs(&r.as_ref().unwrap().positions),
                vec![i as u64 / 2 + 1],
                "{i}"
            );
        } else {
            assert!(matches!(r, Err(StoreError::Corrupt { .. })), "{i}: {r:?}");
        }
    }
    let feed: Vec<String> = store
        .read_all(ReadAll::after(0))
        .map_ok(|e| e.stream_id.to_string())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(feed, ["order-1", "order-2", "order-3"]);
    let outbox = store.pending_outbox(10).await.unwrap();
    let sources: Vec<Uuid> = outbox.iter().map(|r| r.message.source_event_id).collect();
    let expected: Vec<Uuid> = [0, 2, 4]
        .iter()
        .map(|&i| requests[i].events[0].event_id)
        .collect();
    assert_eq!(sources, expected);
    assert_eq!(
        outbox.iter().map(|r| seq(r.position)).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(
        store.stream_version(&stream("order-ahead")).await.unwrap(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_outbox_fails_only_appends_with_messages() {
    let store = store("outbox").await;
    redis(
        &store,
        redis::cmd("XADD")
            .arg(store.keys().outbox())
            .arg("7-0")
            .arg("x")
            .arg("y"),
    )
    .await;
    let plain = append("order-1", ExpectedVersion::Any, vec![event(1)]);
    let e = event(2);
    let m = message(&e, 2);
    let with_message = append("order-2", ExpectedVersion::Any, vec![e]).with_outbox(vec![m]);
    let results = group(&store, &[plain, with_message]).await;
    let first = results[0].as_ref().unwrap().positions[0];
    assert!(
        matches!(&results[1], Err(StoreError::Corrupt { reason, .. }) if reason.contains("outbox")),
        "{:?}",
        results[1]
    );
    assert_eq!(store.head_position().await.unwrap(), first);
}

/// Concurrent appends through the store's own path: identical retries racing each other store
/// the batch once, and everyone gets its positions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_identical_retries_store_once() {
    let store = store("race").await;
    for round in 0..20u64 {
        let s = format!("order-r{round}");
        let request = append(
            &s,
            ExpectedVersion::NoStream,
            vec![event(round), event(round + 1)],
        );
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let store = store.clone();
                let request = request.clone();
                tokio::spawn(async move { store.append(request).await.unwrap() })
            })
            .collect();
        let mut fresh = 0;
        let mut positions = None;
        for t in tasks {
            let r = t.await.unwrap();
            fresh += usize::from(!r.duplicate);
            assert_eq!(r.stream_version, 2);
            assert_eq!(*positions.get_or_insert(r.positions.clone()), r.positions);
        }
        assert_eq!(fresh, 1, "round {round}: stored exactly once");
    }
    assert_eq!(seq(store.head_position().await.unwrap()), 40);
}

/// The seconds since 2024-01-01 now: the least epoch a new incarnation can start.
fn clock_epoch() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    now - es_core::contract::position::EPOCH_CLOCK_ORIGIN
}

/// The script's constants are es-core's.
#[test]
fn the_script_numbers_epochs_as_es_core_does() {
    let script = crate::script::APPEND;
    assert!(script.contains(&format!("local SPAN = {}\n", 1u64 << EPOCH_BITS)));
    assert!(script.contains(&format!(
        "local ORIGIN = {}\n",
        es_core::contract::position::EPOCH_CLOCK_ORIGIN
    )));
    assert!(script.contains(&format!("local LAST = {}\n", (1u64 << 53) - 1)));
    assert_eq!(
        first_of_epoch(es_core::contract::position::MAX_EPOCH) + (1 << EPOCH_BITS) - 2,
        (1 << 53) - 1
    );
}

/// The first write of a store begins an epoch numbered from the server's clock, recorded with
/// head 0; a later write of the same incarnation does not begin another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_write_ever_begins_an_epoch_from_the_clock() {
    let before = clock_epoch();
    let store = store("first").await;
    assert!(store.epochs().await.unwrap().is_empty());
    let r = store
        .append(append(
            "order-1",
            ExpectedVersion::NoStream,
            vec![event(1), event(2)],
        ))
        .await
        .unwrap();
    let epoch = epoch_of(r.positions[0]);
    assert!(
        epoch >= before && epoch <= clock_epoch() + 1,
        "{epoch} vs {before}"
    );
    assert_eq!(
        r.positions,
        [first_of_epoch(epoch), first_of_epoch(epoch) + 1]
    );
    let more = store
        .append(append("order-1", ExpectedVersion::Exact(2), vec![event(3)]))
        .await
        .unwrap();
    assert_eq!(more.positions, [first_of_epoch(epoch) + 2]);
    assert_eq!(
        store.epochs().await.unwrap(),
        [EpochStart {
            epoch,
            previous_head: 0
        }]
    );
}

/// The error inside a `StoreError::Backend`, as this crate's `Error`.
fn crate_error(err: &StoreError) -> Option<&crate::Error> {
    match err {
        StoreError::Backend(source) => source.downcast_ref::<crate::Error>(),
        _ => None,
    }
}

/// The script's own check, on the first write of a new server incarnation, refuses an evicting
/// policy even where the store's background task has not read it yet (here the group is sent
/// directly, past the store's check; the index's `run` field is set to another process's id,
/// which is what a restart or failover looks like to the script).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_write_of_a_new_incarnation_checks_the_eviction_policy() {
    let dir = es_test_support::scratch_dir("es-redis-unit-evict");
    let server = es_test_support::RedisServer::start(&dir, &["--appendonly", "yes"]).unwrap();
    let store = RedisStore::builder(server.url())
        .prefix("unit")
        .build()
        .await
        .unwrap();
    let first = group(
        &store,
        &[append("order-1", ExpectedVersion::Any, vec![event(1)])],
    )
    .await;
    let head = first[0].as_ref().unwrap().positions[0];
    let epochs = store.epochs().await.unwrap();

    let keys = store.keys().clone();
    redis(
        &store,
        redis::cmd("HSET")
            .arg(keys.index())
            .arg("run")
            .arg("0".repeat(40)),
    )
    .await;
    redis(
        &store,
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory-policy")
            .arg("allkeys-random"),
    )
    .await;
    let refused = group(
        &store,
        &[append("order-1", ExpectedVersion::Any, vec![event(2)])],
    )
    .await;
    match refused[0].as_ref().map_err(crate_error) {
        Err(Some(crate::Error::EvictionPolicy { policy })) => assert_eq!(policy, "allkeys-random"),
        other => panic!("expected EvictionPolicy, got {other:?}"),
    }
    assert_eq!(store.head_position().await.unwrap(), head);
    assert_eq!(store.epochs().await.unwrap(), epochs, "no epoch began");

    redis(
        &store,
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory-policy")
            .arg("noeviction"),
    )
    .await;
    let ok = group(
        &store,
        &[append("order-1", ExpectedVersion::Any, vec![event(3)])],
    )
    .await;
    let position = ok[0].as_ref().unwrap().positions[0];
    let epoch = epoch_of(position);
    assert!(epoch > epoch_of(head));
    assert_eq!(position, first_of_epoch(epoch));
    let now = store.epochs().await.unwrap();
    assert_eq!(now.len(), 2);
    assert_eq!(
        now[1],
        EpochStart {
            epoch,
            previous_head: head
        }
    );
}

/// Positions are Lua doubles in the script: exact up to 2^53 - 1, and the store refuses to go
/// beyond, typed and without writing. Positions above 10^14 (every position of an epoch numbered
/// from the clock is) are formatted in full where the script builds strings (the duplicate
/// lookup of ids written earlier in the same call), so a retry is still recognised.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_stay_exact_up_to_two_to_the_53() {
    const LAST: u64 = (1 << 53) - 1;
    let store = store("last").await;
    let keys = store.keys().clone();
    let first = append("order-1", ExpectedVersion::NoStream, vec![event(1)]);
    let r = store.append(first.clone()).await.unwrap();
    assert!(r.positions[0] > 100_000_000_000_000);
    let retry = store.append(first).await.unwrap();
    assert!(retry.duplicate);
    assert_eq!(retry.positions, r.positions);

    redis(
        &store,
        redis::cmd("HSET")
            .arg(keys.index())
            .arg("position")
            .arg(LAST - 2),
    )
    .await;
    // An append and its retry in one group: the retry finds the ids the append just wrote.
    let pair = append(
        "order-2",
        ExpectedVersion::NoStream,
        vec![event(2), event(3)],
    );
    let both = group(&store, &[pair.clone(), pair.clone()]).await;
    let r = both[0].as_ref().unwrap();
    assert_eq!(r.positions, [LAST - 1, LAST]);
    let in_group = both[1].as_ref().unwrap();
    assert!(in_group.duplicate);
    assert_eq!(in_group.positions, [LAST - 1, LAST]);
    let retry = store.append(pair).await.unwrap();
    assert!(retry.duplicate);
    assert_eq!(retry.positions, [LAST - 1, LAST]);
    let read: Vec<u64> = store
        .read_all(ReadAll::after(LAST - 2))
        .map_ok(|e| e.global_position)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(read, [LAST - 1, LAST]);

    let over = store
        .append(append("order-3", ExpectedVersion::NoStream, vec![event(4)]))
        .await
        .unwrap_err();
    assert!(
        matches!(&over, StoreError::Backend(e) if e.to_string().contains("2^53")),
        "{over:?}"
    );
    assert_eq!(store.head_position().await.unwrap(), LAST);
    assert_eq!(store.stream_version(&stream("order-3")).await.unwrap(), 0);

    // A new incarnation after a head in the last epoch would begin above it, at 2^53: refused
    // the same way. (The `run` field set to another process's id makes the next write the first
    // of a new incarnation.)
    let epochs = store.epochs().await.unwrap();
    redis(
        &store,
        redis::cmd("HSET")
            .arg(keys.index())
            .arg("run")
            .arg("0".repeat(40)),
    )
    .await;
    let over = store
        .append(append("order-3", ExpectedVersion::NoStream, vec![event(5)]))
        .await
        .unwrap_err();
    assert!(
        matches!(&over, StoreError::Backend(e) if e.to_string().contains("2^53")),
        "{over:?}"
    );
    assert_eq!(store.epochs().await.unwrap(), epochs);
}

// ---------------------------------------------------------------------------------------------
// Property: a group behaves like its appends one at a time (against es-memory).

const STREAMS: [&str; 3] = ["order-1", "order-2", "payment-1"];

#[derive(Debug, Clone)]
enum Exp {
    Any,
    NoStream,
    Exists,
    Exact(u8),
}

#[derive(Debug, Clone)]
enum Events {
    New(u8),
    Retry(u8),
    Overlap(u8, u8),
}

#[derive(Debug, Clone)]
struct Spec {
    stream: u8,
    expected: Exp,
    events: Events,
    messages: u8,
}

fn spec() -> impl Strategy<Value = Spec> {
    let expected = prop_oneof![
        Just(Exp::Any),
        Just(Exp::NoStream),
        Just(Exp::Exists),
        (0u8..6).prop_map(Exp::Exact),
    ];
    let events = prop_oneof![
        5 => (0u8..4).prop_map(Events::New),
        2 => any::<u8>().prop_map(Events::Retry),
        1 => (any::<u8>(), 1u8..3).prop_map(|(k, n)| Events::Overlap(k, n)),
    ];
    (0u8..3, expected, events, 0u8..3).prop_map(|(stream, expected, events, messages)| Spec {
        stream,
        expected,
        events,
        messages,
    })
}

fn build(spec: &Spec, sent: &[AppendRequest], step: usize) -> AppendRequest {
    let fresh = |n: u8| -> Vec<NewEvent> {
        (0..u64::from(n))
            .map(|j| event(step as u64 * 10 + j).with_id(Uuid::now_v7()))
            .collect()
    };
    if let (Events::Retry(k), false) = (&spec.events, sent.is_empty()) {
        return sent[usize::from(*k) % sent.len()].clone();
    }
    let events = match &spec.events {
        Events::Overlap(k, n) if !sent.is_empty() => {
            let mut events: Vec<NewEvent> = sent[usize::from(*k) % sent.len()]
                .events
                .iter()
                .take(1)
                .cloned()
                .collect();
            events.extend(fresh(*n));
            events
        }
        Events::New(n) => fresh(*n),
        _ => fresh(1),
    };
    let expected = match spec.expected {
        Exp::Any => ExpectedVersion::Any,
        Exp::NoStream => ExpectedVersion::NoStream,
        Exp::Exists => ExpectedVersion::StreamExists,
        Exp::Exact(v) => ExpectedVersion::Exact(u64::from(v)),
    };
    let outbox = if events.is_empty() {
        Vec::new()
    } else {
        (0..u64::from(spec.messages))
            .map(|m| message(&events[0], step as u64 * 10 + m))
            .collect()
    };
    AppendRequest::new(stream(STREAMS[usize::from(spec.stream)]), expected, events)
        .with_outbox(outbox)
}

fn outcome(r: &Result<AppendResult, StoreError>) -> String {
    match r {
        Ok(r) => format!(
            "{:?}",
            AppendResult {
                positions: seqs(&r.positions),
                ..r.clone()
            }
        ),
        Err(StoreError::Conflict { actual, .. }) => format!("Conflict({actual})"),
        Err(StoreError::DuplicateEvent { event_id, .. }) => format!("Duplicate({event_id})"),
        Err(other) => format!("unexpected: {other}"),
    }
}

fn comparable(records: Vec<OutboxRecord>) -> Vec<(u64, StreamId, OutboxMessage)> {
    records
        .into_iter()
        .map(|r| (seq(r.position), r.stream_id, r.message))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn a_group_is_its_appends_in_order(groups in proptest::collection::vec(
        proptest::collection::vec(spec(), 1..10), 1..4)
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let ours = store("prop").await;
            let oracle = InMemoryStore::new();
            let mut sent: Vec<AppendRequest> = Vec::new();
            for (g, specs) in groups.iter().enumerate() {
                let mut requests = Vec::new();
                for (i, spec) in specs.iter().enumerate() {
                    let request = build(spec, &sent, g * 100 + i);
                    sent.push(request.clone());
                    requests.push(request);
                }
                let results = group(&ours, &requests).await;
                for (i, (request, result)) in requests.iter().zip(&results).enumerate() {
                    let expected = oracle.append(request.clone()).await;
                    assert_eq!(
                        outcome(result),
                        outcome(&expected),
                        "group {g}, append {i}: {request:?}"
                    );
                }
            }
            let feed = |events: Vec<es_core::RecordedEvent>| -> Vec<_> {
                events
                    .into_iter()
                    .map(|e| (seq(e.global_position), e.event_id, e.stream_id, e.stream_version, e.payload))
                    .collect()
            };
            let all = ReadAll::after(0);
            assert_eq!(
                feed(ours.read_all(all.clone()).try_collect().await.unwrap()),
                feed(oracle.read_all(all).try_collect().await.unwrap())
            );
            for s in STREAMS {
                let s = stream(s);
                assert_eq!(
                    ours.stream_version(&s).await.unwrap(),
                    oracle.stream_version(&s).await.unwrap()
                );
            }
            assert_eq!(
                comparable(ours.pending_outbox(1000).await.unwrap()),
                comparable(oracle.pending_outbox(1000).await.unwrap())
            );
        });
    }
}
