//! Bad input: hostile and odd stream ids, oversized payloads and batches, data written behind
//! the store's back, lost scripts, bad settings. Each gets a typed error or transparent recovery,
//! and nothing stored is lost.

mod common;

use bytes::Bytes;
use es_core::{
    AppendLimits, AppendRequest, EventFilter, EventStore, ExpectedVersion, NewEvent, ReadAll,
    ReadStream, RecordedEvent, SnapshotRecord, SnapshotStore, StoreError, StreamId,
};
use es_redis::{Error, RedisStore};
use futures::TryStreamExt;
use redis::Value;
use serde_json::json;

fn event(n: u64) -> NewEvent {
    NewEvent::from_value("Noted", 1, &json!({ "n": n }))
}

async fn append(
    store: &RedisStore,
    stream: &StreamId,
    expected: ExpectedVersion,
    events: Vec<NewEvent>,
) -> Result<es_core::AppendResult, StoreError> {
    store
        .append(AppendRequest::new(stream.clone(), expected, events))
        .await
}

async fn read(store: &RedisStore, stream: &StreamId) -> Result<Vec<RecordedEvent>, StoreError> {
    store
        .read_stream(stream, ReadStream::forward())
        .try_collect()
        .await
}

async fn read_all(store: &RedisStore) -> Result<Vec<RecordedEvent>, StoreError> {
    store.read_all(ReadAll::after(0)).try_collect().await
}

async fn redis(store: &RedisStore, cmd: &mut redis::Cmd) -> Value {
    let mut conn = store.connection();
    cmd.query_async(&mut conn).await.unwrap()
}

#[test]
fn hostile_stream_ids_are_typed_errors() {
    let long = format!("order-{}", "x".repeat(10 * 1024));
    for bad in [
        "order-{x}",
        "order-a}b",
        "order-{",
        "or{der-x",
        "order-a b",
        " order-x",
        "order-ü",
        "订单-1",
        "order-x\n",
        "order-",
        "-x",
        "order",
        long.as_str(),
    ] {
        let err = StreamId::parse(bad).unwrap_err();
        assert!(!err.reason.is_empty(), "{bad:?}");
        assert!(
            err.input.chars().count() <= 80,
            "the error quotes a bounded input"
        );
    }
    assert!(StreamId::new("order", "a{b}").is_err());
    assert!(StreamId::new("or der", "x").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_but_valid_stream_ids_round_trip() {
    let store = common::store("ids").await;
    let max_id = "z".repeat(StreamId::MAX_LEN - "order-".len());
    let ids = [
        "order-a:b:c".to_owned(),
        "order-x=y~z".to_owned(),
        "order-a.b@c+d_e-f".to_owned(),
        "order-:".to_owned(),
        "order-es:{es:$all}".replace(['{', '}', '$'], ""),
        format!("order-{max_id}"),
    ];
    let mut positions = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let s = StreamId::parse(id).unwrap_or_else(|e| panic!("{id}: {e}"));
        assert_eq!(s.as_str().len(), id.len());
        let key = store.keys().events(&s);
        assert!(
            key.contains(&format!("{{{s}}}")),
            "{key} is tagged by the stream id"
        );
        let r = append(
            &store,
            &s,
            ExpectedVersion::NoStream,
            vec![event(i as u64), event(99)],
        )
        .await
        .unwrap();
        positions.extend(r.positions);
        let stored = read(&store, &s).await.unwrap();
        assert_eq!(stored.len(), 2, "{id}");
        assert!(stored
            .iter()
            .all(|e| e.stream_id == s && e.category() == "order"));
        let snapshot = SnapshotRecord {
            stream_id: s.clone(),
            version: 2,
            schema_version: 1,
            payload: Bytes::from_static(b"{}"),
            recorded_at: es_core::event::now_micros(),
            event_id: None,
        };
        assert!(store.save_snapshot(snapshot.clone()).await.unwrap());
        assert_eq!(store.load_snapshot(&s).await.unwrap(), Some(snapshot));
    }
    let all = read_all(&store).await.unwrap();
    assert_eq!(
        all.iter().map(|e| e.global_position).collect::<Vec<_>>(),
        positions
    );
    let all_ids: Vec<&str> = all.iter().map(|e| e.stream_id.as_str()).collect();
    for id in &ids {
        assert_eq!(all_ids.iter().filter(|s| **s == id).count(), 2);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_payloads_and_batches_are_rejected_before_writing() {
    let url = es_test_support::redis_url();
    let store = RedisStore::builder(url.as_str())
        .prefix(common::unique_prefix("big"))
        .limits(AppendLimits {
            max_payload_bytes: 1000,
            max_batch_len: 20,
            ..AppendLimits::default()
        })
        .build()
        .await
        .unwrap();
    let s = StreamId::parse("order-big").unwrap();
    let big = NewEvent::new("Noted", 1, format!("\"{}\"", "x".repeat(1000))).unwrap();
    let big_id = big.event_id;
    match append(&store, &s, ExpectedVersion::Any, vec![event(0), big]).await {
        Err(StoreError::PayloadTooLarge {
            event_id,
            size,
            limit,
            ..
        }) => assert_eq!((event_id, size, limit), (big_id, 1002, 1000)),
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    let long: Vec<NewEvent> = (0..21).map(event).collect();
    let r = append(&store, &s, ExpectedVersion::Any, long).await;
    assert!(matches!(r, Err(StoreError::InvalidRequest { .. })), "{r:?}");
    assert_eq!(store.stream_version(&s).await.unwrap(), 0);
    assert_eq!(store.head_position().await.unwrap(), 0);

    // At the default limits: a payload of almost 1 MiB and a batch of 10,000 events (the script
    // works through ids in chunks) are stored and read back intact.
    let store = common::store("big").await;
    let limit = AppendLimits::default();
    let payload = format!("\"{}\"", "é".repeat((limit.max_payload_bytes - 2) / 2));
    let huge = NewEvent::new("Noted", 1, payload.clone()).unwrap();
    append(&store, &s, ExpectedVersion::NoStream, vec![huge])
        .await
        .unwrap();
    let batch: Vec<NewEvent> = (0..limit.max_batch_len as u64).map(event).collect();
    let r = append(&store, &s, ExpectedVersion::Exact(1), batch.clone())
        .await
        .unwrap();
    assert_eq!(r.stream_version, 1 + limit.max_batch_len as u64);
    let retry = append(&store, &s, ExpectedVersion::Exact(1), batch)
        .await
        .unwrap();
    assert!(retry.duplicate);
    assert_eq!(retry.positions, r.positions);
    let stored = read(&store, &s).await.unwrap();
    assert_eq!(stored.len(), 1 + limit.max_batch_len);
    assert_eq!(stored[0].payload, Bytes::from(payload));
    assert!(stored[1..]
        .iter()
        .enumerate()
        .all(|(i, e)| e.payload_json().unwrap()["n"] == i));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_written_behind_the_stores_back_are_corrupt_errors() {
    let store = common::store("bad").await;
    let keys = store.keys().clone();
    let s = StreamId::parse("order-1").unwrap();
    append(&store, &s, ExpectedVersion::NoStream, vec![event(1)])
        .await
        .unwrap();

    // A per-stream entry with garbage fields at version 2, and one with bad metadata at 3.
    let events_key = keys.events(&s);
    redis(
        &store,
        redis::cmd("XADD")
            .arg(&events_key)
            .arg("2-0")
            .arg("garbage")
            .arg("yes"),
    )
    .await;
    match read(&store, &s).await {
        Err(StoreError::Corrupt { location, reason }) => {
            assert!(
                location.contains("order-1") && location.contains("version 2"),
                "{location}"
            );
            assert!(reason.contains("garbage"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // The good event before it is still readable.
    let first: Vec<RecordedEvent> = store
        .read_stream(&s, ReadStream::forward().limit(1))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(first.len(), 1);

    let t = StreamId::parse("order-2").unwrap();
    append(&store, &t, ExpectedVersion::NoStream, vec![event(1)])
        .await
        .unwrap();
    let mut bad_meta = redis::cmd("XADD");
    bad_meta.arg(keys.events(&t)).arg("2-0");
    for (field, value) in [
        ("event_id", "0191a2b3-c4d5-7e6f-8a9b-0c1d2e3f4a5b"),
        ("type", "Noted"),
        ("schema", "1"),
        ("payload", "{}"),
        ("metadata", "{not json"),
        ("position", "99"),
        ("recorded_at", "1700000000000000"),
    ] {
        bad_meta.arg(field).arg(value);
    }
    redis(&store, &mut bad_meta).await;
    match read(&store, &t).await {
        Err(StoreError::Corrupt { location, reason }) => {
            assert!(location.contains("order-2"), "{location}");
            assert!(reason.contains("metadata"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }

    // Garbage in the global feed.
    let head = store.head_position().await.unwrap();
    redis(
        &store,
        redis::cmd("XADD")
            .arg(keys.feed())
            .arg(format!("{}-0", head + 1))
            .arg("stream")
            .arg("not a stream id"),
    )
    .await;
    match read_all(&store).await {
        Err(StoreError::Corrupt { location, .. }) => {
            assert!(
                location.contains(&format!("position {}", head + 1)),
                "{location}"
            );
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // Appending now would have to write where the garbage sits: refused, nothing written.
    let u = StreamId::parse("order-3").unwrap();
    let r = append(&store, &u, ExpectedVersion::Any, vec![event(5)]).await;
    assert!(matches!(r, Err(StoreError::Corrupt { .. })), "{r:?}");
    assert_eq!(store.stream_version(&u).await.unwrap(), 0);
    assert_eq!(store.head_position().await.unwrap(), head);
    let filtered: Result<Vec<RecordedEvent>, _> = store
        .read_all(
            ReadAll::after(0)
                .filter(EventFilter::all().category("order"))
                .limit(2),
        )
        .try_collect()
        .await;
    assert_eq!(
        filtered.unwrap().len(),
        2,
        "events before the garbage stay readable"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_the_wrong_shape_are_corrupt_and_nothing_is_written() {
    let store = common::store("shape").await;
    let keys = store.keys().clone();

    // A version key that is not a number.
    let s = StreamId::parse("order-v").unwrap();
    redis(&store, redis::cmd("SET").arg(keys.version(&s)).arg("seven")).await;
    let err = store.stream_version(&s).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    let r = append(&store, &s, ExpectedVersion::Any, vec![event(1)]).await;
    assert!(matches!(r, Err(StoreError::Corrupt { .. })), "{r:?}");

    // A stream whose events key is a plain string (WRONGTYPE inside the script).
    let t = StreamId::parse("order-t").unwrap();
    redis(&store, redis::cmd("SET").arg(keys.events(&t)).arg("oops")).await;
    let r = append(&store, &t, ExpectedVersion::Any, vec![event(1)]).await;
    assert!(matches!(r, Err(StoreError::Corrupt { .. })), "{r:?}");
    let r = read(&store, &t).await;
    assert!(matches!(r, Err(StoreError::Corrupt { .. })), "{r:?}");

    // An entry beyond the stream's version (XADD with an automatic, time-based id).
    let u = StreamId::parse("order-u").unwrap();
    let good = append(&store, &u, ExpectedVersion::NoStream, vec![event(1)])
        .await
        .unwrap();
    redis(
        &store,
        redis::cmd("XADD")
            .arg(keys.events(&u))
            .arg("*")
            .arg("x")
            .arg("y"),
    )
    .await;
    let r = append(&store, &u, ExpectedVersion::Exact(1), vec![event(2)]).await;
    assert!(matches!(r, Err(StoreError::Corrupt { .. })), "{r:?}");

    // None of it wrote anything: the head and the feed hold the one good event.
    assert_eq!(store.head_position().await.unwrap(), good.positions[0]);
    assert_eq!(read_all(&store).await.unwrap().len(), 1);
    assert_eq!(store.stream_version(&u).await.unwrap(), 1);

    // A snapshot hash with garbage.
    redis(
        &store,
        redis::cmd("HSET")
            .arg(keys.snapshot(&u))
            .arg("version")
            .arg("3")
            .arg("schema")
            .arg("x"),
    )
    .await;
    let err = store.load_snapshot(&u).await.unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_and_functions_lost_after_a_flush_are_reloaded() {
    // A server of its own: SCRIPT FLUSH empties the cache of every client of the server.
    let dir = es_test_support::scratch_dir("redis-flush");
    let server = es_test_support::RedisServer::start(&dir, &["--appendonly", "yes"])
        .expect("start redis-server");
    let store = common::store_at(&server.url(), "flush").await;
    let s = StreamId::parse("order-1").unwrap();
    let first = vec![event(1), event(2)];
    let r = append(&store, &s, ExpectedVersion::NoStream, first.clone())
        .await
        .unwrap();
    redis(&store, redis::cmd("SCRIPT").arg("FLUSH")).await;
    redis(&store, redis::cmd("FUNCTION").arg("FLUSH")).await;
    let retry = append(&store, &s, ExpectedVersion::NoStream, first)
        .await
        .unwrap();
    assert!(retry.duplicate);
    assert_eq!(retry.positions, r.positions);
    redis(&store, redis::cmd("FUNCTION").arg("FLUSH")).await;
    let next = append(&store, &s, ExpectedVersion::Exact(2), vec![event(3)])
        .await
        .unwrap();
    assert_eq!(next.stream_version, 3);
    redis(&store, redis::cmd("SCRIPT").arg("FLUSH")).await;
    let snapshot = SnapshotRecord {
        stream_id: s.clone(),
        version: 3,
        schema_version: 1,
        payload: Bytes::from_static(b"{}"),
        recorded_at: es_core::event::now_micros(),
        event_id: None,
    };
    assert!(store.save_snapshot(snapshot).await.unwrap());
    assert_eq!(read(&store, &s).await.unwrap().len(), 3);
    drop(store);
    drop(server);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_are_typed_construction_errors() {
    let url = es_test_support::redis_url();
    for bad in ["", "has space", "br{ace}", "ü", &"p".repeat(65)] {
        let r = RedisStore::builder(url.as_str()).prefix(bad).build().await;
        assert!(
            matches!(r, Err(Error::InvalidPrefix { .. })),
            "{bad:?}: {r:?}"
        );
    }
    for builder in [
        RedisStore::builder(url.as_str()).poll_interval(std::time::Duration::ZERO),
        RedisStore::builder(url.as_str()).response_timeout(std::time::Duration::ZERO),
        RedisStore::builder(url.as_str()).connect_timeout(std::time::Duration::ZERO),
        RedisStore::builder(url.as_str()).server_check_interval(std::time::Duration::ZERO),
        RedisStore::builder(url.as_str()).read_page_size(0),
    ] {
        let r = builder.build().await;
        assert!(matches!(r, Err(Error::InvalidSetting(_))), "{r:?}");
    }
    let r = RedisStore::connect("not a url").await;
    assert!(matches!(r, Err(Error::InvalidUrl { .. })), "{r:?}");
    let port = es_test_support::free_port().unwrap();
    let r = RedisStore::connect(&format!("redis://127.0.0.1:{port}")).await;
    assert!(matches!(r, Err(Error::Connect { .. })), "{r:?}");
}
