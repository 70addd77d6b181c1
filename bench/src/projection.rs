//! Projection catch-up against the raw read-all rate of the same store.

use std::hint::black_box;
use std::time::{Duration, Instant};

use es_core::group::GroupConfig;
use es_core::projection::{partition_checkpoint, HandlerError};
use es_core::{
    AtLeastOnce, CheckpointStore, EventStore, LeaseStore, Projection, ProjectionRunner,
    ProjectionStatus, ReadAll, RecordedEvent,
};
use futures::StreamExt;

use crate::config::pick;
use crate::report::{Report, Row, Samples};

/// Counts events and payload bytes: the cheapest possible read model, so the figure shows the
/// runner's own cost. With `go`, it handles nothing until `go` turns true.
struct Counter {
    name: String,
    events: u64,
    bytes: u64,
    go: Option<tokio::sync::watch::Receiver<bool>>,
}

impl Projection for Counter {
    fn name(&self) -> &str {
        &self.name
    }

    async fn handle(&mut self, event: &RecordedEvent) -> Result<(), HandlerError> {
        if let Some(mut go) = self.go.take() {
            // Held back once, until the group has formed; no check per event after that.
            go.wait_for(|go| *go).await?;
        }
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
        go: None,
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

/// Feed partitions of the store the consumer-group catch-up goes over.
pub(crate) const GROUP_PARTITIONS: u32 = 4;

/// The lease of the benchmark's consumer groups: short, so that forming a group (a round or two,
/// a quarter of the lease each) weighs little against the catch-up.
const GROUP_LEASE: Duration = Duration::from_millis(400);

/// Fills `store` (with [`GROUP_PARTITIONS`] partitions) with `count` of the domain's benchmark
/// events over 100 streams, in appends of 100.
pub(crate) async fn fill_partitioned<S: EventStore>(store: &S, count: u64) -> anyhow::Result<()> {
    let streams = 100u64;
    let per_stream = count / streams;
    let mut versions = vec![0u64; streams as usize];
    for round in 0..per_stream.div_ceil(100) {
        for (s, version) in versions.iter_mut().enumerate() {
            let n = (per_stream - round * 100).min(100);
            let batch: Vec<es_core::NewEvent> = (0..n)
                .map(|i| {
                    let (t, v, payload) = crate::domain::stored_event(*version + i);
                    es_core::NewEvent::from_value(t, v, &payload)
                })
                .collect();
            store
                .append(es_core::AppendRequest::new(
                    es_core::StreamId::new("order", &format!("group{s}"))?,
                    es_core::ExpectedVersion::Exact(*version),
                    batch,
                ))
                .await?;
            *version += n;
        }
    }
    Ok(())
}

/// `workers` readers at once, each reading its share of the partitions (round-robin, as a group
/// divides them) with `read_all` from position 0.
async fn read_partitions<S: EventStore>(
    store: &S,
    workers: u32,
    count: u64,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let readers = (0..workers).map(|w| async move {
        let mut n = 0u64;
        for partition in (0..store.partitioning().partitions().end).filter(|p| p % workers == w) {
            let mut events = store.read_all(ReadAll::after(0).partition(partition));
            while let Some(event) = events.next().await {
                black_box(event?);
                n += 1;
            }
        }
        anyhow::Ok(n)
    });
    let n: u64 = futures::future::try_join_all(readers).await?.iter().sum();
    let elapsed = start.elapsed();
    anyhow::ensure!(n == count, "the readers returned {n} of {count} events");
    Ok(elapsed)
}

/// A fresh projection (new name) run by a consumer group of `workers` workers: once the group
/// has divided the partitions (its handlers held back until then), the time until every
/// partition's checkpoint covers the partition's head.
async fn project_group<S: EventStore + CheckpointStore + LeaseStore>(
    store: &S,
    workers: u32,
    heads: &[u64],
) -> anyhow::Result<Duration> {
    let name = format!("bench-group-{}", uuid::Uuid::now_v7().simple());
    let (go, held) = tokio::sync::watch::channel(false);
    let group: Vec<_> = (0..workers)
        .map(|w| {
            let (name, store, held) = (name.clone(), store.clone(), held.clone());
            ProjectionRunner::new(store.clone()).spawn_group(
                GroupConfig::new(format!("w{w}")).lease_ttl(GROUP_LEASE),
                move || {
                    let counter = Counter {
                        name: name.clone(),
                        events: 0,
                        bytes: 0,
                        go: Some(held.clone()),
                    };
                    AtLeastOnce::new(counter, store.clone())
                },
            )
        })
        .collect();
    let share = GROUP_PARTITIONS as usize / workers.min(GROUP_PARTITIONS) as usize;
    let formed = Instant::now() + Duration::from_secs(60);
    while !group.iter().all(|w| w.owned().len() == share) {
        anyhow::ensure!(
            Instant::now() < formed,
            "the group did not divide the partitions"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let start = Instant::now();
    go.send_replace(true);
    for (partition, head) in (0u32..).zip(heads) {
        let checkpoint = partition_checkpoint(&name, partition);
        let deadline = Instant::now() + Duration::from_secs(600);
        while store.load_checkpoint(&checkpoint).await?.position < *head {
            anyhow::ensure!(Instant::now() < deadline, "the group did not catch up");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let elapsed = start.elapsed();
    for worker in group {
        worker.shutdown().await;
    }
    Ok(elapsed)
}

/// Measures a projection's consumer group of 1, 2 and 4 workers (in this process, each on its
/// own clone of the store) catching up over the `count` events of `store` (which has
/// [`GROUP_PARTITIONS`] partitions and nothing else), against as many concurrent readers reading
/// the same partitions with `read_all`.
pub(crate) async fn group_catch_up<S: EventStore + CheckpointStore + LeaseStore>(
    report: &mut Report,
    group: &'static str,
    store: &S,
    count: u64,
) -> anyhow::Result<()> {
    let mut heads = Vec::new();
    for partition in store.partitioning().partitions() {
        heads.push(store.partition_head(partition).await?);
    }
    for workers in [1, 2, 4] {
        let pairs = pick(5, 1);
        read_partitions(store, workers, count).await?;
        let mut samples = Samples::default();
        for i in 0..pairs {
            let (ours, raw) = if i % 2 == 0 {
                let raw = read_partitions(store, workers, count).await?;
                (project_group(store, workers, &heads).await?, raw)
            } else {
                let ours = project_group(store, workers, &heads).await?;
                (ours, read_partitions(store, workers, count).await?)
            };
            samples.push_times(count, ours, raw);
        }
        report.push(Row::paired(
            group,
            format!(
                "projection catch-up over {}k events, {GROUP_PARTITIONS} partitions, consumer \
                 group of {workers} worker(s)",
                count / 1000
            ),
            &samples,
            "events/s",
            None,
            format!(
                "workers in one process, each on its share of the partitions, timed once the \
                 group has formed; raw = {workers} concurrent read_all readers over the same \
                 partitions; {}",
                samples.describe()
            ),
        ));
    }
    Ok(())
}
