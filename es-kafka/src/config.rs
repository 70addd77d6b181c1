//! Where the brokers are and how the producer behaves.

use std::time::Duration;

use rdkafka::ClientConfig;

/// Connection and producer settings for [`KafkaPublisher`](crate::KafkaPublisher) and the
/// helpers of this crate.
///
/// The producer defaults are the ones at-least-once delivery in per-stream order needs (see the
/// [crate docs](crate#producer-settings)); [`set`](Self::set) adds or overrides any librdkafka
/// property, for every client this crate creates (producer, admin client, consumers), so
/// connection settings such as `security.protocol` go there too.
///
/// ```
/// use std::time::Duration;
/// use es_kafka::KafkaConfig;
///
/// let config = KafkaConfig::new("127.0.0.1:9092")
///     .with_delivery_timeout(Duration::from_secs(3))
///     .set("client.id", "billing-relay");
/// assert!(config
///     .producer_settings()
///     .contains(&("enable.idempotence".to_owned(), "true".to_owned())));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    brokers: String,
    delivery_timeout: Duration,
    max_message_bytes: usize,
    settings: Vec<(String, String)>,
}

/// librdkafka's default `message.max.bytes`.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1_000_000;

impl KafkaConfig {
    /// Settings for the comma-separated `host:port` list `brokers` (`bootstrap.servers`).
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            delivery_timeout: Duration::from_secs(5),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            settings: Vec::new(),
        }
    }

    /// The `bootstrap.servers` list.
    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    /// How long a batch may wait for the broker's acknowledgements before
    /// [`publish`](es_core::Publisher::publish) fails and the relay sends it again
    /// (`message.timeout.ms`). Default 5 s.
    ///
    /// Keep it below [`RelayConfig::publish_timeout`](es_core::RelayConfig::publish_timeout):
    /// the relay cuts a publish call off after that (to stay within its lease), and a batch the
    /// publisher settles itself reports which records failed instead of failing as a whole.
    pub fn with_delivery_timeout(mut self, timeout: Duration) -> Self {
        self.delivery_timeout = timeout;
        self
    }

    /// The configured delivery timeout.
    pub fn delivery_timeout(&self) -> Duration {
        self.delivery_timeout
    }

    /// The largest message the publisher sends (librdkafka's `message.max.bytes`; default
    /// [`DEFAULT_MAX_MESSAGE_BYTES`], clamped to librdkafka's range `1000 ..= 1_000_000_000`).
    ///
    /// Set it to what the broker accepts for the topics the outbox publishes to (the topic's
    /// `max.message.bytes`, by default the broker's `message.max.bytes`, about 1 MiB on Kafka).
    /// [`KafkaPublisher::check`](crate::KafkaPublisher::check) refuses a record whose message
    /// (key, value, headers and librdkafka's per-record overhead, counted as librdkafka counts
    /// them) is larger, so the relay dead-letters it without sending it. A record under this
    /// limit but over the broker's is rejected by the broker (`MESSAGE_TOO_LARGE`) and
    /// dead-lettered the same way, after one attempt.
    pub fn with_max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes.clamp(1000, 1_000_000_000);
        self
    }

    /// The largest message the producer accepts: a `message.max.bytes` given with
    /// [`set`](Self::set) if it is a number, else [`with_max_message_bytes`](Self::with_max_message_bytes).
    pub fn max_message_bytes(&self) -> usize {
        self.settings
            .iter()
            .find(|(k, _)| k == "message.max.bytes")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(self.max_message_bytes)
    }

    /// Adds or overrides a librdkafka property for every client this crate creates. Applied
    /// after the defaults, so it wins over them.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        let key = key.into();
        self.settings.retain(|(k, _)| *k != key);
        self.settings.push((key, value.into()));
        self
    }

    /// The effective producer properties: the defaults, then [`set`](Self::set) overrides.
    pub fn producer_settings(&self) -> Vec<(String, String)> {
        let timeout_ms = self
            .delivery_timeout
            .as_millis()
            .clamp(1, 900_000)
            .to_string();
        let max_message_bytes = self.max_message_bytes.to_string();
        let defaults = [
            ("bootstrap.servers", self.brokers.as_str()),
            // The largest message; `KafkaPublisher::check` uses the same figure.
            ("message.max.bytes", max_message_bytes.as_str()),
            // Exactly one copy per send attempt and per-partition order across retries.
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("max.in.flight.requests.per.connection", "5"),
            ("message.send.max.retries", "2147483647"),
            ("retry.backoff.ms", "100"),
            ("retry.backoff.max.ms", "1000"),
            // The delivery deadline of a batch; requests never outlive it.
            ("message.timeout.ms", timeout_ms.as_str()),
            ("request.timeout.ms", timeout_ms.as_str()),
            // Same key, same partition as the Java client (and kafka-python).
            ("partitioner", "murmur2_random"),
            // A relay batch is queued at once and then waited for: lingering would only add
            // its time to every batch.
            ("linger.ms", "0"),
            // Come back quickly after a broker restart.
            ("reconnect.backoff.ms", "100"),
            ("reconnect.backoff.max.ms", "1000"),
        ];
        self.with_overrides(&defaults)
    }

    /// A librdkafka client configuration with [`producer_settings`](Self::producer_settings):
    /// what [`KafkaPublisher`](crate::KafkaPublisher) uses, for a raw producer to compare with.
    pub fn producer_client_config(&self) -> ClientConfig {
        client_config(&self.producer_settings())
    }

    /// Properties for admin clients and consumers: the brokers and the overrides.
    pub(crate) fn client_settings(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut all = vec![("bootstrap.servers", self.brokers.as_str())];
        all.extend_from_slice(defaults);
        client_config(&self.with_overrides(&all))
    }

    fn with_overrides(&self, defaults: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = defaults
            .iter()
            .filter(|(k, _)| !self.settings.iter().any(|(s, _)| s == k))
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        out.extend(self.settings.iter().cloned());
        out
    }
}

fn client_config(settings: &[(String, String)]) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (k, v) in settings {
        config.set(k, v);
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get<'a>(settings: &'a [(String, String)], key: &str) -> Option<&'a str> {
        settings
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn overrides_replace_defaults_once() {
        let config = KafkaConfig::new("b:1")
            .with_delivery_timeout(Duration::from_millis(1500))
            .set("linger.ms", "20")
            .set("linger.ms", "30")
            .set("client.id", "x");
        let settings = config.producer_settings();
        assert_eq!(get(&settings, "linger.ms"), Some("30"));
        assert_eq!(settings.iter().filter(|(k, _)| k == "linger.ms").count(), 1);
        assert_eq!(get(&settings, "message.timeout.ms"), Some("1500"));
        assert_eq!(get(&settings, "bootstrap.servers"), Some("b:1"));
        assert_eq!(get(&settings, "client.id"), Some("x"));
        assert_eq!(get(&settings, "acks"), Some("all"));
    }
}
