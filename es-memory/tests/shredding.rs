//! The crypto-shredding suite on the in-memory store and key store.

es_testkit::shredding_conformance_tests!(|| async {
    (
        es_memory::InMemoryStore::new(),
        es_memory::InMemoryKeyStore::new(),
    )
});
