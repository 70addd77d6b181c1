//! Appends on a 3-primary Redis Cluster against the same client on one primary, with the server
//! CPU each node spends per event.
//!
//! Both stores have [`PARTITIONS`] feed partitions and the same client settings; the cluster's
//! partitions fall on its three primaries (one hash slot each), the single primary holds them
//! all. Each round, every node's `used_cpu_user + used_cpu_sys` (`INFO cpu`) is read before and
//! after, so the row shows what one event costs each node: the figure the scaling model in
//! docs/13-scaling-out.md is built from. On this 2-core machine the cluster's six server
//! processes and the client share the two cores, so the throughput ratio says little about a
//! real cluster; the CPU per event per node does.

use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use es_core::{AppendRequest, EventStore, ExpectedVersion, NewEvent, Partitioning, StreamId};
use es_redis::RedisStore;

use crate::load::{round, rounds, timed};
use crate::report::{rate, Report, Row, Samples};

/// Feed partitions of both stores: one per primary of the cluster.
const PARTITIONS: u32 = 3;
/// Appending tasks.
const TASKS: usize = 16;

const GROUP: &str = "es-redis";

static RUN: AtomicU64 = AtomicU64::new(0);

/// A node's total CPU seconds so far (`used_cpu_user + used_cpu_sys`).
async fn cpu_seconds(url: &str) -> anyhow::Result<f64> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO").arg("cpu").query_async(&mut conn).await?;
    let field = |name: &str| -> f64 {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    Ok(field("used_cpu_user") + field("used_cpu_sys"))
}

/// The nodes of the cluster that are primaries now.
async fn primaries(urls: &[String]) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for url in urls {
        let client = redis::Client::open(url.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let role: redis::Value = redis::cmd("ROLE").query_async(&mut conn).await?;
        if let redis::Value::Array(items) = role {
            if matches!(items.first(), Some(redis::Value::BulkString(b)) if b == b"master") {
                out.push(url.clone());
            }
        }
    }
    Ok(out)
}

/// One timed round of 1-event appends to distinct streams; returns events/s and the CPU seconds
/// each of `nodes` spent during it.
async fn round_on(store: &RedisStore, nodes: &[String]) -> anyhow::Result<(f64, u64, Vec<f64>)> {
    let run = RUN.fetch_add(1, Ordering::Relaxed);
    let mut before = Vec::new();
    for node in nodes {
        before.push(cpu_seconds(node).await?);
    }
    let store = store.clone();
    let (count, elapsed) = timed(TASKS, move |t, i| {
        let store = store.clone();
        async move {
            let stream = StreamId::new("order", &format!("c{run}x{t}"))?;
            let event = NewEvent::new("OrderPlaced", 1, r#"{"total_cents":12999}"#)?;
            store
                .append(AppendRequest::new(
                    stream,
                    ExpectedVersion::Exact(i),
                    vec![event],
                ))
                .await?;
            Ok(())
        }
    })
    .await?;
    let mut spent = Vec::new();
    for (node, before) in nodes.iter().zip(before) {
        spent.push(cpu_seconds(node).await? - before);
    }
    Ok((rate(count, elapsed), count, spent))
}

fn micros_per_event(spent: &[f64], events: u64) -> Vec<f64> {
    spent
        .iter()
        .map(|s| s * 1e6 / events.max(1) as f64)
        .collect()
}

fn show(values: &[f64]) -> String {
    values
        .iter()
        .map(|v| format!("{v:.1}"))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// `redis:cluster`: the same 16-task 1-event appends on the cluster and on one primary.
pub(crate) async fn run(report: &mut Report) -> anyhow::Result<()> {
    let single_url = std::env::var("REDIS_URL").context("REDIS_URL is not set")?;
    let urls: Vec<String> = std::env::var("REDIS_CLUSTER_URLS")
        .context("REDIS_CLUSTER_URLS is not set: run `cargo xtask bench`")?
        .split(',')
        .map(str::to_owned)
        .collect();
    let prefix = format!("benchc:{}", uuid::Uuid::now_v7().simple());
    let partitioning = Partitioning::new(PARTITIONS)?;
    let cluster = RedisStore::cluster_builder(urls.clone())
        .prefix(&prefix)
        .partitioning(partitioning)
        .build()
        .await
        .context("cannot connect to the cluster")?;
    let single = RedisStore::builder(single_url.as_str())
        .prefix(&prefix)
        .partitioning(partitioning)
        .build()
        .await
        .context("cannot connect to the single primary")?;
    let nodes = primaries(&urls).await?;
    anyhow::ensure!(
        nodes.len() == 3,
        "the cluster has {} primaries",
        nodes.len()
    );
    let one = [single_url.clone()];
    round_on(&cluster, &nodes).await?;
    round_on(&single, &one).await?;
    let mut samples = Samples::default();
    let (mut cluster_cpu, mut single_cpu) = (vec![0.0; nodes.len()], vec![0.0]);
    let (mut cluster_events, mut single_events) = (0, 0);
    for i in 0..rounds() {
        let ((ours, n_ours, c_ours), (base, n_base, c_base)) = if i % 2 == 0 {
            let base = round_on(&single, &one).await?;
            (round_on(&cluster, &nodes).await?, base)
        } else {
            let ours = round_on(&cluster, &nodes).await?;
            (ours, round_on(&single, &one).await?)
        };
        samples.push(ours, base);
        cluster_events += n_ours;
        single_events += n_base;
        cluster_cpu
            .iter_mut()
            .zip(&c_ours)
            .for_each(|(a, b)| *a += b);
        single_cpu[0] += c_base[0];
    }
    let per_node = micros_per_event(&cluster_cpu, cluster_events);
    let single_per_event = micros_per_event(&single_cpu, single_events)[0];
    report.push(Row::paired(
        GROUP,
        format!(
            "{TASKS} tasks, 1-event appends, {PARTITIONS} partitions on a 3-primary cluster vs \
             the same client on one primary"
        ),
        &samples,
        "events/s",
        None,
        format!(
            "server CPU per event: cluster primaries {} µs (sum {:.1}), single primary {:.1} µs; \
             client and six servers share 2 cores; {:.1}s rounds, {}",
            show(&per_node),
            per_node.iter().sum::<f64>(),
            single_per_event,
            round().as_secs_f64(),
            samples.describe()
        ),
    ));
    for url in urls.iter().chain(&one) {
        delete_prefixed(url, &prefix).await;
    }
    Ok(())
}

/// Deletes the keys under `prefix` held by the node at `url` (best effort).
async fn delete_prefixed(url: &str, prefix: &str) {
    let Ok(client) = redis::Client::open(url) else {
        return;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let mut cursor = 0u64;
    loop {
        let Ok((next, keys)): redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
        else {
            return;
        };
        for key in keys {
            let _: redis::RedisResult<()> =
                redis::cmd("UNLINK").arg(&key).query_async(&mut conn).await;
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}
