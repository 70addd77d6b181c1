//! Least privilege: a store run by a role that holds only the grants of
//! `es_postgres::grants_script` works in full (the conformance suites below), issues no DDL, and
//! cannot write around the store's functions.

mod common;

use es_core::{AppendRequest, EventStore, ExpectedVersion, NewEvent, StreamId};
use es_postgres::{Error, PgStore};
use sqlx::{AssertSqlSafe, PgPool};

es_testkit::conformance_tests!(common::restricted_store);

/// The streaming suite (outbox, relay lease, checkpoints, projection runner) under the role.
mod streaming {
    use super::common;

    es_testkit::streaming_conformance_tests!(common::restricted_store);
}

/// The role runs a consumer group: its leases (take, renew, list, release) and an exactly-once
/// projection that claims the partition (fencing its checkpoint) and records batches, all through
/// the schema's functions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_application_role_runs_consumer_groups() {
    use es_core::contract::LeaseStore;
    use es_core::group::GroupConfig;
    use es_core::projection::{partition_checkpoint, HandlerError};
    use es_core::{CheckpointStore, ProjectionRunner, RecordedEvent};
    use std::time::Duration;

    struct Nothing;
    impl es_postgres::PgProjection for Nothing {
        fn name(&self) -> &'static str {
            "nothing"
        }
        async fn handle(
            &mut self,
            _tx: &mut sqlx::PgConnection,
            _event: &RecordedEvent,
        ) -> Result<(), HandlerError> {
            Ok(())
        }
        async fn reset(&mut self, _tx: &mut sqlx::PgConnection) -> Result<(), HandlerError> {
            Ok(())
        }
    }

    let store = common::restricted_store().await;
    let long = Duration::from_secs(30);
    assert_eq!(
        store.acquire_lease("g", "x", "a", long).await.unwrap(),
        Some(1)
    );
    assert_eq!(
        store.acquire_lease("g", "x", "a", long).await.unwrap(),
        Some(1)
    );
    assert_eq!(store.held_leases("g").await.unwrap().len(), 1);
    store.release_lease("g", "x", "a", 1).await.unwrap();
    assert_eq!(store.held_leases("g").await.unwrap(), vec![]);
    let fenced = store.fence_checkpoint("c").await.unwrap();
    assert_eq!((fenced.position, fenced.generation), (0, 1));

    let appended = store
        .append(AppendRequest::new(
            StreamId::new("account", "lp-g").unwrap(),
            ExpectedVersion::NoStream,
            vec![NewEvent::new("Opened", 1, r#"{"owner":"ada"}"#).unwrap()],
        ))
        .await
        .unwrap();
    let sink_store = store.clone();
    let group = ProjectionRunner::new(store.clone()).spawn_group(
        GroupConfig::new("w").lease_ttl(Duration::from_secs(2)),
        move || es_postgres::ExactlyOnce::new(&sink_store, Nothing),
    );
    tokio::time::timeout(Duration::from_secs(30), group.wait_owned(|o| o == [0]))
        .await
        .expect("the worker takes the partition");
    let row = partition_checkpoint("nothing", 0);
    tokio::time::timeout(Duration::from_secs(30), async {
        while store.load_checkpoint(&row).await.unwrap().position < appended.positions[0] {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the projection records its batch");
    let held = store.held_leases("projection:nothing").await.unwrap();
    assert!(held.iter().any(|l| l.name == "partition:0"), "{held:?}");
    group.shutdown().await;
    assert_eq!(
        store.held_leases("projection:nothing").await.unwrap(),
        vec![]
    );
    assert!(store.load_checkpoint(&row).await.unwrap().generation >= 1);
}

/// The SQLSTATE of a failed statement run by `pool`, or a panic if it succeeded.
async fn refused(pool: &PgPool, sql: &str) -> String {
    match sqlx::raw_sql(AssertSqlSafe(sql.to_owned()))
        .execute(pool)
        .await
    {
        Ok(_) => panic!("the application role was allowed to run `{sql}`"),
        Err(err) => err
            .as_database_error()
            .and_then(|e| e.code().map(std::borrow::Cow::into_owned))
            .unwrap_or_else(|| panic!("`{sql}` failed without a SQLSTATE: {err}")),
    }
}

#[tokio::test]
async fn the_application_role_cannot_write_around_the_functions() {
    let url = es_test_support::database_url();
    let schema = common::unique_schema("lpw");
    let admin = common::pool(&url, 2).await;
    common::store_on(&url, &schema).await;
    common::grant_app_role(&admin, &schema).await;
    let app_url = common::url_as(&url, common::APP_ROLE);
    let store = common::store_on(&app_url, &schema).await;

    // What the store does works: an append, a read, a snapshot.
    let stream = StreamId::new("account", "lp-1").unwrap();
    let appended = store
        .append(AppendRequest::new(
            stream.clone(),
            ExpectedVersion::NoStream,
            vec![NewEvent::new("Opened", 1, r#"{"owner":"ada"}"#).unwrap()],
        ))
        .await
        .expect("the role appends through the store");
    assert_eq!(appended.stream_version, 1);

    let app = common::pool(&app_url, 2).await;
    let s = format!("\"{schema}\"");
    let attacks = [
        // An event below the head, or anywhere, by hand.
        format!(
            "INSERT INTO {s}.events (global_position, stream_id, category, stream_version, \
             event_id, event_type, schema_version, payload, metadata, recorded_at) \
             VALUES (1, 'account-lp-1', 'account', 2, gen_random_uuid(), 'Forged', 1, '{{}}', \
             '{{}}', now())"
        ),
        format!("UPDATE {s}.events SET payload = '{{\"owner\":\"eve\"}}'"),
        format!("DELETE FROM {s}.events"),
        // The position sequences.
        format!("SELECT setval('{s}.positions', 1)"),
        format!("SELECT nextval('{s}.positions')"),
        format!("SELECT setval('{s}.outbox_positions', 1)"),
        // Snapshots, checkpoints, the relay lease, the outbox, the epochs.
        format!(
            "INSERT INTO {s}.snapshots (stream_id, version, schema_version, payload, recorded_at) \
             VALUES ('account-lp-1', 1, 1, '{{\"balance\":1000000}}', now())"
        ),
        format!("UPDATE {s}.snapshots SET payload = '{{\"balance\":1000000}}'"),
        format!("DELETE FROM {s}.snapshots"),
        format!("UPDATE {s}.checkpoints SET position = 1000000"),
        format!("INSERT INTO {s}.checkpoints (name, position, updated_at) VALUES ('p', 9, now())"),
        format!("UPDATE {s}.relay_leases SET generation = 0"),
        // The leases of consumer groups, and the generations that fence checkpoints.
        format!(
            "INSERT INTO {s}.group_leases (lease_group, name, owner, generation, expires_at) \
             VALUES ('g', 'partition:0', 'eve', 1000, 'infinity')"
        ),
        format!("UPDATE {s}.group_leases SET owner = 'eve', expires_at = 'infinity'"),
        format!("DELETE FROM {s}.group_leases"),
        format!("UPDATE {s}.checkpoints SET generation = 0"),
        format!("DELETE FROM {s}.outbox"),
        format!("DELETE FROM {s}.epochs"),
        format!("TRUNCATE {s}.events"),
        // New objects in the store's schema, or a function shadowing the store's.
        format!("CREATE TABLE {s}.extra (x int)"),
        format!("CREATE FUNCTION {s}.now() RETURNS timestamptz LANGUAGE sql AS 'SELECT now()'"),
        format!("ALTER FUNCTION {s}.snapshot_delete(text, bigint) SECURITY INVOKER"),
        format!("DROP FUNCTION {s}.snapshot_delete(text, bigint)"),
    ];
    for sql in &attacks {
        let code = refused(&app, sql).await;
        assert!(
            code == "42501" || code == "42883",
            "`{sql}` failed with SQLSTATE {code}, not for lack of rights"
        );
    }

    // Nothing changed: the one event is there, as appended, and the sequence did not move.
    let stored: Vec<(i64, String, String)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT stream_version, event_type, payload->>'owner' FROM {s}.events"
    )))
    .fetch_all(&admin)
    .await
    .unwrap();
    assert_eq!(stored, vec![(1, "Opened".to_owned(), "ada".to_owned())]);
    assert_eq!(store.head_position().await.unwrap(), appended.positions[0]);
}

#[tokio::test]
async fn a_role_without_grants_gets_a_typed_error_and_changes_nothing() {
    let url = es_test_support::database_url();
    let schema = common::unique_schema("lpn");
    let admin = common::pool(&url, 2).await;
    // The role exists (granted on another schema), but has no right on this one.
    let other = common::unique_schema("lpo");
    common::store_on(&url, &other).await;
    common::grant_app_role(&admin, &other).await;
    let app_url = common::url_as(&url, common::APP_ROLE);

    // Not migrated: the role may not create it.
    match PgStore::builder_from_url(&app_url)
        .schema(&schema)
        .build()
        .await
    {
        Err(Error::Migration { source, .. } | Error::Database(source)) => {
            let code = source
                .as_database_error()
                .and_then(sqlx::error::DatabaseError::code);
            assert_eq!(code.as_deref(), Some("42501"), "{source}");
        }
        other => panic!("a role without CREATE built a store: {other:?}"),
    }
    let exists: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = $1)",
    )
    .bind(&schema)
    .fetch_one(&admin)
    .await
    .unwrap();
    assert!(!exists, "the failed build left schema {schema} behind");

    // Migrated by the admin but not granted: refused on the first read of the schema.
    common::store_on(&url, &schema).await;
    match PgStore::builder_from_url(&app_url)
        .schema(&schema)
        .build()
        .await
    {
        Err(Error::Database(source)) => {
            let code = source
                .as_database_error()
                .and_then(sqlx::error::DatabaseError::code);
            assert_eq!(code.as_deref(), Some("42501"), "{source}");
        }
        other => panic!("a role without grants built a store: {other:?}"),
    }
}

#[tokio::test]
async fn every_function_runs_as_its_owner_with_a_pinned_search_path() {
    let url = es_test_support::database_url();
    let schema = common::unique_schema("lpf");
    let admin = common::pool(&url, 2).await;
    common::store_on(&url, &schema).await;
    let rows: Vec<(String, bool, Option<Vec<String>>, bool)> = sqlx::query_as(
        "SELECT p.oid::regprocedure::text, p.prosecdef, p.proconfig, \
                EXISTS (SELECT 1 FROM aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a \
                         WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE') \
           FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
          WHERE n.nspname = $1 ORDER BY 1",
    )
    .bind(&schema)
    .fetch_all(&admin)
    .await
    .unwrap();
    assert!(
        rows.len() >= 14,
        "expected the store's functions, found {rows:?}"
    );
    for (function, definer, config, public) in rows {
        assert!(definer, "{function} is not SECURITY DEFINER");
        let config = config.unwrap_or_default();
        assert!(
            config
                .iter()
                .any(|c| c == "search_path=pg_catalog, pg_temp"),
            "{function} does not pin search_path: {config:?}"
        );
        assert!(!public, "{function} is executable by PUBLIC");
    }
}
