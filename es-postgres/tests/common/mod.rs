//! Shared helpers for the es-postgres integration tests: a fresh schema per store.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use es_postgres::PgStore;
use sqlx::postgres::{PgPool, PgPoolOptions};

/// A schema name no other test (in this or a concurrent run) uses.
pub fn unique_schema(prefix: &str) -> String {
    es_testkit::support::unique_name(&format!("t_{prefix}"), '_')
}

/// A pool on `url` sized for the concurrency tests.
pub async fn pool(url: &str, max: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(5))
        .test_before_acquire(false)
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"))
}

/// A store on a fresh schema of the shared server (`DATABASE_URL`).
pub async fn fresh_store() -> PgStore {
    let url = es_test_support::database_url();
    store_on(&url, &unique_schema("s")).await
}

/// A store on `schema` of the server at `url`.
pub async fn store_on(url: &str, schema: &str) -> PgStore {
    PgStore::builder(pool(url, 24).await)
        .schema(schema)
        .poll_interval(Duration::from_millis(200))
        .build()
        .await
        .unwrap_or_else(|e| panic!("cannot build the store on schema {schema}: {e}"))
}
