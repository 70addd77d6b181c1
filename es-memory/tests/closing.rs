//! Closing streams on the in-memory store: the conformance cases on one feed and on four
//! partitions by stream id.

es_testkit::closing_conformance_tests!(|| async { es_memory::InMemoryStore::new() });

/// Four partitions by stream id: the streams of a multi-stream append are picked in one
/// partition, the others spread over all four.
mod partitioned {
    es_testkit::closing_conformance_tests!(|| async {
        es_memory::InMemoryStore::builder()
            .partitioning(es_core::Partitioning::new(4).expect("4 partitions"))
            .build()
    });
}
