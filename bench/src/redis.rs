//! es-redis benchmarks against raw commands sent with the same client, in the same run.
//!
//! Raw baselines send the same number of `XADD` commands the append script runs (one to the
//! stream, one to the feed per event) through the store's own connection, with the same fields
//! and automatic ids and none of the checks: for single-event appends the two `XADD`s go as one
//! pipeline (one round trip, like one `EVALSHA`), for 100-event appends as one pipeline of 200.
//! Read baselines send the same `XRANGE` pages and decode them by hand into the same
//! `RecordedEvent`. Every workload alternates raw and framework runs (ABBA) after a warm-up and
//! reports medians. The server's persistence settings are printed in the notes.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use chrono::DateTime;
use es_core::{
    AppendRequest, EventStore, ExpectedVersion, Metadata, NewEvent, ReadAll, ReadStream,
    RecordedEvent, StreamId,
};
use es_redis::RedisStore;
use futures::TryStreamExt;
use redis::aio::{ConnectionLike as _, ConnectionManager};
use redis::Value;
use uuid::Uuid;

use crate::command::{self, Baseline, Targets};
use crate::config::{pick, Args};
use crate::domain::metadata;
use crate::load::{read_repeats, round, rounds, timed};
use crate::report::{heap_size, rate, Report, Row, Samples};
use crate::PEAK;

const GROUP: &str = "es-redis";
const READ_EVENTS: u64 = 10_000;
/// Events in the feed that read-all and projection catch-up go over.
const FEED_EVENTS: u64 = 100_000;

/// Page size of the store's reads, used by the raw read baselines too.
const PAGE: u64 = 512;

const PAYLOAD: &str = r#"{"order_id": "ord_7f3c2a9e-4b1d-4c8e-9a2f-1e5d6c7b8a90", "customer_id": "cus_42a1b3c4", "currency": "EUR", "total_cents": 12999, "items": [{"sku": "SKU-RED-SHIRT-M", "qty": 2}, {"sku": "SKU-JEANS-32", "qty": 1}]}"#;

pub(crate) async fn run(report: &mut Report, args: &Args) -> anyhow::Result<()> {
    let url = std::env::var("REDIS_URL").context(
        "REDIS_URL is not set: run `cargo xtask bench`, or start redis-server and export it",
    )?;
    let prefix = format!(
        "bench:{}:{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()
    );
    let store = RedisStore::builder(url.as_str())
        .prefix(&prefix)
        .read_page_size(PAGE)
        .build()
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    let settings = server_settings(&store).await;
    let result = async {
        if args.wants("redis", "personal") {
            crate::personal::run(report, GROUP, store.clone(), store.key_store()).await?;
        }
        if args.wants("redis", "append") {
            appends(report, &store, 16, 1, Some(0.7), &settings).await?;
            appends(report, &store, 16, 100, Some(0.7), &settings).await?;
            appends(report, &store, 1, 1, None, &settings).await?;
        }
        if args.wants("redis", "telemetry") {
            crate::telemetry::run(report, GROUP, store.clone()).await?;
        }
        if args.wants("redis", "command") {
            let raw = RawXadds {
                store: &store,
                settings: &settings,
            };
            command::run(report, GROUP, store.clone(), &raw, Targets::default()).await?;
        }
        let (read, catch_up) = (args.wants("redis", "read"), args.wants("redis", "catch-up"));
        if read || catch_up {
            let (feed, stream) = feed_store(&store).await?;
            if read {
                reads(report, &feed, &stream).await?;
            }
            if catch_up {
                crate::projection::catch_up(report, GROUP, &feed, feed_len()).await?;
            }
            cleanup(&feed, feed.keys().prefix()).await;
        }
        if args.wants("redis", "group") {
            let partitioning = es_core::Partitioning::new(crate::projection::GROUP_PARTITIONS)?;
            let grouped = RedisStore::builder(url.as_str())
                .prefix(format!("{prefix}:group"))
                .read_page_size(PAGE)
                .partitioning(partitioning)
                .build()
                .await?;
            let count = feed_len();
            crate::projection::fill_partitioned(&grouped, count).await?;
            crate::projection::group_catch_up(report, GROUP, &grouped, count).await?;
        }
        if args.wants("redis", "cluster") {
            crate::redis_cluster::run(report).await?;
        }
        anyhow::Ok(())
    }
    .await;
    cleanup(&store, &prefix).await;
    result
}

async fn server_settings(store: &RedisStore) -> String {
    let mut conn = store.connection();
    let get = |name: &'static str| {
        let mut conn = conn.clone();
        async move {
            let reply: Vec<String> = redis::cmd("CONFIG")
                .arg("GET")
                .arg(name)
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            reply.get(1).cloned().unwrap_or_else(|| "?".to_owned())
        }
    };
    let aof = get("appendonly").await;
    let fsync = get("appendfsync").await;
    let _ = redis::cmd("PING").query_async::<String>(&mut conn).await;
    if aof == "yes" {
        format!("appendonly yes, appendfsync {fsync}")
    } else {
        "appendonly no".to_owned()
    }
}

/// Deletes every key of the run.
async fn cleanup(store: &RedisStore, prefix: &str) {
    let mut conn = store.connection();
    let mut cursor = 0u64;
    loop {
        let reply: redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await;
        let Ok((next, keys)) = reply else { return };
        if !keys.is_empty() {
            let _ = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async::<u64>(&mut conn)
                .await;
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}

fn new_event() -> NewEvent {
    NewEvent::new("OrderPlaced", 1, PAYLOAD)
        .expect("valid JSON")
        .with_metadata(metadata())
}

/// The raw baseline's `XADD`s for one event: to a per-stream key and to a feed key, with the
/// fields the store writes.
fn raw_xadds(
    pipe: &mut redis::Pipeline,
    stream_key: &str,
    feed_key: &str,
    stream: &str,
    version: u64,
) {
    let id = Uuid::now_v7().hyphenated().to_string();
    let meta = metadata().to_json();
    let at = es_core::event::now_micros().timestamp_micros();
    pipe.cmd("XADD")
        .arg(stream_key)
        .arg("*")
        .arg("event_id")
        .arg(&id)
        .arg("type")
        .arg("OrderPlaced")
        .arg("schema")
        .arg(1)
        .arg("payload")
        .arg(PAYLOAD)
        .arg("metadata")
        .arg(&meta)
        .arg("position")
        .arg(version)
        .arg("recorded_at")
        .arg(at)
        .ignore();
    pipe.cmd("XADD")
        .arg(feed_key)
        .arg("*")
        .arg("stream")
        .arg(stream)
        .arg("version")
        .arg(version)
        .arg("event_id")
        .arg(&id)
        .arg("type")
        .arg("OrderPlaced")
        .arg("schema")
        .arg(1)
        .arg("payload")
        .arg(PAYLOAD)
        .arg("metadata")
        .arg(&meta)
        .arg("recorded_at")
        .arg(at)
        .ignore();
}

async fn appends(
    report: &mut Report,
    store: &RedisStore,
    tasks: usize,
    batch: usize,
    target: Option<f64>,
    settings: &str,
) -> anyhow::Result<()> {
    let mut samples = Samples::default();
    round_raw(store, tasks, batch).await?;
    round_ours(store, tasks, batch).await?;
    for i in 0..rounds() {
        let (ours, raw) = if i % 2 == 0 {
            let raw = round_raw(store, tasks, batch).await?;
            (round_ours(store, tasks, batch).await?, raw)
        } else {
            let ours = round_ours(store, tasks, batch).await?;
            (ours, round_raw(store, tasks, batch).await?)
        };
        samples.push(ours, raw);
    }
    let baseline = if batch == 1 {
        "a pipeline of 2 XADDs"
    } else {
        "a pipeline of 2 XADDs per event"
    };
    report.push(Row::paired(
        GROUP,
        format!("{tasks} task(s), {batch}-event appends to distinct streams vs {baseline}"),
        &samples,
        "events/s",
        target,
        format!(
            "{settings}; {:.1}s rounds, {}",
            round().as_secs_f64(),
            samples.describe()
        ),
    ));
    Ok(())
}

/// The command rows' raw side: the append rows' pipelined `XADD`s.
struct RawXadds<'a> {
    store: &'a RedisStore,
    settings: &'a str,
}

impl Baseline for RawXadds<'_> {
    fn describe(&self, batch: usize) -> String {
        format!(
            "a pipeline of 2 XADDs per event, {batch} event(s) per pipeline; {}",
            self.settings
        )
    }

    async fn round(&self, tasks: usize, batch: usize) -> anyhow::Result<f64> {
        round_raw(self.store, tasks, batch).await
    }
}

static RUN: AtomicU64 = AtomicU64::new(0);

/// One timed round of raw pipelined `XADD`s; returns events/s.
async fn round_raw(store: &RedisStore, tasks: usize, batch: usize) -> anyhow::Result<f64> {
    let round = RUN.fetch_add(1, Ordering::Relaxed);
    let conn = store.connection();
    let prefix = store.keys().prefix().to_owned();
    let feed_key = format!("{prefix}:raw:feed");
    let (count, elapsed) = timed(tasks, move |t, i| {
        let mut conn: ConnectionManager = conn.clone();
        let stream = format!("order-raw{tasks}x{batch}x{round}x{t}");
        let stream_key = format!("{prefix}:raw:{{{stream}}}");
        let feed_key = feed_key.clone();
        async move {
            let mut pipe = redis::pipe();
            for j in 0..batch as u64 {
                raw_xadds(
                    &mut pipe,
                    &stream_key,
                    &feed_key,
                    &stream,
                    i * batch as u64 + j + 1,
                );
            }
            pipe.exec_async(&mut conn).await?;
            Ok(())
        }
    })
    .await?;
    Ok(rate(count * batch as u64, elapsed))
}

/// One timed round of framework appends; returns events/s.
async fn round_ours(store: &RedisStore, tasks: usize, batch: usize) -> anyhow::Result<f64> {
    let round = RUN.fetch_add(1, Ordering::Relaxed);
    let store = store.clone();
    let (count, elapsed) = timed(tasks, move |t, i| {
        let store = store.clone();
        async move {
            let stream = StreamId::new("order", &format!("b{tasks}x{batch}x{round}x{t}"))?;
            let events = (0..batch).map(|_| new_event()).collect();
            let expected = ExpectedVersion::Exact(i * batch as u64);
            store
                .append(AppendRequest::new(stream, expected, events))
                .await?;
            Ok(())
        }
    })
    .await?;
    Ok(rate(count * batch as u64, elapsed))
}

/// Fills `stream` with `count` events in batches of 1000.
async fn fill(store: &RedisStore, stream: &StreamId, count: u64) -> anyhow::Result<()> {
    let mut i = 0;
    while i < count {
        let n = 1000.min(count - i);
        let batch = (0..n).map(|_| new_event()).collect();
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

/// Events in the feed store.
fn feed_len() -> u64 {
    pick(FEED_EVENTS, 20_000)
}

/// A fresh store whose feed holds exactly `feed_len()` events: a 10k-event stream read by the
/// stream workload, and streams of 1000 for the rest.
async fn feed_store(store: &RedisStore) -> anyhow::Result<(RedisStore, StreamId)> {
    let prefix = format!("{}:reads", store.keys().prefix());
    let url = std::env::var("REDIS_URL")?;
    let feed = RedisStore::builder(url.as_str())
        .prefix(&prefix)
        .read_page_size(PAGE)
        .build()
        .await?;
    let stream = StreamId::new("order", "read")?;
    fill(&feed, &stream, READ_EVENTS).await?;
    let others = feed_len() - READ_EVENTS;
    for k in 0..others / 1000 {
        fill(&feed, &StreamId::new("order", &format!("other{k}"))?, 1000).await?;
    }
    Ok((feed, stream))
}

/// Collects `stream` through the store; returns the time taken and the peak heap.
async fn ours_stream(feed: &RedisStore, stream: &StreamId) -> anyhow::Result<(Duration, usize)> {
    let before = PEAK.current_usage();
    PEAK.reset_peak_usage();
    let start = Instant::now();
    let events: Vec<RecordedEvent> = feed
        .read_stream(stream, ReadStream::forward())
        .try_collect()
        .await?;
    let elapsed = start.elapsed();
    let peak = PEAK.peak_usage().saturating_sub(before);
    anyhow::ensure!(
        events.len() as u64 == READ_EVENTS,
        "read {} events",
        events.len()
    );
    black_box(events);
    Ok((elapsed, peak))
}

/// Collects `stream` with raw `XRANGE` pages; returns the time taken.
async fn raw_stream(
    conn: &ConnectionManager,
    key: &str,
    stream: &StreamId,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let events = raw_read(conn.clone(), key, Some(stream)).await?;
    let elapsed = start.elapsed();
    anyhow::ensure!(
        events.len() as u64 == READ_EVENTS,
        "raw read {} events",
        events.len()
    );
    black_box(events);
    Ok(elapsed)
}

/// Consumes the whole feed through the store one event at a time; returns the time taken.
async fn ours_all(feed: &RedisStore, expected: u64) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let count = feed
        .read_all(ReadAll::after(0))
        .try_fold(0u64, |n, e| {
            black_box(e);
            async move { Ok(n + 1) }
        })
        .await?;
    let elapsed = start.elapsed();
    anyhow::ensure!(count == expected, "read_all {count} of {expected} events");
    Ok(elapsed)
}

/// Consumes the whole feed with raw `XRANGE` pages; returns the time taken.
async fn raw_all(conn: &ConnectionManager, key: &str, expected: u64) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let count = raw_read_count(conn.clone(), key).await?;
    let elapsed = start.elapsed();
    anyhow::ensure!(count == expected, "raw read {count} of {expected} events");
    Ok(elapsed)
}

async fn reads(report: &mut Report, feed: &RedisStore, stream: &StreamId) -> anyhow::Result<()> {
    let conn = feed.connection();
    let stream_key = feed.keys().events(stream);
    let feed_key = feed.keys().feed().to_owned();
    let total = feed_len();

    raw_stream(&conn, &stream_key, stream).await?;
    ours_stream(feed, stream).await?;
    let mut samples = Samples::default();
    let mut peak = 0;
    for i in 0..read_repeats() {
        let ((ours, p), raw) = if i % 2 == 0 {
            let raw = raw_stream(&conn, &stream_key, stream).await?;
            (ours_stream(feed, stream).await?, raw)
        } else {
            let ours = ours_stream(feed, stream).await?;
            (ours, raw_stream(&conn, &stream_key, stream).await?)
        };
        peak = peak.max(p);
        samples.push_times(READ_EVENTS, ours, raw);
    }
    report.push(Row::paired(
        GROUP,
        "read a 10k-event stream vs raw XRANGE pages decoded into RecordedEvent",
        &samples,
        "events/s",
        Some(0.8),
        format!(
            "pages of {PAGE}; peak heap collecting {}; {}",
            heap_size(peak),
            samples.describe()
        ),
    ));

    raw_all(&conn, &feed_key, total).await?;
    ours_all(feed, total).await?;
    let mut samples = Samples::default();
    for i in 0..read_repeats() {
        let (ours, raw) = if i % 2 == 0 {
            let raw = raw_all(&conn, &feed_key, total).await?;
            (ours_all(feed, total).await?, raw)
        } else {
            let ours = ours_all(feed, total).await?;
            (ours, raw_all(&conn, &feed_key, total).await?)
        };
        samples.push_times(total, ours, raw);
    }
    report.push(Row::paired(
        GROUP,
        format!(
            "read_all over {}k events vs raw XRANGE pages decoded into RecordedEvent",
            total / 1000
        ),
        &samples,
        "events/s",
        Some(0.8),
        format!(
            "pages of {PAGE}; events consumed one by one; {}",
            samples.describe()
        ),
    ));
    Ok(())
}

/// Reads all pages of `key` with `XRANGE ... COUNT PAGE`, decoding every entry.
async fn raw_read(
    mut conn: ConnectionManager,
    key: &str,
    stream: Option<&StreamId>,
) -> anyhow::Result<Vec<RecordedEvent>> {
    let mut out = Vec::new();
    let mut from = "-".to_owned();
    loop {
        let reply = xrange(&mut conn, key, &from).await?;
        let Value::Array(entries) = reply else {
            anyhow::bail!("XRANGE returned no array");
        };
        let n = entries.len() as u64;
        let mut last = None;
        for entry in entries {
            let (id, event) = decode_by_hand(entry, stream)?;
            last = Some(id);
            out.push(event);
        }
        match last {
            Some(id) if n == PAGE => from = format!("({id}"),
            _ => return Ok(out),
        }
    }
}

/// One `XRANGE key from + COUNT PAGE`, sent the way the store sends it.
async fn xrange(conn: &mut ConnectionManager, key: &str, from: &str) -> anyhow::Result<Value> {
    let mut cmd = redis::cmd("XRANGE");
    cmd.arg(key).arg(from).arg("+").arg("COUNT").arg(PAGE);
    Ok(conn.req_packed_command(&cmd).await?)
}

/// Like [`raw_read`] over the feed, consuming events one by one.
async fn raw_read_count(mut conn: ConnectionManager, key: &str) -> anyhow::Result<u64> {
    let mut count = 0;
    let mut from = "-".to_owned();
    loop {
        let reply = xrange(&mut conn, key, &from).await?;
        let Value::Array(entries) = reply else {
            anyhow::bail!("XRANGE returned no array");
        };
        let n = entries.len() as u64;
        let mut last = None;
        for entry in entries {
            let (id, event) = decode_by_hand(entry, None)?;
            last = Some(id);
            black_box(event);
            count += 1;
        }
        match last {
            Some(id) if n == PAGE => from = format!("({id}"),
            _ => return Ok(count),
        }
    }
}

/// A straightforward decoder of one entry into a `RecordedEvent` (no validation beyond what
/// parsing needs). `stream` is the stream for per-stream entries, `None` for feed entries.
fn decode_by_hand(
    entry: Value,
    stream: Option<&StreamId>,
) -> anyhow::Result<(String, RecordedEvent)> {
    let Value::Array(pair) = entry else {
        anyhow::bail!("entry is not an array");
    };
    let mut pair = pair.into_iter();
    let (Some(Value::BulkString(id)), Some(Value::Array(fields))) = (pair.next(), pair.next())
    else {
        anyhow::bail!("entry is not (id, fields)");
    };
    let id = String::from_utf8(id)?;
    let number: u64 = id.split('-').next().unwrap_or("0").parse()?;
    let mut event = RecordedEvent {
        event_id: Uuid::nil(),
        stream_id: stream
            .cloned()
            .unwrap_or_else(|| StreamId::parse("x-x").expect("valid")),
        stream_version: number,
        global_position: number,
        partition: 0,
        event_type: String::new(),
        schema_version: 0,
        payload: Bytes::new(),
        metadata: Metadata::default(),
        recorded_at: DateTime::UNIX_EPOCH,
    };
    let mut fields = fields.into_iter();
    while let (Some(Value::BulkString(name)), Some(Value::BulkString(value))) =
        (fields.next(), fields.next())
    {
        match name.as_slice() {
            b"event_id" => event.event_id = Uuid::parse_str(std::str::from_utf8(&value)?)?,
            b"type" => event.event_type = String::from_utf8(value)?,
            b"schema" => event.schema_version = std::str::from_utf8(&value)?.parse()?,
            b"payload" => event.payload = Bytes::from(value),
            b"metadata" => event.metadata = Metadata::from_json(&value)?,
            b"position" => event.global_position = std::str::from_utf8(&value)?.parse()?,
            b"version" => event.stream_version = std::str::from_utf8(&value)?.parse()?,
            b"stream" => event.stream_id = StreamId::parse(std::str::from_utf8(&value)?)?,
            b"recorded_at" => {
                event.recorded_at =
                    DateTime::from_timestamp_micros(std::str::from_utf8(&value)?.parse()?)
                        .context("recorded_at out of range")?;
            }
            _ => {}
        }
    }
    Ok((id, event))
}
