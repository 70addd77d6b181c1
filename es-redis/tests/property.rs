//! Random operation sequences run on Redis and on the in-memory oracle (`es_memory::oracle`);
//! every result must match. Each case runs on a fresh key prefix of the shared server
//! (`REDIS_URL`). `PROPTEST_CASES` sets the number of cases (default 256).

mod common;

use proptest::prelude::*;

proptest! {
    #[test]
    fn redis_matches_the_in_memory_oracle(ops in es_memory::oracle::ops()) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let store = common::store("prop").await;
            es_memory::oracle::check_against_memory(store, &ops).await;
        });
    }
}
