//! Never-skip on a hot standby: transactions become visible on a streaming-replication standby
//! in the order of their commit records in the WAL, and the commit order makes that the order of
//! positions. A reader polling the standby must therefore never pass a position that becomes
//! visible there later, even while appends on the primary roll back after drawing positions.
//!
//! The test runs a primary and a standby of its own (`pg_basebackup -R`, by
//! `PgServer::start_standby`).

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use es_core::projection::HandlerError;
use es_core::{AppendRequest, EventStore, ExpectedVersion, NewEvent, RecordedEvent, StreamId};
use es_postgres::PgStore;
use es_test_support::{scratch_dir, PgServer};
use futures::future::BoxFuture;
use serde_json::json;
use sqlx::{AssertSqlSafe, PgConnection, PgPool};
use uuid::Uuid;

const SCHEMA: &str = "standby";

/// Fails one append in four after it drew its positions, and makes others wait a little inside
/// their transaction, so that allocations end out of order.
fn unruly(
    counter: Arc<AtomicU64>,
) -> impl for<'c> Fn(
    &'c mut PgConnection,
    &'c [RecordedEvent],
) -> BoxFuture<'c, Result<(), HandlerError>>
       + Send
       + Sync
       + 'static {
    move |_conn, _events| {
        let n = counter.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            match n % 4 {
                0 => Err("refused on purpose".into()),
                1 => {
                    tokio::time::sleep(Duration::from_millis(n % 40)).await;
                    Ok(())
                }
                _ => Ok(()),
            }
        })
    }
}

/// Polls `pool` for events after the last one seen, as fast as it can, until `stop`; returns
/// what it saw, in the order it saw it.
async fn poll(pool: PgPool, stop: Arc<AtomicBool>) -> Vec<(i64, Uuid)> {
    let mut seen = Vec::new();
    let mut after = 0i64;
    while !stop.load(Ordering::Relaxed) {
        let Ok(rows) = sqlx::query_as::<_, (i64, Uuid)>(AssertSqlSafe(format!(
            "SELECT global_position, event_id FROM {SCHEMA}.events \
             WHERE global_position > $1 ORDER BY global_position LIMIT 1000"
        )))
        .bind(after)
        .fetch_all(&pool)
        .await
        else {
            // The table appears on the standby once the primary's migration replays.
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        if let Some(last) = rows.last() {
            after = last.0;
        }
        seen.extend(rows);
    }
    seen
}

fn assert_never_skipped(name: &str, seen: &[(i64, Uuid)], all: &BTreeMap<i64, Uuid>) {
    let last = seen.last().map_or(0, |e| e.0);
    let expected: Vec<(i64, Uuid)> = all.range(..=last).map(|(p, id)| (*p, *id)).collect();
    let missing: Vec<i64> = expected
        .iter()
        .filter(|e| !seen.contains(e))
        .map(|e| e.0)
        .take(10)
        .collect();
    assert!(
        missing.is_empty(),
        "{name} skipped positions {missing:?} (saw {} of {} events up to {last})",
        seen.len(),
        expected.len()
    );
    assert_eq!(
        seen,
        expected.as_slice(),
        "{name} saw events out of order or twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_never_shows_a_position_before_an_earlier_one() {
    let primary = PgServer::start(&scratch_dir("standby-primary"), &[]).unwrap();
    let replica = scratch_dir("standby-replica");
    let standby = PgServer::start_standby(&primary, &replica, &[("hot_standby", "on")]).unwrap();
    let primary_url = primary.url("postgres");
    let standby_pool = common::pool(&standby.url("postgres"), 4).await;
    let primary_pool = common::pool(&primary_url, 4).await;

    // Several stores on one schema, as several processes would be; every one of them rolls
    // appends back after allocating.
    let counter = Arc::new(AtomicU64::new(0));
    let mut stores = Vec::new();
    for _ in 0..3 {
        stores.push(
            PgStore::builder(common::pool(&primary_url, 8).await)
                .schema(SCHEMA)
                .inline_projection("unruly", unruly(Arc::clone(&counter)))
                .build()
                .await
                .unwrap(),
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    let on_standby = tokio::spawn(poll(standby_pool.clone(), Arc::clone(&stop)));
    let on_primary = tokio::spawn(poll(primary_pool.clone(), Arc::clone(&stop)));

    let deadline = tokio::time::Instant::now() + Duration::from_secs(12);
    let mut writers = Vec::new();
    for w in 0..12u64 {
        let store = stores[usize::try_from(w).unwrap() % stores.len()].clone();
        writers.push(tokio::spawn(async move {
            let (mut ok, mut refused) = (0u64, 0u64);
            let mut i = 0u64;
            while tokio::time::Instant::now() < deadline {
                let stream = StreamId::parse(&format!("acct-{w}-{}", i % 7)).unwrap();
                let events = (0..=(i % 3))
                    .map(|k| NewEvent::from_value("Moved", 1, &json!({ "w": w, "i": i, "k": k })))
                    .collect();
                match store
                    .append(AppendRequest::new(stream, ExpectedVersion::Any, events))
                    .await
                {
                    Ok(_) => ok += 1,
                    Err(_) => refused += 1,
                }
                i += 1;
            }
            (ok, refused)
        }));
    }
    let (mut ok, mut refused) = (0, 0);
    for w in writers {
        let (o, r) = w.await.unwrap();
        ok += o;
        refused += r;
    }
    assert!(
        ok > 100 && refused > 20,
        "appends {ok}, rolled back {refused}"
    );

    // Let the standby replay everything, then stop the pollers.
    let lsn: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&primary_pool)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let caught_up: bool =
                sqlx::query_scalar("SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn")
                    .bind(&lsn)
                    .fetch_one(&standby_pool)
                    .await
                    .unwrap();
            if caught_up {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the standby catches up");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let standby_seen = on_standby.await.unwrap();
    let primary_seen = on_primary.await.unwrap();

    let all: BTreeMap<i64, Uuid> = sqlx::query_as::<_, (i64, Uuid)>(AssertSqlSafe(format!(
        "SELECT global_position, event_id FROM {SCHEMA}.events"
    )))
    .fetch_all(&standby_pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    assert!(
        all.len() as u64 >= ok,
        "every acknowledged append replicated"
    );
    assert_never_skipped("the standby poller", &standby_seen, &all);
    assert_never_skipped("the primary poller", &primary_seen, &all);
    assert_eq!(
        standby_seen.len(),
        all.len(),
        "the standby poller saw everything"
    );
}
