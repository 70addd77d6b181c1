//! Feed partitions on a standalone server (`REDIS_URL`, and servers of their own where a test
//! restarts one): the recorded partitioning and its check at build, one outbox, lease and
//! dead-letter list per partition, per-partition heads, watchers and epochs. The conformance
//! suites on partitioned stores are in `conformance.rs`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use es_core::contract::position::{epoch_of, first_of_epoch};
use es_core::contract::{Delivered, Rejection};
use es_core::{
    AppendRequest, EventStore, ExpectedVersion, Metadata, NewEvent, OutboxMessage, OutboxStore,
    PartitionKey, Partitioning, ReadAll, StoreError, StreamId,
};
use es_redis::redis::AsyncCommands;
use es_redis::{Error, KeyLayout, RedisStore};
use es_test_support::{scratch_dir, RedisServer};
use futures::TryStreamExt;
use uuid::Uuid;

fn partitions(n: u32) -> Partitioning {
    Partitioning::new(n).unwrap()
}

fn event() -> NewEvent {
    NewEvent::new("Placed", 1, r#"{"n":1}"#).unwrap()
}

/// An append of one event with one outbox message keyed by the stream.
fn append_with_message(stream: &StreamId) -> AppendRequest {
    let event = event();
    let message = OutboxMessage {
        message_id: Uuid::now_v7(),
        source_event_id: event.event_id,
        topic: "orders".into(),
        key: stream.to_string(),
        message_type: "OrderPlaced".into(),
        schema_version: 1,
        payload: Bytes::from_static(br#"{"n":1}"#),
        metadata: Metadata::new(),
    };
    AppendRequest::new(stream.clone(), ExpectedVersion::Any, vec![event]).with_outbox(vec![message])
}

/// `n` streams of each partition of `partitioning`, partition by partition.
fn streams_per_partition(partitioning: Partitioning, n: usize) -> Vec<Vec<StreamId>> {
    let mut per = vec![Vec::new(); partitioning.count() as usize];
    let mut i = 0;
    while per.iter().any(|streams| streams.len() < n) {
        let stream = StreamId::new("order", &i.to_string()).unwrap();
        let streams = &mut per[partitioning.partition_of(&stream) as usize];
        if streams.len() < n {
            streams.push(stream);
        }
        i += 1;
    }
    per
}

async fn feed(store: &RedisStore, partition: u32) -> Vec<es_core::RecordedEvent> {
    store
        .read_all(ReadAll::after(0).partition(partition))
        .try_collect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partitioning_is_recorded_and_another_is_refused_at_build() {
    let url = es_test_support::redis_url();
    let prefix = common::unique_prefix("precorded");
    let builder = || RedisStore::builder(&url).prefix(&prefix);
    let store = builder().partitioning(partitions(4)).build().await.unwrap();
    // Several partitions take the tagged layout without being asked.
    assert_eq!(store.keys().layout(), KeyLayout::Tagged);
    assert_eq!(store.partitioning(), partitions(4));
    assert_eq!(store.keys().partitions(), 4);
    let meta: Option<String> = store
        .connection()
        .hget(store.keys().meta(), "layout")
        .await
        .unwrap();
    assert_eq!(meta.as_deref(), Some("tagged/4"));
    let stream = StreamId::new("order", "1").unwrap();
    common::append_two_and_read_back(&store, &stream).await;

    // Another count, another key, or one partition: refused, naming both, and nothing written.
    for (partitioning, requested) in [
        (partitions(3), "tagged/4 | tagged/3"),
        (partitions(8), "tagged/4 | tagged/8"),
        (
            partitions(4).by(PartitionKey::Category),
            "tagged/4 | tagged/4/category",
        ),
        (Partitioning::single(), "tagged/4 | classic/1"),
    ] {
        let err = builder()
            .partitioning(partitioning)
            .build()
            .await
            .unwrap_err();
        match &err {
            Error::LayoutMismatch {
                recorded,
                requested: asked,
                ..
            } => assert_eq!(format!("{recorded} | {asked}"), requested),
            other => panic!("{partitioning}: expected LayoutMismatch, got {other}"),
        }
        assert!(err.to_string().contains("partitioning"), "{err}");
    }
    let err = builder()
        .key_layout(KeyLayout::Tagged)
        .build()
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::LayoutMismatch { requested, .. } if requested == "tagged/1"),
        "{err}"
    );
    // The same partitioning opens the store, with its events where they were.
    let again = builder().partitioning(partitions(4)).build().await.unwrap();
    let p = again.partitioning().partition_of(&stream);
    assert_eq!(feed(&again, p).await.len(), 2);

    // A store by category records its key.
    let by_category = RedisStore::builder(&url)
        .prefix(common::unique_prefix("pcategory"))
        .partitioning(partitions(5).by(PartitionKey::Category))
        .build()
        .await
        .unwrap();
    assert_eq!(by_category.keys().recorded_layout(), "tagged/5/category");

    // Several partitions in the classic layout: refused before connecting.
    let err = builder()
        .partitioning(partitions(2))
        .key_layout(KeyLayout::Classic)
        .build()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidSetting(_)), "{err}");
    assert!(err.to_string().contains("tagged layout"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_partition_has_its_own_outbox_lease_and_dead_letters() {
    let store = common::partitioned_store("poutbox", 4).await;
    let partitioning = store.partitioning();
    let per = streams_per_partition(partitioning, 3);
    // Partition k gets k + 1 appends per stream, each with one message.
    for (k, streams) in per.iter().enumerate() {
        for stream in streams {
            for _ in 0..=k {
                store.append(append_with_message(stream)).await.unwrap();
            }
        }
    }

    // The unscoped handle of a partitioned store refuses every outbox method.
    let partitioned = |result: Result<(), StoreError>, what: &str| match result {
        Err(StoreError::Partitioned { partitions: 4 }) => {}
        other => panic!("{what}: expected Partitioned, got {other:?}"),
    };
    let ttl = Duration::from_secs(30);
    partitioned(store.acquire_relay_lease("r", ttl).await.map(drop), "lease");
    partitioned(store.release_relay_lease("r", 1).await, "release");
    partitioned(store.pending_outbox(10).await.map(drop), "pending");
    partitioned(store.pending_outbox_after(0, 10).await.map(drop), "after");
    partitioned(store.mark_delivered(1, &[]).await, "mark");
    partitioned(store.dead_letter(1, &[]).await, "dead_letter");
    partitioned(store.dead_letters(10).await.map(drop), "dead_letters");
    partitioned(store.requeue_dead_letters(&[1]).await.map(drop), "requeue");
    partitioned(store.outbox_len().await.map(drop), "len");
    partitioned(store.relay_status().await.map(drop), "status");
    assert!(matches!(
        store.outbox_partition(4),
        Err(StoreError::NoSuchPartition {
            partition: 4,
            partitions: 4
        })
    ));

    // Each scoped handle sees exactly its partition's records, numbered on from the first
    // position of the partition's epoch.
    let handles: Vec<RedisStore> = partitioning
        .partitions()
        .map(|p| store.outbox_partition(p).unwrap())
        .collect();
    for (k, handle) in handles.iter().enumerate() {
        let pending = handle.pending_outbox(100).await.unwrap();
        assert_eq!(pending.len(), 3 * (k + 1), "partition {k}");
        assert!(pending
            .iter()
            .all(|r| partitioning.partition_of(&r.stream_id) as usize == k));
        let positions: Vec<u64> = pending.iter().map(|r| r.position).collect();
        let first = positions[0];
        assert_eq!(first, first_of_epoch(epoch_of(first)));
        assert_eq!(
            positions,
            (first..first + pending.len() as u64).collect::<Vec<_>>()
        );
        assert_eq!(handle.outbox_len().await.unwrap(), pending.len() as u64);
    }

    // One lease per partition: two owners hold the leases of two partitions at once.
    let g0 = handles[0].acquire_relay_lease("a", ttl).await.unwrap();
    let g1 = handles[1].acquire_relay_lease("b", ttl).await.unwrap();
    assert_eq!((g0, g1), (Some(1), Some(1)));
    assert_eq!(
        handles[0].acquire_relay_lease("b", ttl).await.unwrap(),
        None
    );
    // A generation of partition 0's lease means nothing in partition 2, whose lease nobody took.
    let in_two = handles[2].pending_outbox(1).await.unwrap();
    let mark = handles[2]
        .mark_delivered(1, &[Delivered::from(&in_two[0])])
        .await;
    assert!(matches!(mark, Err(StoreError::Fenced { .. })), "{mark:?}");

    // Delivery marks and dead letters stay in their partition.
    let first = handles[0].pending_outbox(2).await.unwrap();
    handles[0]
        .mark_delivered(1, &[Delivered::from(&first[0])])
        .await
        .unwrap();
    handles[0]
        .dead_letter(
            1,
            &[Rejection {
                position: first[1].position,
                message_id: first[1].message.message_id,
                error: "too large".into(),
                attempts: 1,
            }],
        )
        .await
        .unwrap();
    let status0 = handles[0].relay_status().await.unwrap();
    assert_eq!((status0.pending, status0.dead_letters), (1, 1));
    assert_eq!(status0.lease.unwrap().owner, "a");
    let status1 = handles[1].relay_status().await.unwrap();
    assert_eq!((status1.pending, status1.dead_letters), (6, 0));
    assert_eq!(status1.lease.unwrap().owner, "b");
    assert!(handles[1].dead_letters(10).await.unwrap().is_empty());
    assert_eq!(handles[3].relay_status().await.unwrap().lease, None);
    // A re-queued dead letter goes to the end of its own partition's outbox.
    assert_eq!(
        handles[0]
            .requeue_dead_letters(&[first[1].position])
            .await
            .unwrap(),
        1
    );
    let back = handles[0].pending_outbox(10).await.unwrap();
    assert_eq!(back.last().unwrap().position, first[0].position + 3);
    assert_eq!(back.last().unwrap().message, first[1].message);
    assert_eq!(handles[1].outbox_len().await.unwrap(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_to_every_partition_keep_each_feed_dense_and_in_order() {
    let store = common::partitioned_store("pgroup", 4).await;
    let partitioning = store.partitioning();
    let per = streams_per_partition(partitioning, 4);
    // 16 writers (4 streams in each partition), 25 appends each, concurrently: group commit
    // groups them per partition.
    let mut writers = Vec::new();
    for stream in per.iter().flatten() {
        let stream = stream.clone();
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for version in 0..25u64 {
                let expected = if version == 0 {
                    ExpectedVersion::NoStream
                } else {
                    ExpectedVersion::Exact(version)
                };
                let result = store
                    .append(AppendRequest::new(stream.clone(), expected, vec![event()]))
                    .await
                    .unwrap();
                acked.push((stream.clone(), result.positions[0]));
            }
            acked
        }));
    }
    let mut acked: BTreeMap<u32, BTreeSet<u64>> = BTreeMap::new();
    for writer in writers {
        for (stream, position) in writer.await.unwrap() {
            assert!(acked
                .entry(partitioning.partition_of(&stream))
                .or_default()
                .insert(position));
        }
    }
    for p in partitioning.partitions() {
        let events = feed(&store, p).await;
        assert_eq!(events.len(), 100, "partition {p}");
        // Dense from the partition's first epoch: each partition numbers its own feed.
        let first = events[0].global_position;
        assert_eq!(first, first_of_epoch(epoch_of(first)));
        let positions: Vec<u64> = events.iter().map(|e| e.global_position).collect();
        assert_eq!(positions, (first..first + 100).collect::<Vec<_>>());
        assert_eq!(
            positions.iter().copied().collect::<BTreeSet<_>>(),
            acked[&p]
        );
        assert!(events.iter().all(|e| e.partition == p));
        let mut versions: BTreeMap<&StreamId, u64> = BTreeMap::new();
        for e in &events {
            let last = versions.insert(&e.stream_id, e.stream_version).unwrap_or(0);
            assert_eq!(
                e.stream_version,
                last + 1,
                "per-stream order in partition {p}"
            );
        }
        assert_eq!(store.partition_head(p).await.unwrap(), first + 99);
        // Stream reads name the partition too.
        let stream = &per[p as usize][0];
        let read: Vec<_> = store
            .read_stream(stream, es_core::ReadStream::forward())
            .try_collect()
            .await
            .unwrap();
        assert!(read.iter().all(|e| e.partition == p));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_of_one_partition_is_woken_by_its_appends_only() {
    // A long polling interval: only the partition's head watcher can wake a waiter in time.
    let store = common::store_with(
        "pwatch",
        RedisStore::builder(es_test_support::redis_url())
            .partitioning(partitions(3))
            .poll_interval(Duration::from_secs(30)),
    )
    .await;
    let per = streams_per_partition(store.partitioning(), 1);
    let waiter = |p: u32| {
        let store = store.clone();
        tokio::spawn(async move { store.wait_for_partition(p, 0).await })
    };
    let (w0, w1) = (waiter(0), waiter(1));
    // Let the watchers start and block.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Another client appends (so the store's own append cannot wake it): partition 1 only.
    let writer = RedisStore::builder(es_test_support::redis_url())
        .prefix(store.keys().prefix())
        .partitioning(partitions(3))
        .build()
        .await
        .unwrap();
    writer
        .append(AppendRequest::new(
            per[1][0].clone(),
            ExpectedVersion::Any,
            vec![event()],
        ))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), w1)
        .await
        .expect("the waiter of partition 1 is woken by its append")
        .unwrap();
    assert!(!w0.is_finished(), "partition 0 did not move");
    w0.abort();
    assert_eq!(store.partition_head(0).await.unwrap(), 0);
    let head = store.partition_head(1).await.unwrap();
    assert_eq!(head, first_of_epoch(epoch_of(head)));
    assert!(store.partition_epochs(0).await.unwrap().is_empty());
    assert_eq!(store.partition_epochs(1).await.unwrap().len(), 1);
    // A partition the store lacks: a typed error from the head and the epochs.
    assert!(matches!(
        store.partition_head(3).await,
        Err(StoreError::NoSuchPartition { partition: 3, .. })
    ));
    assert!(matches!(
        store.partition_epochs(3).await,
        Err(StoreError::NoSuchPartition { partition: 3, .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_begins_an_epoch_in_each_partition_on_its_next_write() {
    let dir = scratch_dir("es-redis-partition-epochs");
    let mut server = RedisServer::start(&dir, &["--appendonly", "yes"]).unwrap();
    let url = server.url();
    let open = || {
        RedisStore::builder(url.as_str())
            .prefix("pe")
            .partitioning(partitions(3))
            .build()
    };
    let store = open().await.unwrap();
    let per = streams_per_partition(store.partitioning(), 1);
    let append = |store: &RedisStore, p: usize| {
        let store = store.clone();
        let stream = per[p][0].clone();
        async move {
            store
                .append(AppendRequest::new(
                    stream,
                    ExpectedVersion::Any,
                    vec![event()],
                ))
                .await
                .unwrap()
                .positions[0]
        }
    };
    let mut one = Vec::new();
    for p in 0..3 {
        let first = append(&store, p).await;
        assert_eq!(first, first_of_epoch(epoch_of(first)));
        assert_eq!(append(&store, p).await, first + 1);
        one.push(first);
    }
    drop(store);
    server.terminate().unwrap();
    server.restart().unwrap();
    let store = open().await.unwrap();
    // Partition 1's first write on the new incarnation begins an epoch after its own head;
    // the others are untouched until they are written.
    let two = append(&store, 1).await;
    assert!(epoch_of(two) > epoch_of(one[1]));
    assert_eq!(two, first_of_epoch(epoch_of(two)));
    let history = |p: u32| {
        let store = store.clone();
        async move {
            store
                .partition_epochs(p)
                .await
                .unwrap()
                .iter()
                .map(|e| (e.epoch, e.previous_head))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        history(1).await,
        [(epoch_of(one[1]), 0), (epoch_of(two), one[1] + 1)]
    );
    assert_eq!(history(0).await, [(epoch_of(one[0]), 0)]);
    assert_eq!(history(2).await, [(epoch_of(one[2]), 0)]);
    assert_eq!(store.partition_head(0).await.unwrap(), one[0] + 1);
    // Then partition 0's first write begins its own epoch; partition 1 stays in its epoch.
    let two0 = append(&store, 0).await;
    assert!(epoch_of(two0) > epoch_of(one[0]));
    assert_eq!(two0, first_of_epoch(epoch_of(two0)));
    assert_eq!(append(&store, 1).await, two + 1);
    assert_eq!(history(0).await.len(), 2);
    assert_eq!(history(1).await.len(), 2);
    assert_eq!(history(2).await.len(), 1);
    // Each partition's subscriber reads on across its epoch: nothing was lost.
    let positions = |events: Vec<es_core::RecordedEvent>| -> Vec<u64> {
        events.iter().map(|e| e.global_position).collect()
    };
    assert_eq!(
        positions(subscribed(&store, 0, one[0]).await),
        [one[0] + 1, two0]
    );
    assert_eq!(
        positions(subscribed(&store, 1, one[1]).await),
        [one[1] + 1, two, two + 1]
    );
    assert_eq!(positions(subscribed(&store, 2, one[2]).await), [one[2] + 1]);
}

/// What a subscription to `partition` from `after` delivers up to the partition's head.
async fn subscribed(store: &RedisStore, partition: u32, after: u64) -> Vec<es_core::RecordedEvent> {
    use futures::StreamExt;
    let head = store.partition_head(partition).await.unwrap();
    let mut subscription = store.subscribe_partition(partition, after, es_core::EventFilter::all());
    let mut events: Vec<es_core::RecordedEvent> = Vec::new();
    while events.last().map_or(after, |e| e.global_position) < head {
        let next = tokio::time::timeout(Duration::from_secs(10), subscription.next())
            .await
            .expect("the subscription delivers up to the head")
            .expect("the subscription goes on");
        events.push(next.unwrap());
    }
    events
}
