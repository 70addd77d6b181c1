//! Random operation sequences run on Redis and on the in-memory oracle (`es_testkit::oracle`);
//! every result must match. Each case runs on a fresh key prefix of the shared server
//! (`REDIS_URL`). `PROPTEST_CASES` sets the number of cases (default 256).

mod common;

es_testkit::property_tests!(redis_matches_the_in_memory_oracle, || async {
    common::store("prop").await
});
