//! Multi-stream appends on es-postgres: the conformance cases on one feed, on eight partitions
//! by stream id (calls across partitions, in both orders) and by category; and calls that roll
//! back after drawing positions (an inline projection refusing the last part, a backend killed
//! mid-call) while writers and a subscriber run.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use es_core::{AppendRequest, EventStore, ExpectedVersion, NewEvent, Partitioning, StreamId};
use es_postgres::PgStore;
use es_testkit::support::{check_feed, tail_until_done, DONE};
use futures::TryStreamExt;
use uuid::Uuid;

es_testkit::multi_conformance_tests!(common::fresh_store);

/// Eight partitions by stream id: the accounts of a call are in different partitions.
mod partitioned {
    use super::common;

    es_testkit::multi_conformance_tests!(|| common::fresh_partitioned_store(
        es_core::Partitioning::new(8).expect("8 partitions")
    ));

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn multi_append_across_partitions_never_skips() {
        let store =
            common::fresh_partitioned_store(es_core::Partitioning::new(4).expect("4")).await;
        es_testkit::multi::spanning::multi_append_across_partitions_never_skips(store).await;
    }
}

/// Transfers between accounts of four partitions, in both directions, from sixteen tasks:
/// besides the checks of the spanning case, the server records no deadlock while they run. A
/// call that drew positions in every partition before waiting for earlier allocations would
/// deadlock with another that drew in the same partitions in between (each waits for the
/// other's ticket); PostgreSQL would break the cycle by aborting one, which the store retries,
/// so only the server's count shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn calls_across_partitions_never_deadlock() {
    let store = common::fresh_partitioned_store(Partitioning::new(4).expect("4")).await;
    let admin = common::pool(&es_test_support::database_url(), 2).await;
    let deadlocks = || async {
        // A backend's pending statistics reach the shared counters within a second or so of
        // its last transaction.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let count: i64 = sqlx::query_scalar(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(&admin)
        .await
        .unwrap_or_else(|e| panic!("pg_stat_database: {e}"));
        count
    };
    let before = deadlocks().await;
    es_testkit::multi::spanning::multi_append_across_partitions_never_skips(store).await;
    assert_eq!(deadlocks().await, before, "the server recorded deadlocks");
}

/// Three partitions by category: every account in one partition.
mod partitioned_by_category {
    use super::common;

    es_testkit::multi_conformance_tests!(|| common::fresh_partitioned_store(
        es_core::Partitioning::new(3)
            .expect("3 partitions")
            .by(es_core::PartitionKey::Category)
    ));
}

/// A store with four partitions by stream id and the inline projection of
/// [`common::slow_or_refusing`].
async fn store_with_projection(stall: Duration) -> PgStore {
    let url = es_test_support::database_url();
    let schema = common::unique_schema("mx");
    PgStore::builder(common::pool(&url, 24).await)
        .schema(schema.as_str())
        .partitioning(Partitioning::new(4).expect("4 partitions"))
        .poll_interval(Duration::from_millis(200))
        .inline_projection("slow_or_refusing", common::slow_or_refusing(stall))
        .build()
        .await
        .unwrap_or_else(|e| panic!("cannot build the store on schema {schema}: {e}"))
}

/// Two streams of different partitions, `low` in a lower partition than `high`.
fn streams_in_two_partitions(store: &PgStore) -> (StreamId, StreamId) {
    let partitioning = store.partitioning();
    let mut by_partition = std::collections::BTreeMap::new();
    for n in 0.. {
        let stream = StreamId::new("account", &format!("x{n}")).expect("valid");
        by_partition
            .entry(partitioning.partition_of(&stream))
            .or_insert(stream);
        if by_partition.len() == 2 {
            break;
        }
    }
    let mut streams = by_partition.into_values();
    (
        streams.next().expect("two partitions"),
        streams.next().expect("two partitions"),
    )
}

fn event(event_type: &str) -> NewEvent {
    NewEvent::new(event_type, 1, "{}").expect("valid JSON")
}

/// Writers appending single events to `streams` (every partition) until `stop`; returns the
/// ids acknowledged.
fn writers(
    store: &PgStore,
    streams: Vec<StreamId>,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Vec<Uuid>>> {
    streams
        .into_iter()
        .map(|stream| {
            let store = store.clone();
            let stop = Arc::clone(stop);
            tokio::spawn(async move {
                let mut acked = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let e = event("Credited");
                    let id = e.event_id;
                    store
                        .append(AppendRequest::new(
                            stream.clone(),
                            ExpectedVersion::Any,
                            vec![e],
                        ))
                        .await
                        .expect("a single append");
                    acked.push(id);
                }
                acked
            })
        })
        .collect()
}

/// Ends the run: stops the writers, appends `Done`, and checks that the subscriber saw exactly
/// the stored events, once each, each partition's positions strictly increasing, and none of
/// the `refused` ids.
async fn finish(
    store: &PgStore,
    stop: &AtomicBool,
    writers: Vec<tokio::task::JoinHandle<Vec<Uuid>>>,
    subscriber: tokio::task::JoinHandle<Vec<es_core::RecordedEvent>>,
    refused: &HashSet<Uuid>,
) {
    stop.store(true, Ordering::SeqCst);
    let mut acked = HashSet::new();
    for w in writers {
        acked.extend(w.await.expect("a writer"));
    }
    store
        .append(AppendRequest::new(
            StreamId::new("marker", "done").unwrap(),
            ExpectedVersion::Any,
            vec![event(DONE)],
        ))
        .await
        .expect("Done");
    let seen = tokio::time::timeout(Duration::from_secs(120), subscriber)
        .await
        .expect("the subscriber reaches Done")
        .expect("the subscriber");
    let mut stored = HashSet::new();
    for partition in store.partitioning().partitions() {
        let events: Vec<es_core::RecordedEvent> = store
            .read_all(es_core::ReadAll::after(0).partition(partition))
            .try_collect()
            .await
            .expect("read_all");
        stored.extend(events.iter().map(|e| e.event_id));
    }
    assert!(
        acked.iter().all(|id| stored.contains(id)),
        "an acknowledged append was lost"
    );
    assert!(
        refused.iter().all(|id| !stored.contains(id)),
        "an event of a rolled-back call was stored"
    );
    check_feed("subscriber", &seen, &stored);
}

/// Calls spanning two partitions whose inline projection holds the lower partition's positions
/// for a while (a `Slow` event) and then refuses the higher partition's part (a `Refused`
/// event): each call rolls back after drawing positions in both partitions. Meanwhile writers
/// append to streams of every partition, and a subscriber follows every partition: it never
/// skips an event committed after a rolled-back allocation, never sees the refused events, and
/// every acknowledged append is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_rolled_back_after_drawing_positions_never_makes_a_reader_skip() {
    let store = store_with_projection(Duration::from_millis(150)).await;
    let (low, high) = streams_in_two_partitions(&store);
    let subscriber = tail_until_done(&store);
    let stop = Arc::new(AtomicBool::new(false));
    let targets: Vec<StreamId> = (0..6)
        .map(|n| StreamId::new("account", &format!("w{n}")).unwrap())
        .chain([low.clone(), high.clone()])
        .collect();
    let writers = writers(&store, targets, &stop);
    let mut refused = HashSet::new();
    for _ in 0..5 {
        let (slow, no) = (event("Slow"), event("Refused"));
        refused.insert(slow.event_id);
        refused.insert(no.event_id);
        let err = store
            .append_streams(vec![
                AppendRequest::new(low.clone(), ExpectedVersion::Any, vec![slow]),
                AppendRequest::new(high.clone(), ExpectedVersion::Any, vec![no]),
            ])
            .await
            .expect_err("the projection refuses the call");
        assert!(
            matches!(&err, es_core::StoreError::InlineProjection { stream_id, .. } if *stream_id == high),
            "{err:?}"
        );
    }
    // And calls that go through, between the refused ones' partitions.
    for _ in 0..5 {
        store
            .append_streams(vec![
                AppendRequest::new(low.clone(), ExpectedVersion::Any, vec![event("Slow")]),
                AppendRequest::new(high.clone(), ExpectedVersion::Any, vec![event("Credited")]),
            ])
            .await
            .expect("a call that the projection accepts");
    }
    finish(&store, &stop, writers, subscriber, &refused).await;
}

/// A call's backend is killed (`pg_terminate_backend`) while it holds positions drawn in one
/// partition (its inline projection stalls on a `Slow` event), with writers and a subscriber
/// running: the call fails as unavailable, none of its events is stored, and the subscriber
/// skips nothing committed after the positions it held.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_whose_backend_is_killed_never_makes_a_reader_skip() {
    let store = store_with_projection(Duration::from_secs(2)).await;
    let (low, high) = streams_in_two_partitions(&store);
    let subscriber = tail_until_done(&store);
    let stop = Arc::new(AtomicBool::new(false));
    let targets: Vec<StreamId> = (0..6)
        .map(|n| StreamId::new("account", &format!("w{n}")).unwrap())
        .chain([low.clone(), high.clone()])
        .collect();
    let writers = writers(&store, targets, &stop);
    let admin = common::pool(&es_test_support::database_url(), 2).await;
    let schema = store.schema().as_str().to_owned();
    let mut refused = HashSet::new();
    let mut killed = 0;
    for _ in 0..3 {
        let (slow, other) = (event("Slow"), event("Credited"));
        refused.insert(slow.event_id);
        refused.insert(other.event_id);
        let call = {
            let store = store.clone();
            let (low, high) = (low.clone(), high.clone());
            tokio::spawn(async move {
                store
                    .append_streams(vec![
                        AppendRequest::new(low, ExpectedVersion::Any, vec![slow]),
                        AppendRequest::new(high, ExpectedVersion::Any, vec![other]),
                    ])
                    .await
            })
        };
        // The call's backend: idle in its transaction (the projection sleeps in the client)
        // after the call of the schema's append function.
        let pattern = format!("%\"{schema}\".append_events%");
        let mut pid: Option<i32> = None;
        for _ in 0..400 {
            pid = sqlx::query_scalar(
                "SELECT pid FROM pg_stat_activity WHERE state = 'idle in transaction' \
                 AND query LIKE $1 \
                 AND clock_timestamp() - state_change > interval '300 milliseconds' LIMIT 1",
            )
            .bind(&pattern)
            .fetch_optional(&admin)
            .await
            .expect("pg_stat_activity");
            if pid.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let pid = pid.expect("the call's backend is found while it holds its positions");
        let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .fetch_one(&admin)
            .await
            .expect("pg_terminate_backend");
        killed += usize::from(terminated);
        let outcome = call.await.expect("the call's task");
        assert!(
            outcome.is_err(),
            "a call whose backend was killed fails: {outcome:?}"
        );
    }
    assert_eq!(killed, 3, "every call's backend was killed mid-call");
    finish(&store, &stop, writers, subscriber, &refused).await;
}
