//! Random operation sequences on es-postgres and on the in-memory oracle: every read compared.

mod common;

// Each case migrates a fresh schema; 48 cases keep the suite under a minute.
es_testkit::property_tests!(matches_the_in_memory_store, common::fresh_store, cases = 48);
