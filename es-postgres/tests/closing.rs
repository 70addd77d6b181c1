//! Closing streams on es-postgres: the conformance cases on one feed, on eight partitions by
//! stream id, and under the least-privilege role (only the grants of
//! `es_postgres::grants_script`: the closed check runs inside the schema's functions and reads
//! of its tables); and the partial index that keeps the check off the events' growth.

mod common;

es_testkit::closing_conformance_tests!(common::fresh_store);

/// Eight partitions by stream id.
mod partitioned {
    use super::common;

    es_testkit::closing_conformance_tests!(|| common::fresh_partitioned_store(
        es_core::Partitioning::new(8).expect("8 partitions")
    ));
}

/// Under the application role with only the grants.
mod least_privilege {
    use super::common;

    es_testkit::closing_conformance_tests!(common::restricted_store);
}

/// The tombstones' index is a partial unique index on the stream id: the closed probe uses it,
/// and it refuses a second tombstone in one stream even when written behind the store's back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tombstone_index_holds_one_row_per_closed_stream() {
    use es_core::{AppendRequest, EventStore, ExpectedVersion, NewEvent, StreamId};

    let store = common::fresh_store().await;
    let schema = format!("\"{}\"", store.schema().as_str());
    for n in 0..20 {
        let s = StreamId::new("account", &format!("ix{n}")).unwrap();
        let mut events: Vec<NewEvent> = (0..5)
            .map(|_| NewEvent::new("Credited", 1, "{}").unwrap())
            .collect();
        if n % 4 == 0 {
            events.push(NewEvent::closing());
        }
        store
            .append(AppendRequest::new(s, ExpectedVersion::NoStream, events))
            .await
            .expect("an append");
    }
    let admin = common::pool(&es_test_support::database_url(), 2).await;
    let rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {schema}.events WHERE event_type = '$closed'"
    )))
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!(rows, 5, "five streams closed");
    let definition: String = sqlx::query_scalar(
        "SELECT pg_get_indexdef(c.oid) FROM pg_class c \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relname = 'events_closed_idx' AND n.nspname = $1",
    )
    .bind(store.schema().as_str())
    .fetch_one(&admin)
    .await
    .unwrap();
    assert!(definition.contains("UNIQUE"), "{definition}");
    assert!(definition.contains("$closed"), "{definition}");
    // The probe `append_events` and the multi-stream check make matches the index's predicate
    // (checked with sequential scans off: the table is too small for the planner to want it).
    let mut conn = admin.acquire().await.unwrap();
    sqlx::query("SET enable_seqscan = off")
        .execute(&mut *conn)
        .await
        .unwrap();
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN SELECT EXISTS (SELECT 1 FROM {schema}.events c \
         WHERE c.stream_id = 'account-ix1' AND c.event_type = '$closed')"
    )))
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    sqlx::query("RESET enable_seqscan")
        .execute(&mut *conn)
        .await
        .unwrap();
    drop(conn);
    assert!(
        plan.iter().any(|line| line.contains("events_closed_idx")),
        "{plan:#?}"
    );
    // A second tombstone written around the store is refused by the index.
    let err = sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {schema}.events (partition, global_position, stream_id, category, \
         stream_version, event_id, event_type, schema_version, payload, metadata, recorded_at) \
         VALUES (0, 999999, 'account-ix0', 'account', 7, gen_random_uuid(), '$closed', 1, \
         '{{}}', '{{}}', now())"
    )))
    .execute(&admin)
    .await
    .expect_err("a second tombstone");
    assert!(err.to_string().contains("events_closed_idx"), "{err}");
}
