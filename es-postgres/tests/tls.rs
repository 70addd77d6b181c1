//! TLS to PostgreSQL: a server with `ssl=on` and a certificate from a CA the test makes; the
//! store verifies the chain and the host name, and never falls back to plaintext when told to
//! require TLS.

use std::path::{Path, PathBuf};

use es_core::{AppendRequest, EventStore, ExpectedVersion, NewEvent, StreamId};
use es_postgres::{Error, PgStore};
use es_test_support::{scratch_dir, PgServer, TestCerts};

/// A PostgreSQL server with `ssl=on` serving `cert`/`key`, and the test certificates.
struct TlsServer {
    server: PgServer,
    certs: TestCerts,
}

impl TlsServer {
    /// A server whose certificate names `localhost` and `127.0.0.1`.
    fn start() -> Self {
        Self::start_with(|certs| (certs.server_cert.clone(), certs.server_key.clone()))
    }

    /// A server whose certificate names only another host.
    fn start_for_another_host() -> Self {
        Self::start_with(|certs| (certs.wrong_host_cert.clone(), certs.wrong_host_key.clone()))
    }

    fn start_with(pick: impl Fn(&TestCerts) -> (PathBuf, PathBuf)) -> Self {
        let dir = scratch_dir("pg-tls");
        let certs = TestCerts::generate(&dir.join("certs"))
            .unwrap_or_else(|e| panic!("cannot make the test certificates: {e}"));
        let (cert, key) = pick(&certs);
        let server = PgServer::start_tls(&dir.join("pg"), &cert, &key)
            .unwrap_or_else(|e| panic!("cannot start PostgreSQL with TLS: {e}"));
        Self { server, certs }
    }

    fn url(&self, host: &str, mode: &str, ca: &Path) -> String {
        format!(
            "postgres://postgres@{host}:{}/postgres?sslmode={mode}&sslrootcert={}",
            self.server.port(),
            ca.display()
        )
    }
}

async fn build(url: &str, require_tls: bool) -> Result<PgStore, Error> {
    PgStore::builder_from_url(url)
        .max_connections(4)
        .require_tls(require_tls)
        .build()
        .await
}

#[tokio::test]
async fn verify_full_connects_encrypted_and_appends() {
    let tls = TlsServer::start();
    let store = build(
        &tls.url("localhost", "verify-full", &tls.certs.ca_cert),
        true,
    )
    .await
    .unwrap_or_else(|e| panic!("verify-full with the right CA failed: {e}"));
    assert!(store.server().tls, "{:?}", store.server());
    assert!(store
        .server()
        .tls_version
        .as_deref()
        .is_some_and(|v| v.starts_with("TLSv1.")));
    let stream = StreamId::new("account", "tls-1").unwrap();
    let done = store
        .append(AppendRequest::new(
            stream,
            ExpectedVersion::NoStream,
            vec![NewEvent::new("Opened", 1, "{}").unwrap()],
        ))
        .await
        .unwrap();
    assert_eq!(done.stream_version, 1);
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let tls = TlsServer::start();
    for mode in ["verify-full", "verify-ca"] {
        match build(&tls.url("localhost", mode, &tls.certs.other_ca_cert), false).await {
            Err(Error::Connect { source, .. }) => {
                let text = format!("{source:?}").to_lowercase();
                assert!(
                    text.contains("certificate") || text.contains("issuer"),
                    "{text}"
                );
            }
            other => panic!("{mode} with a foreign CA: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_certificate_for_another_host_name_is_refused() {
    let tls = TlsServer::start_for_another_host();
    // The certificate names `redis.invalid`; the URL names localhost.
    match build(
        &tls.url("localhost", "verify-full", &tls.certs.ca_cert),
        false,
    )
    .await
    {
        Err(Error::Connect { source, .. }) => {
            let text = format!("{source:?}").to_lowercase();
            assert!(
                text.contains("name") || text.contains("certificate"),
                "{text}"
            );
        }
        other => panic!("verify-full with the wrong host name: {other:?}"),
    }
    // verify-ca checks the chain only, and connects.
    let store = build(&tls.url("localhost", "verify-ca", &tls.certs.ca_cert), true)
        .await
        .unwrap();
    assert!(store.server().tls);
}

#[tokio::test]
async fn required_tls_never_falls_back_to_plaintext() {
    // The shared test server runs without TLS.
    let plain = es_test_support::database_url();
    let sep = if plain.contains('?') { '&' } else { '?' };

    // A URL that allows plaintext is refused before connecting.
    for mode in ["disable", "allow", "prefer"] {
        let url = format!("{plain}{sep}sslmode={mode}");
        assert!(
            matches!(build(&url, true).await, Err(Error::TlsRequired { .. })),
            "sslmode={mode} was accepted with require_tls"
        );
    }
    assert!(matches!(
        build(&plain, true).await,
        Err(Error::TlsRequired { .. })
    ));

    // `sslmode=require` on a server without TLS fails to connect, typed.
    let url = format!("{plain}{sep}sslmode=require");
    assert!(matches!(
        build(&url, true).await,
        Err(Error::Connect { .. })
    ));

    // A pool of the caller's that ended up in plaintext is refused after connecting.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&format!("{plain}{sep}sslmode=prefer"))
        .await
        .unwrap();
    assert!(matches!(
        PgStore::builder(pool).require_tls(true).build().await,
        Err(Error::TlsRequired { .. })
    ));

    // Without require_tls, the same URL runs in plaintext, and the store says so.
    let store = build(&format!("{plain}{sep}sslmode=prefer"), false)
        .await
        .unwrap();
    assert!(!store.server().tls);
}
