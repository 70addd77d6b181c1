//! Connecting the processes to the store under test, riding out a server that is down.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use es_core::{Partitioning, StreamId};
use es_postgres::{PgStore, PgStoreBuilder};
use es_redis::RedisStore;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

/// The PostgreSQL schema and Redis key prefix every process of a run uses.
pub(crate) const NAMESPACE: &str = "chaos";

/// The event type of the orchestrator's end marker; subscribers stop once they delivered it.
pub(crate) const END_TYPE: &str = "ChaosEnd";

/// The category of the streams whose subscriber filters by category; the end marker's stream
/// is in it.
pub(crate) const FILTERED_CATEGORY: &str = "acct";

/// The streams of the end markers, one per partition (partition 0 first): `acct-end` with one
/// partition; with several, per partition the first of `acct-end`, `acct-end1`, `acct-end2`, ...
/// that falls in it.
pub(crate) fn marker_streams(partitioning: Partitioning) -> Vec<StreamId> {
    let mut streams: Vec<Option<StreamId>> = vec![None; partitioning.count() as usize];
    let mut left = streams.len();
    for i in 0u64.. {
        let id = if i == 0 {
            "end".to_owned()
        } else {
            format!("end{i}")
        };
        let Ok(stream) = StreamId::new(FILTERED_CATEGORY, &id) else {
            continue;
        };
        let slot = &mut streams[partitioning.partition_of(&stream) as usize];
        if slot.is_none() {
            *slot = Some(stream);
            left -= 1;
            if left == 0 {
                break;
            }
        }
    }
    streams.into_iter().flatten().collect()
}

/// How long a consumer-group worker's leases last without renewal: a killed projection or relay
/// process loses its partitions to the other worker after this.
pub(crate) const GROUP_LEASE: Duration = Duration::from_secs(2);

/// The store's feed partitions, as given by `--partitions` (the same in every process of a run).
pub(crate) fn partitioning(count: u32) -> Result<Partitioning> {
    Partitioning::new(count).with_context(|| format!("--partitions {count}"))
}

/// How long a process keeps trying to reach a server that is down before it gives up.
pub(crate) const PATIENCE: Duration = Duration::from_secs(180);

/// The table of the exactly-once projection on PostgreSQL (in [`NAMESPACE`]).
pub(crate) const PG_MODEL: &str = "chaos_read_model";
/// Where the exactly-once projection records versions it did not expect.
pub(crate) const PG_GAPS: &str = "chaos_gaps";
/// The table of the writers' inline projection.
pub(crate) const PG_INLINE: &str = "chaos_inline";
/// The name of the projections (their checkpoint).
pub(crate) const PROJECTION: &str = "chaos_read_model";

/// The Redis hash of the at-least-once projection: stream → `"<count> <last version>"`.
pub(crate) fn redis_model_key() -> String {
    format!("{NAMESPACE}:chaos:model")
}

/// The Redis list where the at-least-once projection records versions it did not expect.
pub(crate) fn redis_gaps_key() -> String {
    format!("{NAMESPACE}:chaos:gaps")
}

/// Runs `future` on a runtime of two worker threads, then drops the runtime without waiting
/// for its blocking threads (one of them may be blocked reading stdin).
pub(crate) fn block_on<T>(future: impl Future<Output = Result<T>>) -> Result<T> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(future);
    rt.shutdown_background();
    result
}

/// Runs `attempt` until it succeeds or [`PATIENCE`] has passed, pausing between attempts.
pub(crate) async fn retry<T, F, Fut>(what: &str, mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let start = Instant::now();
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(e) if start.elapsed() < PATIENCE => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("{what}: gave up after {PATIENCE:?}")),
        }
    }
}

/// Connection options for a PostgreSQL client of the run.
///
/// `timeouts`: the session settings of [`PgStore::connect_options`] (a 60 s statement time-out,
/// keepalives), which override the server-wide time-outs the orchestrator injects. Writers
/// connect without them, so that those faults reach their sessions.
pub(crate) fn pg_options(url: &str, application: &str, timeouts: bool) -> Result<PgConnectOptions> {
    let options = if timeouts {
        PgStore::connect_options(url)?
    } else {
        let options: PgConnectOptions = url.parse()?;
        options.options([
            ("client_connection_check_interval", "1000"),
            ("tcp_keepalives_idle", "5"),
            ("tcp_keepalives_interval", "2"),
            ("tcp_keepalives_count", "3"),
        ])
    };
    Ok(options.application_name(application))
}

/// A pool that connects lazily (so it can be made while the server is down).
pub(crate) fn pg_pool(options: PgConnectOptions, max: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(3))
        .test_before_acquire(false)
        .connect_lazy_with(options)
}

/// Builds a store from `builder`, retrying while the server is unreachable.
pub(crate) async fn pg_store(builder: PgStoreBuilder) -> Result<PgStore> {
    retry("build the PostgreSQL store", || {
        let builder = builder.clone();
        async move { Ok(builder.build().await?) }
    })
    .await
}

/// A Redis store under [`NAMESPACE`] with `partitioning`, retrying while the server is
/// unreachable.
pub(crate) async fn redis_store(
    url: &str,
    response_timeout: Duration,
    partitioning: Partitioning,
) -> Result<RedisStore> {
    retry("build the Redis store", || async {
        Ok(RedisStore::builder(url)
            .prefix(NAMESPACE)
            .partitioning(partitioning)
            .response_timeout(response_timeout)
            .poll_interval(Duration::from_millis(500))
            .build()
            .await?)
    })
    .await
}
