//! The backend conformance suite on the in-memory store.

es_testkit::conformance_tests!(|| async { es_memory::InMemoryStore::new() });

mod streaming {
    es_testkit::streaming_conformance_tests!(|| async { es_memory::InMemoryStore::new() });
}
