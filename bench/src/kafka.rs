//! Relay throughput to a Kafka-protocol broker (`KAFKA_BROKERS`): the outbox of the in-memory
//! store published by `es_core::Relay` with `es_kafka::KafkaPublisher`, against a raw rdkafka
//! producer with the same settings sending the same records (key, value, headers) pipelined,
//! in the same run, each to a fresh topic.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use es_core::{
    AppendRequest, EventStore, ExpectedVersion, Metadata, NewEvent, OutboxMessage, OutboxRecord,
    OutboxStore, Relay, RelayConfig, RelayStep, StreamId,
};
use es_kafka::rdkafka::error::{KafkaError, RDKafkaErrorCode};
use es_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use es_kafka::{KafkaConfig, KafkaPublisher};
use es_memory::InMemoryStore;
use uuid::Uuid;

use crate::config::pick;
use crate::report::{Report, Row, Samples};

const GROUP: &str = "kafka";
const RECORDS: u64 = 20_000;
const STREAMS: u64 = 100;
const PARTITIONS: u32 = 3;
const ROUNDS: usize = 5;

pub(crate) async fn run(report: &mut Report) -> anyhow::Result<()> {
    let brokers = std::env::var("KAFKA_BROKERS").context(
        "KAFKA_BROKERS is not set: run `cargo xtask bench`, or start a broker (tansu) and \
         export KAFKA_BROKERS=127.0.0.1:<port>",
    )?;
    let config = KafkaConfig::new(brokers);
    let default_batch = RelayConfig::default().batch_size;
    let in_flight = RelayConfig::default().max_in_flight;
    let records_n = records();
    // (batch size, batches in flight): the defaults, a smaller window, and one batch at a time
    // (what a publisher that is not gapless gets).
    let mut ours: Vec<(u64, usize, Samples)> = vec![
        (default_batch, in_flight, Samples::default()),
        (500, 4, Samples::default()),
        (default_batch, 1, Samples::default()),
    ];
    // The raw producer sending in waves of the default batch size, awaiting a wave's
    // acknowledgements before the next: the shape of a relay that waits for each batch, without
    // the relay, against the raw producer with every record in flight. It tells the broker's
    // cost of waiting per batch from the relay's own.
    let mut waves = Samples::default();
    let mut bytes = 0;
    // Alternate the order (ABBA) so every variant sees the broker in the same state; each run
    // warms its producer up with one record first.
    for round in 0..pick(ROUNDS, 1) {
        let raw_topic = fresh_topic(&config, "raw").await?;
        let records = retarget(
            &filled_store(&raw_topic)
                .await?
                .pending_outbox(records_n)
                .await?,
            &raw_topic,
        );
        anyhow::ensure!(
            records.len() as u64 == records_n,
            "the outbox holds every record"
        );
        bytes = records
            .iter()
            .map(|r| r.message.payload.len())
            .sum::<usize>()
            / records.len();
        let mut relays = Vec::new();
        let raw_first = round % 2 == 0;
        let mut raw = if raw_first {
            Some(raw_producer(&config, &records).await?)
        } else {
            None
        };
        let order: Vec<usize> = if raw_first {
            (0..ours.len()).collect()
        } else {
            (0..ours.len()).rev().collect()
        };
        let mut wave_times = Vec::new();
        for &k in &order {
            let topic = fresh_topic(&config, "relay").await?;
            let (batch_size, window, _) = &ours[k];
            let took = relay(&config, filled_store(&topic).await?, *batch_size, *window).await?;
            relays.push((k, took));
            if *window == 1 {
                let topic = fresh_topic(&config, "waves").await?;
                let wave = usize::try_from(*batch_size)?;
                wave_times.push(raw_in_waves(&config, &retarget(&records, &topic), wave).await?);
            }
        }
        if raw.is_none() {
            raw = Some(raw_producer(&config, &records).await?);
        }
        let raw = raw.unwrap_or_default();
        for (k, took) in relays {
            ours[k].2.push_times(records_n, took, raw);
        }
        for took in wave_times {
            waves.push_times(records_n, took, raw);
        }
    }
    push_rows(report, &ours, &waves, records_n, bytes, default_batch);
    Ok(())
}

/// The relay rows and the raw-in-waves row.
fn push_rows(
    report: &mut Report,
    ours: &[(u64, usize, Samples)],
    waves: &Samples,
    records_n: u64,
    bytes: usize,
    default_batch: u64,
) {
    let default_window = RelayConfig::default().max_in_flight;
    for (batch_size, window, samples) in ours {
        let (name, target) = match (*batch_size == default_batch, *window) {
            (true, w) if w == default_window => (
                format!("batch {batch_size}, {window} in flight (default)"),
                Some(0.8),
            ),
            (_, 1) => (
                format!(
                    "batch {batch_size}, {window} in flight (what a publisher that is not \
                     gapless gets)"
                ),
                None,
            ),
            _ => (format!("batch {batch_size}, {window} in flight"), None),
        };
        report.push(Row::paired(
            GROUP,
            format!("relay {records_n} outbox records, {name}"),
            samples,
            "msgs/s",
            target,
            format!(
                "in-memory outbox, {STREAMS} keys, {PARTITIONS} partitions, ~{bytes}-byte JSON \
                 values, idempotent producer, acks=all; raw = rdkafka FutureProducer, same \
                 settings and headers, all records in flight, acks awaited; {}",
                samples.describe()
            ),
        ));
    }
    report.push(Row::paired(
        GROUP,
        format!(
            "raw producer in waves of {default_batch} (each wave's acks awaited) vs all in flight"
        ),
        waves,
        "msgs/s",
        None,
        format!(
            "the shape of a relay that waits for each batch, without the relay: its ceiling on \
             this broker; same records and settings; {}",
            waves.describe()
        ),
    ));
}

/// Records per run.
fn records() -> u64 {
    pick(RECORDS, 2000)
}

/// An in-memory store whose outbox holds `records()` messages to `topic` over `STREAMS` streams,
/// written 10 events (and 10 messages) per append.
async fn filled_store(topic: &str) -> anyhow::Result<InMemoryStore> {
    let store = InMemoryStore::new();
    let memo = "x".repeat(140);
    let per_append = 10;
    for chunk in 0..records() / per_append {
        let stream = StreamId::new("account", &format!("{}", chunk % STREAMS))?;
        let events: Vec<NewEvent> = (0..per_append)
            .map(|i| {
                let n = chunk * per_append + i;
                NewEvent::from_value(
                    "Deposited",
                    1,
                    &serde_json::json!({ "amount": n, "memo": memo }),
                )
            })
            .collect();
        let outbox = events
            .iter()
            .zip(chunk * per_append..)
            .map(|(e, n)| OutboxMessage {
                message_id: Uuid::now_v7(),
                source_event_id: e.event_id,
                topic: topic.to_owned(),
                key: stream.to_string(),
                message_type: "account.deposited".into(),
                schema_version: 1,
                payload: Bytes::from(
                    serde_json::json!({
                        "account": stream.to_string(),
                        "amount": n,
                        "currency": "EUR",
                        "memo": memo,
                    })
                    .to_string(),
                ),
                metadata: Metadata::new()
                    .with_causation_id(e.event_id)
                    .with_correlation_id(e.event_id)
                    .with_actor("bench"),
            })
            .collect();
        store
            .append(AppendRequest::new(stream, ExpectedVersion::Any, events).with_outbox(outbox))
            .await?;
    }
    Ok(store)
}

/// A new topic with `PARTITIONS` partitions.
async fn fresh_topic(config: &KafkaConfig, what: &str) -> anyhow::Result<String> {
    let topic = format!("bench-{what}-{}", Uuid::now_v7().simple());
    es_kafka::ensure_topic(config, &topic, PARTITIONS).await?;
    Ok(topic)
}

/// The same records addressed to `topic`.
fn retarget(records: &[OutboxRecord], topic: &str) -> Vec<OutboxRecord> {
    records
        .iter()
        .map(|r| {
            let mut r = r.clone();
            topic.clone_into(&mut r.message.topic);
            r
        })
        .collect()
}

/// The relay publishing the whole outbox: steps until idle, as `Relay::run` does.
async fn relay(
    config: &KafkaConfig,
    store: InMemoryStore,
    batch_size: u64,
    max_in_flight: usize,
) -> anyhow::Result<Duration> {
    let publisher = KafkaPublisher::new(config.clone())?;
    // Connection, producer id and topic metadata: once per process, not per record.
    let warm_up = store.pending_outbox(1).await?;
    publisher.send(&warm_up).await?;
    let relay = Relay::new(
        store.clone(),
        publisher,
        RelayConfig {
            owner: "bench".into(),
            batch_size,
            max_in_flight,
            ..RelayConfig::default()
        },
    );
    let start = Instant::now();
    // `Relay::run`'s work without its idle wait: passes of pipelined batches until idle.
    loop {
        match relay.drain().await? {
            RelayStep::Published(_) => {}
            RelayStep::Idle => break,
            other => anyhow::bail!("relay pass: {other:?}"),
        }
    }
    let elapsed = start.elapsed();
    anyhow::ensure!(store.outbox_len().await? == 0, "the relay left records");
    Ok(elapsed)
}

/// A raw producer with the publisher's settings sending the same records, all in flight at once.
async fn raw_producer(config: &KafkaConfig, records: &[OutboxRecord]) -> anyhow::Result<Duration> {
    let producer: FutureProducer = config.producer_client_config().create()?;
    send_all(&producer, &records[..1]).await?;
    let start = Instant::now();
    send_all(&producer, records).await?;
    Ok(start.elapsed())
}

/// A raw producer sending `records` in waves of `wave`, each wave's acknowledgements awaited
/// before the next is sent.
async fn raw_in_waves(
    config: &KafkaConfig,
    records: &[OutboxRecord],
    wave: usize,
) -> anyhow::Result<Duration> {
    let producer: FutureProducer = config.producer_client_config().create()?;
    send_all(&producer, &records[..1]).await?;
    let start = Instant::now();
    for chunk in records.chunks(wave) {
        send_all(&producer, chunk).await?;
    }
    Ok(start.elapsed())
}

/// Sends `records` pipelined and waits for every acknowledgement.
async fn send_all(producer: &FutureProducer, records: &[OutboxRecord]) -> anyhow::Result<()> {
    let mut deliveries = Vec::with_capacity(records.len());
    for r in records {
        let mut record = FutureRecord::to(&r.message.topic)
            .key(r.message.key.as_bytes())
            .payload(&r.message.payload[..])
            .headers(es_kafka::headers::encode(r))
            .timestamp(r.recorded_at.timestamp_millis());
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    deliveries.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }
    for delivery in deliveries {
        delivery.await?.map_err(|(e, _)| e)?;
    }
    Ok(())
}
