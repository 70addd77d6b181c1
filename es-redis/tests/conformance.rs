//! The es-core conformance suite on Redis (`REDIS_URL`), each case under its own key prefix.

mod common;

es_core::conformance_tests!(|| async { common::store("conf").await });
