//! Connecting to the store the URL names.

use anyhow::{bail, Context, Result};
use es_core::contract::redact_url;
use es_core::{PartitionKey, Partitioning};
use es_postgres::PgStore;
use es_redis::RedisStore;

use crate::cli::{ConnArgs, KeyArg};

/// A store of either backend.
#[derive(Clone)]
pub(crate) enum AnyStore {
    Postgres(PgStore),
    Redis(RedisStore),
}

/// Runs `$body` with `$s` bound to the store inside `$store`, whatever its backend.
macro_rules! with_store {
    ($store:expr, $s:ident => $body:expr) => {
        match $store {
            $crate::connect::AnyStore::Postgres($s) => $body,
            $crate::connect::AnyStore::Redis($s) => $body,
        }
    };
}
pub(crate) use with_store;

/// Connects to the store `args` name.
pub(crate) async fn connect(args: &ConnArgs) -> Result<AnyStore> {
    let Some(url) = args.url.as_deref() else {
        bail!("no store given: pass --url (or set ES_URL) to a postgres:// or redis:// URL");
    };
    let shown = redact_url(url);
    let key = match args.partition_key {
        KeyArg::Stream => PartitionKey::Stream,
        KeyArg::Category => PartitionKey::Category,
    };
    let partitioning = Partitioning::new(args.partitions)
        .with_context(|| format!("--partitions {}", args.partitions))?
        .by(key);
    let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
    match scheme {
        "postgres" | "postgresql" => {
            let store = PgStore::builder_from_url(url)
                .schema(args.schema.as_str())
                .run_migrations(false)
                .partitioning(partitioning)
                .max_connections(4)
                .writers(1)
                .build()
                .await
                .with_context(|| {
                    format!(
                        "cannot open the store in schema `{}` at {shown}",
                        args.schema
                    )
                })?;
            Ok(AnyStore::Postgres(store))
        }
        "redis" | "rediss" | "redis+unix" | "unix" => {
            let builder = if url.contains(',') {
                cluster_builder(url)?
            } else {
                RedisStore::builder(url)
            };
            let store = builder
                .prefix(args.redis_prefix.as_str())
                .partitioning(partitioning)
                .build()
                .await
                .with_context(|| {
                    format!(
                        "cannot open the store with prefix `{}` at {shown}",
                        args.redis_prefix
                    )
                })?;
            Ok(AnyStore::Redis(store))
        }
        _ => bail!(
            "unsupported URL {shown}: expected postgres://, postgresql://, redis:// or rediss://"
        ),
    }
}

#[cfg(feature = "cluster")]
#[allow(clippy::unnecessary_wraps)] // fails without the feature
fn cluster_builder(urls: &str) -> Result<es_redis::RedisStoreBuilder> {
    Ok(RedisStore::cluster_builder(
        urls.split(',').map(str::trim).filter(|u| !u.is_empty()),
    ))
}

#[cfg(not(feature = "cluster"))]
fn cluster_builder(urls: &str) -> Result<es_redis::RedisStoreBuilder> {
    bail!(
        "{} names several nodes (a Redis Cluster): this `es` was built without the `cluster` feature",
        redact_url(urls)
    )
}
