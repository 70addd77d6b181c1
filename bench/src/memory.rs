//! In-memory benchmarks: rehydration against plain serde_json decoding, derived apply dispatch
//! against a hand-written match, and append throughput.

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

use crate::domain::{self, Order, OrderEvent};
use crate::report::{rate, Report, Row};
use crate::PEAK;

const GROUP: &str = "es-memory";
const REHYDRATE_EVENTS: u64 = 100_000;
const ROUNDS: usize = 5;

pub(crate) async fn run(report: &mut Report) -> anyhow::Result<()> {
    rehydrate(report).await?;
    dispatch(report);
    appends(report).await?;
    let store = InMemoryStore::new();
    fill(&store, &StreamId::new("order", "feed")?, REHYDRATE_EVENTS).await?;
    crate::projection::catch_up(report, GROUP, &store, REHYDRATE_EVENTS).await?;
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

/// Best (shortest) of `ROUNDS` timings.
fn best(times: &[Duration]) -> Duration {
    times.iter().copied().min().unwrap_or_default()
}

async fn rehydrate(report: &mut Report) -> anyhow::Result<()> {
    let store = InMemoryStore::new();
    let stream = StreamId::new("order", "bench")?;
    fill(&store, &stream, REHYDRATE_EVENTS).await?;
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

    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    let mut peak = 0;
    for _ in 0..ROUNDS {
        let start = Instant::now();
        for (t, p) in &payloads {
            black_box(domain::decode_by_hand(t, p)?);
        }
        raw.push(start.elapsed());

        let before = PEAK.current_usage();
        PEAK.reset_peak_usage();
        let start = Instant::now();
        let loaded = repo.load::<Order>("bench").await?;
        ours.push(start.elapsed());
        peak = peak.max(PEAK.peak_usage().saturating_sub(before));
        assert_eq!(loaded.version, REHYDRATE_EVENTS);
        black_box(loaded);
    }
    report.push(Row {
        group: GROUP,
        workload:
            "rehydrate 100k events (read + decode + upcast 1% + apply) vs plain serde_json decode"
                .into(),
        ours: rate(REHYDRATE_EVENTS, best(&ours)),
        raw: Some(rate(REHYDRATE_EVENTS, best(&raw))),
        unit: "events/s",
        target: Some(0.5),
        note: format!("peak heap during load {:.1} KiB", peak as f64 / 1024.0),
    });
    Ok(())
}

fn dispatch(report: &mut Report) {
    let events: Vec<OrderEvent> = (0..REHYDRATE_EVENTS)
        .map(|i| {
            let (t, _, payload) = domain::stored_event(i);
            domain::decode_by_hand(t, payload.to_string().as_bytes()).expect("valid payload")
        })
        .collect();
    let passes = 20;
    let (mut derived, mut by_hand) = (Vec::new(), Vec::new());
    // Alternate which one runs first, so neither benefits from a warmer cache or CPU clock.
    for round in 0..ROUNDS * 4 {
        for hand in [round % 2 == 0, round % 2 == 1] {
            let start = Instant::now();
            let order = if hand {
                fold_by_hand(&events, passes)
            } else {
                fold_derived(&events, passes)
            };
            let elapsed = start.elapsed();
            black_box(order);
            if hand {
                by_hand.push(elapsed);
            } else {
                derived.push(elapsed);
            }
        }
    }
    let count = REHYDRATE_EVENTS * passes;
    report.push(Row {
        group: GROUP,
        workload: "apply dispatch: derived `apply_to` vs hand-written match".into(),
        ours: rate(count, best(&derived)),
        raw: Some(rate(count, best(&by_hand))),
        unit: "events/s",
        target: Some(1.0 / 1.05),
        note: "target: derived costs <= 1.05x the hand-written match".into(),
    });
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
            order.apply(e);
        }
    }
    order
}

/// A baseline with no checks at all: a mutex around a map of vectors.
#[derive(Default)]
struct Naive {
    streams: Mutex<HashMap<String, Vec<Arc<NewEvent>>>>,
}

fn payload_event() -> NewEvent {
    let payload = serde_json::json!({
        "order_id": "ord_7f3c2a9e-4b1d-4c8e-9a2f-1e5d6c7b8a90", "customer_id": "cus_42a1b3c4",
        "currency": "EUR", "total_cents": 12999,
        "items": [{"sku": "SKU-RED-SHIRT-M", "qty": 2}, {"sku": "SKU-JEANS-32", "qty": 1}]
    });
    NewEvent::from_value("OrderPlaced", 1, &payload)
}

async fn appends(report: &mut Report) -> anyhow::Result<()> {
    for (tasks, batch) in [(1usize, 1usize), (1, 10), (16, 1), (16, 10)] {
        let per_task = 200_000 / tasks / batch;
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
        let ours = start.elapsed();
        let total = (tasks * per_task * batch) as u64;

        let naive = Arc::new(Naive::default());
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
                    naive
                        .streams
                        .lock()
                        .expect("naive lock")
                        .entry(stream.clone())
                        .or_default()
                        .extend(events);
                }
            }));
        }
        for h in handles {
            h.await?;
        }
        let raw = start.elapsed();
        report.push(Row {
            group: GROUP,
            workload: format!("append {batch}-event batches, {tasks} task(s)"),
            ours: rate(total, ours),
            raw: Some(rate(total, raw)),
            unit: "events/s",
            target: None,
            note: "raw = a mutex-guarded map of vectors with no version, id or order checks".into(),
        });
    }
    Ok(())
}
