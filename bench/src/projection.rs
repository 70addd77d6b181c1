//! Projection catch-up against the raw read-all rate of the same store.

use std::hint::black_box;
use std::time::{Duration, Instant};

use es_core::projection::HandlerError;
use es_core::{
    AtLeastOnce, CheckpointStore, EventStore, Projection, ProjectionRunner, ProjectionStatus,
    ReadAll, RecordedEvent,
};
use futures::StreamExt;

use crate::config::pick;
use crate::report::{Report, Row, Samples};

/// Counts events and payload bytes: the cheapest possible read model, so the figure shows the
/// runner's own cost.
struct Counter {
    name: String,
    events: u64,
    bytes: u64,
}

impl Projection for Counter {
    fn name(&self) -> &str {
        &self.name
    }

    async fn handle(&mut self, event: &RecordedEvent) -> Result<(), HandlerError> {
        self.events += 1;
        self.bytes += event.payload.len() as u64;
        Ok(())
    }

    async fn reset(&mut self) -> Result<(), HandlerError> {
        self.events = 0;
        self.bytes = 0;
        Ok(())
    }
}

/// Reads every event with `read_all` from position 0, consuming them one by one.
async fn read_all<S: EventStore>(store: &S, count: u64) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut events = store.read_all(ReadAll::after(0));
    let mut n = 0u64;
    let mut bytes = 0u64;
    while let Some(event) = events.next().await {
        let event = event?;
        bytes += event.payload.len() as u64;
        black_box(event);
        n += 1;
    }
    let elapsed = start.elapsed();
    black_box(bytes);
    anyhow::ensure!(n == count, "read_all returned {n} of {count} events");
    Ok(elapsed)
}

/// A fresh projection (new name, so no checkpoint) caught up to `head`.
async fn project<S: EventStore + CheckpointStore>(
    store: &S,
    head: u64,
) -> anyhow::Result<Duration> {
    let name = format!("bench-catch-up-{}", uuid::Uuid::now_v7().simple());
    let projection = Counter {
        name,
        events: 0,
        bytes: 0,
    };
    let start = Instant::now();
    let handle =
        ProjectionRunner::new(store.clone()).spawn(AtLeastOnce::new(projection, store.clone()));
    let status = handle.wait_for(head).await;
    let elapsed = start.elapsed();
    anyhow::ensure!(
        matches!(status, ProjectionStatus::Running { position } if position >= head),
        "the projection did not catch up: {status:?}"
    );
    handle.shutdown().await;
    Ok(elapsed)
}

/// Measures a projection catching up over every event in `store` against reading them all with
/// `read_all` from position 0. The store must already hold `count` events and nothing else.
pub(crate) async fn catch_up<S: EventStore + CheckpointStore>(
    report: &mut Report,
    group: &'static str,
    store: &S,
    count: u64,
) -> anyhow::Result<()> {
    let head = store.head_position().await?;
    let pairs = pick(5, 1);
    read_all(store, count).await?;
    project(store, head).await?;
    let mut samples = Samples::default();
    for i in 0..pairs {
        let (ours, raw) = if i % 2 == 0 {
            let raw = read_all(store, count).await?;
            (project(store, head).await?, raw)
        } else {
            let ours = project(store, head).await?;
            (ours, read_all(store, count).await?)
        };
        samples.push_times(count, ours, raw);
    }
    report.push(Row::paired(
        group,
        format!(
            "projection catch-up over {}k events (at least once, checkpoint per batch)",
            count / 1000
        ),
        &samples,
        "events/s",
        Some(0.7),
        format!(
            "raw = read_all from position 0 on the same store; {}",
            samples.describe()
        ),
    ));
    Ok(())
}
