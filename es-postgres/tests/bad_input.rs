//! Bad input gets a typed error and loses nothing: hostile schema names, hostile but valid stream
//! ids, oversized or malformed events, rows corrupted behind the store's back.

mod common;

use bytes::Bytes;
use es_core::{
    AppendLimits, AppendRequest, EventFilter, EventStore, ExpectedVersion, NewEvent, OutboxStore,
    ReadAll, ReadStream, RecordedEvent, Repository, RepositoryError, SnapshotRecord, SnapshotStore,
    StoreError, StreamId,
};
use es_postgres::{Error, PgStore};
use es_testkit::domain::{Ledger, LedgerCommand};
use futures::TryStreamExt;
use serde_json::json;
use sqlx::AssertSqlSafe;

fn event(n: u64) -> NewEvent {
    NewEvent::from_value("Happened", 1, &json!({ "n": n }))
}

async fn read(store: &PgStore, stream: &StreamId) -> Result<Vec<RecordedEvent>, StoreError> {
    store
        .read_stream(stream, ReadStream::forward())
        .try_collect()
        .await
}

#[tokio::test]
async fn hostile_schema_names_are_rejected_before_touching_the_database() {
    let url = es_test_support::database_url();
    let pool = common::pool(&url, 2).await;
    let schemas = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM pg_namespace")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let before = schemas().await;
    let long = "a".repeat(10_000);
    for bad in [
        "",
        "es\"; DROP SCHEMA public CASCADE; --",
        "es'; SELECT pg_sleep(10); --",
        "es;",
        "Es",
        "with space",
        "ünïcode",
        "日本",
        "es\0x",
        "pg_temp",
        "1st",
        long.as_str(),
    ] {
        let result = PgStore::builder(pool.clone()).schema(bad).build().await;
        match result {
            Err(Error::InvalidSchemaName { name, .. }) => assert!(name.chars().count() <= 80),
            other => panic!("{bad:?} was accepted: {other:?}"),
        }
        assert!(es_postgres::migration_script(bad).is_err());
    }
    assert_eq!(schemas().await, before, "no schema was created");
}

#[tokio::test]
async fn hostile_but_valid_stream_ids_round_trip() {
    let store = common::fresh_store().await;
    let long_id = "x".repeat(StreamId::MAX_LEN - "c-".len());
    let ids = [
        StreamId::new("order", "a-b_c.d:e@f+g=h~i").unwrap(),
        StreamId::new("order", "--__..::@@++==~~").unwrap(),
        StreamId::new(&"c".repeat(StreamId::MAX_CATEGORY_LEN), "1").unwrap(),
        StreamId::new("c", &long_id).unwrap(),
        StreamId::new("ORDER_2", "0").unwrap(),
    ];
    for (i, id) in ids.iter().enumerate() {
        store
            .append(AppendRequest::new(
                id.clone(),
                ExpectedVersion::NoStream,
                vec![event(i as u64)],
            ))
            .await
            .unwrap();
        let stored = read(&store, id).await.unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(&stored[0].stream_id, id);
        assert_eq!(stored[0].category(), id.category());
        assert_eq!(store.stream_version(id).await.unwrap(), 1);
        let snapshot = SnapshotRecord {
            stream_id: id.clone(),
            version: 1,
            schema_version: 1,
            payload: Bytes::from_static(b"{\"ok\": true}"),
            recorded_at: es_core::event::now_micros(),
            event_id: None,
        };
        assert!(store.save_snapshot(snapshot).await.unwrap());
        assert_eq!(
            store.load_snapshot(id).await.unwrap().unwrap().stream_id,
            *id
        );
    }
    // Category filters match whole categories, including ones that look like patterns.
    let filtered: Vec<RecordedEvent> = store
        .read_all(ReadAll::after(0).filter(EventFilter::all().category("order")))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(filtered.len(), 2);
    let none: Vec<RecordedEvent> = store
        .read_all(ReadAll::after(0).filter(EventFilter::all().category("%")))
        .try_collect()
        .await
        .unwrap();
    assert!(none.is_empty());
}

#[tokio::test]
async fn oversized_events_and_batches_are_rejected() {
    let url = es_test_support::database_url();
    let limits = AppendLimits {
        max_payload_bytes: 1024,
        max_batch_len: 20,
        ..AppendLimits::default()
    };
    let store = PgStore::builder(common::pool(&url, 8).await)
        .schema(common::unique_schema("limits"))
        .limits(limits)
        .build()
        .await
        .unwrap();
    let stream = StreamId::new("order", "big").unwrap();
    let big = NewEvent::new("Big", 1, format!("\"{}\"", "x".repeat(1023))).unwrap();
    let id = big.event_id;
    match store
        .append(AppendRequest::new(
            stream.clone(),
            ExpectedVersion::Any,
            vec![event(0), big],
        ))
        .await
    {
        Err(StoreError::PayloadTooLarge {
            event_id,
            size,
            limit,
            ..
        }) => assert_eq!((event_id, size, limit), (id, 1025, 1024)),
        other => panic!("expected PayloadTooLarge, got {other:?}"),
    }
    let fits = NewEvent::new("Big", 1, format!("\"{}\"", "x".repeat(1022))).unwrap();
    store
        .append(AppendRequest::new(
            stream.clone(),
            ExpectedVersion::Any,
            vec![fits],
        ))
        .await
        .unwrap();
    let too_many = (0..21).map(event).collect();
    let r = store
        .append(AppendRequest::new(
            stream.clone(),
            ExpectedVersion::Any,
            too_many,
        ))
        .await;
    assert!(matches!(r, Err(StoreError::InvalidRequest { .. })), "{r:?}");
    assert_eq!(store.stream_version(&stream).await.unwrap(), 1);
}

/// Events PostgreSQL refuses (not JSON, `\u0000` in jsonb, NUL in a type name) fail alone with
/// `InvalidRequest`, even when they share a group with good appends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_events_fail_alone() {
    let store = common::fresh_store().await;
    let mut bad_events = Vec::new();
    let mut not_json = event(0);
    not_json.payload = Bytes::from_static(b"{not json");
    bad_events.push(not_json);
    bad_events.push(NewEvent::new("Nul", 1, r#"{"text": "a\u0000b"}"#).unwrap());
    let mut nul_type = event(0);
    nul_type.event_type = "Bad\0Type".into();
    bad_events.push(nul_type);
    let mut invalid_utf8 = event(0);
    invalid_utf8.payload = Bytes::from_static(b"\"\xff\xfe\"");
    bad_events.push(invalid_utf8);

    for (k, bad) in bad_events.into_iter().enumerate() {
        let mut tasks = Vec::new();
        for i in 0..12u64 {
            let store = store.clone();
            let stream = StreamId::new("order", &format!("{k}-{i}")).unwrap();
            let events = if i == 5 {
                vec![event(i), bad.clone()]
            } else {
                vec![event(i)]
            };
            tasks.push(tokio::spawn(async move {
                store
                    .append(AppendRequest::new(
                        stream,
                        ExpectedVersion::NoStream,
                        events,
                    ))
                    .await
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            let result = t.await.unwrap();
            if i == 5 {
                assert!(
                    matches!(result, Err(StoreError::InvalidRequest { .. })),
                    "case {k}: {result:?}"
                );
            } else {
                assert_eq!(result.unwrap().stream_version, 1, "case {k}");
            }
        }
        let bad_stream = StreamId::new("order", &format!("{k}-5")).unwrap();
        assert_eq!(
            store.stream_version(&bad_stream).await.unwrap(),
            0,
            "case {k}"
        );
    }
    let all: Vec<RecordedEvent> = store
        .read_all(ReadAll::after(0))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(all.len(), 4 * 11);
}

fn message(source: uuid::Uuid) -> es_core::contract::OutboxMessage {
    es_core::contract::OutboxMessage {
        message_id: uuid::Uuid::now_v7(),
        source_event_id: source,
        topic: "topic".into(),
        key: "key".into(),
        message_type: "Happened".into(),
        schema_version: 1,
        payload: Bytes::from_static(b"{\"a\": [1, 2]}"),
        metadata: es_core::Metadata::new(),
    }
}

/// Outbox messages PostgreSQL refuses (not JSON, NUL in a topic or key) fail their append alone
/// with `InvalidRequest`: no event and no outbox record of it is written, while the appends that
/// shared its group commit are stored with their records.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_outbox_messages_fail_alone() {
    let store = common::fresh_store().await;
    let mut bad_messages = Vec::new();
    let mut not_json = message(uuid::Uuid::nil());
    not_json.payload = Bytes::from_static(b"{not json");
    bad_messages.push(not_json);
    let mut nul_topic = message(uuid::Uuid::nil());
    nul_topic.topic = "to\0pic".into();
    bad_messages.push(nul_topic);
    let mut nul_key = message(uuid::Uuid::nil());
    nul_key.key = "k\0".into();
    bad_messages.push(nul_key);

    for (k, bad) in bad_messages.into_iter().enumerate() {
        let mut tasks = Vec::new();
        for i in 0..12u64 {
            let store = store.clone();
            let stream = StreamId::new("order", &format!("{k}-{i}")).unwrap();
            let e = event(i);
            let outbox = if i == 5 {
                vec![message(e.event_id), bad.clone()]
            } else {
                vec![message(e.event_id)]
            };
            tasks.push(tokio::spawn(async move {
                store
                    .append(
                        AppendRequest::new(stream, ExpectedVersion::NoStream, vec![e])
                            .with_outbox(outbox),
                    )
                    .await
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            let result = t.await.unwrap();
            if i == 5 {
                assert!(
                    matches!(result, Err(StoreError::InvalidRequest { .. })),
                    "case {k}: {result:?}"
                );
            } else {
                assert_eq!(result.unwrap().stream_version, 1, "case {k}");
            }
        }
        let bad_stream = StreamId::new("order", &format!("{k}-5")).unwrap();
        assert_eq!(store.stream_version(&bad_stream).await.unwrap(), 0);
    }
    let pending = store.pending_outbox(1000).await.unwrap();
    assert_eq!(pending.len(), 3 * 11);
    assert!(pending
        .iter()
        .all(|r| !r.stream_id.as_str().ends_with("-5")));
    // The payload comes back byte for byte (`json`, not normalized `jsonb`).
    assert!(pending
        .iter()
        .all(|r| r.message.payload == Bytes::from_static(b"{\"a\": [1, 2]}")));
}

/// An outbox row damaged behind the store's back is a typed error naming its position.
#[tokio::test]
async fn corrupt_outbox_rows_are_typed_errors() {
    let url = es_test_support::database_url();
    let schema = common::unique_schema("badbox");
    let store = common::store_on(&url, &schema).await;
    let e = event(0);
    let request = AppendRequest::new(
        StreamId::new("order", "1").unwrap(),
        ExpectedVersion::NoStream,
        vec![e.clone()],
    )
    .with_outbox(vec![message(e.event_id)]);
    store.append(request).await.unwrap();
    let pending = store.pending_outbox(10).await.unwrap();
    assert_eq!(pending.len(), 1);
    let position = pending[0].position;
    for (set, what) in [
        ("stream_id = 'no category'", "stream id"),
        ("schema_version = -1", "schema version"),
        ("metadata = '[1]'", "metadata"),
    ] {
        let pool = common::pool(&url, 1).await;
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE \"{schema}\".outbox SET {set} WHERE position = {position}"
        )))
        .execute(&pool)
        .await
        .unwrap();
        match store.pending_outbox(10).await {
            Err(StoreError::Corrupt { location, reason }) => {
                assert!(
                    location.contains(&position.to_string()),
                    "{what}: {location}"
                );
                assert!(reason.contains(what), "{what}: {reason}");
            }
            other => panic!("{what}: expected Corrupt, got {other:?}"),
        }
        // Repair for the next case.
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE \"{schema}\".outbox SET stream_id = 'order-1', schema_version = 1, \
             metadata = '{{}}' WHERE position = {position}"
        )))
        .execute(&pool)
        .await
        .unwrap();
    }
    assert_eq!(store.pending_outbox(10).await.unwrap().len(), 1);
}

/// Rows changed behind the store's back are typed errors naming where; the other events stay
/// readable.
#[tokio::test]
#[allow(clippy::too_many_lines)] // one case per kind of damage, in one schema
async fn corrupt_rows_are_typed_errors() {
    let url = es_test_support::database_url();
    let schema = common::unique_schema("corrupt");
    let store = common::store_on(&url, &schema).await;
    let admin = common::pool(&url, 2).await;
    let corrupt = |sql: String| {
        let admin = admin.clone();
        async move {
            sqlx::query(AssertSqlSafe(sql))
                .execute(&admin)
                .await
                .unwrap();
        }
    };
    let cases = [
        ("metadata", "metadata = '{\"correlation_id\": 42}'"),
        ("metadata_array", "metadata = '[1, 2]'"),
        ("schema", "schema_version = -1"),
        ("version", "stream_version = -7"),
        ("stream", "stream_id = 'no dash here'"),
    ];
    for (name, set) in cases {
        let stream = StreamId::new("order", name).unwrap();
        let second = event(2);
        let second_id = second.event_id;
        store
            .append(AppendRequest::new(
                stream.clone(),
                ExpectedVersion::NoStream,
                vec![event(1), second],
            ))
            .await
            .unwrap();
        corrupt(format!(
            "UPDATE \"{schema}\".events SET {set} WHERE event_id = '{second_id}'"
        ))
        .await;
        // A negative version is outside every stream read; the global feed meets it.
        let result = if name == "stream" || name == "version" {
            store
                .read_all(ReadAll::after(0))
                .try_collect::<Vec<_>>()
                .await
                .map(|_| ())
        } else {
            read(&store, &stream).await.map(|_| ())
        };
        match result {
            Err(StoreError::Corrupt { location, .. }) => {
                let expected = if name == "stream" {
                    "global position"
                } else {
                    stream.as_str()
                };
                assert!(location.contains(expected), "{name}: {location}");
            }
            other => panic!("{name}: expected Corrupt, got {other:?}"),
        }
        // The first event is still readable on its own.
        let first: Vec<RecordedEvent> = store
            .read_stream(&stream, ReadStream::forward().limit(1))
            .try_collect()
            .await
            .unwrap();
        assert_eq!(first.len(), 1, "{name}");
        corrupt(format!(
            "DELETE FROM \"{schema}\".events WHERE event_id = '{second_id}'"
        ))
        .await;
    }

    // A payload that no longer matches its type: the repository names stream and version.
    let repo = Repository::new(store.clone());
    repo.execute::<Ledger>("p", &LedgerCommand::Open)
        .await
        .unwrap();
    repo.execute::<Ledger>("p", &LedgerCommand::Credit(5))
        .await
        .unwrap();
    corrupt(format!(
        "UPDATE \"{schema}\".events SET payload = '\"not an object\"' \
         WHERE stream_id = 'ledger-p' AND stream_version = 2"
    ))
    .await;
    match repo.load::<Ledger>("p").await {
        Err(RepositoryError::Decode(e)) => assert!(e.to_string().contains("ledger-p"), "{e}"),
        other => panic!("expected a decode error, got {other:?}"),
    }

    // A snapshot row with an impossible schema version is a typed error; the repository falls
    // back to the events.
    let s = StreamId::new("ledger", "snap").unwrap();
    let snapshot = SnapshotRecord {
        stream_id: s.clone(),
        version: 1,
        schema_version: 1,
        payload: Bytes::from_static(b"{}"),
        recorded_at: es_core::event::now_micros(),
        event_id: None,
    };
    assert!(store.save_snapshot(snapshot.clone()).await.unwrap());
    corrupt(format!(
        "UPDATE \"{schema}\".snapshots SET schema_version = -1"
    ))
    .await;
    assert!(matches!(
        store.load_snapshot(&s).await,
        Err(StoreError::Corrupt { .. })
    ));
    let bad_json = SnapshotRecord {
        version: 2,
        payload: Bytes::from_static(b"{oops"),
        ..snapshot
    };
    assert!(matches!(
        store.save_snapshot(bad_json).await,
        Err(StoreError::InvalidRequest { .. })
    ));
}

/// A load reads its own columns straight from the rows (no stream id, no metadata): rows
/// changed behind the store's back are typed errors there too, each naming the stream, and no
/// event is skipped. Metadata, which a load does not read, does not stop it; `read_stream`
/// still reports it.
#[tokio::test]
async fn corrupt_rows_are_typed_errors_when_loading() {
    let url = es_test_support::database_url();
    let schema = common::unique_schema("corrupt_load");
    let store = common::store_on(&url, &schema).await;
    let admin = common::pool(&url, 2).await;
    let repo = Repository::new(store.clone());
    let table = format!("\"{schema}\".events");
    let cases = [
        ("gap", "DELETE FROM {t} WHERE stream_id = '{s}' AND stream_version = 700"),
        ("moved", "UPDATE {t} SET stream_version = 100000 WHERE stream_id = '{s}' AND stream_version = 700"),
        ("schema", "UPDATE {t} SET schema_version = -1 WHERE stream_id = '{s}' AND stream_version = 700"),
        ("position", "UPDATE {t} SET global_position = -5 WHERE stream_id = '{s}' AND stream_version = 700"),
        ("payload", "UPDATE {t} SET payload = '{{\"amount\": \"lots\", \"currency\": \"EUR\"}}' WHERE stream_id = '{s}' AND stream_version = 700"),
        ("type", "UPDATE {t} SET event_type = 'Exploded' WHERE stream_id = '{s}' AND stream_version = 700"),
        ("newer", "UPDATE {t} SET schema_version = 7 WHERE stream_id = '{s}' AND stream_version = 700"),
        ("metadata", "UPDATE {t} SET metadata = '[1, 2]' WHERE stream_id = '{s}' AND stream_version = 700"),
    ];
    for (name, damage) in cases {
        // Enough events for several pages; the damage is in the second page, read while others are
        // fetched.
        let id = format!("load-{name}");
        let s = StreamId::new("ledger", &id).unwrap();
        let mut events = vec![NewEvent::from_value("Opened", 1, &json!({}))];
        events.extend((0..1200).map(|_| {
            NewEvent::from_value("Credited", 2, &json!({ "amount": 1, "currency": "EUR" }))
        }));
        store
            .append(AppendRequest::new(
                s.clone(),
                ExpectedVersion::NoStream,
                events,
            ))
            .await
            .unwrap();
        let sql = damage
            .replace("{t}", &table)
            .replace("{s}", s.as_str())
            .replace("{{", "{")
            .replace("}}", "}");
        sqlx::query(AssertSqlSafe(sql))
            .execute(&admin)
            .await
            .unwrap();
        let result = repo.load_without_snapshot::<Ledger>(&id).await;
        match (name, &result) {
            (
                "gap" | "moved" | "schema",
                Err(RepositoryError::Store {
                    source: StoreError::Corrupt { location, .. },
                    stream_id,
                    ..
                }),
            ) => {
                assert_eq!(stream_id, &s, "{name}");
                assert!(location.contains(s.as_str()), "{name}: {location}");
            }
            (
                "position",
                Err(RepositoryError::Store {
                    source: StoreError::Corrupt { location, .. },
                    stream_id,
                    ..
                }),
            ) => {
                assert_eq!(stream_id, &s);
                assert!(location.contains("global position -5"), "{location}");
            }
            (
                "payload",
                Err(RepositoryError::Decode(es_core::DecodeError::Payload {
                    stream_id,
                    version,
                    ..
                })),
            )
            | (
                "type",
                Err(RepositoryError::Decode(es_core::DecodeError::UnknownEventType {
                    stream_id,
                    version,
                    ..
                })),
            )
            | (
                "newer",
                Err(RepositoryError::Decode(es_core::DecodeError::SchemaVersion {
                    stream_id,
                    version,
                    ..
                })),
            ) => {
                assert_eq!((stream_id, *version), (&s, 700), "{name}");
            }
            ("metadata", Ok(loaded)) => {
                assert_eq!((loaded.version, loaded.aggregate.balance), (1201, 1200));
                assert!(matches!(
                    read(&store, &s).await,
                    Err(StoreError::Corrupt { .. })
                ));
            }
            _ => panic!("{name}: unexpected {result:?}"),
        }
    }
}
