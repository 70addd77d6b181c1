//! Archiving on es-postgres: the conformance cases on one feed, on eight partitions and under
//! the least-privilege role; and what a plain SQL client sees of the two tables.

mod common;

use es_core::{AppendRequest, EventStore, ExpectedVersion, NewEvent, StreamId};
use sqlx::AssertSqlSafe;

es_testkit::archiving_conformance_tests!(common::fresh_store);

/// Eight partitions by stream id.
mod partitioned {
    use super::common;

    es_testkit::archiving_conformance_tests!(|| common::fresh_partitioned_store(
        es_core::Partitioning::new(8).expect("8 partitions")
    ));
}

/// The role with only the grants of `es_postgres::grants_script`.
mod least_privilege {
    use super::common;

    es_testkit::archiving_conformance_tests!(common::restricted_store);
}

/// A row of `events` or `archived_events`, every column.
type Row = (
    i64,
    String,
    String,
    i64,
    uuid::Uuid,
    String,
    i64,
    String,
    String,
    chrono::DateTime<chrono::Utc>,
    i32,
);

/// Archived rows leave `events` for `archived_events`, whole and once: a plain SQL client counts
/// them moved, with every column unchanged, and the stream's last event still in `events`.
#[tokio::test]
async fn archived_rows_move_between_the_tables_unchanged() {
    let url = es_test_support::database_url();
    let schema = common::unique_schema("arch");
    let store = common::store_on(&url, &schema).await;
    let admin = common::pool(&url, 2).await;
    let stream = StreamId::new("cold", "rows").unwrap();
    let events: Vec<NewEvent> = (1..=50)
        .map(|n| NewEvent::from_value("Noted", 1, &serde_json::json!({ "n": n })))
        .collect();
    store
        .append(AppendRequest::new(
            stream.clone(),
            ExpectedVersion::NoStream,
            events,
        ))
        .await
        .unwrap();
    let rows = |table: &str| {
        format!(
            "SELECT global_position, stream_id, category, stream_version, event_id, event_type, \
             schema_version, payload::text, metadata::text, recorded_at, partition \
             FROM \"{schema}\".{table} ORDER BY global_position"
        )
    };
    let before: Vec<Row> = sqlx::query_as(AssertSqlSafe(rows("events")))
        .fetch_all(&admin)
        .await
        .unwrap();
    assert_eq!(before.len(), 50);

    let archived = store.archive_stream(&stream, 50).await.unwrap();
    assert_eq!((archived.moved, archived.hot_from), (49, 50));

    let hot: Vec<Row> = sqlx::query_as(AssertSqlSafe(rows("events")))
        .fetch_all(&admin)
        .await
        .unwrap();
    let cold: Vec<Row> = sqlx::query_as(AssertSqlSafe(rows("archived_events")))
        .fetch_all(&admin)
        .await
        .unwrap();
    assert_eq!(hot.len(), 1, "only the last event stays in `events`");
    assert_eq!(hot[0].3, 50);
    assert_eq!(cold.len(), 49);
    let mut together = cold;
    together.extend(hot);
    assert_eq!(together, before, "every row moved whole, once");
}
