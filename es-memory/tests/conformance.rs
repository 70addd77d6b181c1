//! The backend conformance suite on the in-memory store.

es_testkit::conformance_tests!(|| async { es_memory::InMemoryStore::new() });

mod streaming {
    es_testkit::streaming_conformance_tests!(|| async { es_memory::InMemoryStore::new() });
}

/// The same suites on a store with four feed partitions.
mod partitioned {
    fn store() -> es_memory::InMemoryStore {
        let partitioning = es_core::Partitioning::new(4).expect("4 partitions");
        es_memory::InMemoryStore::builder()
            .partitioning(partitioning)
            .build()
    }

    es_testkit::conformance_tests!(|| async { store() });

    /// Leases and consumer groups: projections and relays on every partition.
    mod groups {
        es_testkit::group_conformance_tests!(|| async { super::store() });
    }
}

/// The same suites on a store whose partitions follow the stream category.
mod partitioned_by_category {
    fn store() -> es_memory::InMemoryStore {
        let partitioning = es_core::Partitioning::new(3)
            .expect("3 partitions")
            .by(es_core::PartitionKey::Category);
        es_memory::InMemoryStore::builder()
            .partitioning(partitioning)
            .build()
    }

    es_testkit::conformance_tests!(|| async { store() });
}
