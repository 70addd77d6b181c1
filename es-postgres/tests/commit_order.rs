//! Commit order under every way an append can end: rolled back after drawing its positions (an
//! inline projection failing, an idempotent retry, a terminated backend), stalled past the append
//! time-out, or failing alone in its group. Several stores share one schema, as separate
//! processes would; a subscriber on yet another store records what it delivers.
//!
//! Each test names the finding of the guarantees review it reproduces; all of them failed (a
//! skipped position, or an append that never returned) before the commit order waited past
//! rolled-back allocations and before stalls were bounded.

mod common;

use std::time::Duration;

use es_core::{
    AppendRequest, AppendResult, EventStore, ExpectedVersion, NewEvent, ReadAll, RecordedEvent,
    StoreError, StreamId,
};
use es_postgres::PgStore;
use futures::TryStreamExt;
use serde_json::json;

/// The longest any append or wait in these tests may take before the test fails: far above the
/// stalls the tests inject, far below "forever".
const LIVENESS: Duration = Duration::from_secs(60);

fn stream(name: &str) -> StreamId {
    StreamId::parse(name).unwrap()
}

fn event(kind: &str) -> NewEvent {
    NewEvent::from_value(kind, 1, &json!({ "kind": kind }))
}

async fn store_with(schema: &str, stall: Duration, append_timeout: Duration) -> PgStore {
    store_named(schema, schema, stall, append_timeout).await
}

/// A store on `schema` whose connections carry the application name `app`.
async fn store_named(
    schema: &str,
    app: &str,
    stall: Duration,
    append_timeout: Duration,
) -> PgStore {
    let url = es_test_support::database_url();
    let options: sqlx::postgres::PgConnectOptions = url.parse().unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .test_before_acquire(false)
        .connect_with(options.application_name(app))
        .await
        .unwrap();
    PgStore::builder(pool)
        .schema(schema)
        .poll_interval(Duration::from_millis(100))
        .append_timeout(append_timeout)
        .inline_projection("slow_or_refusing", common::slow_or_refusing(stall))
        .build()
        .await
        .unwrap()
}

async fn plain_store(schema: &str) -> PgStore {
    common::store_on(&es_test_support::database_url(), schema).await
}

/// Whatever the subscriber delivered must be exactly the committed feed up to the last position
/// it delivered, in order: nothing skipped, nothing twice.
async fn assert_never_skipped(store: &PgStore, delivered: &[RecordedEvent]) {
    let last = delivered.last().map_or(0, |e| e.global_position);
    let feed: Vec<RecordedEvent> = store
        .read_all(ReadAll::after(0))
        .try_collect()
        .await
        .unwrap();
    let expected: Vec<(u64, uuid::Uuid)> = feed
        .iter()
        .filter(|e| e.global_position <= last)
        .map(|e| (e.global_position, e.event_id))
        .collect();
    let got: Vec<(u64, uuid::Uuid)> = delivered
        .iter()
        .map(|e| (e.global_position, e.event_id))
        .collect();
    assert_eq!(
        got, expected,
        "the subscriber skipped or repeated an event: delivered {got:?}, feed {expected:?}"
    );
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(LIVENESS, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not return within {LIVENESS:?}"))
}

/// Finding 1, as reported: an idempotent retry sent with `Any` failed on the unique key after
/// drawing a position, and the append after it committed while an earlier one was still open.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retry_with_any_does_not_let_the_feed_skip() {
    let schema = common::unique_schema("co_retry");
    let slow = store_with(&schema, Duration::from_secs(3), Duration::from_secs(30)).await;
    let retrier = plain_store(&schema).await;
    let third = plain_store(&schema).await;

    let x = event("X");
    let first = retrier
        .append(AppendRequest::new(
            stream("acct-r"),
            ExpectedVersion::NoStream,
            vec![x.clone()],
        ))
        .await
        .unwrap();
    let recorder = common::Recorder::start(&third);

    let slow_append = tokio::spawn({
        let slow = slow.clone();
        async move {
            slow.append(AppendRequest::new(
                stream("acct-slow"),
                ExpectedVersion::NoStream,
                vec![event("Slow")],
            ))
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let again = within(
        "the retry",
        retrier.append(AppendRequest::new(
            stream("acct-r"),
            ExpectedVersion::Any,
            vec![x],
        )),
    )
    .await
    .unwrap();
    assert_eq!(again.positions, first.positions);
    assert!(again.duplicate);
    let fast = within(
        "the append after the retry",
        third.append(AppendRequest::new(
            stream("acct-fast"),
            ExpectedVersion::NoStream,
            vec![event("Fast")],
        )),
    )
    .await
    .unwrap();
    let slow_result = within("the slow append", slow_append)
        .await
        .unwrap()
        .unwrap();
    assert!(slow_result.positions[0] < fast.positions[0]);

    let delivered = recorder
        .until("the subscriber reaches the head", LIVENESS, |seen| {
            seen.iter().any(|e| e.global_position >= fast.positions[0])
        })
        .await;
    assert_never_skipped(&third, &delivered).await;
    assert!(
        delivered
            .iter()
            .any(|e| e.global_position == slow_result.positions[0]),
        "the slow append's event was never delivered"
    );
}

/// Finding 1, the general case: an append that draws positions and then rolls back (here an
/// inline projection refuses it) sits between a slow open append and a later one. The later one
/// must not commit before the slow one ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolled_back_allocation_does_not_let_the_feed_skip() {
    let schema = common::unique_schema("co_rollback");
    let slow = store_with(&schema, Duration::from_secs(3), Duration::from_secs(30)).await;
    let refusing = store_with(&schema, Duration::ZERO, Duration::from_secs(30)).await;
    let third = plain_store(&schema).await;
    let recorder = common::Recorder::start(&third);

    let slow_append = tokio::spawn({
        let slow = slow.clone();
        async move {
            slow.append(AppendRequest::new(
                stream("acct-slow"),
                ExpectedVersion::NoStream,
                vec![event("Slow")],
            ))
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let refused = within(
        "the refused append",
        refusing.append(AppendRequest::new(
            stream("acct-refused"),
            ExpectedVersion::NoStream,
            vec![event("Refused"), event("Refused")],
        )),
    )
    .await;
    assert!(
        matches!(refused, Err(StoreError::InlineProjection { .. })),
        "{refused:?}"
    );
    let fast = within(
        "the append after the rollback",
        third.append(AppendRequest::new(
            stream("acct-fast"),
            ExpectedVersion::NoStream,
            vec![event("Fast")],
        )),
    )
    .await
    .unwrap();
    let slow_result = within("the slow append", slow_append)
        .await
        .unwrap()
        .unwrap();
    assert!(slow_result.positions[0] < fast.positions[0]);

    let delivered = recorder
        .until("the subscriber reaches the head", LIVENESS, |seen| {
            seen.iter().any(|e| e.global_position >= fast.positions[0])
        })
        .await;
    assert_never_skipped(&third, &delivered).await;
    assert_eq!(
        delivered
            .iter()
            .map(|e| e.event_type.as_str())
            .collect::<Vec<_>>(),
        ["Slow", "Fast"]
    );
}

/// Findings 1 and 2: an append that stalls after drawing its positions (its inline projection
/// hangs, as a paused or vanished client would) is aborted by PostgreSQL after the append
/// time-out; appends of other stores wait for it at most about that long, and nothing is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_append_is_aborted_and_the_chain_moves_on() {
    let schema = common::unique_schema("co_stall");
    // The projection would hang for ten minutes; the append time-out is one second.
    let stalling = store_with(&schema, Duration::from_secs(600), Duration::from_secs(1)).await;
    let other = plain_store(&schema).await;
    let recorder = common::Recorder::start(&other);

    let before = other
        .append(AppendRequest::new(
            stream("acct-before"),
            ExpectedVersion::NoStream,
            vec![event("Before")],
        ))
        .await
        .unwrap();
    let stalled = tokio::spawn({
        let stalling = stalling.clone();
        async move {
            stalling
                .append(AppendRequest::new(
                    stream("acct-stalled"),
                    ExpectedVersion::NoStream,
                    vec![event("Slow")],
                ))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Queued behind the stalled allocation: answered once PostgreSQL aborted it.
    let mut after: Vec<AppendResult> = Vec::new();
    for i in 0..5 {
        after.push(
            within(
                "an append behind the stalled one",
                other.append(AppendRequest::new(
                    stream(&format!("acct-after{i}")),
                    ExpectedVersion::NoStream,
                    vec![event("After")],
                )),
            )
            .await
            .unwrap(),
        );
    }
    let stalled = within("the stalled append", stalled).await.unwrap();
    assert!(
        matches!(stalled, Err(StoreError::Unavailable(_))),
        "the stalled append must fail as unavailable, got {stalled:?}"
    );
    // The store that stalled works again with a fresh connection.
    let recovered = within(
        "an append on the store that stalled",
        stalling.append(AppendRequest::new(
            stream("acct-stalled"),
            ExpectedVersion::NoStream,
            vec![event("Fine")],
        )),
    )
    .await
    .unwrap();
    assert_eq!(
        recovered.stream_version, 1,
        "the stalled append wrote nothing"
    );

    let last = recovered.positions[0].max(after[4].positions[0]);
    let delivered = recorder
        .until("the subscriber reaches the head", LIVENESS, |seen| {
            seen.iter().any(|e| e.global_position >= last)
        })
        .await;
    assert_never_skipped(&other, &delivered).await;
    assert!(delivered.iter().all(|e| e.event_type != "Slow"));
    assert!(delivered
        .iter()
        .any(|e| e.global_position == before.positions[0]));
}

/// Finding 3: an inline projection that fails on an append alone in its group must release the
/// append's positions at once. Before, the rollback was only queued on the writer's connection,
/// which sat idle in its transaction and held every later append of every store back. The
/// append time-out is set far above the test's patience, so only the explicit rollback can let
/// the next appends through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_inline_projection_releases_its_positions_at_once() {
    let schema = common::unique_schema("co_refuse");
    let refusing = store_with(&schema, Duration::ZERO, Duration::from_secs(3600)).await;
    let other = plain_store(&schema).await;
    let recorder = common::Recorder::start(&other);

    let refused = refusing
        .append(AppendRequest::new(
            stream("acct-refused"),
            ExpectedVersion::NoStream,
            vec![event("Refused")],
        ))
        .await;
    assert!(
        matches!(refused, Err(StoreError::InlineProjection { .. })),
        "{refused:?}"
    );
    let next = tokio::time::timeout(
        Duration::from_secs(20),
        other.append(AppendRequest::new(
            stream("acct-next"),
            ExpectedVersion::NoStream,
            vec![event("Next")],
        )),
    )
    .await
    .expect("an append after the refused one is not held back")
    .unwrap();
    let same_store = tokio::time::timeout(
        Duration::from_secs(20),
        refusing.append(AppendRequest::new(
            stream("acct-same"),
            ExpectedVersion::NoStream,
            vec![event("Same")],
        )),
    )
    .await
    .expect("the refusing store goes on")
    .unwrap();
    let head = next.positions[0].max(same_store.positions[0]);
    let delivered = recorder
        .until("the subscriber reaches the head", LIVENESS, |seen| {
            seen.iter().any(|e| e.global_position >= head)
        })
        .await;
    assert_never_skipped(&other, &delivered).await;
}

/// Finding 1 with a terminated backend: appends rolled back by `pg_terminate_backend` while they
/// hold positions (stalled in their inline projection) never let a later commit overtake an
/// earlier open one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn terminated_backends_holding_positions_do_not_let_the_feed_skip() {
    let schema = common::unique_schema("co_term");
    let slow = store_with(&schema, Duration::from_secs(3), Duration::from_secs(30)).await;
    let victim_app = common::unique_schema("co_victim");
    let victim = store_named(
        &schema,
        &victim_app,
        Duration::from_secs(600),
        Duration::from_secs(3600),
    )
    .await;
    let third = plain_store(&schema).await;
    let admin = common::pool(&es_test_support::database_url(), 2).await;
    let recorder = common::Recorder::start(&third);

    let slow_append = tokio::spawn({
        let slow = slow.clone();
        async move {
            slow.append(AppendRequest::new(
                stream("acct-slow"),
                ExpectedVersion::NoStream,
                vec![event("Slow")],
            ))
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let victim_append = tokio::spawn({
        let victim = victim.clone();
        async move {
            victim
                .append(AppendRequest::new(
                    stream("acct-victim"),
                    ExpectedVersion::NoStream,
                    vec![event("SqlSlow")],
                ))
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Terminate the victim's backend: the one running `pg_sleep` in its projection.
    let killed: Vec<(i32,)> = sqlx::query_as(
        "SELECT pid FROM pg_stat_activity \
         WHERE application_name = $1 AND query LIKE 'SELECT pg_sleep%' AND state = 'active' \
           AND pg_terminate_backend(pid)",
    )
    .bind(&victim_app)
    .fetch_all(&admin)
    .await
    .unwrap();
    assert_eq!(killed.len(), 1, "one stalled backend terminated");
    let victim_result = within("the terminated append", victim_append)
        .await
        .unwrap();
    let fast = within(
        "the append after the terminated one",
        third.append(AppendRequest::new(
            stream("acct-fast"),
            ExpectedVersion::NoStream,
            vec![event("Fast")],
        )),
    )
    .await
    .unwrap();
    let slow_result = within("the slow append", slow_append).await.unwrap();
    let delivered = recorder
        .until("the subscriber reaches the head", LIVENESS, |seen| {
            seen.iter().any(|e| e.global_position >= fast.positions[0])
        })
        .await;
    assert_never_skipped(&third, &delivered).await;
    let types: Vec<&str> = delivered.iter().map(|e| e.event_type.as_str()).collect();
    // Whichever of the two slow appends was terminated, the other's event comes before Fast.
    assert_eq!(types.last(), Some(&"Fast"));
    assert_eq!(
        types.len(),
        1 + usize::from(slow_result.is_ok()) + usize::from(victim_result.is_ok()),
        "delivered {types:?}; slow {slow_result:?}; victim {victim_result:?}"
    );
}
