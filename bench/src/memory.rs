//! In-memory benchmarks: rehydration against plain `serde_json` decoding, derived apply dispatch
//! against a hand-written match, append throughput, commands (see [`crate::command`]), and
//! projection catch-up.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use es_core::{
    Aggregate, AppendRequest, EventStore, ExpectedVersion, NewEvent, ReadStream, RecordedEvent,
    Repository, StreamId,
};
use es_memory::InMemoryStore;
use futures::TryStreamExt;

use crate::command::{self, Baseline, Targets};
use crate::config::{pick, Args};
use crate::domain::{self, Order, OrderEvent};
use crate::load::timed;
use crate::report::{heap_size, rate, Report, Row, Samples};
use crate::PEAK;

const GROUP: &str = "es-memory";
const EVENTS: u64 = 100_000;

pub(crate) async fn run(report: &mut Report, args: &Args) -> anyhow::Result<()> {
    if args.wants("memory", "rehydrate") {
        rehydrate(report).await?;
    }
    if args.wants("memory", "dispatch") {
        dispatch(report);
    }
    if args.wants("memory", "append") {
        appends(report).await?;
    }
    if args.wants("memory", "command") {
        let store = InMemoryStore::new();
        command::run(report, GROUP, store, &NaiveRounds, Targets::default()).await?;
    }
    if args.wants("memory", "telemetry") {
        crate::telemetry::run(report, GROUP, InMemoryStore::new()).await?;
    }
    if args.wants("memory", "catch-up") {
        let count = pick(EVENTS, 20_000);
        let store = InMemoryStore::new();
        fill(&store, &StreamId::new("order", "feed")?, count).await?;
        crate::projection::catch_up(report, GROUP, &store, count).await?;
    }
    if args.wants("memory", "personal") {
        let keys = es_memory::InMemoryKeyStore::new();
        crate::personal::run(report, GROUP, InMemoryStore::new(), keys).await?;
    }
    if args.wants("memory", "group") {
        let count = pick(EVENTS, 20_000);
        let partitioning = es_core::Partitioning::new(crate::projection::GROUP_PARTITIONS)?;
        let store = InMemoryStore::builder().partitioning(partitioning).build();
        crate::projection::fill_partitioned(&store, count).await?;
        crate::projection::group_catch_up(report, GROUP, &store, count).await?;
    }
    Ok(())
}

/// Fills `stream` with `count` benchmark events in batches of 1000.
pub(crate) async fn fill<S: EventStore>(
    store: &S,
    stream: &StreamId,
    count: u64,
) -> anyhow::Result<()> {
    let mut i = 0;
    while i < count {
        let batch: Vec<NewEvent> = (i..(i + 1000).min(count))
            .map(|n| {
                let (t, v, payload) = domain::stored_event(n);
                NewEvent::from_value(t, v, &payload)
            })
            .collect();
        let n = batch.len() as u64;
        store
            .append(AppendRequest::new(
                stream.clone(),
                ExpectedVersion::Exact(i),
                batch,
            ))
            .await?;
        i += n;
    }
    Ok(())
}

/// Decodes every payload into the event enum with plain `serde_json` and applies it with a
/// hand-written match: the rehydration baseline.
#[inline(never)]
fn decode_all(payloads: &[(String, bytes::Bytes)]) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut order = Order::default();
    for (t, p) in payloads {
        let event = domain::decode_by_hand(t, p)?;
        domain::apply_by_hand(&mut order, &event);
    }
    let elapsed = start.elapsed();
    black_box(order);
    Ok(elapsed)
}

async fn rehydrate(report: &mut Report) -> anyhow::Result<()> {
    let count = pick(EVENTS, 20_000);
    let pairs = pick(9, 2);
    let store = InMemoryStore::new();
    let stream = StreamId::new("order", "bench")?;
    fill(&store, &stream, count).await?;
    let repo = Repository::builder(store.clone())
        .upcaster::<Order>(domain::item_added_v1())
        .build()?;
    let stored: Vec<RecordedEvent> = store
        .read_stream(&stream, ReadStream::forward())
        .try_collect()
        .await?;
    let payloads: Vec<(String, bytes::Bytes)> = stored
        .iter()
        .map(|e| (e.event_type.clone(), e.payload.clone()))
        .collect();
    drop(stored);

    let load = || async {
        let start = Instant::now();
        let loaded = repo.load::<Order>("bench").await?;
        let elapsed = start.elapsed();
        anyhow::ensure!(loaded.version == count, "loaded {}", loaded.version);
        black_box(loaded);
        anyhow::Ok(elapsed)
    };
    // Warm-up: caches, allocator arenas, CPU clock.
    decode_all(&payloads)?;
    load().await?;

    let mut samples = Samples::default();
    for i in 0..pairs {
        let (ours, raw) = if i % 2 == 0 {
            let raw = decode_all(&payloads)?;
            (load().await?, raw)
        } else {
            let ours = load().await?;
            (ours, decode_all(&payloads)?)
        };
        samples.push_times(count, ours, raw);
    }
    // Peak heap of one more load, measured on its own.
    let before = PEAK.current_usage();
    PEAK.reset_peak_usage();
    load().await?;
    let peak = PEAK.peak_usage().saturating_sub(before);

    report.push(Row::paired(
        GROUP,
        format!(
            "rehydrate {}k events (read + decode + upcast 1% + apply) vs plain serde_json decode \
             + apply",
            count / 1000
        ),
        &samples,
        "events/s",
        Some(0.8),
        format!(
            "raw decodes the same payloads into the same enum and applies them by hand; peak \
             heap during load {}; {}",
            heap_size(peak),
            samples.describe()
        ),
    ));
    Ok(())
}

fn dispatch(report: &mut Report) {
    let events: Vec<OrderEvent> = (0..EVENTS)
        .map(|i| {
            let (t, _, payload) = domain::stored_event(i);
            domain::decode_by_hand(t, payload.to_string().as_bytes()).expect("valid payload")
        })
        .collect();
    let passes = pick(10, 2);
    let pairs = pick(31, 4);
    let time = |hand: bool| {
        let start = Instant::now();
        let order = if hand {
            fold_by_hand(&events, passes)
        } else {
            fold_derived(&events, passes)
        };
        let elapsed = start.elapsed();
        black_box(order);
        elapsed
    };
    time(true);
    time(false);
    let mut samples = Samples::default();
    // Alternate which one runs first, so neither benefits from a warmer cache or CPU clock.
    for i in 0..pairs {
        let (derived, hand) = if i % 2 == 0 {
            let hand = time(true);
            (time(false), hand)
        } else {
            let derived = time(false);
            (derived, time(true))
        };
        samples.push_times(EVENTS * passes, derived, hand);
    }
    report.push(Row::paired(
        GROUP,
        "apply dispatch: derived `apply_to` vs hand-written match",
        &samples,
        "events/s",
        Some(1.0 / 1.05),
        format!(
            "target: derived costs <= 1.05x the hand-written match; {}",
            samples.describe()
        ),
    ));
}

#[inline(never)]
fn fold_by_hand(events: &[OrderEvent], passes: u64) -> Order {
    let mut order = Order::default();
    for _ in 0..passes {
        for e in black_box(events) {
            domain::apply_by_hand(&mut order, e);
        }
    }
    order
}

#[inline(never)]
fn fold_derived(events: &[OrderEvent], passes: u64) -> Order {
    let mut order = Order::default();
    for _ in 0..passes {
        for e in black_box(events) {
            order.evolve(e);
        }
    }
    order
}

/// A baseline with no checks at all: a mutex around a map of vectors.
#[derive(Default)]
struct Naive {
    streams: Mutex<HashMap<String, Vec<Arc<NewEvent>>>>,
}

impl Naive {
    /// Adds `events` to the end of `stream`.
    fn push(&self, stream: &str, events: Vec<Arc<NewEvent>>) {
        self.streams
            .lock()
            .expect("naive lock")
            .entry(stream.to_owned())
            .or_default()
            .extend(events);
    }
}

/// The command rows' raw side: timed rounds of pushes into a fresh [`Naive`], each task to a
/// stream of its own, the events carrying metadata as the commands' do.
struct NaiveRounds;

impl Baseline for NaiveRounds {
    fn describe(&self, batch: usize) -> String {
        format!(
            "pushes of {batch} event(s) into a mutex-guarded map of vectors with no version, id \
             or order checks"
        )
    }

    async fn round(&self, tasks: usize, batch: usize) -> anyhow::Result<f64> {
        let naive = Arc::new(Naive::default());
        let template = payload_event();
        let (pushes, took) = timed(tasks, move |t, _| {
            let metadata = domain::metadata();
            let events = (0..batch)
                .map(|_| {
                    let event = template.clone().with_id(uuid::Uuid::now_v7());
                    Arc::new(event.with_metadata(metadata.clone()))
                })
                .collect();
            naive.push(&format!("order-t{t}"), events);
            async { Ok(()) }
        })
        .await?;
        Ok(rate(pushes * batch as u64, took))
    }
}

fn payload_event() -> NewEvent {
    let payload = serde_json::json!({
        "order_id": "ord_7f3c2a9e-4b1d-4c8e-9a2f-1e5d6c7b8a90", "customer_id": "cus_42a1b3c4",
        "currency": "EUR", "total_cents": 12999,
        "items": [{"sku": "SKU-RED-SHIRT-M", "qty": 2}, {"sku": "SKU-JEANS-32", "qty": 1}]
    });
    NewEvent::from_value("OrderPlaced", 1, &payload)
}

/// `tasks` tasks appending `per_task` batches of `batch` events each to their own stream of a
/// fresh store.
async fn append_ours(tasks: usize, batch: usize, per_task: usize) -> anyhow::Result<Duration> {
    let store = InMemoryStore::new();
    let template = payload_event();
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let store = store.clone();
        let template = template.clone();
        handles.push(tokio::spawn(async move {
            let stream = StreamId::new("order", &format!("t{t}"))?;
            for i in 0..per_task {
                let events = (0..batch)
                    .map(|_| template.clone().with_id(uuid::Uuid::now_v7()))
                    .collect();
                let expected = ExpectedVersion::Exact((i * batch) as u64);
                store
                    .append(AppendRequest::new(stream.clone(), expected, events))
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    let elapsed = start.elapsed();
    drop(store);
    Ok(elapsed)
}

/// The same events pushed into [`Naive`].
async fn append_raw(tasks: usize, batch: usize, per_task: usize) -> anyhow::Result<Duration> {
    let naive = Arc::new(Naive::default());
    let template = payload_event();
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let naive = Arc::clone(&naive);
        let template = template.clone();
        handles.push(tokio::spawn(async move {
            let stream = format!("order-t{t}");
            for _ in 0..per_task {
                let events: Vec<Arc<NewEvent>> = (0..batch)
                    .map(|_| Arc::new(template.clone().with_id(uuid::Uuid::now_v7())))
                    .collect();
                naive.push(&stream, events);
            }
        }));
    }
    for h in handles {
        h.await?;
    }
    let elapsed = start.elapsed();
    drop(naive);
    Ok(elapsed)
}

async fn appends(report: &mut Report) -> anyhow::Result<()> {
    let total = pick(100_000, 10_000);
    let pairs = pick(5, 1);
    for (tasks, batch) in [(1usize, 1usize), (1, 10), (16, 1), (16, 10)] {
        let per_task = total / tasks / batch;
        let events = (tasks * per_task * batch) as u64;
        append_ours(tasks, batch, per_task / 10).await?;
        append_raw(tasks, batch, per_task / 10).await?;
        let mut samples = Samples::default();
        for i in 0..pairs {
            let (ours, raw) = if i % 2 == 0 {
                let raw = append_raw(tasks, batch, per_task).await?;
                (append_ours(tasks, batch, per_task).await?, raw)
            } else {
                let ours = append_ours(tasks, batch, per_task).await?;
                (ours, append_raw(tasks, batch, per_task).await?)
            };
            samples.push_times(events, ours, raw);
        }
        report.push(Row::paired(
            GROUP,
            format!("append {batch}-event batches, {tasks} task(s)"),
            &samples,
            "events/s",
            None,
            format!(
                "raw = a mutex-guarded map of vectors with no version, id or order checks; {}",
                samples.describe()
            ),
        ));
    }
    Ok(())
}
