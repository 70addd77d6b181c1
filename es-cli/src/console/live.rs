//! Projection lag and outbox backlog: read now for the pages, and sampled every interval into
//! a short history (the live charts, `/api/live`) and into gauges (`/metrics`).
//!
//! One reading costs one `partition_head` per feed partition, one `load_checkpoint` per
//! projection (per partition on a partitioned store) and one `relay_status` per outbox.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use anyhow::Result;
use axum::extract::State;
use axum::Json;
use es_core::contract::position::distance;
use es_core::projection::partition_checkpoint;
use es_core::{RelayStatus, StreamingStore};
use serde::Serialize;
use serde_json::{json, Value};

use super::{App, Console};
use crate::connect::with_store;

/// The most samples kept (at the default interval of 5 s: the last 10 minutes).
const KEPT: usize = 120;

/// One projection checkpoint against the head of its partition.
pub(crate) struct LagRow {
    pub(crate) projection: String,
    /// The feed partition, on a store with several (the consumer-group checkpoint of that
    /// partition); `None` on a single-feed store.
    pub(crate) partition: Option<u32>,
    pub(crate) position: u64,
    pub(crate) generation: u64,
    pub(crate) head: u64,
    pub(crate) lag: u64,
}

impl LagRow {
    /// The series name in the charts and the `projection` label's partition.
    pub(crate) fn key(&self) -> String {
        match self.partition {
            Some(p) => format!("{}/p{p}", self.projection),
            None => self.projection.clone(),
        }
    }
}

/// What one reading found.
pub(crate) struct Reading {
    pub(crate) lags: Vec<LagRow>,
    /// Each outbox's status, by index.
    pub(crate) outboxes: Vec<RelayStatus>,
}

/// One point of the charts.
#[derive(Clone, Serialize)]
pub(crate) struct Sample {
    at: String,
    lag: BTreeMap<String, u64>,
    backlog: BTreeMap<String, u64>,
}

/// The sampled history.
#[derive(Default)]
pub(crate) struct Samples {
    kept: Mutex<VecDeque<Sample>>,
    interval_ms: Mutex<u64>,
}

/// Reads every projection's lag and every outbox's status now.
pub(crate) async fn read_now(app: &Console) -> Result<Reading> {
    with_store!(&app.store, s => read_store(s, &app.projections).await)
}

async fn read_store<S: StreamingStore>(store: &S, projections: &[String]) -> Result<Reading> {
    let partitioning = store.partitioning();
    let mut heads = Vec::new();
    for partition in partitioning.partitions() {
        heads.push((partition, store.partition_head(partition).await?));
    }
    let mut lags = Vec::new();
    for name in projections {
        for &(partition, head) in &heads {
            let (key, partition) = if partitioning.is_single() {
                (name.clone(), None)
            } else {
                (partition_checkpoint(name, partition), Some(partition))
            };
            let checkpoint = store.load_checkpoint(&key).await?;
            lags.push(LagRow {
                projection: name.clone(),
                partition,
                position: checkpoint.position,
                generation: checkpoint.generation,
                head,
                lag: distance(checkpoint.position, head),
            });
        }
    }
    let mut outboxes = Vec::new();
    for index in 0..store.outbox_partitions() {
        outboxes.push(store.outbox_partition(index)?.relay_status().await?);
    }
    Ok(Reading { lags, outboxes })
}

/// Takes a reading every `every` until the task is aborted: keeps the last [`KEPT`] as the
/// charts' history and sets the gauges `es_console_projection_lag{projection,partition}`,
/// `es_console_outbox_pending{outbox}` and `es_console_outbox_dead_letters{outbox}`. A failed
/// reading counts in `es_console_sample_errors_total` and leaves a gap.
pub(crate) async fn sample_forever(app: App, every: Duration) {
    *app.live
        .interval_ms
        .lock()
        .unwrap_or_else(PoisonError::into_inner) =
        u64::try_from(every.as_millis()).unwrap_or(u64::MAX);
    loop {
        match read_now(&app).await {
            Ok(reading) => {
                let mut lag = BTreeMap::new();
                for row in &reading.lags {
                    let partition = row
                        .partition
                        .map_or_else(|| "-".to_owned(), |p| p.to_string());
                    #[allow(clippy::cast_precision_loss)] // a gauge is an f64
                    metrics::gauge!(
                        "es_console_projection_lag",
                        "projection" => row.projection.clone(),
                        "partition" => partition
                    )
                    .set(row.lag as f64);
                    lag.insert(row.key(), row.lag);
                }
                let mut backlog = BTreeMap::new();
                for (index, status) in reading.outboxes.iter().enumerate() {
                    #[allow(clippy::cast_precision_loss)] // a gauge is an f64
                    {
                        metrics::gauge!("es_console_outbox_pending", "outbox" => index.to_string())
                            .set(status.pending as f64);
                        metrics::gauge!("es_console_outbox_dead_letters", "outbox" => index.to_string())
                            .set(status.dead_letters as f64);
                    }
                    backlog.insert(format!("outbox {index} pending"), status.pending);
                    backlog.insert(format!("outbox {index} dead"), status.dead_letters);
                }
                let mut kept = app.live.kept.lock().unwrap_or_else(PoisonError::into_inner);
                if kept.len() == KEPT {
                    kept.pop_front();
                }
                kept.push_back(Sample {
                    at: chrono::Utc::now().to_rfc3339(),
                    lag,
                    backlog,
                });
            }
            Err(_) => metrics::counter!("es_console_sample_errors_total").increment(1),
        }
        app.metrics.run_upkeep();
        tokio::time::sleep(every).await;
    }
}

/// `/api/live`: the sampled history, oldest first: `{"interval_ms", "samples": [{"at", "lag":
/// {series: lag}, "backlog": {series: records}}]}`.
pub(crate) async fn live_json(State(app): State<App>) -> Json<Value> {
    let samples: Vec<Sample> = app
        .live
        .kept
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .cloned()
        .collect();
    let interval = *app
        .live
        .interval_ms
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    Json(json!({ "interval_ms": interval, "samples": samples }))
}
