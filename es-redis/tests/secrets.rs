//! Connection URLs never show their password: not in `Debug` output, not in errors, not in
//! tracing fields. Against a server of its own that requires a password. The store logs one line
//! of the server settings it runs under when it is built.

use std::time::Duration;

use es_core::{AppendRequest, EventStore, ExpectedVersion, NewEvent, StreamId};
use es_redis::{Error, RedisStore};
use es_testkit::support::everything_shown;

mod common;

const PASSWORD: &str = "s3cret-pw";

#[test]
fn builder_debug_output_does_not_show_the_password() {
    for (url, visible) in [
        (
            "redis://relay:s3cret-pw@cache.example.invalid:6380/2",
            "redis://relay:***@cache.example.invalid:6380/2",
        ),
        (
            "rediss://:s3cret-pw@cache.example.invalid",
            "rediss://:***@cache.example.invalid",
        ),
        (
            "redis+unix:///run/redis.sock?db=1&pass=s3cret-pw",
            "redis+unix:///run/redis.sock?db=1&pass=***",
        ),
    ] {
        let builder = RedisStore::builder(url).prefix("billing");
        for shown in [format!("{builder:?}"), format!("{builder:#?}")] {
            assert!(!shown.contains("s3cret"), "the password is shown: {shown}");
            assert!(shown.contains(visible), "{shown}");
            assert!(shown.contains("billing"), "{shown}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_a_password_is_used_without_showing_it() {
    let dir = es_test_support::scratch_dir("redis-password");
    let server = es_test_support::RedisServer::start(
        &dir,
        &["--appendonly", "yes", "--requirepass", PASSWORD],
    )
    .expect("start redis-server");
    let port = server.port();

    // The right password: the store works, and neither it nor its builder shows the password.
    let url = format!("redis://:{PASSWORD}@127.0.0.1:{port}");
    let builder = RedisStore::builder(url.as_str()).prefix("secrets");
    assert!(!format!("{builder:?}").contains(PASSWORD));
    let store = builder.build().await.expect("the right password");
    assert!(!format!("{store:?}").contains(PASSWORD), "{store:?}");
    let stream = StreamId::new("account", "1").unwrap();
    let event = NewEvent::new("Opened", 1, "{}").unwrap();
    store
        .append(AppendRequest::new(
            stream,
            ExpectedVersion::NoStream,
            vec![event],
        ))
        .await
        .unwrap();

    // A wrong password: refused, and the error shows the server but neither password.
    let wrong = "wrong-s3cret-pw";
    let err = RedisStore::builder(format!("redis://:{wrong}@127.0.0.1:{port}"))
        .connect_timeout(Duration::from_secs(1))
        .build()
        .await
        .expect_err("a wrong password");
    assert!(
        matches!(&err, Error::Connect { url: Some(_), .. }),
        "{err:?}"
    );
    let shown = everything_shown(&err);
    assert!(!shown.contains("s3cret"), "a password is shown: {shown}");
    assert!(
        shown.contains(&format!("redis://:***@127.0.0.1:{port}")),
        "{shown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_errors_do_not_show_the_password() {
    // Nothing listens on the port.
    let port = es_test_support::free_port().unwrap();
    let err = RedisStore::builder(format!("redis://relay:{PASSWORD}@127.0.0.1:{port}/0"))
        .connect_timeout(Duration::from_millis(200))
        .build()
        .await
        .expect_err("nothing listens there");
    assert!(matches!(&err, Error::Connect { .. }), "{err:?}");
    let shown = everything_shown(&err);
    assert!(!shown.contains("s3cret"), "the password is shown: {shown}");
    assert!(
        shown.contains(&format!("redis://relay:***@127.0.0.1:{port}/0")),
        "{shown}"
    );

    // URLs the redis crate refuses: shown without the password, or not at all if they do not
    // parse as URLs.
    for (url, visible) in [
        (
            "redis://:s3cret-pw@127.0.0.1:6379/not-a-number",
            Some("redis://:***@127.0.0.1:6379/not-a-number"),
        ),
        (
            "http://:s3cret-pw@127.0.0.1:6379",
            Some("http://:***@127.0.0.1:6379"),
        ),
        ("redis://:s3cret-pw@127.0.0.1:notaport", None),
    ] {
        let err = RedisStore::connect(url).await.expect_err("an invalid URL");
        assert!(matches!(&err, Error::InvalidUrl { .. }), "{url}: {err:?}");
        let shown = everything_shown(&err);
        assert!(!shown.contains("s3cret"), "the password is shown: {shown}");
        if let Some(visible) = visible {
            assert!(shown.contains(visible), "{shown}");
        }
    }
}

#[cfg(feature = "tls")]
#[test]
fn tls_settings_do_not_show_the_client_key() {
    let key = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1zM2NyZXQ=\n-----END PRIVATE KEY-----\n";
    let builder = RedisStore::builder("rediss://app:s3cret-pw@cache.example.invalid")
        .tls_root_certificates("-----BEGIN CERTIFICATE-----\nQ0E=\n-----END CERTIFICATE-----\n")
        .tls_client_certificate(
            "-----BEGIN CERTIFICATE-----\nY2xpZW50\n-----END CERTIFICATE-----\n",
            key,
        );
    for shown in [format!("{builder:?}"), format!("{builder:#?}")] {
        assert!(!shown.contains("s3cret"), "a secret is shown: {shown}");
        assert!(!shown.contains("c2VjcmV0"), "the key is shown: {shown}");
        assert!(!shown.contains("PRIVATE KEY"), "the key is shown: {shown}");
        assert!(shown.contains("client_key: \"***\""), "{shown}");
        assert!(shown.contains("root_certificates: \"set\""), "{shown}");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_build_logs_one_line_of_what_it_runs_under_without_the_password() {
    let dir = es_test_support::scratch_dir("redis-log-line");
    let server = es_test_support::RedisServer::start(
        &dir,
        &[
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--requirepass",
            PASSWORD,
        ],
    )
    .expect("start redis-server");
    let port = server.port();
    let capture = common::Capture::default();
    let _guard = tracing::subscriber::set_default(capture.clone());

    let url = format!("redis://:{PASSWORD}@127.0.0.1:{port}/0");
    let store = RedisStore::builder(url.as_str())
        .prefix("logged")
        .build()
        .await
        .expect("the right password");
    let stream = StreamId::new("account", "7").unwrap();
    let event = NewEvent::new("Opened", 1, "{}").unwrap();
    store
        .append(AppendRequest::new(
            stream,
            ExpectedVersion::NoStream,
            vec![event],
        ))
        .await
        .unwrap();
    let _ = RedisStore::builder(format!("redis://:wrong-s3cret-pw@127.0.0.1:{port}/0"))
        .connect_timeout(Duration::from_secs(1))
        .build()
        .await
        .expect_err("a wrong password");
    drop(store);

    let lines = capture.lines();
    for line in &lines {
        assert!(!line.contains("s3cret"), "a password is logged: {line}");
    }
    let settings: Vec<&String> = lines
        .iter()
        .filter(|line| line.contains("Redis store on"))
        .collect();
    assert_eq!(settings.len(), 1, "one line per build: {lines:#?}");
    let line = settings[0];
    for expected in [
        "INFO es_redis: Redis store on Redis 7.",
        "appendonly yes, appendfsync always",
        "RDB snapshots off",
        "maxmemory-policy noeviction",
        "prefix=logged",
        &format!("url=redis://:***@127.0.0.1:{port}/0"),
        "tls=false",
    ] {
        assert!(line.contains(expected), "`{expected}` missing from: {line}");
    }
}

#[cfg(feature = "sentinel")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_urls_do_not_show_their_passwords() {
    let builder = RedisStore::builder("redis://app:s3cret-pw@unused/0")
        .sentinels(
            "shop",
            [
                "redis://:s3cret-sentinel@10.0.0.1:26379",
                "redis://watcher:s3cret-sentinel@10.0.0.2:26379",
            ],
        )
        .min_replicas_acked(1, Duration::from_secs(1));
    for shown in [format!("{builder:?}"), format!("{builder:#?}")] {
        assert!(!shown.contains("s3cret"), "a password is shown: {shown}");
        assert!(shown.contains("redis://:***@10.0.0.1:26379"), "{shown}");
        assert!(
            shown.contains("redis://watcher:***@10.0.0.2:26379"),
            "{shown}"
        );
    }

    // No sentinel answers: the error shows neither password.
    let port = es_test_support::free_port().unwrap();
    let err = RedisStore::builder(format!("redis://app:{PASSWORD}@unused/0"))
        .sentinels(
            "shop",
            [format!("redis://:s3cret-sentinel@127.0.0.1:{port}")],
        )
        .connect_timeout(Duration::from_millis(200))
        .build()
        .await
        .expect_err("no sentinel listens");
    assert!(matches!(&err, Error::Connect { .. }), "{err:?}");
    let shown = everything_shown(&err);
    assert!(!shown.contains("s3cret"), "a password is shown: {shown}");
}
