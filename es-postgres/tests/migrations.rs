//! Embedded migrations: idempotent, safe to run concurrently, verifiable when managed externally.

mod common;

use es_core::{
    AppendRequest, EventStore, ExpectedVersion, NewEvent, OutboxStore, ReadAll, StreamId,
};
use es_postgres::{Error, PgStore};
use futures::TryStreamExt;
use serde_json::json;
use sqlx::AssertSqlSafe;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_builds_migrate_once() {
    let url = es_test_support::database_url();
    let schema = common::unique_schema("mig");
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let url = url.clone();
        let schema = schema.clone();
        tasks.push(tokio::spawn(async move {
            PgStore::builder(common::pool(&url, 4).await)
                .schema(schema)
                .build()
                .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let pool = common::pool(&url, 2).await;
    let applied: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM \"{schema}\".schema_migrations"
    )))
    .fetch_one(&pool)
    .await
    .unwrap();
    // One row per embedded migration: as many as the rendered script records.
    let embedded = es_postgres::migration_script("x")
        .unwrap()
        .matches(".schema_migrations (version, name, checksum) VALUES")
        .count();
    assert_eq!(usize::try_from(applied).unwrap(), embedded);
    assert!(embedded >= 4);
    // Building again is a no-op.
    common::store_on(&url, &schema).await;
}

#[tokio::test]
async fn externally_managed_schema() {
    let url = es_test_support::database_url();
    let pool = common::pool(&url, 4).await;
    let schema = common::unique_schema("ext");
    let unmanaged = || {
        PgStore::builder(pool.clone())
            .schema(&schema)
            .run_migrations(false)
    };
    match unmanaged().build().await {
        Err(Error::SchemaNotReady { found: None, .. }) => {}
        other => panic!("expected SchemaNotReady, got {other:?}"),
    }
    let script = es_postgres::migration_script(&schema).unwrap();
    let mut tx = pool.begin().await.unwrap();
    sqlx::raw_sql(AssertSqlSafe(script))
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let store = unmanaged().build().await.unwrap();
    let stream = StreamId::new("order", "1").unwrap();
    store
        .append(AppendRequest::new(
            stream,
            ExpectedVersion::NoStream,
            vec![NewEvent::from_value("A", 1, &json!({}))],
        ))
        .await
        .unwrap();
    // The migrating builder accepts the externally migrated schema too.
    PgStore::builder(pool.clone())
        .schema(&schema)
        .build()
        .await
        .unwrap();

    // A migration that differs from the embedded one, or a newer one, is refused.
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE \"{schema}\".schema_migrations SET checksum = 'tampered'"
    )))
    .execute(&pool)
    .await
    .unwrap();
    assert!(matches!(
        unmanaged().build().await,
        Err(Error::MigrationChanged { version: 1, .. })
    ));
    assert!(matches!(
        PgStore::builder(pool.clone()).schema(&schema).build().await,
        Err(Error::MigrationChanged { .. })
    ));
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO \"{schema}\".schema_migrations (version, name, checksum) VALUES (999, 'future', 'x')"
    )))
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "DELETE FROM \"{schema}\".schema_migrations WHERE version <> 999"
    )))
    .execute(&pool)
    .await
    .unwrap();
    assert!(matches!(
        unmanaged().build().await,
        Err(Error::SchemaTooNew { found: 999, .. })
    ));
}

/// A schema at version 1 holding events (written by the version 1 append function) is migrated
/// to version 2 when a store is built: the events stay, positions continue, the outbox works.
#[tokio::test]
async fn upgrades_a_version_1_schema_with_data() {
    let url = es_test_support::database_url();
    let pool = common::pool(&url, 4).await;
    let schema = common::unique_schema("up");
    let script = es_postgres::migration_script(&schema).unwrap();
    let (v1, _) = script
        .split_once("\n-- migration 2 (")
        .expect("the script holds migration 2");
    let mut tx = pool.begin().await.unwrap();
    sqlx::raw_sql(AssertSqlSafe(v1.to_owned()))
        .execute(&mut *tx)
        .await
        .unwrap();
    for i in 1..=2i64 {
        sqlx::query(AssertSqlSafe(format!(
            "SELECT outcomes FROM \"{schema}\".append_events(ARRAY['order-1'], ARRAY['order'], \
             ARRAY[0]::smallint[], ARRAY[0]::bigint[], ARRAY[1], ARRAY[1], ARRAY[0], \
             ARRAY[gen_random_uuid()], ARRAY['V1'], ARRAY[{i}]::bigint[], ARRAY['{{}}']::jsonb[], \
             ARRAY['{{}}']::jsonb[], false)"
        )))
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();

    let store = common::store_on(&url, &schema).await;
    let stream = StreamId::new("order", "1").unwrap();
    let event = NewEvent::from_value("V2", 1, &json!({}));
    let message = es_core::OutboxMessage {
        message_id: uuid::Uuid::now_v7(),
        source_event_id: event.event_id,
        topic: "t".into(),
        key: "order-1".into(),
        message_type: "M".into(),
        schema_version: 1,
        payload: "{}".into(),
        metadata: es_core::Metadata::new(),
    };
    let result = store
        .append(
            AppendRequest::new(stream, ExpectedVersion::Exact(2), vec![event])
                .with_outbox(vec![message]),
        )
        .await
        .unwrap();
    assert_eq!(result.stream_version, 3);
    let all: Vec<_> = store
        .read_all(ReadAll::after(0))
        .try_collect()
        .await
        .unwrap();
    let types: Vec<&str> = all.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, ["V1", "V1", "V2"]);
    assert_eq!(store.pending_outbox(10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn schemas_are_isolated() {
    let url = es_test_support::database_url();
    let a = common::store_on(&url, &common::unique_schema("iso")).await;
    let b = common::store_on(&url, &common::unique_schema("iso")).await;
    let stream = StreamId::new("order", "1").unwrap();
    for store in [&a, &b] {
        store
            .append(AppendRequest::new(
                stream.clone(),
                ExpectedVersion::NoStream,
                vec![NewEvent::from_value("A", 1, &json!({}))],
            ))
            .await
            .unwrap();
    }
    for store in [&a, &b] {
        let all: Vec<_> = store
            .read_all(ReadAll::after(0))
            .try_collect()
            .await
            .unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].stream_id, stream);
    }
}

#[tokio::test]
async fn connect_reports_an_unreachable_server() {
    let port = es_test_support::free_port().unwrap();
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    match PgStore::connect(&url).await {
        Err(Error::Connect { .. }) => {}
        other => panic!("expected Error::Connect, got {other:?}"),
    }
}
