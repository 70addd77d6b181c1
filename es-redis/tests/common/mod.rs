//! Shared helpers for the es-redis integration tests.
#![allow(dead_code, unreachable_pub)]

use es_redis::RedisStore;

/// A key prefix no other test (in this or a concurrent run) uses.
pub fn unique_prefix(name: &str) -> String {
    es_testkit::support::unique_name(&format!("t:{name}"), ':')
}

/// A store on the shared server (`REDIS_URL`) under a fresh prefix.
pub async fn store(name: &str) -> RedisStore {
    store_at(&es_test_support::redis_url(), name).await
}

/// A store on `url` under a fresh prefix.
pub async fn store_at(url: &str, name: &str) -> RedisStore {
    RedisStore::builder(url)
        .prefix(unique_prefix(name))
        .build()
        .await
        .unwrap_or_else(|e| panic!("cannot connect to Redis at {url}: {e}"))
}
