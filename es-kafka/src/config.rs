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
///
/// With the `tls` feature, `with_tls` and `with_sasl` set up encrypted and authenticated
/// connections (see `KafkaTls`, `KafkaSasl`, and the guide's production recipe,
/// `docs/12-production.md`).
///
/// Its `Debug` output shows the values of secret properties (passwords, private keys, OAuth
/// client secrets: every property librdkafka itself treats as sensitive, and any other whose
/// name mentions a password or a secret) as `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    brokers: String,
    delivery_timeout: Duration,
    max_message_bytes: usize,
    settings: Vec<(String, String)>,
    #[cfg(feature = "tls")]
    security: Security,
}

/// The typed TLS and SASL settings.
#[cfg(feature = "tls")]
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Security {
    tls: Option<crate::KafkaTls>,
    sasl: Option<crate::KafkaSasl>,
    sasl_without_tls: bool,
}

/// Properties [`KafkaConfig::with_tls`] and [`KafkaConfig::with_sasl`] own: setting one of them
/// with [`KafkaConfig::set`] as well is refused.
#[cfg(feature = "tls")]
const SECURITY_PROPERTIES: &[&str] = &[
    "security.protocol",
    "sasl.mechanism",
    "sasl.mechanisms",
    "sasl.username",
    "sasl.password",
    "ssl.ca.location",
    "ssl.ca.pem",
    "ssl.certificate.location",
    "ssl.certificate.pem",
    "ssl.key.location",
    "ssl.key.pem",
    "ssl.key.password",
    "enable.ssl.certificate.verification",
    "ssl.endpoint.identification.algorithm",
];

/// What `Debug` output and errors show instead of a secret.
pub(crate) const REDACTED: &str = "***";

/// The properties librdkafka marks as sensitive (it redacts them in its own debug output), plus
/// the Java client's trust store password that some configurations carry over.
const SECRET_PROPERTIES: &[&str] = &[
    "sasl.username",
    "sasl.password",
    "sasl.oauthbearer.config",
    "sasl.oauthbearer.client.secret",
    "sasl.oauthbearer.assertion.private.key.file",
    "sasl.oauthbearer.assertion.private.key.passphrase",
    "sasl.oauthbearer.assertion.private.key.pem",
    "ssl.key.location",
    "ssl.key.password",
    "ssl.key.pem",
    "ssl_key",
    "ssl.ca.pem",
    "ssl.keystore.password",
    "ssl.truststore.password",
];

/// Whether the value of librdkafka property `key` is a secret that `Debug` output and errors
/// must not show.
pub(crate) fn is_secret(key: &str) -> bool {
    let key = key.trim().to_ascii_lowercase();
    SECRET_PROPERTIES.contains(&key.as_str())
        || key.contains("password")
        || key.contains("passphrase")
        || key.contains("secret")
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        struct Settings<'a>(&'a [(String, String)]);
        impl std::fmt::Debug for Settings<'_> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_map()
                    .entries(self.0.iter().map(|(key, value)| {
                        let value = if is_secret(key) {
                            REDACTED
                        } else {
                            value.as_str()
                        };
                        (key, value)
                    }))
                    .finish()
            }
        }
        let mut out = f.debug_struct("KafkaConfig");
        out.field("brokers", &self.brokers)
            .field("delivery_timeout", &self.delivery_timeout)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("settings", &Settings(&self.settings));
        #[cfg(feature = "tls")]
        out.field("tls", &self.security.tls)
            .field("sasl", &self.security.sasl)
            .field("sasl_without_tls", &self.security.sasl_without_tls);
        out.finish()
    }
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
            #[cfg(feature = "tls")]
            security: Security::default(),
        }
    }

    /// Connects to the brokers over TLS, verifying their certificates and host names (see
    /// [`KafkaTls`](crate::KafkaTls)).
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn with_tls(mut self, tls: crate::KafkaTls) -> Self {
        self.security.tls = Some(tls);
        self
    }

    /// Authenticates to the brokers with SASL (see [`KafkaSasl`](crate::KafkaSasl)); together
    /// with [`with_tls`](Self::with_tls) (`SASL_SSL`), or refused unless
    /// [`allow_sasl_without_tls`](Self::allow_sasl_without_tls) says otherwise.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn with_sasl(mut self, sasl: crate::KafkaSasl) -> Self {
        self.security.sasl = Some(sasl);
        self
    }

    /// Allows SCRAM without TLS (`SASL_PLAINTEXT`): the password never crosses the network, but
    /// everything else does in plaintext, a listener can try passwords against the recorded
    /// exchange offline, and nothing proves the broker is the right one. For a trusted network
    /// only. `PLAIN` without TLS stays refused: it would send the password as it is.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn allow_sasl_without_tls(mut self) -> Self {
        self.security.sasl_without_tls = true;
        self
    }

    /// The TLS settings, if any.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn tls(&self) -> Option<&crate::KafkaTls> {
        self.security.tls.as_ref()
    }

    /// The SASL settings, if any.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn sasl(&self) -> Option<&crate::KafkaSasl> {
        self.security.sasl.as_ref()
    }

    /// Refuses settings that would send a password in plaintext, or turn the checks of
    /// [`with_tls`](Self::with_tls) off: called before any client is created.
    #[cfg(feature = "tls")]
    pub(crate) fn validate(&self) -> Result<(), crate::Error> {
        use crate::SaslMechanism;
        let invalid = |reason: String| Err(crate::Error::InvalidSetting { reason });
        let security = &self.security;
        if let (Some(sasl), None) = (&security.sasl, &security.tls) {
            if sasl.mechanism() == SaslMechanism::Plain {
                return invalid(
                    "SASL PLAIN without TLS would send the password in plaintext: add \
                     `with_tls`"
                        .to_owned(),
                );
            }
            if !security.sasl_without_tls {
                return invalid(format!(
                    "SASL {} without TLS sends everything but the password in plaintext: add \
                     `with_tls`, or call `allow_sasl_without_tls` on a trusted network",
                    sasl.mechanism()
                ));
            }
        }
        if security.tls.is_some() || security.sasl.is_some() {
            if let Some((key, _)) = self.settings.iter().find(|(key, _)| {
                SECURITY_PROPERTIES.contains(&key.trim().to_ascii_lowercase().as_str())
            }) {
                return invalid(format!(
                    "`{key}` is set with `set` as well as by `with_tls`/`with_sasl`, which own it"
                ));
            }
        }
        Ok(())
    }

    /// Nothing to refuse without the `tls` feature.
    #[cfg(not(feature = "tls"))]
    #[allow(clippy::unnecessary_wraps, clippy::unused_self)]
    pub(crate) fn validate(&self) -> Result<(), crate::Error> {
        Ok(())
    }

    /// The librdkafka properties of [`with_tls`](Self::with_tls) and
    /// [`with_sasl`](Self::with_sasl): none without the `tls` feature.
    #[cfg_attr(not(feature = "tls"), allow(clippy::unused_self))]
    fn security_properties(&self) -> Vec<(&'static str, String)> {
        #[cfg(feature = "tls")]
        {
            let security = &self.security;
            let protocol = match (&security.tls, &security.sasl) {
                (None, None) => return Vec::new(),
                (Some(_), None) => "SSL",
                (Some(_), Some(_)) => "SASL_SSL",
                (None, Some(_)) => "SASL_PLAINTEXT",
            };
            let mut out = vec![("security.protocol", protocol.to_owned())];
            if let Some(tls) = &security.tls {
                out.extend(tls.properties());
            }
            if let Some(sasl) = &security.sasl {
                out.extend(sasl.properties());
            }
            out
        }
        #[cfg(not(feature = "tls"))]
        Vec::new()
    }

    /// Every secret value in the settings (passwords, PEM keys, values of secret properties
    /// given to [`set`](Self::set)), for scrubbing text that librdkafka wrote.
    pub(crate) fn secret_values(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .settings
            .iter()
            .filter(|(key, value)| is_secret(key) && !value.is_empty())
            .map(|(_, value)| value.clone())
            .collect();
        #[cfg(feature = "tls")]
        {
            out.extend(self.security.tls.iter().flat_map(crate::KafkaTls::secrets));
            out.extend(
                self.security
                    .sasl
                    .iter()
                    .flat_map(crate::KafkaSasl::secrets),
            );
        }
        out.retain(|value| !value.is_empty());
        out
    }

    /// The `bootstrap.servers` list.
    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    /// How long a batch may wait for the broker's acknowledgements before
    /// [`publish`](es_core::Publisher::publish) fails and the relay sends it again (and
    /// librdkafka's `request.timeout.ms`). Default 5 s. The publisher keeps it itself, by
    /// closing the producer (see [`KafkaPublisher`](crate::KafkaPublisher), "Gapless");
    /// librdkafka's own `message.timeout.ms` is infinite.
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

    /// The effective producer properties: the defaults, the TLS and SASL properties, then
    /// [`set`](Self::set) overrides. The SASL password and private keys are among them, as
    /// they are: do not log the list.
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
            // No local time-out: a message timed out while a later one of its partition goes
            // on would leave a gap. The publisher keeps each batch's deadline itself, by
            // closing (purging) the whole producer.
            ("message.timeout.ms", "0"),
            ("request.timeout.ms", timeout_ms.as_str()),
            // Any other error that would leave a gap stops the producer instead.
            ("enable.gapless.guarantee", "true"),
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
    /// Its `Debug` output (rdkafka's) shows every value, passwords included.
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
        let overridden = |key: &str| self.settings.iter().any(|(s, _)| s == key);
        let mut out: Vec<(String, String)> = defaults
            .iter()
            .filter(|(k, _)| !overridden(k))
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        // `validate` refuses an override of these; a client is never created with one.
        out.extend(
            self.security_properties()
                .into_iter()
                .filter(|(k, _)| !overridden(k))
                .map(|(k, v)| (k.to_owned(), v)),
        );
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

    /// The value of `key` in `settings`.
    pub(super) fn get<'a>(settings: &'a [(String, String)], key: &str) -> Option<&'a str> {
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
        assert_eq!(get(&settings, "request.timeout.ms"), Some("1500"));
        assert_eq!(get(&settings, "message.timeout.ms"), Some("0"));
        assert_eq!(get(&settings, "enable.gapless.guarantee"), Some("true"));
        assert_eq!(get(&settings, "bootstrap.servers"), Some("b:1"));
        assert_eq!(get(&settings, "client.id"), Some("x"));
        assert_eq!(get(&settings, "acks"), Some("all"));
    }

    #[test]
    fn debug_output_hides_secret_properties() {
        let config = KafkaConfig::new("broker.example:9093")
            .set("security.protocol", "SASL_SSL")
            .set("sasl.mechanism", "PLAIN")
            .set("sasl.username", "relay-user-s3cret")
            .set("sasl.password", "pw-s3cret")
            .set("ssl.key.password", "key-s3cret")
            .set("ssl.key.pem", "-----BEGIN PRIVATE KEY----- pem-s3cret")
            .set("sasl.oauthbearer.client.secret", "oauth-s3cret")
            .set(
                "sasl.oauthbearer.config",
                "principal=x clientSecret=cfg-s3cret",
            )
            .set("some.future.password", "future-s3cret");
        let debug = format!("{config:?}");
        let pretty = format!("{config:#?}");
        for shown in [&debug, &pretty] {
            assert!(!shown.contains("s3cret"), "a secret is shown: {shown}");
            assert!(shown.contains("broker.example:9093"), "{shown}");
            assert!(shown.contains("SASL_SSL"), "{shown}");
            assert!(shown.contains("\"sasl.password\": \"***\""), "{shown}");
        }
    }

    #[test]
    fn client_errors_hide_refused_secret_values() {
        use rdkafka::error::KafkaError;
        use rdkafka::types::RDKafkaConfRes;

        let refused = |key: &str, value: &str| {
            crate::Error::client_scrubbed(
                "producer",
                KafkaError::ClientConfig(
                    RDKafkaConfRes::RD_KAFKA_CONF_INVALID,
                    format!("Invalid value \"{value}\" for configuration property \"{key}\""),
                    key.to_owned(),
                    value.to_owned(),
                ),
                &[],
            )
        };
        let err = refused("sasl.password", "pw-s3cret");
        for shown in [err.to_string(), format!("{err:?}")] {
            assert!(!shown.contains("s3cret"), "a secret is shown: {shown}");
            assert!(shown.contains("sasl.password"), "{shown}");
        }
        let source = std::error::Error::source(&err).map(ToString::to_string);
        assert!(source.is_some_and(|s| !s.contains("s3cret") && s.contains("***")));
        // A value that is not secret stays, so the error still says what was wrong.
        let err = refused("acks", "sometimes");
        assert!(err.to_string().contains("sometimes"), "{err}");
    }

    #[test]
    fn a_client_refusing_a_secret_property_does_not_show_it() {
        // Without TLS support librdkafka refuses the TLS key password; with it, it refuses a
        // client key that is no key. Either way the error shows no secret value.
        let config = if cfg!(feature = "tls") {
            KafkaConfig::new("127.0.0.1:9")
                .set("security.protocol", "SSL")
                .set("ssl.certificate.pem", "not a certificate")
                .set("ssl.key.pem", "not a key: key-s3cret")
        } else {
            KafkaConfig::new("127.0.0.1:9").set("ssl.key.password", "key-s3cret")
        };
        let err = crate::TopicConsumer::subscribe(&config, "topic", "group")
            .expect_err("librdkafka refuses the setting");
        let shown = format!("{err} / {err:?}");
        assert!(!shown.contains("s3cret"), "a secret is shown: {shown}");
        assert!(
            shown.contains("cannot create the Kafka consumer"),
            "{shown}"
        );
        if cfg!(not(feature = "tls")) {
            assert!(shown.contains("ssl.key.password"), "{shown}");
        }
    }
}

#[cfg(all(test, feature = "tls"))]
mod tls_tests {
    use super::tests::get;
    use super::*;
    use crate::{Error, KafkaSasl, KafkaTls};

    #[test]
    fn the_protocol_follows_what_is_set() {
        let tls = || KafkaTls::new().with_ca_file("/ca.pem");
        let sasl = || KafkaSasl::scram_sha_256("u", "p");
        let protocol = |config: KafkaConfig| {
            get(&config.producer_settings(), "security.protocol").map(str::to_owned)
        };
        assert_eq!(protocol(KafkaConfig::new("b:1")), None);
        assert_eq!(
            protocol(KafkaConfig::new("b:1").with_tls(tls())).as_deref(),
            Some("SSL")
        );
        let both = KafkaConfig::new("b:1").with_tls(tls()).with_sasl(sasl());
        assert_eq!(protocol(both.clone()).as_deref(), Some("SASL_SSL"));
        let settings = both.producer_settings();
        assert_eq!(get(&settings, "sasl.mechanism"), Some("SCRAM-SHA-256"));
        assert_eq!(get(&settings, "ssl.ca.location"), Some("/ca.pem"));
        assert_eq!(
            get(&settings, "ssl.endpoint.identification.algorithm"),
            Some("https")
        );
        let plaintext = KafkaConfig::new("b:1")
            .with_sasl(sasl())
            .allow_sasl_without_tls();
        assert_eq!(
            protocol(plaintext.clone()).as_deref(),
            Some("SASL_PLAINTEXT")
        );
        assert!(plaintext.validate().is_ok());
    }

    #[test]
    fn sasl_without_tls_is_refused_unless_allowed_and_never_for_plain() {
        let scram = KafkaConfig::new("b:1").with_sasl(KafkaSasl::scram_sha_512("u", "pw-s3cret"));
        let err = scram
            .validate()
            .expect_err("SCRAM without TLS is refused by default");
        assert!(matches!(err, Error::InvalidSetting { .. }), "{err:?}");
        assert!(err.to_string().contains("allow_sasl_without_tls"), "{err}");
        let plain = KafkaConfig::new("b:1")
            .with_sasl(KafkaSasl::plain("u", "pw-s3cret"))
            .allow_sasl_without_tls();
        let err = plain
            .validate()
            .expect_err("PLAIN without TLS is always refused");
        assert!(err.to_string().contains("PLAIN"), "{err}");
        for shown in [format!("{err}"), format!("{err:?}"), format!("{plain:?}")] {
            assert!(!shown.contains("s3cret"), "a secret is shown: {shown}");
        }
        // The refusal comes before any client is created.
        let err = crate::KafkaPublisher::new(scram).expect_err("refused");
        assert!(matches!(err, Error::InvalidSetting { .. }), "{err:?}");
    }

    #[test]
    fn raw_settings_cannot_undo_the_typed_ones() {
        let tls = || KafkaConfig::new("b:1").with_tls(KafkaTls::new());
        for (key, value) in [
            ("security.protocol", "PLAINTEXT"),
            ("enable.ssl.certificate.verification", "false"),
            ("ssl.endpoint.identification.algorithm", "none"),
            ("ssl.ca.location", "/other.pem"),
            ("sasl.password", "pw-s3cret"),
        ] {
            let config = tls().set(key, value);
            let err = config.validate().expect_err(key);
            assert!(matches!(err, Error::InvalidSetting { .. }), "{err:?}");
            assert!(err.to_string().contains(key), "{err}");
            assert!(!format!("{err} {err:?}").contains("s3cret"), "{err:?}");
            let err = crate::TopicConsumer::subscribe(&config, "t", "g").expect_err(key);
            assert!(matches!(err, Error::InvalidSetting { .. }), "{err:?}");
        }
        // Other TLS properties stay available.
        assert!(tls()
            .set("ssl.cipher.suites", "TLS_AES_128_GCM_SHA256")
            .validate()
            .is_ok());
    }

    #[test]
    fn debug_output_of_a_secured_config_hides_the_secrets() {
        let config = KafkaConfig::new("kafka.internal:9093")
            .with_tls(
                KafkaTls::new()
                    .with_ca_pem("-----BEGIN CERTIFICATE----- ca")
                    .with_client_certificate_pem("cert", "-----BEGIN PRIVATE KEY----- key-s3cret")
                    .with_key_password("keypw-s3cret"),
            )
            .with_sasl(KafkaSasl::scram_sha_512("user-s3cret", "pw-s3cret"));
        for shown in [format!("{config:?}"), format!("{config:#?}")] {
            assert!(!shown.contains("s3cret"), "a secret is shown: {shown}");
            assert!(shown.contains("kafka.internal:9093") && shown.contains("ScramSha512"));
        }
        let secrets = config.secret_values();
        assert!(secrets.iter().any(|s| s == "pw-s3cret"));
        assert!(secrets.iter().any(|s| s == "keypw-s3cret"));
        assert!(secrets.iter().any(|s| s.contains("key-s3cret")));
    }
}
