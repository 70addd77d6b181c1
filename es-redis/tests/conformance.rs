//! The es-core conformance suites on Redis (`REDIS_URL`), each case under its own key prefix.

mod common;

es_testkit::conformance_tests!(|| async { common::store("conf").await });

/// The streaming-out suite: the outbox written by the append script, the relay lease,
/// checkpoints and the projection runner.
mod streaming {
    use super::common;

    es_testkit::streaming_conformance_tests!(|| async { common::store("stream").await });
}
