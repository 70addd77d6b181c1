//! The backend conformance suite on es-postgres, each case on a fresh schema.

mod common;

es_core::conformance_tests!(common::fresh_store);
