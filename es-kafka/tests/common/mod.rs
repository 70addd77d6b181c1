//! What the end-to-end tests share: the broker settings and stores on fresh schemas or key
//! prefixes of the shared servers.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use es_kafka::KafkaConfig;
use es_postgres::PgStore;
use es_redis::RedisStore;
use es_testkit::support::unique_name;
use sqlx::postgres::PgPoolOptions;

/// The shared broker (`KAFKA_BROKERS`).
pub fn config() -> KafkaConfig {
    KafkaConfig::new(es_test_support::kafka_brokers())
}

/// A PostgreSQL schema name no other test uses.
pub fn unique_schema(prefix: &str) -> String {
    unique_name(&format!("t_{prefix}"), '_')
}

/// A Redis key prefix no other test uses.
pub fn unique_prefix(prefix: &str) -> String {
    unique_name(&format!("t:{prefix}"), ':')
}

/// A store on a fresh schema of the shared PostgreSQL server (`DATABASE_URL`).
pub async fn fresh_pg_store() -> PgStore {
    pg_store_on(&es_test_support::database_url(), &unique_schema("kafka")).await
}

/// A store on `schema` of the PostgreSQL server at `url`.
pub async fn pg_store_on(url: &str, schema: &str) -> PgStore {
    let pool = PgPoolOptions::new()
        .max_connections(24)
        .acquire_timeout(Duration::from_secs(5))
        .test_before_acquire(false)
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    PgStore::builder(pool)
        .schema(schema)
        .poll_interval(Duration::from_millis(200))
        .build()
        .await
        .unwrap_or_else(|e| panic!("cannot build the store on schema {schema}: {e}"))
}

/// A store on the shared Redis server (`REDIS_URL`) under a fresh key prefix.
pub async fn fresh_redis_store() -> RedisStore {
    let url = es_test_support::redis_url();
    RedisStore::builder(url.as_str())
        .prefix(unique_prefix("kafka"))
        .build()
        .await
        .unwrap_or_else(|e| panic!("cannot connect to Redis at {url}: {e}"))
}
