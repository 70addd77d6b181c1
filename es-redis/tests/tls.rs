//! `rediss://` against a redis-server that accepts only TLS (`port 0`, `tls-port`), with
//! certificates the test makes with `openssl`: the right CA works (with and without a client
//! certificate); a wrong CA, the system's CAs, a certificate for another host name and the ways
//! to turn the checks off are typed errors, and nothing falls back to plaintext.
#![cfg(feature = "tls")]

mod common;

use std::path::Path;
use std::time::Duration;

use es_core::{EventStore, StreamId};
use es_redis::{Error, RedisStore};
use es_test_support::{RedisServer, TestCerts};
use es_testkit::support::everything_shown;

const PASSWORD: &str = "tls-s3cret-pw";

fn pem(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

fn certs(name: &str) -> TestCerts {
    TestCerts::generate(&es_test_support::scratch_dir(name).join("certs"))
        .expect("make test certificates")
}

fn tls_server(name: &str, certs: &TestCerts) -> RedisServer {
    let dir = es_test_support::scratch_dir(name);
    RedisServer::start_tls(
        &dir,
        certs,
        &["--appendonly", "yes", "--requirepass", PASSWORD],
    )
    .expect("start redis-server with TLS")
}

/// `rediss://:<password>@127.0.0.1:<port>`.
fn url(server: &RedisServer) -> String {
    format!("rediss://:{PASSWORD}@127.0.0.1:{}", server.port())
}

fn assert_tls_error(err: &Error, port: u16) {
    let Error::Tls { url, .. } = err else {
        panic!("expected Error::Tls, got {err:?}");
    };
    assert_eq!(url, &format!("rediss://:***@127.0.0.1:{port}"));
    let shown = everything_shown(err);
    assert!(!shown.contains("s3cret"), "the password is shown: {shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_works_over_tls_with_the_right_ca() {
    let certs = certs("tls-ok");
    let server = tls_server("redis-tls-ok", &certs);
    let store = RedisStore::builder(url(&server))
        .prefix("tls")
        .tls_root_certificates(pem(&certs.ca_cert))
        .build()
        .await
        .expect("TLS with the test CA");
    let stream = StreamId::new("account", "1").unwrap();
    let events = common::append_two_and_read_back(&store, &stream).await;
    assert_eq!(events.len(), 2);
    let shown = format!("{store:?}");
    assert!(!shown.contains("s3cret"), "{shown}");

    // A subscriber's head watcher and the settings monitor use TLS connections too.
    common::append_wakes_a_waiter(&store, &stream, 2).await;

    // With a client certificate as well (the server asks for one and checks it).
    let store = RedisStore::builder(url(&server))
        .prefix("tls")
        .tls_root_certificates(pem(&certs.ca_cert))
        .tls_client_certificate(pem(&certs.client_cert), pem(&certs.client_key))
        .build()
        .await
        .expect("TLS with a client certificate");
    assert_eq!(store.stream_version(&stream).await.unwrap(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_or_host_name_is_a_typed_error_never_plaintext() {
    let certs = certs("tls-bad");
    let server = tls_server("redis-tls-bad", &certs);
    let port = server.port();
    let build = |builder: es_redis::RedisStoreBuilder| async move {
        builder
            .connect_timeout(Duration::from_secs(2))
            .build()
            .await
            .expect_err("must not connect")
    };

    // A CA that did not sign the server's certificate.
    let err =
        build(RedisStore::builder(url(&server)).tls_root_certificates(pem(&certs.other_ca_cert)))
            .await;
    assert_tls_error(&err, port);

    // The system's CAs, which do not hold the test CA.
    let err = build(RedisStore::builder(url(&server))).await;
    assert_tls_error(&err, port);

    // Plaintext to the TLS port: the server takes the command for a broken handshake and
    // closes the connection; the store reports a connection error, not a success.
    let err = build(RedisStore::builder(format!(
        "redis://:{PASSWORD}@127.0.0.1:{port}"
    )))
    .await;
    assert!(
        matches!(err, Error::Connect { .. } | Error::Tls { .. }),
        "{err:?}"
    );

    // The ways to turn the checks off are refused before connecting.
    let err = build(
        RedisStore::builder(format!("{}/#insecure", url(&server)))
            .tls_root_certificates(pem(&certs.ca_cert)),
    )
    .await;
    assert!(matches!(err, Error::InvalidSetting(_)), "{err:?}");
    let err = build(
        RedisStore::builder(format!("redis://:{PASSWORD}@127.0.0.1:{port}"))
            .tls_root_certificates(pem(&certs.ca_cert)),
    )
    .await;
    assert!(matches!(err, Error::InvalidSetting(_)), "{err:?}");
    assert!(!everything_shown(&err).contains("s3cret"));

    // A certificate the right CA signed, for another host name.
    let wrong_host = TestCerts {
        server_cert: certs.wrong_host_cert.clone(),
        server_key: certs.wrong_host_key.clone(),
        ..certs.clone()
    };
    let other = tls_server("redis-tls-host", &wrong_host);
    let err =
        build(RedisStore::builder(url(&other)).tls_root_certificates(pem(&certs.ca_cert))).await;
    assert_tls_error(&err, other.port());

    // No failed attempt sent a command, the password with it: the first connection that
    // verifies the server is the only one the server saw authenticate.
    let client = es_redis::redis::Client::build_with_tls(
        url(&server),
        es_redis::redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem(&certs.ca_cert)),
        },
    )
    .unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let stats: String = es_redis::redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(stats.contains("cmdstat_auth:calls=1,"), "{stats}");
}
