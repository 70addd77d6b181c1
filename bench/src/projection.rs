//! Projection catch-up against the raw read-all rate of the same store.

use std::hint::black_box;
use std::time::Instant;

use es_core::projection::HandlerError;
use es_core::{
    AtLeastOnce, CheckpointStore, EventStore, Projection, ProjectionRunner, ProjectionStatus,
    ReadAll, RecordedEvent,
};
use futures::StreamExt;

use crate::report::{rate, Report, Row};

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

/// Measures a projection catching up over every event in `store` against reading them all with
/// `read_all` from position 0. The store must already hold `count` events and nothing else.
pub(crate) async fn catch_up<S: EventStore + CheckpointStore>(
    report: &mut Report,
    group: &'static str,
    store: &S,
    count: u64,
) -> anyhow::Result<()> {
    let head = store.head_position().await?;
    let (mut raw, mut ours) = (Vec::new(), Vec::new());
    for round in 0..3 {
        let start = Instant::now();
        let mut events = store.read_all(ReadAll::after(0));
        let mut n = 0u64;
        while let Some(event) = events.next().await {
            black_box(event?);
            n += 1;
        }
        raw.push(start.elapsed());
        anyhow::ensure!(n == count, "read_all returned {n} of {count} events");

        let name = format!("bench-catch-up-{round}-{}", uuid::Uuid::now_v7().simple());
        let projection = Counter {
            name,
            events: 0,
            bytes: 0,
        };
        let start = Instant::now();
        let handle =
            ProjectionRunner::new(store.clone()).spawn(AtLeastOnce::new(projection, store.clone()));
        let status = handle.wait_for(head).await;
        ours.push(start.elapsed());
        anyhow::ensure!(
            matches!(status, ProjectionStatus::Running { position } if position >= head),
            "the projection did not catch up: {status:?}"
        );
        handle.shutdown().await;
    }
    let best = |times: &[std::time::Duration]| times.iter().copied().min().unwrap_or_default();
    report.push(Row {
        group,
        workload: format!(
            "projection catch-up over {}k events (at least once, checkpoint per batch)",
            count / 1000
        ),
        ours: rate(count, best(&ours)),
        raw: Some(rate(count, best(&raw))),
        unit: "events/s",
        target: Some(0.7),
        note: "raw = read_all from position 0 on the same store".into(),
    });
    Ok(())
}
