//! The crate's error type.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use uuid::Uuid;

use crate::config::{is_secret, REDACTED};

/// What went wrong talking to Kafka.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// librdkafka refused the configuration. If it refused the value of a secret property
    /// (`sasl.password`, see [`KafkaConfig`](crate::KafkaConfig)), the error names the
    /// property but not the value.
    #[error("cannot create the Kafka {client}: {source}")]
    Client {
        /// Which client: "producer", "consumer" or "admin client".
        client: &'static str,
        /// The client's error.
        #[source]
        source: KafkaError,
    },
    /// A record could not be handed to the producer (for example larger than
    /// `message.max.bytes`).
    #[error("cannot send outbox record {position} (message {message_id}): {source}")]
    Enqueue {
        /// Outbox position of the record.
        position: u64,
        /// Its message id.
        message_id: Uuid,
        /// The producer's error.
        #[source]
        source: KafkaError,
    },
    /// The broker did not acknowledge some records of a batch in time; the batch stays pending
    /// and is sent again.
    #[error(
        "{failed} of {total} records were not acknowledged; the first was outbox record \
         {position} (message {message_id}): {source}"
    )]
    Delivery {
        /// Records without acknowledgement.
        failed: usize,
        /// Records in the batch.
        total: usize,
        /// Outbox position of the first unacknowledged record.
        position: u64,
        /// Its message id.
        message_id: Uuid,
        /// Why it failed.
        #[source]
        source: KafkaError,
    },
    /// The broker refused to create a topic.
    #[error("cannot create topic `{topic}`: {code}")]
    CreateTopic {
        /// The topic.
        topic: String,
        /// The broker's error code.
        code: RDKafkaErrorCode,
    },
    /// A request to the broker failed.
    #[error("{what}: {source}")]
    Request {
        /// What was asked.
        what: String,
        /// The client's error.
        #[source]
        source: KafkaError,
    },
    /// The broker did not answer in time.
    #[error("{what}: no answer within {timeout:?}")]
    Timeout {
        /// What was asked.
        what: String,
        /// How long it waited.
        timeout: Duration,
    },
    /// The settings are refused before any client is created: SASL without TLS (unless
    /// allowed, and never `PLAIN`), or a [`set`](crate::KafkaConfig::set) property that
    /// contradicts `with_tls` or `with_sasl` (the `tls` feature). The reason names properties,
    /// never
    /// their secret values.
    #[error("invalid Kafka settings: {reason}")]
    InvalidSetting {
        /// What is wrong.
        reason: String,
    },
    /// TLS with a broker failed: its certificate does not chain to a trusted CA, is not valid
    /// for the host name the client connected to, or the handshake failed otherwise. Nothing
    /// was sent to it, in TLS or in plaintext.
    #[error("TLS with the Kafka brokers `{brokers}` failed: {reason}")]
    Tls {
        /// The `bootstrap.servers` list.
        brokers: String,
        /// librdkafka's description (secrets of the settings replaced by `***`).
        reason: String,
    },
    /// SASL authentication failed: wrong user name or password, or a mechanism the broker
    /// does not offer.
    #[error("SASL authentication with the Kafka brokers `{brokers}` failed: {reason}")]
    Authentication {
        /// The `bootstrap.servers` list.
        brokers: String,
        /// librdkafka's description (secrets of the settings replaced by `***`).
        reason: String,
    },
    /// No broker answered in time.
    #[error(
        "no Kafka broker of `{brokers}` answered within {timeout:?}{}",
        reason.as_ref().map(|r| format!(" (last error: {r})")).unwrap_or_default()
    )]
    Unreachable {
        /// The `bootstrap.servers` list.
        brokers: String,
        /// How long it waited.
        timeout: Duration,
        /// The last error librdkafka reported, if any (secrets replaced by `***`).
        reason: Option<String>,
    },
}

impl Error {
    /// The error of creating a client: a refused value of a secret property is replaced by
    /// `***`, in the value and wherever librdkafka's description repeats it, and so is each of
    /// `secrets` (the secret values of the settings).
    pub(crate) fn client_scrubbed(
        client: &'static str,
        source: KafkaError,
        secrets: &[String],
    ) -> Self {
        let scrub = |mut text: String| {
            for secret in secrets.iter().filter(|s| !s.is_empty()) {
                text = text.replace(secret.as_str(), REDACTED);
            }
            text
        };
        let source = match source {
            KafkaError::ClientConfig(code, description, key, value) if is_secret(&key) => {
                let description = if value.is_empty() {
                    description
                } else {
                    description.replace(&value, REDACTED)
                };
                KafkaError::ClientConfig(code, scrub(description), key, REDACTED.to_owned())
            }
            KafkaError::ClientConfig(code, description, key, value) => {
                KafkaError::ClientConfig(code, scrub(description), key, value)
            }
            KafkaError::ClientCreation(description) => {
                KafkaError::ClientCreation(scrub(description))
            }
            other => other,
        };
        Error::Client { client, source }
    }
}

/// Why [`KafkaPublisher::check`](crate::KafkaPublisher::check) refuses a record: Kafka could
/// never accept it, so the relay dead-letters it without sending it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The message is larger than the producer's `message.max.bytes`.
    #[error(
        "the message is {size} bytes (key, value, headers and per-record overhead), more than \
         the {limit} bytes the producer may send (`message.max.bytes`)"
    )]
    TooLarge {
        /// The message's size as librdkafka counts it.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The topic name is not a legal Kafka topic name.
    #[error("invalid topic name {topic:?}: {reason}")]
    InvalidTopic {
        /// The topic, shortened to 300 characters.
        topic: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
}

/// Why a [`KafkaPublisher`](crate::KafkaPublisher) did not publish a record: its
/// [`Publisher::Error`](es_core::outbox::Publisher::Error). Whether the relay dead-letters the
/// record or sends it again follows [`classify`](crate::classify).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The publisher's own check refused the record before sending it.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// The producer refused the message when it was handed over: it was never sent.
    #[error("the producer refused the message: {0}")]
    Refused(#[source] KafkaError),
    /// The message was sent but the broker did not acknowledge it.
    #[error("the broker did not acknowledge the message: {0}")]
    NotAcknowledged(#[source] KafkaError),
}

impl PublishError {
    /// The librdkafka or broker error code, if the error came from Kafka.
    pub fn code(&self) -> Option<RDKafkaErrorCode> {
        match self {
            Self::Record(_) => None,
            Self::Refused(error) | Self::NotAcknowledged(error) => error.rdkafka_error_code(),
        }
    }
}
