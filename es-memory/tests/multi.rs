//! Multi-stream appends on the in-memory store: the conformance cases on one feed, on four
//! partitions by stream id (calls across partitions) and by category.

es_testkit::multi_conformance_tests!(|| async { es_memory::InMemoryStore::new() });

fn partitioned(partitioning: es_core::Partitioning) -> es_memory::InMemoryStore {
    es_memory::InMemoryStore::builder()
        .partitioning(partitioning)
        .build()
}

/// Four partitions by stream id: the accounts of a call are in different partitions.
mod partitioned {
    es_testkit::multi_conformance_tests!(|| async {
        super::partitioned(es_core::Partitioning::new(4).expect("4 partitions"))
    });

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn multi_append_across_partitions_never_skips() {
        es_testkit::multi::spanning::multi_append_across_partitions_never_skips(
            super::partitioned(es_core::Partitioning::new(4).expect("4 partitions")),
        )
        .await;
    }
}

/// Three partitions by category: every account in one partition.
mod partitioned_by_category {
    es_testkit::multi_conformance_tests!(|| async {
        super::partitioned(
            es_core::Partitioning::new(3)
                .expect("3 partitions")
                .by(es_core::PartitionKey::Category),
        )
    });
}

/// An inline projection that refuses one part fails the whole call: nothing of any part is
/// written, and the projection saw no part committed.
#[tokio::test]
async fn an_inline_projection_refusing_one_part_fails_the_call() {
    use es_core::{AppendRequest, EventStore, ExpectedVersion, NewEvent, StoreError, StreamId};
    let store = es_memory::InMemoryStore::builder()
        .inline_projection("refuse-b", |events| {
            if events.iter().any(|e| e.stream_id.id() == "b") {
                Err("b is refused".into())
            } else {
                Ok(())
            }
        })
        .build();
    let a = StreamId::new("account", "a").unwrap();
    let b = StreamId::new("account", "b").unwrap();
    let event = || NewEvent::new("Opened", 1, "{}").unwrap();
    let err = store
        .append_streams(vec![
            AppendRequest::new(a.clone(), ExpectedVersion::NoStream, vec![event()]),
            AppendRequest::new(b.clone(), ExpectedVersion::NoStream, vec![event()]),
        ])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::InlineProjection { stream_id, .. } if *stream_id == b),
        "{err:?}"
    );
    assert!(store.is_empty(), "nothing of the call was written");
    assert_eq!(store.stream_version(&a).await.unwrap(), 0);
}
