//! Shared helpers for the es-postgres integration tests: a fresh schema per store.
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use es_core::projection::HandlerError;
use es_core::RecordedEvent;
use es_postgres::PgStore;
use futures::future::BoxFuture;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::AssertSqlSafe;
use sqlx::PgConnection;

/// A schema name no other test (in this or a concurrent run) uses.
pub fn unique_schema(prefix: &str) -> String {
    es_testkit::support::unique_name(&format!("t_{prefix}"), '_')
}

/// A pool on `url` sized for the concurrency tests.
pub async fn pool(url: &str, max: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(5))
        .test_before_acquire(false)
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"))
}

/// A store on a fresh schema of the shared server (`DATABASE_URL`).
pub async fn fresh_store() -> PgStore {
    let url = es_test_support::database_url();
    store_on(&url, &unique_schema("s")).await
}

/// A store on `schema` of the server at `url`.
pub async fn store_on(url: &str, schema: &str) -> PgStore {
    PgStore::builder(pool(url, 24).await)
        .schema(schema)
        .poll_interval(Duration::from_millis(200))
        .build()
        .await
        .unwrap_or_else(|e| panic!("cannot build the store on schema {schema}: {e}"))
}

/// The login role the least-privilege tests run stores as: no right of its own, only what
/// `es_postgres::grants_script` gives it per schema. Created once per server (roles are
/// cluster-wide); creating it twice at once is harmless.
pub const APP_ROLE: &str = "es_test_app";

/// `url` with its user replaced by `role` (the test servers trust loopback connections).
pub fn url_as(url: &str, role: &str) -> String {
    let mut parsed = url::Url::parse(url).unwrap_or_else(|e| panic!("bad DATABASE_URL {url}: {e}"));
    parsed
        .set_username(role)
        .unwrap_or_else(|()| panic!("cannot set the user of {url}"));
    parsed.to_string()
}

/// Creates [`APP_ROLE`] if missing and grants it what a store on `schema` needs.
pub async fn grant_app_role(admin: &PgPool, schema: &str) {
    sqlx::raw_sql(AssertSqlSafe(format!(
        "DO $$ BEGIN CREATE ROLE {APP_ROLE} LOGIN; \
         EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;\n{}",
        es_postgres::grants_script(schema, APP_ROLE).expect("valid names")
    )))
    .execute(admin)
    .await
    .unwrap_or_else(|e| panic!("cannot grant {APP_ROLE} on {schema}: {e}"));
}

/// A store on a fresh schema, migrated by the server's superuser, run by [`APP_ROLE`] with only
/// the grants of `es_postgres::grants_script` and the builder's default settings.
pub async fn restricted_store() -> PgStore {
    let url = es_test_support::database_url();
    let schema = unique_schema("lp");
    let admin = pool(&url, 2).await;
    store_on(&url, &schema).await;
    grant_app_role(&admin, &schema).await;
    store_on(&url_as(&url, APP_ROLE), &schema).await
}

/// An inline projection that sleeps `stall` on events of type `Slow` (in the client, the
/// transaction idle), runs `pg_sleep` for as long on `SqlSlow` (in the server), and fails on
/// `Refused`.
pub fn slow_or_refusing(
    stall: Duration,
) -> impl for<'c> Fn(
    &'c mut PgConnection,
    &'c [RecordedEvent],
) -> BoxFuture<'c, Result<(), HandlerError>>
       + Send
       + Sync
       + 'static {
    move |conn, events| {
        Box::pin(async move {
            for e in events {
                match e.event_type.as_str() {
                    "Slow" => tokio::time::sleep(stall).await,
                    "SqlSlow" => {
                        sqlx::query("SELECT pg_sleep($1)")
                            .bind(stall.as_secs_f64())
                            .execute(&mut *conn)
                            .await?;
                    }
                    "Refused" => return Err(format!("refusing {}", e.event_id).into()),
                    _ => {}
                }
            }
            Ok(())
        })
    }
}

/// A store with `partitioning` on a fresh schema of the shared server (`DATABASE_URL`).
pub async fn fresh_partitioned_store(partitioning: es_core::Partitioning) -> PgStore {
    let url = es_test_support::database_url();
    let schema = unique_schema("p");
    PgStore::builder(pool(&url, 24).await)
        .schema(schema.as_str())
        .partitioning(partitioning)
        .poll_interval(Duration::from_millis(200))
        .build()
        .await
        .unwrap_or_else(|e| panic!("cannot build the store on schema {schema}: {e}"))
}

/// Collects what a subscription to every partition (from position 0 of each) delivers, until
/// dropped.
pub struct Recorder {
    seen: std::sync::Arc<tokio::sync::Mutex<Vec<RecordedEvent>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    pub fn start(store: &PgStore) -> Self {
        use es_core::EventStore;
        use futures::StreamExt;

        let seen = std::sync::Arc::new(tokio::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&seen);
        let from = es_core::FeedPosition::start(&store.partitioning());
        let mut feed = store.subscribe_all(&from, es_core::EventFilter::all());
        let task = tokio::spawn(async move {
            while let Some(event) = feed.next().await {
                sink.lock()
                    .await
                    .push(event.expect("the subscription does not fail"));
            }
        });
        Self { seen, task }
    }

    /// Waits (at most `patience`) until what it delivered satisfies `done`, then returns it;
    /// fails the test naming `what` otherwise.
    pub async fn until(
        &self,
        what: &str,
        patience: Duration,
        done: impl Fn(&[RecordedEvent]) -> bool,
    ) -> Vec<RecordedEvent> {
        tokio::time::timeout(patience, async {
            loop {
                {
                    let seen = self.seen.lock().await;
                    if done(&seen) {
                        return seen.clone();
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{what} within {patience:?}"))
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}
