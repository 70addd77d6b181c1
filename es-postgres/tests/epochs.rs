//! Epochs: a server that restarts, or comes back from a backup with fewer events than it had
//! handed out, never hands a lost position out again, and a reader that had passed the
//! surviving head learns it with `StoreError::LostTail` instead of skipping the new events.
//!
//! Each test runs a PostgreSQL server of its own, so it can kill it, stop it and swap its data
//! directory for a copy taken earlier (a cold backup restored).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use es_core::contract::position::{epoch_of, first_of_epoch, EpochStart};
use es_core::{
    AppendRequest, EventFilter, EventStore, ExpectedVersion, NewEvent, RecordedEvent, StoreError,
    StreamId,
};
use es_postgres::PgStore;
use es_test_support::{scratch_dir, PgServer};
use futures::{Stream, StreamExt};
use serde_json::json;

const PATIENCE: Duration = Duration::from_secs(90);

fn stream(name: &str) -> StreamId {
    StreamId::parse(name).unwrap()
}

fn event(n: u64) -> NewEvent {
    NewEvent::from_value("Counted", 1, &json!({ "n": n }))
}

async fn store(url: &str) -> PgStore {
    PgStore::builder(common::pool(url, 8).await)
        .schema("epochs")
        .poll_interval(Duration::from_millis(100))
        .build()
        .await
        .unwrap()
}

/// Appends `n` one-event appends to `acct-<name>`, retrying while the server comes back.
async fn append_n(store: &PgStore, name: &str, from: u64, n: u64) -> Vec<u64> {
    let mut positions = Vec::new();
    for i in from..from + n {
        let request = AppendRequest::new(
            stream(&format!("acct-{name}")),
            ExpectedVersion::Any,
            vec![event(i)],
        );
        let result = tokio::time::timeout(PATIENCE, async {
            loop {
                match store.append(request.clone()).await {
                    Ok(result) => return result,
                    Err(err) if err.is_transient() => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(err) => panic!("append failed: {err}"),
                }
            }
        })
        .await
        .expect("the server comes back");
        positions.extend(result.positions);
    }
    positions
}

async fn next_item(
    feed: &mut (impl Stream<Item = Result<RecordedEvent, StoreError>> + Unpin),
) -> Result<RecordedEvent, StoreError> {
    tokio::time::timeout(PATIENCE, feed.next())
        .await
        .expect("the subscription delivers")
        .expect("the subscription goes on")
}

fn cp(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "cp -a {} {}",
        from.display(),
        to.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_starts_an_epoch_that_loses_nothing() {
    let dir = scratch_dir("epochs-restart");
    let mut server = PgServer::start(&dir, &[]).unwrap();
    let url = server.url("postgres");
    let store = store(&url).await;
    let before = append_n(&store, "a", 0, 10).await;
    // The schema's first append begins its first epoch, from the clock.
    let history = store.epochs().await.unwrap();
    assert_eq!(history.len(), 1);
    let first = history[0];
    assert_eq!(first.previous_head, 0);
    assert_eq!(
        before,
        (first_of_epoch(first.epoch)..first_of_epoch(first.epoch) + 10).collect::<Vec<_>>(),
        "positions are dense within an epoch"
    );
    let mut feed = store.subscribe(0, EventFilter::all());
    for p in &before {
        assert_eq!(next_item(&mut feed).await.unwrap().global_position, *p);
    }

    server.kill9().unwrap();
    server.restart().unwrap();
    let after = append_n(&store, "a", 10, 5).await;
    let history = store.epochs().await.unwrap();
    assert_eq!(
        history.len(),
        2,
        "the new incarnation begins an epoch: {history:?}"
    );
    assert!(history[1].epoch > first.epoch);
    assert_eq!(history[1].previous_head, *before.last().unwrap());
    assert_eq!(after[0], first_of_epoch(history[1].epoch));
    // Nothing was lost, so the subscriber crosses into the new epoch without an error.
    for p in &after {
        assert_eq!(next_item(&mut feed).await.unwrap().global_position, *p);
    }
    // A second restart: another epoch, the head of the last one survives.
    server.kill9().unwrap();
    server.restart().unwrap();
    let again = append_n(&store, "a", 15, 1).await;
    let history = store.epochs().await.unwrap();
    assert_eq!(history.len(), 3);
    assert_eq!(
        history[2],
        EpochStart {
            epoch: history[2].epoch,
            previous_head: *after.last().unwrap()
        }
    );
    assert_eq!(again[0], first_of_epoch(history[2].epoch));
    assert_eq!(
        next_item(&mut feed).await.unwrap().global_position,
        again[0]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restore_from_an_older_backup_is_a_lost_tail() {
    let dir = scratch_dir("epochs-restore");
    let mut server = PgServer::start(&dir, &[]).unwrap();
    let url = server.url("postgres");
    let store = store(&url).await;
    let kept = append_n(&store, "k", 0, 5).await;
    let surviving_head = *kept.last().unwrap();

    // A cold backup of the cluster, with five events.
    server.stop().unwrap();
    let data = server.data_dir();
    let backup = data.with_file_name("backup");
    cp(&data, &backup);
    server.restart().unwrap();

    let lost = append_n(&store, "l", 0, 5).await;
    let lost_max = *lost.last().unwrap();
    let mut ahead = store.subscribe(0, EventFilter::all());
    for p in kept.iter().chain(&lost) {
        assert_eq!(next_item(&mut ahead).await.unwrap().global_position, *p);
    }

    // Restore the backup: the five later events, and the epoch they were in, are gone.
    server.stop().unwrap();
    std::fs::remove_dir_all(&data).unwrap();
    cp(&backup, &data);
    // Epochs are numbered in seconds: make sure the clock has moved past the lost one's.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    server.restart().unwrap();

    let new = append_n(&store, "n", 0, 3).await;
    assert!(
        new.iter().all(|p| *p > lost_max),
        "a lost position was handed out again: {new:?} after {lost:?}"
    );
    let history = store.epochs().await.unwrap();
    assert_eq!(history.len(), 2, "{history:?}");
    assert_eq!(history[1].previous_head, surviving_head);
    assert!(epoch_of(new[0]) > epoch_of(lost_max));

    // The subscriber that had read the lost events is told, not left waiting past them.
    match next_item(&mut ahead).await {
        Err(StoreError::LostTail {
            position,
            head,
            epoch,
        }) => {
            assert_eq!(
                (position, head, epoch),
                (lost_max, surviving_head, history[1].epoch)
            );
        }
        other => panic!("expected LostTail, got {other:?}"),
    }
    // A reader that had stopped before the surviving head sees the new events after it.
    let mut behind = store.subscribe(kept[2], EventFilter::all());
    for p in kept[3..].iter().chain(&new) {
        assert_eq!(next_item(&mut behind).await.unwrap().global_position, *p);
    }
    // A checkpoint past the surviving head fails the same way when it resumes.
    let mut resumed = store.subscribe(lost_max, EventFilter::all());
    assert!(matches!(
        next_item(&mut resumed).await,
        Err(StoreError::LostTail { .. })
    ));
    // Filtered subscriptions move past events they skip; they must not move past the loss.
    let mut filtered = store.subscribe(lost_max, EventFilter::all().category("nothing"));
    assert!(matches!(
        next_item(&mut filtered).await,
        Err(StoreError::LostTail { .. })
    ));
}

/// A store whose schema was dropped and created again (or pointed at an empty database) starts
/// from nothing: its positions lie above the old ones, and a reader of the old store learns that
/// everything it read is gone instead of skipping the new events.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wiped_store_is_a_lost_tail_for_its_old_readers() {
    let url = es_test_support::database_url();
    let schema = common::unique_schema("wiped");
    let old = common::store_on(&url, &schema).await;
    let old_positions = append_n(&old, "w", 0, 3).await;
    let mut reader = old.subscribe(0, EventFilter::all());
    for p in &old_positions {
        assert_eq!(next_item(&mut reader).await.unwrap().global_position, *p);
    }
    let admin = common::pool(&url, 2).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA \"{schema}\" CASCADE"
    )))
    .execute(&admin)
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let fresh = common::store_on(&url, &schema).await;
    let new_positions = append_n(&fresh, "w", 0, 2).await;
    assert!(new_positions[0] > *old_positions.last().unwrap());
    let mut resumed = fresh.subscribe(*old_positions.last().unwrap(), EventFilter::all());
    match next_item(&mut resumed).await {
        Err(StoreError::LostTail { head, .. }) => assert_eq!(head, 0),
        other => panic!("expected LostTail, got {other:?}"),
    }
}

/// An epoch begins for every partition at once: a restart under a store with four partitions
/// records each partition's surviving head, every partition's positions go on in the new epoch,
/// and a subscriber of every partition crosses into it without an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_records_the_surviving_head_of_every_partition() {
    use es_core::contract::{FeedPosition, Partitioning};
    use std::collections::BTreeMap;

    let dir = scratch_dir("epochs-partitions");
    let mut server = PgServer::start(&dir, &[]).unwrap();
    let url = server.url("postgres");
    let partitioning = Partitioning::new(4).unwrap();
    let store = PgStore::builder(common::pool(&url, 8).await)
        .schema("epochs_parts")
        .partitioning(partitioning)
        .poll_interval(Duration::from_millis(100))
        .build()
        .await
        .unwrap();
    // Streams acct-0.. over every partition, two events each before the restart.
    let mut heads: BTreeMap<u32, u64> = BTreeMap::new();
    let mut before = 0;
    for i in 0..24 {
        let positions = append_n(&store, &i.to_string(), 0, 2).await;
        let partition = partitioning.partition_of(&stream(&format!("acct-{i}")));
        heads.insert(partition, *positions.last().unwrap());
        before += 2;
    }
    assert_eq!(heads.len(), 4, "24 streams fall into every partition");
    let mut feed = store.subscribe_all(&FeedPosition::start(&partitioning), EventFilter::all());
    for _ in 0..before {
        next_item(&mut feed).await.unwrap();
    }

    server.kill9().unwrap();
    server.restart().unwrap();
    let mut after = Vec::new();
    for i in 0..24 {
        after.extend(append_n(&store, &i.to_string(), 2, 1).await);
    }
    let mut new_epoch = None;
    for partition in partitioning.partitions() {
        let history = store.partition_epochs(partition).await.unwrap();
        assert_eq!(history.len(), 2, "partition {partition}: {history:?}");
        assert_eq!(history[0].previous_head, 0);
        assert_eq!(
            history[1].previous_head, heads[&partition],
            "partition {partition} records its own surviving head"
        );
        assert!(
            new_epoch.is_none_or(|e| e == history[1].epoch),
            "one epoch for all"
        );
        new_epoch = Some(history[1].epoch);
    }
    let new_epoch = new_epoch.unwrap();
    assert!(after.iter().all(|p| epoch_of(*p) == new_epoch));
    let mut crossed = Vec::new();
    for _ in 0..after.len() {
        crossed.push(next_item(&mut feed).await.unwrap().global_position);
    }
    crossed.sort_unstable();
    after.sort_unstable();
    assert_eq!(crossed, after, "every partition crossed into the new epoch");
}
