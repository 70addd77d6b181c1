//! The oracle checker itself, run against a second in-memory store: identical stores must agree
//! on every generated sequence (this keeps the checker honest for the database backends).

es_testkit::property_tests!(
    in_memory_matches_itself,
    || async { es_memory::InMemoryStore::new() },
    cases = 64
);
