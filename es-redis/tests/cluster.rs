//! The store on a real Redis Cluster (`REDIS_CLUSTER_URLS`: 3 primaries with a replica each,
//! started by `cargo xtask test`): both es-core conformance suites, each case under its own key
//! prefix, hence its own partition tag and slot, so the cases spread over the three primaries;
//! and the cluster's own guarantees: one slot per append, the recorded layout, the function
//! library on every primary.
#![cfg(feature = "cluster")]

mod common;

use es_core::{AppendRequest, EventStore, ExpectedVersion, NewEvent, StreamId};
use es_redis::redis::{self, AsyncCommands};
use es_redis::{slot_of_tag, Error, KeyLayout, RedisStore};
use futures::TryStreamExt;
use std::collections::{BTreeMap, BTreeSet};

/// A store on the shared cluster under a fresh prefix.
async fn store(name: &str) -> RedisStore {
    RedisStore::cluster_builder(es_test_support::redis_cluster_urls())
        .prefix(common::unique_prefix(name))
        .build()
        .await
        .unwrap_or_else(|e| panic!("cannot build a store on the Redis Cluster: {e}"))
}

es_testkit::conformance_tests!(|| async { store("cconf").await });

/// The streaming-out suite on the cluster: the outbox written by the append function, the
/// relay lease, dead letters, checkpoints and the projection runner.
mod streaming {
    es_testkit::streaming_conformance_tests!(|| async { super::store("cstream").await });
}

/// A store on the shared cluster under a fresh prefix with `partitions` feed partitions.
async fn partitioned_store(name: &str, partitions: u32) -> RedisStore {
    RedisStore::cluster_builder(es_test_support::redis_cluster_urls())
        .prefix(common::unique_prefix(name))
        .partitioning(es_core::Partitioning::new(partitions).unwrap())
        .build()
        .await
        .unwrap_or_else(|e| panic!("cannot build a store on the Redis Cluster: {e}"))
}

/// The core suite on three partitions: one on each primary of the evenly assigned cluster.
mod partitioned_3 {
    es_testkit::conformance_tests!(|| async { super::partitioned_store("cp3", 3).await });
}

/// The core suite on eight partitions, spread over the three primaries.
mod partitioned_8 {
    es_testkit::conformance_tests!(|| async { super::partitioned_store("cp8", 8).await });
}

/// The lease and consumer-group cases on three partitions, one per primary: a projection group
/// on every partition, a relay group on every outbox, the group's leases on the slot of its own
/// tag.
mod partitioned_3_groups {
    es_testkit::group_conformance_tests!(|| async { super::partitioned_store("cp3g", 3).await });
}

/// The slot Redis Cluster hashes `key` to, asked of the cluster.
async fn keyslot(conn: &mut redis::cluster_async::ClusterConnection, key: &str) -> u16 {
    redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(conn)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_an_append_writes_is_in_the_partition_slot() {
    let store = store("slots").await;
    let keys = store.keys().clone();
    assert_eq!(keys.layout(), KeyLayout::Tagged);
    let partition = keys.partition(0).unwrap().clone();
    let mut conn = store.cluster_connection().expect("a cluster store");
    // The cluster computes the same slot as the store.
    assert_eq!(keyslot(&mut conn, partition.feed()).await, partition.slot());
    assert_eq!(
        partition.slot(),
        slot_of_tag(format!("{}:p0:0", keys.prefix()).as_bytes())
    );

    // Appends with outbox messages to several streams, concurrently (group commit puts them in
    // one call).
    let mut appends = Vec::new();
    for i in 0..8 {
        let store = store.clone();
        appends.push(tokio::spawn(async move {
            let stream = StreamId::new("order", &format!("o{i}")).unwrap();
            let event = NewEvent::new("Placed", 1, r#"{"total":1}"#).unwrap();
            let message = es_core::OutboxMessage {
                message_id: uuid::Uuid::now_v7(),
                source_event_id: event.event_id,
                topic: "orders".into(),
                key: stream.to_string(),
                message_type: "OrderPlaced".into(),
                schema_version: 1,
                payload: bytes::Bytes::from_static(br#"{"total":1}"#),
                metadata: es_core::Metadata::new(),
            };
            store
                .append(
                    AppendRequest::new(stream, ExpectedVersion::NoStream, vec![event])
                        .with_outbox(vec![message]),
                )
                .await
                .unwrap()
        }));
    }
    for append in appends {
        append.await.unwrap();
    }

    // Every key under the prefix is in the partition's slot, except the global ones (the meta
    // key, checkpoints), which appends do not write.
    let global = [
        keys.meta(),
        keys.checkpoints(),
        keys.checkpoint_generations(),
    ];
    let pattern = format!("{}:*", keys.prefix());
    let mut found = Vec::new();
    for node in cluster_primaries(&mut conn).await {
        let mut node_conn = redis::Client::open(node)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let node_keys: Vec<String> = node_conn.keys(&pattern).await.unwrap();
        found.extend(node_keys);
    }
    assert!(found.iter().any(|k| k == keys.meta()), "{found:?}");
    let written: Vec<&String> = found
        .iter()
        .filter(|k| !global.contains(&k.as_str()))
        .collect();
    // 8 streams × (events, version) + feed, index, outbox, epochs.
    assert_eq!(written.len(), 8 * 2 + 4, "{written:?}");
    for key in written {
        assert_eq!(keyslot(&mut conn, key).await, partition.slot(), "{key}");
    }
}

/// The URLs of the cluster's primaries, from `CLUSTER SLOTS`.
async fn cluster_primaries(conn: &mut redis::cluster_async::ClusterConnection) -> Vec<String> {
    let slots: Vec<redis::Value> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(conn)
        .await
        .unwrap();
    let mut urls = Vec::new();
    for range in slots {
        let redis::Value::Array(fields) = range else {
            panic!("unexpected CLUSTER SLOTS entry {range:?}")
        };
        let redis::Value::Array(primary) = &fields[2] else {
            panic!("unexpected CLUSTER SLOTS node {:?}", fields[2])
        };
        let host: String = redis::from_redis_value(primary[0].clone()).unwrap();
        let port: u16 = redis::from_redis_value(primary[1].clone()).unwrap();
        let url = format!("redis://{host}:{port}");
        if !urls.contains(&url) {
            urls.push(url);
        }
    }
    urls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_function_library_is_on_every_primary_and_reloaded_where_it_went_missing() {
    let store = store("functions").await;
    let mut conn = store.cluster_connection().unwrap();
    let primaries = cluster_primaries(&mut conn).await;
    assert_eq!(primaries.len(), 3, "{primaries:?}");
    for url in &primaries {
        let mut node = redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let list: redis::Value = redis::cmd("FUNCTION")
            .arg("LIST")
            .arg("LIBRARYNAME")
            .arg("es_append_*")
            .query_async(&mut node)
            .await
            .unwrap();
        let text = format!("{list:?}");
        assert!(text.contains("es_append_"), "{url}: {text}");
    }

    // The primary of the store's slot loses the library (a `FUNCTION FLUSH` there): the next
    // append finds it missing, loads it on that primary and is sent again, stored once.
    let slot = store.keys().partition(0).unwrap().slot();
    let at_slot = || {
        redis::cluster_routing::RoutingInfo::SingleNode(
            redis::cluster_routing::SingleNodeRoutingInfo::SpecificNode(
                redis::cluster_routing::Route::new(slot, redis::cluster_routing::SlotAddr::Master),
            ),
        )
    };
    let flushed = conn
        .route_command(redis::cmd("FUNCTION").arg("FLUSH").clone(), at_slot())
        .await
        .unwrap();
    assert_eq!(flushed, redis::Value::Okay);
    let stream = StreamId::new("order", "after-flush").unwrap();
    let events = common::append_two_and_read_back(&store, &stream).await;
    assert_eq!(events.len(), 2);
    let listed = conn
        .route_command(redis::cmd("FUNCTION").arg("LIST").clone(), at_slot())
        .await
        .unwrap();
    assert!(format!("{listed:?}").contains("es_append_"), "{listed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layout_is_recorded_and_another_layout_is_refused() {
    let urls = es_test_support::redis_cluster_urls();
    let prefix = common::unique_prefix("layout");
    let store = RedisStore::cluster_builder(urls.clone())
        .prefix(&prefix)
        .build()
        .await
        .unwrap();
    let meta: Option<String> = store
        .cluster_connection()
        .unwrap()
        .hget(store.keys().meta(), "layout")
        .await
        .unwrap();
    assert_eq!(meta.as_deref(), Some("tagged/1"));
    // The classic layout cannot run on a cluster: refused before connecting.
    let err = RedisStore::cluster_builder(urls.clone())
        .prefix(&prefix)
        .key_layout(KeyLayout::Classic)
        .build()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidSetting(_)), "{err}");
    assert!(err.to_string().contains("tagged layout"), "{err}");
    // No nodes at all.
    let err = RedisStore::cluster_builder(Vec::<String>::new())
        .build()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidSetting(_)), "{err}");

    // On a standalone server: a classic store refuses to open as tagged, and the other way
    // round, with the recorded and the requested layout named.
    let url = es_test_support::redis_url();
    let classic_prefix = common::unique_prefix("layout-classic");
    let classic = RedisStore::builder(&url)
        .prefix(&classic_prefix)
        .build()
        .await
        .unwrap();
    common::append_two_and_read_back(&classic, &StreamId::new("order", "1").unwrap()).await;
    let err = RedisStore::builder(&url)
        .prefix(&classic_prefix)
        .key_layout(KeyLayout::Tagged)
        .build()
        .await
        .unwrap_err();
    match &err {
        Error::LayoutMismatch {
            recorded,
            requested,
            ..
        } => {
            assert_eq!(recorded, "classic/1");
            assert_eq!(requested, "tagged/1");
        }
        other => panic!("expected LayoutMismatch, got {other}"),
    }
    // A classic store made before layouts were recorded (no meta key) is recognised by its
    // head and recorded as classic.
    let _: () = classic
        .connection()
        .del(classic.keys().meta())
        .await
        .unwrap();
    let err = RedisStore::builder(&url)
        .prefix(&classic_prefix)
        .key_layout(KeyLayout::Tagged)
        .build()
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::LayoutMismatch { recorded, .. } if recorded == "classic/1"),
        "{err}"
    );

    // The tagged layout on a standalone server: the whole store in one slot's keys.
    let tagged_prefix = common::unique_prefix("layout-tagged");
    let tagged = RedisStore::builder(&url)
        .prefix(&tagged_prefix)
        .key_layout(KeyLayout::Tagged)
        .build()
        .await
        .unwrap();
    let stream = StreamId::new("order", "1").unwrap();
    common::append_two_and_read_back(&tagged, &stream).await;
    assert!(tagged.keys().events(&stream).contains(":p0:0}:s:order-1:"));
    let all: Vec<_> = tagged
        .read_all(es_core::ReadAll::after(0))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(all.len(), 2);
    let err = RedisStore::builder(&url)
        .prefix(&tagged_prefix)
        .build()
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::LayoutMismatch { recorded, requested, .. }
            if recorded == "tagged/1" && requested == "classic/1"),
        "{err}"
    );
}

/// The primary (`host:port`) serving each slot range, from `CLUSTER SLOTS`.
async fn slot_owners(
    conn: &mut redis::cluster_async::ClusterConnection,
) -> Vec<(u16, u16, String)> {
    let slots: Vec<redis::Value> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(conn)
        .await
        .unwrap();
    slots
        .into_iter()
        .map(|range| {
            let redis::Value::Array(fields) = range else {
                panic!("unexpected CLUSTER SLOTS entry {range:?}")
            };
            let low: u16 = redis::from_redis_value(fields[0].clone()).unwrap();
            let high: u16 = redis::from_redis_value(fields[1].clone()).unwrap();
            let redis::Value::Array(primary) = &fields[2] else {
                panic!("unexpected CLUSTER SLOTS node {:?}", fields[2])
            };
            let host: String = redis::from_redis_value(primary[0].clone()).unwrap();
            let port: u16 = redis::from_redis_value(primary[1].clone()).unwrap();
            (low, high, format!("{host}:{port}"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_spread_over_every_primary_and_appends_reach_them_all() {
    for partitions in [3u32, 8] {
        let store = partitioned_store("spread", partitions).await;
        let keys = store.keys().clone();
        let partitioning = store.partitioning();
        assert_eq!(keys.partitions(), partitions);
        let mut conn = store.cluster_connection().unwrap();
        let owners = slot_owners(&mut conn).await;
        let primaries: BTreeSet<&String> = owners.iter().map(|(_, _, node)| node).collect();
        assert_eq!(primaries.len(), 3, "{owners:?}");
        // Each partition's slot, as the cluster hashes its feed key, and the primary serving it.
        let mut serving: BTreeMap<u32, String> = BTreeMap::new();
        for (p, part) in (0u32..).zip(keys.all_partitions()) {
            assert_eq!(keyslot(&mut conn, part.feed()).await, part.slot());
            let owner = owners
                .iter()
                .find(|(low, high, _)| (*low..=*high).contains(&part.slot()))
                .map(|(_, _, node)| node.clone())
                .unwrap();
            serving.insert(p, owner);
        }
        let used: BTreeSet<&String> = serving.values().collect();
        assert_eq!(used, primaries, "{partitions} partitions: {serving:?}");

        // Appends from 16 tasks to streams of every partition.
        let mut writers = Vec::new();
        for task in 0..16 {
            let store = store.clone();
            writers.push(tokio::spawn(async move {
                for n in 0..10 {
                    let stream = StreamId::new("order", &format!("{task}x{n}")).unwrap();
                    let event = NewEvent::new("Placed", 1, r#"{"total":1}"#).unwrap();
                    store
                        .append(AppendRequest::new(
                            stream,
                            ExpectedVersion::NoStream,
                            vec![event],
                        ))
                        .await
                        .unwrap();
                }
            }));
        }
        for writer in writers {
            writer.await.unwrap();
        }
        // Every partition got events, each partition's feed and head are on the primary that
        // serves its slot, and that primary holds the partition's keys (asked directly).
        let mut total = 0;
        for (p, part) in (0u32..).zip(keys.all_partitions()) {
            let feed: Vec<_> = store
                .read_all(es_core::ReadAll::after(0).partition(p))
                .try_collect()
                .await
                .unwrap();
            assert!(
                !feed.is_empty(),
                "partition {p} of {partitions} got no append"
            );
            assert!(feed
                .iter()
                .all(|e| e.partition == p && partitioning.partition_of(&e.stream_id) == p));
            total += feed.len();
            let mut node = redis::Client::open(format!("redis://{}", serving[&p]))
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap();
            let len: usize = redis::cmd("XLEN")
                .arg(part.feed())
                .query_async(&mut node)
                .await
                .unwrap();
            assert_eq!(len, feed.len(), "partition {p} on {}", serving[&p]);
            let head: Option<u64> = node.hget(part.index(), "position").await.unwrap();
            assert_eq!(head, Some(feed.last().unwrap().global_position));
        }
        assert_eq!(total, 160);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_store_with_another_partitioning_is_refused() {
    let urls = es_test_support::redis_cluster_urls();
    let prefix = common::unique_prefix("cpref");
    let with = |partitioning: es_core::Partitioning| {
        RedisStore::cluster_builder(urls.clone())
            .prefix(&prefix)
            .partitioning(partitioning)
            .build()
    };
    let three = es_core::Partitioning::new(3).unwrap();
    let store = with(three).await.unwrap();
    common::append_two_and_read_back(&store, &StreamId::new("order", "1").unwrap()).await;
    let meta: Option<String> = store
        .cluster_connection()
        .unwrap()
        .hget(store.keys().meta(), "layout")
        .await
        .unwrap();
    assert_eq!(meta.as_deref(), Some("tagged/3"));
    for (other, requested) in [
        (es_core::Partitioning::new(8).unwrap(), "tagged/8"),
        (es_core::Partitioning::single(), "tagged/1"),
        (
            three.by(es_core::PartitionKey::Category),
            "tagged/3/category",
        ),
    ] {
        match with(other).await {
            Err(Error::LayoutMismatch {
                recorded,
                requested: asked,
                ..
            }) => assert_eq!((recorded.as_str(), asked.as_str()), ("tagged/3", requested)),
            Err(other) => panic!("expected LayoutMismatch, got {other}"),
            Ok(_) => panic!("a store of 3 partitions opened as {requested}"),
        }
    }
    assert!(with(three).await.is_ok());
}

/// The closing cases on the cluster: the closed check and the closed key in the stream's slot,
/// on one partition and on eight spread over the three primaries.
mod closing {
    es_testkit::closing_conformance_tests!(|| async { super::store("cclose").await });
}

mod closing_partitioned_8 {
    es_testkit::closing_conformance_tests!(|| async {
        super::partitioned_store("cclose8", 8).await
    });
}

/// The multi-stream append cases on the cluster: one partition (one slot) per store.
mod multi {
    es_testkit::multi_conformance_tests!(|| async { super::store("cmulti").await });
}

/// Eight partitions by category on the cluster: every account in the slot of its category's
/// partition.
mod multi_by_category {
    es_testkit::multi_conformance_tests!(|| async {
        es_redis::RedisStore::cluster_builder(es_test_support::redis_cluster_urls())
            .prefix(super::common::unique_prefix("cmcat"))
            .partitioning(
                es_core::Partitioning::new(8)
                    .unwrap()
                    .by(es_core::PartitionKey::Category),
            )
            .build()
            .await
            .unwrap_or_else(|e| panic!("cannot build a store on the Redis Cluster: {e}"))
    });
}

/// On the cluster, a call whose streams are in partitions on different slots is refused before
/// anything is sent (a multi-key script across slots would fail with CROSSSLOT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_append_across_slots_is_refused() {
    let store = partitioned_store("cmspan", 3).await;
    let keys = store.keys();
    let first = StreamId::new("account", "m0").unwrap();
    let other = (1..64)
        .map(|n| StreamId::new("account", &format!("m{n}")).unwrap())
        .find(|s| keys.partition_of(s) != keys.partition_of(&first))
        .expect("a stream in another partition");
    assert_ne!(
        keys.partition_of_stream(&first).slot(),
        keys.partition_of_stream(&other).slot()
    );
    let err = store
        .append_streams(vec![
            AppendRequest::new(
                first.clone(),
                ExpectedVersion::NoStream,
                vec![NewEvent::new("Opened", 1, "{}").unwrap()],
            ),
            AppendRequest::new(
                other,
                ExpectedVersion::NoStream,
                vec![NewEvent::new("Opened", 1, "{}").unwrap()],
            ),
        ])
        .await
        .expect_err("two slots");
    assert!(
        matches!(err, es_core::StoreError::InvalidMultiAppend { .. }),
        "{err:?}"
    );
    assert_eq!(store.stream_version(&first).await.unwrap(), 0);
}
