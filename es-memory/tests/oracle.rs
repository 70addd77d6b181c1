//! The oracle checker itself, run against a second in-memory store: identical stores must agree
//! on every generated sequence (this keeps the checker honest for the database backends).

use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn in_memory_matches_itself(ops in es_memory::oracle::ops()) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(es_memory::oracle::check_against_memory(es_memory::InMemoryStore::new(), &ops));
    }
}
