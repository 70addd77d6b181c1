//! The backend conformance suite on the in-memory store.

es_core::conformance_tests!(|| async { es_memory::InMemoryStore::new() });

mod streaming {
    es_core::streaming_conformance_tests!(|| async { es_memory::InMemoryStore::new() });
}
