//! Multi-stream appends on es-redis: the conformance cases on one feed and on partitions by
//! category (every account in one partition); a call across partitions refused before anything
//! is sent; and every precondition of every part checked before the script's first write
//! (Redis does not roll a script back).

mod common;

use es_core::{AppendRequest, EventStore, ExpectedVersion, NewEvent, StoreError, StreamId};
use es_redis::redis::{self, AsyncCommands};
use es_redis::RedisStore;
use futures::TryStreamExt;

es_testkit::multi_conformance_tests!(|| async { common::store("multi").await });

/// Three partitions by category (the tagged layout): every account of a call in one partition,
/// hence one hash slot.
mod partitioned_by_category {
    use super::common;

    es_testkit::multi_conformance_tests!(|| async {
        let partitioning = es_core::Partitioning::new(3)
            .expect("3 partitions")
            .by(es_core::PartitionKey::Category);
        common::store_with(
            "mcat",
            es_redis::RedisStore::builder(es_test_support::redis_url()).partitioning(partitioning),
        )
        .await
    });
}

fn event(event_type: &str) -> NewEvent {
    NewEvent::new(event_type, 1, "{}").expect("valid JSON")
}

async fn connection() -> redis::aio::MultiplexedConnection {
    redis::Client::open(es_test_support::redis_url())
        .expect("a Redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("a connection to the test server")
}

async fn feed_len(store: &RedisStore) -> usize {
    let mut n = 0;
    for partition in store.partitioning().partitions() {
        let read = if store.partitioning().is_single() {
            es_core::ReadAll::after(0)
        } else {
            es_core::ReadAll::after(0).partition(partition)
        };
        let events: Vec<es_core::RecordedEvent> =
            store.read_all(read).try_collect().await.expect("read_all");
        n += events.len();
    }
    n
}

/// On four partitions by stream id: a call whose streams are in different partitions (so in
/// different hash slots) is refused with `InvalidMultiAppend` before anything is sent, and
/// nothing is written; a call whose streams share a partition goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_across_partitions_is_refused_before_anything_is_sent() {
    let store = common::partitioned_store("mspan", 4).await;
    let keys = store.keys();
    let mut by_partition = std::collections::BTreeMap::<u32, Vec<StreamId>>::new();
    for n in 0..64 {
        let stream = StreamId::new("account", &format!("s{n}")).unwrap();
        by_partition
            .entry(keys.partition_of(&stream))
            .or_default()
            .push(stream);
    }
    let mut partitions = by_partition.values();
    let first = partitions.next().expect("a partition");
    let other = partitions.next().expect("another partition");
    let err = store
        .append_streams(vec![
            AppendRequest::new(
                first[0].clone(),
                ExpectedVersion::NoStream,
                vec![event("Opened")],
            ),
            AppendRequest::new(
                other[0].clone(),
                ExpectedVersion::NoStream,
                vec![event("Opened")],
            ),
        ])
        .await
        .expect_err("streams in two partitions");
    match &err {
        StoreError::InvalidMultiAppend { reason } => {
            assert!(reason.contains("partition"), "{reason}");
        }
        other => panic!("expected InvalidMultiAppend, got {other:?}"),
    }
    assert_eq!(feed_len(&store).await, 0, "nothing was written");
    assert_eq!(store.stream_version(&first[0]).await.unwrap(), 0);

    let results = store
        .append_streams(vec![
            AppendRequest::new(
                first[0].clone(),
                ExpectedVersion::NoStream,
                vec![event("Opened")],
            ),
            AppendRequest::new(
                first[1].clone(),
                ExpectedVersion::NoStream,
                vec![event("Opened")],
            ),
        ])
        .await
        .expect("streams sharing a partition");
    assert_eq!(results.len(), 2);
    assert_eq!(feed_len(&store).await, 2);
}

/// The script checks every part before its first write: a last part whose events key holds
/// data the store did not write (a string; or an entry beyond the stream's version) fails the
/// call as corrupt, and the parts before it, which passed their own checks, are not written.
/// Without the check pass, the script would write the first part and then stop at the last,
/// leaving half a call that Redis does not roll back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_part_is_checked_before_the_first_write() {
    let store = common::store("mcheck").await;
    let (a, b, c) = (
        StreamId::new("account", "a").unwrap(),
        StreamId::new("account", "b").unwrap(),
        StreamId::new("account", "c").unwrap(),
    );
    let mut conn = connection().await;
    // b's events key is a string; c's holds an entry at version 5 while its version key says 0.
    let _: () = conn
        .set(store.keys().events(&b), "not a stream")
        .await
        .unwrap();
    let _: String = redis::cmd("XADD")
        .arg(store.keys().events(&c))
        .arg("5-0")
        .arg("planted")
        .arg("1")
        .query_async(&mut conn)
        .await
        .unwrap();
    for (bad, what) in [(&b, "not a Redis stream"), (&c, "beyond its version")] {
        let err = store
            .append_streams(vec![
                AppendRequest::new(a.clone(), ExpectedVersion::NoStream, vec![event("Opened")]),
                AppendRequest::new(
                    bad.clone(),
                    ExpectedVersion::NoStream,
                    vec![event("Opened")],
                ),
            ])
            .await
            .expect_err("a corrupt last part");
        match &err {
            StoreError::Corrupt { location, reason } => {
                assert!(location.contains(bad.as_str()), "{location}");
                assert!(reason.contains(what), "{reason}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        assert_eq!(
            store.stream_version(&a).await.unwrap(),
            0,
            "the first part was not written"
        );
        let a_events: i64 = conn.exists(store.keys().events(&a)).await.unwrap();
        assert_eq!(a_events, 0, "no entry was added to the first part's stream");
        assert_eq!(feed_len(&store).await, 0, "nothing reached the feed");
    }
}
