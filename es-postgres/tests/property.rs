//! Random operation sequences on es-postgres and on the in-memory oracle: every read compared.

mod common;

use proptest::prelude::*;

proptest! {
    // Each case migrates a fresh schema; 48 cases keep the suite under a minute.
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn matches_the_in_memory_store(ops in es_memory::oracle::ops()) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let store = common::fresh_store().await;
            es_memory::oracle::check_against_memory(store, &ops).await;
        });
    }
}
