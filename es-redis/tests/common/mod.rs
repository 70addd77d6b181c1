//! Shared helpers for the es-redis integration tests.
#![allow(dead_code, unreachable_pub)]

use std::fmt::Write as _;

use es_redis::RedisStore;

/// A key prefix no other test (in this or a concurrent run) uses.
pub fn unique_prefix(name: &str) -> String {
    es_testkit::support::unique_name(&format!("t:{name}"), ':')
}

/// A store on the shared server (`REDIS_URL`) under a fresh prefix.
pub async fn store(name: &str) -> RedisStore {
    store_at(&es_test_support::redis_url(), name).await
}

/// A store on `url` under a fresh prefix.
pub async fn store_at(url: &str, name: &str) -> RedisStore {
    RedisStore::builder(url)
        .prefix(unique_prefix(name))
        .build()
        .await
        .unwrap_or_else(|e| panic!("cannot connect to Redis at {url}: {e}"))
}

/// A store on the shared server under a fresh prefix with `partitions` feed partitions (by
/// stream id, in the tagged layout).
pub async fn partitioned_store(name: &str, partitions: u32) -> RedisStore {
    let partitioning = es_core::Partitioning::new(partitions).expect("a valid partition count");
    store_with(
        name,
        RedisStore::builder(es_test_support::redis_url()).partitioning(partitioning),
    )
    .await
}

/// The store `builder` opens under a fresh prefix.
pub async fn store_with(name: &str, builder: es_redis::RedisStoreBuilder) -> RedisStore {
    builder
        .prefix(unique_prefix(name))
        .build()
        .await
        .unwrap_or_else(|e| panic!("cannot build the store: {e}"))
}

/// The rules of the `ACL SETUSER` line of the production recipe (docs/12-production.md): its
/// words after the user name, with `<password>` and `<prefix>` filled in.
pub fn documented_acl(user: &str, password: &str, prefix: &str) -> Vec<String> {
    const RECIPE: &str = include_str!("../../../docs/12-production.md");
    let line = RECIPE
        .lines()
        .find(|line| line.starts_with("ACL SETUSER <user>"))
        .expect("docs/12-production.md holds the `ACL SETUSER <user> ...` line");
    assert!(line.contains("~<prefix>:*"), "{line}");
    line.split_whitespace()
        .skip(3)
        .map(|word| {
            word.replace("<user>", user)
                .replace("<password>", password)
                .replace("<prefix>", prefix)
        })
        .collect()
}

/// `base` (`redis://host:port[/db]`, no credentials) with `user:password@` in front of the host.
pub fn url_with_user(base: &str, user: &str, password: &str) -> String {
    let (scheme, rest) = base.split_once("://").expect("a URL with a scheme");
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{user}:{password}@{rest}")
}

/// Runs `ACL SETUSER` on the server at `admin_url` with `rules` (the words after the user name).
pub async fn set_user(admin_url: &str, user: &str, rules: &[String]) {
    let client = es_redis::redis::Client::open(admin_url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut cmd = es_redis::redis::cmd("ACL");
    cmd.arg("SETUSER").arg(user).arg("reset");
    for rule in rules {
        cmd.arg(rule);
    }
    let _: () = cmd.query_async(&mut conn).await.unwrap();
}

/// The words of `rules` without `remove`.
pub fn without(rules: &[String], remove: &str) -> Vec<String> {
    let kept: Vec<String> = rules.iter().filter(|r| *r != remove).cloned().collect();
    assert_eq!(kept.len() + 1, rules.len(), "{remove} is not in {rules:?}");
    kept
}

/// A tracing subscriber that keeps every event as one line (`LEVEL target: message k=v ...`).
#[derive(Clone, Default)]
pub struct Capture {
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Capture {
    /// The events seen so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}{}", self.0);
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.0 = format!("{value}{}", self.0);
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let mut fields = Fields(String::new());
        span.record(&mut fields);
        self.lines
            .lock()
            .unwrap()
            .push(format!("SPAN {}:{}", span.metadata().name(), fields.0));
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing::span::Id, values: &tracing::span::Record<'_>) {
        let mut fields = Fields(String::new());
        values.record(&mut fields);
        self.lines
            .lock()
            .unwrap()
            .push(format!("SPAN RECORD{}", fields.0));
    }

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        let meta = event.metadata();
        self.lines.lock().unwrap().push(format!(
            "{} {}: {}",
            meta.level(),
            meta.target(),
            fields.0
        ));
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}

/// Appends one event to `stream` (expected at `version`) while a task waits for the next append:
/// the waiter is woken, so the store's head watcher works over the same kind of connection.
pub async fn append_wakes_a_waiter(store: &RedisStore, stream: &es_core::StreamId, version: u64) {
    use es_core::{AppendRequest, EventStore, ExpectedVersion, NewEvent};
    let head = store.head_position().await.unwrap();
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move { store.wait_for_append(head).await })
    };
    store
        .append(AppendRequest::new(
            stream.clone(),
            ExpectedVersion::Exact(version),
            vec![NewEvent::new("Deposited", 1, r#"{"amount":6}"#).unwrap()],
        ))
        .await
        .unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(10), waiter)
        .await
        .expect("woken by the append")
        .unwrap();
}

/// Sends `signal` (`STOP`, `CONT`, ...) to a server process the test started.
pub fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// Appends two events to `stream` (a new stream, then at version 1) and reads them back:
/// versions 1 and 2.
pub async fn append_two_and_read_back(
    store: &RedisStore,
    stream: &es_core::StreamId,
) -> Vec<es_core::RecordedEvent> {
    use es_core::{AppendRequest, EventStore, ExpectedVersion, NewEvent, ReadStream};
    use futures::TryStreamExt;
    for expected in [ExpectedVersion::NoStream, ExpectedVersion::Exact(1)] {
        store
            .append(AppendRequest::new(
                stream.clone(),
                expected,
                vec![NewEvent::new("Deposited", 1, r#"{"amount":5}"#).unwrap()],
            ))
            .await
            .unwrap();
    }
    let events: Vec<_> = store
        .read_stream(stream, ReadStream::forward())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(
        events.iter().map(|e| e.stream_version).collect::<Vec<_>>(),
        [1, 2]
    );
    events
}
