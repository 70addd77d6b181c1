//! TLS and SASL/SCRAM against a real broker on loopback, with certificates the tests make with
//! `openssl` (`TestCerts`: a CA, a server certificate for `localhost` and `127.0.0.1`, one for
//! another host name, a client certificate, an unrelated CA).
//!
//! The broker is tansu 0.6.0. It cannot serve TLS itself (its `--cert` and `--key` exclude each
//! other, and the acceptor it would build is never used), so TLS is served by `socat` in front
//! of it, which tansu advertises: every connection the clients make is TLS, verified against the
//! test CA and the host name. SASL/SCRAM (SHA-256 and SHA-512) is tansu's own.
//!
//! What is tried: publishing and consuming (publisher, consumer-group member, whole-topic
//! reader, the relay end to end) over TLS with verification, with a client certificate, and
//! with SCRAM over TLS; a wrong CA, the system's CAs, a certificate for another host name, a
//! missing client certificate and TLS to a plaintext listener are `Error::Tls`; a wrong
//! password, an unknown user, the wrong SCRAM mechanism and `PLAIN` (which tansu does not
//! offer) are `Error::Authentication`; SCRAM without TLS needs the explicit opt-in and `PLAIN`
//! without TLS is refused; no error, `Debug` output or tracing event shows a password.
#![cfg(feature = "tls")]

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use es_core::{Metadata, OutboxMessage, OutboxRecord, StreamId};
use es_kafka::{testing, Error, KafkaConfig, KafkaPublisher, KafkaSasl, KafkaTls, TopicConsumer};
use es_memory::InMemoryStore;
use es_test_support::{KafkaBroker, KafkaSecurity, Scram, ScramUser, TestCerts};
use es_testkit::support::everything_shown;
use uuid::Uuid;

const PATIENCE: Duration = Duration::from_secs(60);

fn certs(name: &str) -> TestCerts {
    TestCerts::generate(&es_test_support::scratch_dir(name).join("certs"))
        .expect("make test certificates")
}

fn broker(name: &str, security: &KafkaSecurity) -> KafkaBroker {
    KafkaBroker::start_secured(&es_test_support::scratch_dir(name), security)
        .unwrap_or_else(|e| panic!("start a tansu broker ({name}): {e}"))
}

/// A broker behind a TLS front serving `cert` and `key`.
fn tls_broker(name: &str, cert: &std::path::Path, key: &std::path::Path) -> KafkaBroker {
    broker(
        name,
        &KafkaSecurity {
            tls: Some((cert.to_owned(), key.to_owned())),
            ..KafkaSecurity::default()
        },
    )
}

fn user(name: &str, password: &str, mechanism: Scram) -> ScramUser {
    ScramUser {
        name: name.to_owned(),
        password: password.to_owned(),
        mechanism,
    }
}

fn trusting_the_test_ca(certs: &TestCerts) -> KafkaTls {
    KafkaTls::new().with_ca_file(&certs.ca_cert)
}

fn record(position: u64, topic: &str) -> OutboxRecord {
    OutboxRecord {
        position,
        stream_id: StreamId::new("ledger", "tls").expect("a stream id"),
        recorded_at: chrono::Utc::now(),
        message: OutboxMessage {
            message_id: Uuid::now_v7(),
            source_event_id: Uuid::now_v7(),
            topic: topic.to_owned(),
            key: "ledger-tls".into(),
            message_type: "ledger.moved".into(),
            schema_version: 1,
            payload: format!("{{\"n\":{position}}}").into(),
            metadata: Metadata::new(),
        },
    }
}

/// Creates a topic, publishes five records with a connected publisher, and reads them back
/// with a connected consumer-group member and with the whole-topic reader.
async fn publish_and_read(config: &KafkaConfig, what: &str) {
    let topic = testing::unique_topic("tls");
    es_kafka::ensure_topic(config, &topic, 1)
        .await
        .unwrap_or_else(|e| panic!("{what}: create the topic: {e}"));
    let publisher = KafkaPublisher::connect(config.clone())
        .await
        .unwrap_or_else(|e| panic!("{what}: connect the publisher: {e}"));
    let records: Vec<OutboxRecord> = (1..=5).map(|n| record(n, &topic)).collect();
    publisher
        .send(&records)
        .await
        .unwrap_or_else(|e| panic!("{what}: publish: {e}"));
    let sent: Vec<Uuid> = records.iter().map(|r| r.message.message_id).collect();

    let group = format!("tls-{}", Uuid::now_v7().simple());
    let consumer = TopicConsumer::connect(config, &topic, &group)
        .await
        .unwrap_or_else(|e| panic!("{what}: connect the consumer: {e}"));
    let got = consumer
        .recv_until(PATIENCE, |got| got.len() >= sent.len())
        .await
        .unwrap_or_else(|e| panic!("{what}: consume: {e}"));
    let got: Vec<Uuid> = got
        .iter()
        .filter_map(es_kafka::ConsumedMessage::message_id)
        .collect();
    assert_eq!(
        got, sent,
        "{what}: the consumer group read what was published"
    );

    let all = es_kafka::read_topic(config, &topic, PATIENCE)
        .await
        .unwrap_or_else(|e| panic!("{what}: read the topic: {e}"));
    let all: Vec<Uuid> = all
        .iter()
        .filter_map(es_kafka::ConsumedMessage::message_id)
        .collect();
    assert_eq!(all, sent, "{what}: the topic holds what was published");
}

/// Every way of connecting fails with a TLS error that shows no secret.
async fn assert_every_client_fails_tls(config: &KafkaConfig, what: &str) {
    let topic = testing::unique_topic("tls-refused");
    let errors = [
        es_kafka::check_connection(config).await.err(),
        KafkaPublisher::connect(config.clone()).await.err(),
        TopicConsumer::connect(config, &topic, "g").await.err(),
        es_kafka::ensure_topic(config, &topic, 1).await.err(),
        es_kafka::read_topic(config, &topic, PATIENCE).await.err(),
    ];
    for err in errors {
        let err = err.unwrap_or_else(|| panic!("{what}: a client connected"));
        assert!(
            matches!(&err, Error::Tls { brokers, .. } if *brokers == config.brokers()),
            "{what}: expected Error::Tls, got {err:?}"
        );
        let shown = everything_shown(&err);
        assert!(
            !shown.contains("s3cret"),
            "{what}: a secret is shown: {shown}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publishes_and_consumes_over_tls_with_verification() {
    let certs = certs("kafka-tls-ok");
    let broker = tls_broker("kafka-tls-ok", &certs.server_cert, &certs.server_key);
    let port = broker.client_port();
    let by_ip =
        KafkaConfig::new(format!("127.0.0.1:{port}")).with_tls(trusting_the_test_ca(&certs));
    publish_and_read(&by_ip, "TLS to 127.0.0.1, CA file").await;

    let ca_pem = std::fs::read_to_string(&certs.ca_cert).unwrap();
    let by_name =
        KafkaConfig::new(format!("localhost:{port}")).with_tls(KafkaTls::new().with_ca_pem(ca_pem));
    publish_and_read(&by_name, "TLS to localhost, CA PEM").await;

    // The relay end to end: store -> outbox -> relay -> broker -> consumer group.
    let delivery =
        testing::relay_delivers_every_message_in_order(InMemoryStore::new(), by_ip).await;
    eprintln!("{delivery}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_certificate_is_presented_when_the_broker_asks() {
    let certs = certs("kafka-mtls");
    let broker = broker(
        "kafka-mtls",
        &KafkaSecurity {
            tls: Some((certs.server_cert.clone(), certs.server_key.clone())),
            client_ca: Some(certs.ca_cert.clone()),
            ..KafkaSecurity::default()
        },
    );
    let with_cert = KafkaConfig::new(broker.brokers()).with_tls(
        trusting_the_test_ca(&certs)
            .with_client_certificate_files(&certs.client_cert, &certs.client_key),
    );
    publish_and_read(&with_cert, "TLS with a client certificate").await;

    let key_pem = std::fs::read_to_string(&certs.client_key).unwrap();
    let cert_pem = std::fs::read_to_string(&certs.client_cert).unwrap();
    let with_pem = KafkaConfig::new(broker.brokers()).with_tls(
        trusting_the_test_ca(&certs).with_client_certificate_pem(cert_pem, key_pem.clone()),
    );
    es_kafka::check_connection(&with_pem)
        .await
        .expect("TLS with a client certificate given as PEM");
    assert!(
        !format!("{with_pem:?}").contains(key_pem.trim()),
        "the key is shown"
    );

    // Under TLS 1.3 the broker checks the client's certificate after the client finished its
    // handshake, and closes the connection with an alert: librdkafka reports a receive
    // failure, not a TLS one, so no broker answers and the reason carries the alert.
    let without_cert = KafkaConfig::new(broker.brokers()).with_tls(trusting_the_test_ca(&certs));
    let err = es_kafka::check_connection(&without_cert)
        .await
        .expect_err("no client certificate");
    let Error::Unreachable { reason, .. } = &err else {
        panic!("no client certificate: expected Error::Unreachable, got {err:?}");
    };
    assert!(
        reason
            .as_deref()
            .is_some_and(|r| r.contains("certificate required")),
        "the reason names the broker's alert: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_certificate_from_another_ca_is_a_tls_error() {
    let certs = certs("kafka-tls-ca");
    let broker = tls_broker("kafka-tls-ca", &certs.server_cert, &certs.server_key);
    let other_ca = KafkaConfig::new(broker.brokers())
        .with_tls(KafkaTls::new().with_ca_file(&certs.other_ca_cert));
    assert_every_client_fails_tls(&other_ca, "another CA").await;
    // A consumer that subscribed without checking gets the error from `recv`.
    let consumer = TopicConsumer::subscribe(&other_ca, &testing::unique_topic("tls"), "g")
        .expect("subscribing does not connect");
    let err = consumer
        .recv(PATIENCE)
        .await
        .expect_err("no message over a failed handshake");
    assert!(matches!(err, Error::Tls { .. }), "recv: {err:?}");
    // A publisher made with `new` connects in the background: its records are not
    // acknowledged, and never sent in plaintext.
    let publisher = KafkaPublisher::new(
        other_ca
            .clone()
            .with_delivery_timeout(Duration::from_secs(2)),
    )
    .expect("new does not connect");
    let err = publisher
        .send(&[record(1, &testing::unique_topic("tls"))])
        .await
        .expect_err("not acknowledged over a failed handshake");
    assert!(matches!(err, Error::Delivery { .. }), "send: {err:?}");
    // The system's CAs do not hold the test CA either.
    let system = KafkaConfig::new(broker.brokers()).with_tls(KafkaTls::new());
    let err = es_kafka::check_connection(&system)
        .await
        .expect_err("system CAs");
    assert!(matches!(err, Error::Tls { .. }), "system CAs: {err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_certificate_for_another_host_name_is_a_tls_error() {
    let certs = certs("kafka-tls-host");
    // Signed by the right CA, for `redis.invalid` only.
    let broker = tls_broker(
        "kafka-tls-host",
        &certs.wrong_host_cert,
        &certs.wrong_host_key,
    );
    for host in ["127.0.0.1", "localhost"] {
        let config = KafkaConfig::new(format!("{host}:{}", broker.client_port()))
            .with_tls(trusting_the_test_ca(&certs));
        assert_every_client_fails_tls(&config, &format!("a certificate for another host ({host})"))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_to_a_plaintext_listener_is_an_error_not_a_fallback() {
    let certs = certs("kafka-tls-plain");
    let broker = broker("kafka-tls-plain", &KafkaSecurity::default());
    // The broker answers in plaintext only: a TLS client must not talk to it.
    let config = KafkaConfig::new(broker.brokers())
        .with_tls(trusting_the_test_ca(&certs))
        .set("socket.connection.setup.timeout.ms", "5000");
    // Had the client fallen back to plaintext, the broker would have answered. It waits for
    // a Kafka request instead of the TLS handshake, so the client gives up on the handshake
    // (`socket.connection.setup.timeout.ms`) and no broker answers.
    let err = es_kafka::check_connection(&config)
        .await
        .expect_err("TLS to a plaintext listener");
    assert!(
        matches!(err, Error::Unreachable { .. }),
        "expected Error::Unreachable, got {err:?}"
    );
    // The same listener answers a plaintext client: it was there all along.
    es_kafka::check_connection(&KafkaConfig::new(broker.brokers()))
        .await
        .expect("plaintext to the plaintext listener");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scram_over_tls_publishes_and_consumes() {
    let certs = certs("kafka-scram-tls");
    let broker = broker(
        "kafka-scram-tls",
        &KafkaSecurity {
            tls: Some((certs.server_cert.clone(), certs.server_key.clone())),
            users: vec![
                user("relay-256", "pw-256-s3cret", Scram::Sha256),
                user("relay-512", "pw-512-s3cret", Scram::Sha512),
            ],
            ..KafkaSecurity::default()
        },
    );
    let config = |sasl: KafkaSasl| {
        KafkaConfig::new(broker.brokers())
            .with_tls(trusting_the_test_ca(&certs))
            .with_sasl(sasl)
    };
    let sha256 = config(KafkaSasl::scram_sha_256("relay-256", "pw-256-s3cret"));
    publish_and_read(&sha256, "SCRAM-SHA-256 over TLS").await;
    let sha512 = config(KafkaSasl::scram_sha_512("relay-512", "pw-512-s3cret"));
    publish_and_read(&sha512, "SCRAM-SHA-512 over TLS").await;
    let delivery =
        testing::relay_delivers_every_message_in_order(InMemoryStore::new(), sha512).await;
    eprintln!("{delivery}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_credentials_are_an_authentication_error_that_shows_no_password() {
    let capture = Capture::default();
    tracing::subscriber::set_global_default(capture.clone()).expect("the only subscriber");
    let certs = certs("kafka-scram-bad");
    let broker = broker(
        "kafka-scram-bad",
        &KafkaSecurity {
            tls: Some((certs.server_cert.clone(), certs.server_key.clone())),
            users: vec![user("relay", "right-pw-s3cret", Scram::Sha512)],
            ..KafkaSecurity::default()
        },
    );
    let config = |sasl: KafkaSasl| {
        KafkaConfig::new(broker.brokers())
            .with_tls(trusting_the_test_ca(&certs))
            .with_sasl(sasl)
    };
    // The right credentials work, so the failures below are the credentials'.
    es_kafka::check_connection(&config(KafkaSasl::scram_sha_512(
        "relay",
        "right-pw-s3cret",
    )))
    .await
    .expect("the right password");

    let cases = [
        (
            "a wrong password",
            KafkaSasl::scram_sha_512("relay", "wrong-pw-s3cret"),
        ),
        (
            "an unknown user",
            KafkaSasl::scram_sha_512("nobody", "right-pw-s3cret"),
        ),
        // tansu stores one credential per user and mechanism: there is no SHA-256 one.
        (
            "the other SCRAM mechanism",
            KafkaSasl::scram_sha_256("relay", "right-pw-s3cret"),
        ),
        // tansu 0.6.0 offers SCRAM only.
        (
            "PLAIN, which tansu does not offer",
            KafkaSasl::plain("relay", "right-pw-s3cret"),
        ),
    ];
    for (what, sasl) in cases {
        let config = config(sasl);
        let topic = testing::unique_topic("scram-refused");
        let errors = [
            es_kafka::check_connection(&config).await.err(),
            KafkaPublisher::connect(config.clone()).await.err(),
            TopicConsumer::connect(&config, &topic, "g").await.err(),
            es_kafka::ensure_topic(&config, &topic, 1).await.err(),
        ];
        for err in errors {
            let err = err.unwrap_or_else(|| panic!("{what}: a client connected"));
            assert!(
                matches!(err, Error::Authentication { .. }),
                "{what}: expected Error::Authentication, got {err:?}"
            );
            let shown = everything_shown(&err);
            assert!(
                !shown.contains("pw-s3cret"),
                "{what}: the password is shown: {shown}"
            );
        }
        let shown = format!("{config:?} {config:#?}");
        assert!(
            !shown.contains("pw-s3cret"),
            "{what}: the password is shown: {shown}"
        );
    }

    let lines = capture.lines();
    assert!(
        lines.iter().any(|l| l.contains("Kafka client error")),
        "the failures were logged: {lines:#?}"
    );
    for line in &lines {
        assert!(
            !line.contains("pw-s3cret"),
            "a tracing event shows a password: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scram_without_tls_needs_the_opt_in_and_plain_never_goes_without() {
    let broker = broker(
        "kafka-scram-plaintext",
        &KafkaSecurity {
            users: vec![user("relay", "plain-pw-s3cret", Scram::Sha256)],
            ..KafkaSecurity::default()
        },
    );
    let scram = KafkaConfig::new(broker.brokers())
        .with_sasl(KafkaSasl::scram_sha_256("relay", "plain-pw-s3cret"));
    let err = KafkaPublisher::connect(scram.clone())
        .await
        .expect_err("SCRAM without TLS, not allowed");
    assert!(matches!(err, Error::InvalidSetting { .. }), "{err:?}");
    assert!(!everything_shown(&err).contains("s3cret"));

    publish_and_read(
        &scram.allow_sasl_without_tls(),
        "SCRAM-SHA-256 without TLS, allowed",
    )
    .await;

    let plain = KafkaConfig::new(broker.brokers())
        .with_sasl(KafkaSasl::plain("relay", "plain-pw-s3cret"))
        .allow_sasl_without_tls();
    let err = es_kafka::check_connection(&plain)
        .await
        .expect_err("PLAIN without TLS");
    assert!(matches!(err, Error::InvalidSetting { .. }), "{err:?}");
    assert!(!everything_shown(&err).contains("s3cret"));
}

/// A tracing subscriber that keeps every event and span as a line of text.
#[derive(Clone, Default)]
struct Capture {
    lines: Arc<Mutex<Vec<String>>>,
}

impl Capture {
    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    fn push(&self, line: String) {
        self.lines.lock().unwrap().push(line);
    }
}

/// The fields of an event or span, as `name=value` pairs.
#[derive(Default)]
struct Line(String);

impl tracing::field::Visit for Line {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, " {}={value:?}", field.name());
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let mut line = Line::default();
        span.record(&mut line);
        self.push(format!("span {}{}", span.metadata().name(), line.0));
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing::span::Id, values: &tracing::span::Record<'_>) {
        let mut line = Line::default();
        values.record(&mut line);
        self.push(format!("span record{}", line.0));
    }

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let mut line = Line::default();
        event.record(&mut line);
        self.push(format!(
            "{} {}:{}",
            event.metadata().level(),
            event.metadata().target(),
            line.0
        ));
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}
