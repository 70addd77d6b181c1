//! Inline projections: read-model writes inside the append's transaction.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use es_core::projection::HandlerError;
use es_core::{
    AppendRequest, EventStore, ExpectedVersion, Metadata, NewEvent, OutboxMessage, OutboxStore,
    ReadAll, RecordedEvent, Repository, RetryPolicy, StoreError, StreamId,
};
use es_postgres::PgStore;
use es_testkit::domain::{Ledger, LedgerCommand};
use futures::future::BoxFuture;
use futures::TryStreamExt;
use serde_json::json;
use sqlx::{AssertSqlSafe, PgConnection, PgPool};

/// Records every event it sees (position, id, stream, version, type) in `seen`, whose primary key
/// on the position makes seeing an event twice fail the append; keeps `totals` per stream, whose
/// CHECK refuses a negative total; fails on purpose on events of type `Refused`.
fn recorder(
    schema: String,
) -> impl for<'c> Fn(
    &'c mut PgConnection,
    &'c [RecordedEvent],
) -> BoxFuture<'c, Result<(), HandlerError>>
       + Send
       + Sync
       + 'static {
    move |conn, events| {
        let schema = schema.clone();
        Box::pin(async move {
            for e in events {
                if e.event_type == "Refused" {
                    return Err(format!("refusing event {}", e.event_id).into());
                }
                sqlx::query(AssertSqlSafe(format!(
                    "INSERT INTO \"{schema}\".seen (position, event_id, stream_id, version, \
                     event_type) VALUES ($1, $2, $3, $4, $5)"
                )))
                .bind(i64::try_from(e.global_position)?)
                .bind(e.event_id)
                .bind(e.stream_id.as_str())
                .bind(i64::try_from(e.stream_version)?)
                .bind(&e.event_type)
                .execute(&mut *conn)
                .await?;
                let amount = serde_json::from_slice::<serde_json::Value>(&e.payload)?["amount"]
                    .as_i64()
                    .unwrap_or(0);
                sqlx::query(AssertSqlSafe(format!(
                    "INSERT INTO \"{schema}\".totals AS t (stream_id, total) VALUES ($1, $2) \
                     ON CONFLICT (stream_id) DO UPDATE SET total = t.total + excluded.total"
                )))
                .bind(e.stream_id.as_str())
                .bind(amount)
                .execute(&mut *conn)
                .await?;
            }
            Ok(())
        })
    }
}

/// A store with the recorder inline (and a second projection counting appends), and a pool.
async fn store_with_inline() -> (PgStore, PgPool, String) {
    let url = es_test_support::database_url();
    let schema = common::unique_schema("inl");
    let pool = common::pool(&url, 4).await;
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE SCHEMA \"{schema}\";
         CREATE TABLE \"{schema}\".seen (position bigint PRIMARY KEY, event_id uuid NOT NULL, \
             stream_id text NOT NULL, version bigint NOT NULL, event_type text NOT NULL);
         CREATE TABLE \"{schema}\".totals (stream_id text PRIMARY KEY, \
             total bigint NOT NULL CHECK (total >= 0));
         CREATE TABLE \"{schema}\".appends (n bigint NOT NULL);
         INSERT INTO \"{schema}\".appends VALUES (0);"
    )))
    .execute(&pool)
    .await
    .unwrap();
    let counter_schema = schema.clone();
    let store = PgStore::builder(common::pool(&url, 24).await)
        .schema(&schema)
        .poll_interval(Duration::from_millis(200))
        .inline_projection("recorder", recorder(schema.clone()))
        .inline_projection("append_counter", move |conn, _events| {
            let schema = counter_schema.clone();
            Box::pin(async move {
                sqlx::query(AssertSqlSafe(format!(
                    "UPDATE \"{schema}\".appends SET n = n + 1"
                )))
                .execute(&mut *conn)
                .await?;
                Ok(())
            })
        })
        .build()
        .await
        .unwrap();
    (store, pool, schema)
}

fn event(kind: &str, amount: i64) -> NewEvent {
    NewEvent::from_value(kind, 1, &json!({ "amount": amount }))
}

fn message(source: &NewEvent) -> OutboxMessage {
    OutboxMessage {
        message_id: uuid::Uuid::now_v7(),
        source_event_id: source.event_id,
        topic: "t".into(),
        key: "k".into(),
        message_type: "M".into(),
        schema_version: 1,
        payload: "{}".into(),
        metadata: Metadata::new(),
    }
}

async fn seen(pool: &PgPool, schema: &str) -> Vec<(i64, uuid::Uuid, String, i64, String)> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT position, event_id, stream_id, version, event_type FROM \"{schema}\".seen \
         ORDER BY position"
    )))
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn appends_counted(pool: &PgPool, schema: &str) -> i64 {
    sqlx::query_scalar(AssertSqlSafe(format!("SELECT n FROM \"{schema}\".appends")))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Concurrent appends (grouped into shared commits) each run the projections once, in the append
/// transaction, with the positions, versions and ids the events are stored with.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sees_exactly_the_committed_events_once() {
    let (store, pool, schema) = store_with_inline().await;
    let mut tasks = Vec::new();
    for w in 0..16u64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let stream = StreamId::new("acct", &format!("{}", w % 5)).unwrap();
            let mut written = 0;
            for i in 0..20i64 {
                let events = (0..=(i % 3)).map(|k| event("Credited", k + 1)).collect();
                match store
                    .append(AppendRequest::new(
                        stream.clone(),
                        ExpectedVersion::Any,
                        events,
                    ))
                    .await
                {
                    Ok(_) => written += 1,
                    Err(err) => panic!("append failed: {err}"),
                }
            }
            written
        }));
    }
    let mut written = 0;
    for t in tasks {
        written += t.await.unwrap();
    }
    let all: Vec<RecordedEvent> = store
        .read_all(ReadAll::after(0))
        .try_collect()
        .await
        .unwrap();
    let stored: Vec<_> = all
        .iter()
        .map(|e| {
            (
                i64::try_from(e.global_position).unwrap(),
                e.event_id,
                e.stream_id.to_string(),
                i64::try_from(e.stream_version).unwrap(),
                e.event_type.clone(),
            )
        })
        .collect();
    assert_eq!(seen(&pool, &schema).await, stored);
    assert_eq!(appends_counted(&pool, &schema).await, written);
    // Idempotent retries and conflicts run nothing.
    let stream = StreamId::new("acct", "retry").unwrap();
    let request = AppendRequest::new(
        stream.clone(),
        ExpectedVersion::NoStream,
        vec![event("Credited", 1)],
    );
    store.append(request.clone()).await.unwrap();
    assert!(store.append(request).await.unwrap().duplicate);
    let conflict = store
        .append(AppendRequest::new(
            stream,
            ExpectedVersion::NoStream,
            vec![event("Credited", 1)],
        ))
        .await;
    assert!(
        matches!(conflict, Err(StoreError::Conflict { .. })),
        "{conflict:?}"
    );
    assert_eq!(appends_counted(&pool, &schema).await, written + 1);
}

/// A projection that fails (by returning an error, or by a statement PostgreSQL refuses) fails
/// its append with `InlineProjection`: none of its events, outbox records or read-model writes
/// are stored, while the appends that shared its group commit succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_projection_fails_only_its_append() {
    let (store, pool, schema) = store_with_inline().await;
    for (case, bad) in [
        ("returned error", event("Refused", 1)),
        ("refused SQL", event("Credited", -50)),
    ] {
        let mut tasks = Vec::new();
        for i in 0..16u64 {
            let store = store.clone();
            let bad = bad.clone();
            tasks.push(tokio::spawn(async move {
                let stream =
                    StreamId::new("acct", &format!("{}-{i}", case.replace(' ', "_"))).unwrap();
                let first = event("Credited", 10);
                let mut events = vec![first.clone()];
                if i == 7 {
                    events.push(bad);
                }
                let outbox = vec![message(&first)];
                let result = store
                    .append(
                        AppendRequest::new(stream.clone(), ExpectedVersion::NoStream, events)
                            .with_outbox(outbox),
                    )
                    .await;
                (i, stream, result)
            }));
        }
        for t in tasks {
            let (i, stream, result) = t.await.unwrap();
            if i == 7 {
                match result {
                    Err(StoreError::InlineProjection {
                        stream_id: s,
                        projection,
                        reason,
                    }) => {
                        assert_eq!(s, stream);
                        assert_eq!(projection, "recorder");
                        assert!(!reason.is_empty());
                    }
                    other => panic!("{case}: expected InlineProjection, got {other:?}"),
                }
                assert_eq!(store.stream_version(&stream).await.unwrap(), 0, "{case}");
            } else {
                assert_eq!(result.unwrap().stream_version, 1, "{case}");
            }
        }
    }
    let records = store.pending_outbox(1000).await.unwrap();
    assert_eq!(records.len(), 30);
    assert!(records
        .iter()
        .all(|r| !r.stream_id.as_str().ends_with("-7")));
    let seen = seen(&pool, &schema).await;
    assert_eq!(seen.len(), 30);
    assert!(seen.iter().all(|(_, _, s, _, _)| !s.ends_with("-7")));
    assert_eq!(appends_counted(&pool, &schema).await, 30);
    // Positions of the rolled-back appends are gaps; the feed goes on.
    let all: Vec<RecordedEvent> = store
        .read_all(ReadAll::after(0))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(all.len(), 30);
}

/// The bank-style use: a repository's commands with the ledger's balance kept inline, always
/// equal to what the events say, even under concurrent commands with conflicts and retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repository_commands_keep_an_inline_read_model_consistent() {
    let (store, pool, schema) = store_with_inline().await;
    // Eight tasks on two ledgers conflict a lot: retry commands until they go through.
    let repo = Repository::builder(store.clone())
        .retry_policy(RetryPolicy {
            max_attempts: 1000,
            ..RetryPolicy::default()
        })
        .build()
        .unwrap();
    for id in ["a", "b"] {
        repo.execute::<Ledger>(id, &LedgerCommand::Open)
            .await
            .unwrap();
    }
    let mut tasks = Vec::new();
    for t in 0..8i64 {
        let repo = repo.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..10 {
                let id = if (t + i) % 2 == 0 { "a" } else { "b" };
                repo.execute::<Ledger>(id, &LedgerCommand::Credit(t * 100 + i + 1))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let totals: HashMap<String, i64> = sqlx::query_as::<_, (String, i64)>(AssertSqlSafe(format!(
        "SELECT stream_id, total FROM \"{schema}\".totals"
    )))
    .fetch_all(&pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    for id in ["a", "b"] {
        let ledger = repo.load::<Ledger>(id).await.unwrap();
        assert_eq!(totals[&format!("ledger-{id}")], ledger.aggregate.balance);
    }
}
