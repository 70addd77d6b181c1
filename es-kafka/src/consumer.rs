//! Reading published messages back: a consumer-group subscriber and a whole-topic reader.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use uuid::Uuid;

use crate::client::{self, Context};
use crate::config::KafkaConfig;
use crate::error::Error;
use crate::headers;

/// A message read from a topic, detached from the consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumedMessage {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// Its offset in the partition.
    pub offset: i64,
    /// The key (the stream id for messages from the outbox).
    pub key: Option<Bytes>,
    /// The value (JSON for messages from the outbox); empty for a tombstone.
    pub payload: Bytes,
    /// Headers in the order they were sent.
    pub headers: Vec<(String, Option<Bytes>)>,
    /// The message timestamp in milliseconds since the epoch, if it has one.
    pub timestamp: Option<i64>,
}

impl ConsumedMessage {
    /// Copies what it needs out of a message borrowed from a consumer.
    pub fn from_message(message: &impl Message) -> Self {
        let headers = message.headers().map_or_else(Vec::new, |h| {
            h.iter()
                .map(|h| (h.key.to_owned(), h.value.map(Bytes::copy_from_slice)))
                .collect()
        });
        Self {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(Bytes::copy_from_slice),
            payload: message
                .payload()
                .map_or_else(Bytes::new, Bytes::copy_from_slice),
            headers,
            timestamp: message.timestamp().to_millis(),
        }
    }

    /// The key as text, if it is UTF-8.
    pub fn key_str(&self) -> Option<&str> {
        self.key
            .as_deref()
            .and_then(|k| std::str::from_utf8(k).ok())
    }

    /// The value of the last header called `name`, if it is UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The [`message_id`](headers::MESSAGE_ID) header: the dedupe key.
    pub fn message_id(&self) -> Option<Uuid> {
        self.header(headers::MESSAGE_ID)?.parse().ok()
    }

    /// The [`outbox_position`](headers::OUTBOX_POSITION) header.
    pub fn outbox_position(&self) -> Option<u64> {
        self.header(headers::OUTBOX_POSITION)?.parse().ok()
    }

    /// The value parsed as JSON.
    pub fn json(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_slice(&self.payload)
    }
}

/// A member of consumer group `group` reading `topic` (from the earliest offset when the group
/// has no committed offsets); offsets are committed automatically.
///
/// This is how a service downstream watches the integration events; for a one-off look at a
/// whole topic [`read_topic`] is simpler.
pub struct TopicConsumer {
    consumer: StreamConsumer<Context>,
}

impl std::fmt::Debug for TopicConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicConsumer").finish_non_exhaustive()
    }
}

impl TopicConsumer {
    /// [`check_connection`](crate::check_connection), then [`subscribe`](Self::subscribe): a
    /// wrong CA, a certificate for another host name or wrong SASL credentials fail here,
    /// typed ([`Error::Tls`], [`Error::Authentication`]).
    pub async fn connect(config: &KafkaConfig, topic: &str, group: &str) -> Result<Self, Error> {
        crate::check_connection(config).await?;
        Self::subscribe(config, topic, group)
    }

    /// Joins `group` and subscribes to `topic`. Messages flow once the group has assigned
    /// partitions to it, which takes a moment. Connecting happens in the background: a TLS or
    /// SASL failure shows as [`Error::Tls`] or [`Error::Authentication`] from
    /// [`recv`](Self::recv).
    pub fn subscribe(config: &KafkaConfig, topic: &str, group: &str) -> Result<Self, Error> {
        let consumer: StreamConsumer<Context> = client::create(
            config,
            "consumer",
            &config.client_settings(&[
                ("group.id", group),
                ("auto.offset.reset", "earliest"),
                ("enable.auto.commit", "true"),
                ("enable.partition.eof", "false"),
            ]),
        )?;
        consumer
            .subscribe(&[topic])
            .map_err(|source| Error::Request {
                what: format!("subscribe to `{topic}`"),
                source,
            })?;
        Ok(Self { consumer })
    }

    /// The next message, or `None` if none came within `timeout`.
    pub async fn recv(&self, timeout: Duration) -> Result<Option<ConsumedMessage>, Error> {
        match tokio::time::timeout(timeout, self.consumer.recv()).await {
            Err(_) => Ok(None),
            Ok(Ok(message)) => Ok(Some(ConsumedMessage::from_message(&message))),
            Ok(Err(source)) => Err(self
                .consumer
                .context()
                .security_error_for(source.rdkafka_error_code())
                .unwrap_or(Error::Request {
                    what: "receive a message".into(),
                    source,
                })),
        }
    }

    /// Receives until `done` says the messages so far are enough, or `timeout` passes; returns
    /// what it received either way.
    pub async fn recv_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[ConsumedMessage]) -> bool,
    ) -> Result<Vec<ConsumedMessage>, Error> {
        let deadline = Instant::now() + timeout;
        let mut messages = Vec::new();
        while !done(&messages) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            if let Some(message) = self.recv(left).await? {
                messages.push(message);
            }
        }
        Ok(messages)
    }
}

/// Every message in `topic` now: each partition read from its first offset up to its end (as
/// the broker's fetch responses report it), without a consumer group. Sorted by partition, then
/// offset.
///
/// The end is found by fetching, not with `ListOffsets`: tansu 0.6's in-memory engine answers
/// `ListOffsets(latest)` with the base offset of the last record batch plus one, which stops
/// short of the end whenever that batch holds more than one record.
pub async fn read_topic(
    config: &KafkaConfig,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<ConsumedMessage>, Error> {
    let partitions = crate::admin::partition_count(config, topic).await?;
    let consumer: BaseConsumer<Context> = client::create(
        config,
        "consumer",
        &config.client_settings(&[
            ("group.id", "es-kafka-read-topic"),
            ("enable.auto.commit", "false"),
            ("enable.partition.eof", "true"),
        ]),
    )?;
    let topic = topic.to_owned();
    let blocking = tokio::task::spawn_blocking(move || {
        read_partitions(&consumer, &topic, partitions, timeout)
    });
    blocking
        .await
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic.into_panic()))
}

fn read_partitions(
    consumer: &BaseConsumer<Context>,
    topic: &str,
    partitions: u32,
    timeout: Duration,
) -> Result<Vec<ConsumedMessage>, Error> {
    let deadline = Instant::now() + timeout;
    let mut assignment = TopicPartitionList::new();
    for partition in 0..i32::try_from(partitions).unwrap_or(i32::MAX) {
        assignment
            .add_partition_offset(topic, partition, Offset::Beginning)
            .map_err(|source| Error::Request {
                what: format!("assign `{topic}` partition {partition}"),
                source,
            })?;
    }
    consumer
        .assign(&assignment)
        .map_err(|source| Error::Request {
            what: format!("assign the partitions of `{topic}`"),
            source,
        })?;
    let mut at_end: HashSet<i32> = HashSet::new();
    let mut out = Vec::new();
    while at_end.len() < partitions as usize {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Timeout {
                what: format!("read `{topic}` to its end"),
                timeout,
            });
        }
        match consumer.poll(left.min(Duration::from_millis(200))) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                at_end.insert(partition);
            }
            Some(Err(source)) => {
                return Err(consumer
                    .context()
                    .security_error_for(source.rdkafka_error_code())
                    .unwrap_or(Error::Request {
                        what: format!("read `{topic}`"),
                        source,
                    }))
            }
            Some(Ok(message)) => out.push(ConsumedMessage::from_message(&message)),
        }
    }
    out.sort_by_key(|m| (m.partition, m.offset));
    Ok(out)
}
