//! Building a store from a URL alone (schema and pool settings without a `sqlx` dependency), and
//! connection URLs that never show their password: not in `Debug` output, not in errors; and what
//! the store reports of the server it runs on.

mod common;

use std::time::Duration;

use es_core::{AppendRequest, EventStore, ExpectedVersion, NewEvent, StreamId};
use es_postgres::{Error, PgStore};
use es_testkit::support::everything_shown;

/// `url` with `password` as its password (the test server trusts every local connection, so
/// any password is accepted).
fn with_password(url: &str, password: &str) -> String {
    let mut url = url::Url::parse(url).unwrap();
    url.set_password(Some(password)).unwrap();
    url.to_string()
}

#[tokio::test]
async fn a_store_on_a_custom_schema_is_built_from_a_url_alone() {
    let url = es_test_support::database_url();
    let schema = common::unique_schema("url");
    let store = PgStore::builder_from_url(url.as_str())
        .schema(schema.as_str())
        .max_connections(6)
        .acquire_timeout(Duration::from_secs(3))
        .writers(2)
        .poll_interval(Duration::from_millis(200))
        .build()
        .await
        .unwrap_or_else(|e| panic!("cannot build a store from {url}: {e}"));
    assert_eq!(store.schema().as_str(), schema);

    let stream = StreamId::new("account", "1").unwrap();
    let event = NewEvent::new("Opened", 1, r#"{"owner":"ada"}"#).unwrap();
    let result = store
        .append(AppendRequest::new(
            stream.clone(),
            ExpectedVersion::NoStream,
            vec![event],
        ))
        .await
        .unwrap();
    assert_eq!(result.stream_version, 1);

    // The event is in the chosen schema, read through the re-exported sqlx.
    let stored: i64 = es_postgres::sqlx::query_scalar(es_postgres::sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM \"{}\".events WHERE stream_id = $1",
        store.schema().as_str()
    )))
    .bind(stream.as_str())
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(stored, 1);
    // The pool is the one the builder sized.
    assert_eq!(store.pool().options().get_max_connections(), 6);
}

#[tokio::test]
async fn connect_uses_the_default_schema() {
    let store = PgStore::connect(&es_test_support::database_url())
        .await
        .unwrap();
    assert_eq!(store.schema().as_str(), es_postgres::DEFAULT_SCHEMA);
    assert_eq!(
        store.pool().options().get_max_connections(),
        es_postgres::DEFAULT_MAX_CONNECTIONS
    );
}

#[tokio::test]
async fn pool_settings_on_a_given_pool_are_refused() {
    let url = es_test_support::database_url();
    let pool = common::pool(&url, 4).await;
    for builder in [
        PgStore::builder(pool.clone()).max_connections(8),
        PgStore::builder(pool.clone()).acquire_timeout(Duration::from_secs(1)),
    ] {
        match builder.build().await {
            Err(Error::InvalidSetting(reason)) => assert!(reason.contains("pool"), "{reason}"),
            other => panic!("expected Error::InvalidSetting, got {other:?}"),
        }
    }
    match PgStore::builder_from_url(url)
        .max_connections(0)
        .build()
        .await
    {
        Err(Error::InvalidSetting(reason)) => assert!(reason.contains("at least 1"), "{reason}"),
        other => panic!("expected Error::InvalidSetting, got {other:?}"),
    }
}

#[tokio::test]
async fn debug_output_does_not_show_the_password() {
    let builder = PgStore::builder_from_url("postgres://app:s3cret-pw@db.example.invalid:5432/app")
        .schema("billing");
    for shown in [format!("{builder:?}"), format!("{builder:#?}")] {
        assert!(!shown.contains("s3cret"), "the password is shown: {shown}");
        assert!(
            shown.contains("postgres://app:***@db.example.invalid:5432/app"),
            "{shown}"
        );
        assert!(shown.contains("billing"), "{shown}");
    }

    let builder = PgStore::builder_from_url(
        "postgres://app@db.example.invalid/app?password=s3cret-pw&sslmode=prefer",
    );
    let shown = format!("{builder:?}");
    assert!(!shown.contains("s3cret"), "the password is shown: {shown}");
    assert!(shown.contains("db.example.invalid"), "{shown}");
    assert!(shown.contains("sslmode=prefer"), "{shown}");

    // A store built from a URL with a password, and the builder that made it.
    let url = with_password(&es_test_support::database_url(), "s3cret-pw");
    let builder = PgStore::builder_from_url(url.as_str()).schema(common::unique_schema("dbg"));
    let builder_shown = format!("{builder:?}");
    let store = builder.build().await.unwrap();
    let store_shown = format!("{store:?}");
    for shown in [builder_shown, store_shown] {
        assert!(!shown.contains("s3cret"), "the password is shown: {shown}");
    }
}

#[tokio::test]
async fn connection_errors_do_not_show_the_password() {
    // Nothing listens on the port: the error names the server, not the password.
    let port = es_test_support::free_port().unwrap();
    let url = format!("postgres://app:s3cret-pw@127.0.0.1:{port}/app");
    for result in [
        PgStore::connect(&url).await,
        PgStore::builder_from_url(url.as_str())
            .schema("billing")
            .build()
            .await,
    ] {
        let err = result.expect_err("nothing listens there");
        assert!(
            matches!(&err, Error::Connect { url: Some(_), .. }),
            "{err:?}"
        );
        let shown = everything_shown(&err);
        assert!(!shown.contains("s3cret"), "the password is shown: {shown}");
        assert!(
            shown.contains(&format!("postgres://app:***@127.0.0.1:{port}/app")),
            "{shown}"
        );
    }

    // A URL that does not parse is not shown at all (where its password ends cannot be told);
    // one with a setting sqlx refuses is shown without its password.
    for url in [
        "postgres://app:s3cret-pw@127.0.0.1:notaport/app",
        "postgres://app@127.0.0.1/app?sslmode=bogus&password=s3cret-pw",
    ] {
        for err in [
            PgStore::connect(url).await.expect_err("an invalid URL"),
            PgStore::connect_options(url).expect_err("an invalid URL"),
        ] {
            assert!(matches!(&err, Error::Connect { .. }), "{err:?}");
            let shown = everything_shown(&err);
            assert!(!shown.contains("s3cret"), "the password is shown: {shown}");
        }
    }
}

#[tokio::test]
async fn the_store_reports_what_the_server_runs_under() {
    let url = es_test_support::database_url();
    let store = common::store_on(&url, &common::unique_schema("srv")).await;
    let server = store.server();
    assert!(server.version.starts_with("15"), "{server:?}");
    assert_eq!(server.role, "postgres");
    assert!(!server.tls && server.tls_version.is_none(), "{server:?}");
    assert_eq!(
        (server.fsync.as_str(), server.synchronous_commit.as_str()),
        ("on", "on")
    );
    assert!(server.durable());

    // Sessions that acknowledge commits before they are flushed: reported, and not durable.
    let options = PgStore::connect_options(&url)
        .unwrap()
        .options([("synchronous_commit", "off")]);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .unwrap();
    let store = PgStore::builder(pool)
        .schema(common::unique_schema("srv"))
        .build()
        .await
        .unwrap();
    assert_eq!(store.server().synchronous_commit, "off");
    assert!(!store.server().durable(), "{:?}", store.server());
}
