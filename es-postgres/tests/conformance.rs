//! The backend conformance suites on es-postgres, each case on a fresh schema.

mod common;

es_testkit::conformance_tests!(common::fresh_store);

/// The streaming suite: outbox, relay lease, checkpoints and the projection runner.
mod streaming {
    use super::common;

    es_testkit::streaming_conformance_tests!(common::fresh_store);
}
