//! Closing streams on es-redis: the conformance cases on one feed and on four partitions by
//! stream id (the tagged layout: the streams of a multi-stream append are picked in one
//! partition, hence one hash slot). The closed check and the tombstone's closed key are in the
//! append function, in the stream's slot; under the documented ACL user and on Redis Cluster
//! the same cases run from `acl.rs` and `cluster.rs`.

mod common;

es_testkit::closing_conformance_tests!(|| async { common::store("close").await });

/// Four partitions by stream id.
mod partitioned {
    use super::common;

    es_testkit::closing_conformance_tests!(|| async {
        common::partitioned_store("pclose", 4).await
    });
}

/// The closed key lives in the stream's hash slot, holds the tombstone's version, and a value
/// written there behind the store's back that is not a version makes appends fail as corrupt,
/// never pass as open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_closed_key_holds_the_tombstone_version_in_the_stream_slot() {
    use es_core::{AppendRequest, EventStore, ExpectedVersion, NewEvent, StoreError, StreamId};
    use es_redis::redis::{self, AsyncCommands};

    let store = common::partitioned_store("ckey", 4).await;
    let s = StreamId::new("account", "closed-key").unwrap();
    store
        .append(AppendRequest::new(
            s.clone(),
            ExpectedVersion::NoStream,
            vec![
                NewEvent::new("Opened", 1, "{}").unwrap(),
                NewEvent::closing(),
            ],
        ))
        .await
        .expect("open and close");
    let keys = store.keys();
    let closed = keys.closed(&s);
    let tag = |key: &str| {
        let start = key.find('{').expect("a hash tag");
        let end = start + key[start..].find('}').expect("a closed hash tag");
        es_redis::slot_of_tag(&key.as_bytes()[start + 1..end])
    };
    assert_eq!(tag(&closed), tag(&keys.events(&s)), "{closed}");
    let mut conn = redis::Client::open(es_test_support::redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let value: Option<String> = conn.get(&closed).await.unwrap();
    assert_eq!(value.as_deref(), Some("2"));

    let other = StreamId::new("account", "planted").unwrap();
    let _: () = conn
        .set(keys.closed(&other), "not a version")
        .await
        .unwrap();
    let err = store
        .append(AppendRequest::new(
            other.clone(),
            ExpectedVersion::Any,
            vec![NewEvent::new("Opened", 1, "{}").unwrap()],
        ))
        .await
        .expect_err("a planted closed key");
    match &err {
        StoreError::Corrupt { reason, .. } => assert!(reason.contains("closed key"), "{reason}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(
        store.stream_version(&other).await.unwrap(),
        0,
        "nothing written"
    );
}
