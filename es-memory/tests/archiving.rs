//! Archiving on the in-memory store: the conformance cases on one feed and on four partitions.

es_testkit::archiving_conformance_tests!(|| async { es_memory::InMemoryStore::new() });

/// Four partitions by stream id.
mod partitioned {
    es_testkit::archiving_conformance_tests!(|| async {
        es_memory::InMemoryStore::builder()
            .partitioning(es_core::Partitioning::new(4).expect("4 partitions"))
            .build()
    });
}
