//! Every code of [`super`] against the functions the migrations create: the store's own encoding
//! of each expected-version kind (`writer::append_query`) goes to `append_events`, and each
//! outcome it answers is decoded as the enum says.

use std::time::{SystemTime, UNIX_EPOCH};

use es_core::{AppendRequest, ExpectedVersion, NewEvent, StreamId};
use sqlx::{AssertSqlSafe, Connection, PgConnection};
use tokio::sync::oneshot;

use super::AppendOutcome::{Closed, Conflict, Duplicate, Written};
use super::ExpectedKind::{Any, Exact, NoStream, StreamExists};
use super::{AppendOutcome, CheckpointSave, ExpectedKind, UNCHECKED_INCARNATION};
use crate::error::sqlstate;
use crate::schema::Sql;
use crate::writer::{append_query, CallResult, Job};
use crate::{PgStore, SchemaName};

/// A schema of its own, migrated by building a store on it.
async fn migrated_schema(url: &str) -> SchemaName {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let name = format!("t_protocol_{}_{nanos}", std::process::id());
    let store = PgStore::builder_from_url(url)
        .schema(name.as_str())
        .max_connections(2)
        .build()
        .await
        .unwrap_or_else(|e| panic!("cannot build a store on {url}: {e}"));
    store.schema().clone()
}

fn event() -> NewEvent {
    NewEvent::new("Happened", 1, r#"{"n":1}"#).unwrap()
}

/// One `append_events` call with one append; its outcome and version as the server said.
async fn call(
    conn: &mut PgConnection,
    sql: &Sql,
    request: AppendRequest,
    lookup: bool,
) -> (AppendOutcome, i64) {
    let (reply, _answer) = oneshot::channel();
    let jobs = [Job {
        request,
        partition: 0,
        reply,
    }];
    let query = append_query(
        &sql.append,
        0,
        &jobs,
        lookup,
        false,
        std::time::Duration::from_secs(5),
    );
    let row = query
        .fetch_one(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("append_events failed: {e}"));
    let Ok(result) = CallResult::decode(&row) else {
        panic!("the result of append_events cannot be decoded");
    };
    let outcome = result
        .outcome_of(0)
        .expect("append_events answered an outcome code AppendOutcome knows");
    (outcome, result.version_of(0).expect("a version"))
}

/// A session that has not checked the server's incarnation is told so by its SQLSTATE; then
/// it checks it.
async fn incarnation_unchecked_then_checked(conn: &mut PgConnection, sql: &Sql) {
    let stream = StreamId::new("protocol", "a").unwrap();
    let request = AppendRequest::new(stream, ExpectedVersion::Any, vec![event()]);
    let (reply, _answer) = oneshot::channel();
    let jobs = [Job {
        request,
        partition: 0,
        reply,
    }];
    let err = append_query(
        &sql.append,
        0,
        &jobs,
        false,
        false,
        std::time::Duration::from_secs(5),
    )
    .fetch_one(&mut *conn)
    .await
    .expect_err("an unchecked session may not allocate");
    assert_eq!(sqlstate(&err), Some(UNCHECKED_INCARNATION), "{err}");
    sqlx::query(AssertSqlSafe(sql.check_incarnation.to_string()))
        .execute(&mut *conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn every_expected_kind_and_outcome_means_the_same_on_the_server() {
    let url = es_test_support::database_url();
    let schema = migrated_schema(&url).await;
    let sql = Sql::new(&schema);
    let mut conn = PgConnection::connect(&url).await.unwrap();

    incarnation_unchecked_then_checked(&mut conn, &sql).await;

    let stream = StreamId::new("protocol", "a").unwrap();
    let first = event();
    let tombstone = NewEvent::closing();
    let other = StreamId::new("protocol", "b").unwrap();
    let append = |stream: &StreamId, expected, event| {
        AppendRequest::new(stream.clone(), expected, vec![event])
    };
    let (any, none, exists) = (
        ExpectedVersion::Any,
        ExpectedVersion::NoStream,
        ExpectedVersion::StreamExists,
    );
    let exact = ExpectedVersion::Exact;
    // (request, look ids up, expected kind sent, outcome, version reported)
    let cases = [
        (
            append(&stream, none, first.clone()),
            false,
            NoStream,
            Written,
            1,
        ),
        (append(&stream, none, event()), false, NoStream, Conflict, 1),
        (
            append(&stream, exact(0), event()),
            false,
            NoStream,
            Conflict,
            1,
        ),
        (append(&stream, exact(1), event()), false, Exact, Written, 2),
        (
            append(&stream, exact(1), event()),
            false,
            Exact,
            Conflict,
            2,
        ),
        (
            append(&other, exists, event()),
            false,
            StreamExists,
            Conflict,
            0,
        ),
        (
            append(&stream, exists, event()),
            false,
            StreamExists,
            Written,
            3,
        ),
        (append(&stream, any, event()), false, Any, Written, 4),
        (append(&stream, any, first), true, Any, Duplicate, 4),
        (
            append(&stream, exact(4), tombstone.clone()),
            false,
            Exact,
            Written,
            5,
        ),
        (append(&stream, any, event()), false, Any, Closed, 5),
        (append(&stream, exact(5), event()), false, Exact, Closed, 5),
        // The close retried: its stored copy is found (after the closed outcome, by the
        // lookup of refused ids), so it is a duplicate, not refused.
        (
            append(&stream, exact(4), tombstone),
            false,
            Exact,
            Duplicate,
            5,
        ),
    ];
    let mut kinds = Vec::new();
    let mut outcomes = Vec::new();
    for (request, lookup, kind, outcome, version) in cases {
        let label = format!("{:?} on `{}`", request.expected, request.stream_id);
        assert_eq!(ExpectedKind::of(request.expected).0, kind, "{label}");
        assert_eq!(
            call(&mut conn, &sql, request, lookup).await,
            (outcome, version),
            "{label}"
        );
        kinds.push(kind);
        outcomes.push(outcome);
    }
    // Every code was sent or answered: a new one needs a case above.
    for kind in ExpectedKind::ALL {
        assert!(kinds.contains(&kind), "{kind:?} has no case");
    }
    for outcome in AppendOutcome::ALL {
        assert!(outcomes.contains(&outcome), "{outcome:?} has no case");
    }
    assert_eq!(AppendOutcome::from_code(4), None);
}

#[tokio::test]
async fn every_checkpoint_save_result_means_the_same_on_the_server() {
    let url = es_test_support::database_url();
    let schema = migrated_schema(&url).await;
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let save = format!("SELECT {}.checkpoint_save($1, $2, $3)", schema.quoted());
    let mut seen = Vec::new();
    for (generation, position, expected) in [
        (0, 5, CheckpointSave::Saved),
        (0, 5, CheckpointSave::NotHigher),
        (0, 3, CheckpointSave::NotHigher),
        (7, 9, CheckpointSave::Fenced),
    ] {
        let code: i16 = sqlx::query_scalar(AssertSqlSafe(save.clone()))
            .bind("projection")
            .bind(generation)
            .bind(position)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(
            CheckpointSave::from_code(code),
            Some(expected),
            "generation {generation}, position {position}"
        );
        seen.push(expected);
    }
    for result in CheckpointSave::ALL {
        assert!(seen.contains(&result), "{result:?} has no case");
    }
    assert_eq!(CheckpointSave::from_code(2), None);
}
