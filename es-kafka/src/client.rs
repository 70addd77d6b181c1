//! Creating librdkafka clients, and checking that they can talk to the brokers.
//!
//! Every client of this crate is created here, after [`KafkaConfig::validate`], with a
//! [`Context`] that logs librdkafka's errors through `tracing` (secrets scrubbed) and remembers
//! the last TLS or SASL failure, so that a failed connection becomes [`Error::Tls`] or
//! [`Error::Authentication`] rather than a time-out.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::FromClientConfigAndContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::ClientConfig;

use crate::config::{KafkaConfig, REDACTED};
use crate::error::Error;

/// How long [`check_connection`] waits for a broker to answer.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a connection failed, as librdkafka reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Tls,
    Authentication,
}

impl Failure {
    fn of(code: RDKafkaErrorCode) -> Option<Self> {
        use RDKafkaErrorCode as C;
        match code {
            C::SSL => Some(Self::Tls),
            C::Authentication
            | C::SaslAuthenticationFailed
            | C::UnsupportedSASLMechanism
            | C::IllegalSASLState => Some(Self::Authentication),
            _ => None,
        }
    }
}

/// The context of every client of this crate.
pub(crate) struct Context {
    brokers: String,
    secrets: Vec<String>,
    /// The last TLS or SASL failure, with librdkafka's reason (scrubbed).
    failure: Mutex<Option<(Failure, String)>>,
    /// The last error of any kind (scrubbed).
    last: Mutex<Option<String>>,
}

impl Context {
    fn new(config: &KafkaConfig) -> Self {
        Self {
            brokers: config.brokers().to_owned(),
            secrets: config.secret_values(),
            failure: Mutex::new(None),
            last: Mutex::new(None),
        }
    }

    /// `text` with every secret value of the settings replaced by `***`.
    fn scrub(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for secret in &self.secrets {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), REDACTED);
            }
        }
        out
    }

    /// The TLS or SASL failure librdkafka reported last, as this crate's error.
    pub(crate) fn security_error(&self) -> Option<Error> {
        let failure = self
            .failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        failure.map(|(failure, reason)| {
            let brokers = self.brokers.clone();
            match failure {
                Failure::Tls => Error::Tls { brokers, reason },
                Failure::Authentication => Error::Authentication { brokers, reason },
            }
        })
    }

    /// An error for `code` if it is a TLS or SASL failure: the reason librdkafka gave last.
    pub(crate) fn security_error_for(&self, code: Option<RDKafkaErrorCode>) -> Option<Error> {
        code.and_then(Failure::of)?;
        self.security_error()
    }

    fn last_reason(&self) -> Option<String> {
        self.last
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl ClientContext for Context {
    fn error(&self, error: KafkaError, reason: &str) {
        let reason = self.scrub(reason);
        let code = error.rdkafka_error_code();
        tracing::warn!(brokers = %self.brokers, code = ?code, %reason, "Kafka client error");
        if let Some(failure) = code.and_then(Failure::of) {
            *self.failure.lock().unwrap_or_else(PoisonError::into_inner) =
                Some((failure, reason.clone()));
        }
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        // "1/1 brokers are down" follows the error that says why: keep that one.
        if code != Some(RDKafkaErrorCode::AllBrokersDown) || last.is_none() {
            *last = Some(reason);
        }
    }
}

impl ConsumerContext for Context {}

/// Creates a client (`what`: "producer", "consumer", "admin client") with `settings`, once the
/// configuration passed [`KafkaConfig::validate`].
pub(crate) fn create<T>(
    config: &KafkaConfig,
    what: &'static str,
    settings: &ClientConfig,
) -> Result<T, Error>
where
    T: FromClientConfigAndContext<Context>,
{
    create_with(config, what, settings, |context| context)
}

/// [`create`] with the [`Context`] wrapped by `wrap` (a producer's context around it).
pub(crate) fn create_with<T, C>(
    config: &KafkaConfig,
    what: &'static str,
    settings: &ClientConfig,
    wrap: impl FnOnce(Context) -> C,
) -> Result<T, Error>
where
    C: ClientContext,
    T: FromClientConfigAndContext<C>,
{
    config.validate()?;
    let context = Context::new(config);
    let secrets = context.secrets.clone();
    settings
        .create_with_context(wrap(context))
        .map_err(|source| Error::client_scrubbed(what, source, &secrets))
}

/// Checks that the brokers of `config` can be talked to with its settings: a broker answers a
/// metadata request within 30 s, over TLS with a verified certificate and host name and
/// authenticated by SASL when the configuration says so.
///
/// Fails with [`Error::Tls`] when the TLS handshake fails (a certificate that does not chain to
/// the trusted CAs, or is not valid for the host name; nothing is then sent in plaintext), with
/// [`Error::Authentication`] when SASL fails (wrong user or password, a mechanism the broker
/// does not offer), with [`Error::Unreachable`] when no broker answered, and with
/// [`Error::InvalidSetting`] or [`Error::Client`] for settings refused before connecting.
///
/// [`KafkaPublisher::connect`](crate::KafkaPublisher::connect) and
/// [`TopicConsumer::connect`](crate::TopicConsumer::connect) run it first;
/// [`ensure_topic`](crate::ensure_topic), [`partition_count`](crate::partition_count) and
/// [`read_topic`](crate::read_topic) fail the same way.
pub async fn check_connection(config: &KafkaConfig) -> Result<(), Error> {
    let client: BaseConsumer<Context> = create(config, "consumer", &config.client_settings(&[]))?;
    let blocking = tokio::task::spawn_blocking(move || wait_connected(&client, CONNECT_TIMEOUT));
    blocking
        .await
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic.into_panic()))
}

/// Blocks until a broker answers `client`'s metadata request, a TLS or SASL failure was
/// reported, or `timeout` passed.
pub(crate) fn wait_connected(
    client: &BaseConsumer<Context>,
    timeout: Duration,
) -> Result<(), Error> {
    let start = Instant::now();
    loop {
        let step = timeout
            .saturating_sub(start.elapsed())
            .min(Duration::from_millis(500));
        let answered = client
            .fetch_metadata(None, step)
            .is_ok_and(|metadata| !metadata.brokers().is_empty());
        // Serve the queued events: librdkafka's errors reach the context this way.
        while client.poll(Duration::ZERO).is_some() {}
        if let Some(error) = client.context().security_error() {
            return Err(error);
        }
        if answered {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(Error::Unreachable {
                brokers: client.context().brokers.clone(),
                timeout,
                reason: client.context().last_reason(),
            });
        }
    }
}
