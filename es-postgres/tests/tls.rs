//! TLS to PostgreSQL: a server with `ssl=on` and a certificate from a CA the test makes; the
//! store verifies the chain and the host name, and never falls back to plaintext when told to
//! require TLS.

use std::path::{Path, PathBuf};
use std::process::Command;

use es_core::{AppendRequest, EventStore, ExpectedVersion, NewEvent, StreamId};
use es_postgres::{Error, PgStore};
use es_test_support::PgServer;

/// Runs `openssl` with `args` in `dir`, or panics with its output.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run openssl ({e}): this test needs it, `apt-get install openssl`")
        });
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`<name>.pem`, `<name>.key`) in `dir`.
fn make_ca(dir: &Path, name: &str) -> PathBuf {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
        ],
    );
    dir.join(format!("{name}.pem"))
}

/// A server certificate for `localhost` only (not `127.0.0.1`), signed by CA `ca`: returns the
/// certificate and key PEM.
fn make_server_cert(dir: &Path, ca: &str) -> (Vec<u8>, Vec<u8>) {
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
    (
        std::fs::read(dir.join("server.crt")).unwrap(),
        std::fs::read(dir.join("server.key")).unwrap(),
    )
}

struct TlsServer {
    server: PgServer,
    ca: PathBuf,
    wrong_ca: PathBuf,
}

impl TlsServer {
    fn start() -> Self {
        let dir = es_test_support::scratch_dir("pg-tls");
        let certs = dir.join("certs");
        std::fs::create_dir_all(&certs).unwrap();
        let ca = make_ca(&certs, "es-test-ca");
        let wrong_ca = make_ca(&certs, "other-ca");
        let (cert, key) = make_server_cert(&certs, "es-test-ca");
        let server = PgServer::start_with_files(
            &dir.join("pg"),
            &[
                ("ssl", "on"),
                ("ssl_cert_file", "server.crt"),
                ("ssl_key_file", "server.key"),
            ],
            &[("server.crt", &cert), ("server.key", &key)],
        )
        .unwrap_or_else(|e| panic!("cannot start PostgreSQL with TLS: {e}"));
        Self {
            server,
            ca,
            wrong_ca,
        }
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
    let store = build(&tls.url("localhost", "verify-full", &tls.ca), true)
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
        match build(&tls.url("localhost", mode, &tls.wrong_ca), false).await {
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
    let tls = TlsServer::start();
    // The certificate names `localhost`; the URL names 127.0.0.1.
    match build(&tls.url("127.0.0.1", "verify-full", &tls.ca), false).await {
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
    let store = build(&tls.url("127.0.0.1", "verify-ca", &tls.ca), true)
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
