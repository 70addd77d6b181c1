//! The metrics of `es_core::telemetry`, scraped over HTTP from the `/metrics` endpoint of
//! `es_cli::metrics` while a load runs in the same process (as an application that mounts the
//! endpoint would): commands and their conflicts, appends, a projection held behind and then let
//! go, and a relay that delivers and dead-letters. Each figure must move the way the load says.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use es_core::projection::{AtLeastOnce, HandlerError, Projection, ProjectionRunner, RunnerConfig};
use es_core::{
    AppendRequest, EventStore, ExpectedVersion, Metadata, NewEvent, OutboxMessage, OutboxRecord,
    PublishOutcome, Publisher, RecordedEvent, Relay, RelayConfig, Repository, StreamId,
};
use es_postgres::PgStore;
use es_testkit::domain::{Ledger, LedgerCommand};
use es_testkit::support::unique_name;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// Every sample of the endpoint's answer, by its series (`name{labels}`).
async fn scrape(addr: std::net::SocketAddr) -> BTreeMap<String, f64> {
    let mut conn = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the metrics endpoint: {e}"));
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut answer = String::new();
    conn.read_to_string(&mut answer)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer}"));
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    body.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The value of the one series named `name` whose labels include every `labels` pair.
fn value(samples: &BTreeMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .filter(|(series, _)| {
            let (n, rest) = series.split_once('{').unwrap_or((series.as_str(), ""));
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|(_, v)| *v)
        .next()
}

/// Scrapes until `done` holds, for at most 20 s; returns the last scrape.
async fn scrape_until(
    addr: std::net::SocketAddr,
    what: &str,
    done: impl Fn(&BTreeMap<String, f64>) -> bool,
) -> BTreeMap<String, f64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let samples = scrape(addr).await;
        if done(&samples) {
            return samples;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} never showed; last scrape: {samples:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A projection that handles nothing while its gate is closed.
#[derive(Clone)]
struct Gated {
    open: watch::Receiver<bool>,
}

impl Projection for Gated {
    fn name(&self) -> &'static str {
        "gated"
    }

    async fn handle(&mut self, _event: &RecordedEvent) -> Result<(), HandlerError> {
        self.open.wait_for(|open| *open).await?;
        Ok(())
    }

    async fn reset(&mut self) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// A projection whose every event fails.
struct Broken;

impl Projection for Broken {
    fn name(&self) -> &'static str {
        "broken"
    }

    async fn handle(&mut self, event: &RecordedEvent) -> Result<(), HandlerError> {
        Err(format!("cannot handle {}", event.global_position).into())
    }

    async fn reset(&mut self) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// Acknowledges every record except those of type `Poison`, which it rejects.
struct Broker;

#[derive(Debug)]
struct Refused;

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("poison is never published")
    }
}

impl std::error::Error for Refused {}

impl Publisher for Broker {
    type Error = Refused;

    async fn publish(&self, records: &[OutboxRecord]) -> Vec<PublishOutcome<Refused>> {
        records
            .iter()
            .map(|r| {
                if r.message.message_type == "Poison" {
                    PublishOutcome::Rejected(Refused)
                } else {
                    PublishOutcome::Acknowledged
                }
            })
            .collect()
    }
}

fn message(source: &NewEvent, stream: &StreamId, kind: &str) -> OutboxMessage {
    OutboxMessage {
        message_id: uuid::Uuid::now_v7(),
        source_event_id: source.event_id,
        topic: "events".to_owned(),
        key: stream.to_string(),
        message_type: kind.to_owned(),
        schema_version: 1,
        payload: Bytes::from_static(b"{}"),
        metadata: Metadata::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[allow(clippy::too_many_lines, clippy::cast_precision_loss, clippy::float_cmp)] // one load, scraped phase by phase; counts far below 2^52
async fn scraped_metrics_follow_the_load() {
    let handle = es_cli::metrics::install().unwrap_or_else(|e| panic!("{e}"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move { axum::serve(listener, es_cli::metrics::router(handle)).await });

    let url = es_test_support::database_url();
    let store = PgStore::builder_from_url(url.as_str())
        .schema(unique_name("t_metrics", '_').as_str())
        .build()
        .await
        .unwrap_or_else(|e| panic!("cannot build a store on {url}: {e}"));

    // Phase 1: commands. Two repositories (as two processes would) credit one ledger at once,
    // so some of their commands conflict and retry; every command ends well.
    let before = scrape(addr).await;
    assert_eq!(
        value(&before, "es_commands_total", &[("category", "ledger")]),
        None
    );
    let repos: Vec<Repository<PgStore>> = (0..2)
        .map(|_| {
            Repository::builder(store.clone())
                .build()
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
    repos[0]
        .execute::<Ledger>("hot", &LedgerCommand::Open)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let tasks: Vec<_> = (0..4)
        .map(|t| {
            let repo = repos[t % 2].clone();
            tokio::spawn(async move {
                let (mut ok, mut gave_up) = (0u32, 0u32);
                for _ in 0..25 {
                    match repo
                        .execute::<Ledger>("hot", &LedgerCommand::Credit(1))
                        .await
                    {
                        Ok(_) => ok += 1,
                        Err(es_core::RepositoryError::Conflict { .. }) => gave_up += 1,
                        Err(other) => panic!("{other}"),
                    }
                }
                (ok, gave_up)
            })
        })
        .collect();
    let (mut ok, mut gave_up) = (0, 0);
    for task in tasks {
        let (o, g) = task.await.unwrap_or_else(|e| panic!("{e}"));
        (ok, gave_up) = (ok + o, gave_up + g);
    }
    let rejected = repos[0]
        .execute::<Ledger>("hot", &LedgerCommand::Debit(1_000))
        .await;
    assert!(rejected.is_err(), "a debit beyond the balance went through");
    let after = scrape(addr).await;
    let counted = value(
        &after,
        "es_commands_total",
        &[("category", "ledger"), ("outcome", "ok")],
    );
    assert_eq!(counted, Some(f64::from(1 + ok)), "1 open and {ok} credits");
    let counted = value(
        &after,
        "es_commands_total",
        &[("category", "ledger"), ("outcome", "conflict")],
    );
    assert_eq!(
        counted.unwrap_or(0.0).to_bits(),
        f64::from(gave_up).to_bits(),
        "commands that gave up on conflicts: {counted:?} counted, {gave_up} seen"
    );
    let refused = value(
        &after,
        "es_commands_total",
        &[("category", "ledger"), ("outcome", "rejected")],
    );
    assert_eq!(refused, Some(1.0));
    let conflicts = value(
        &after,
        "es_command_conflicts_total",
        &[("category", "ledger")],
    )
    .unwrap_or(0.0);
    assert!(
        conflicts >= 1.0,
        "two repositories on one ledger never conflicted: {after:#?}"
    );
    let appends = value(&after, "es_append_seconds_count", &[]).unwrap_or(0.0);
    let events = value(&after, "es_append_events_sum", &[]).unwrap_or(0.0);
    assert!(
        appends >= 2.0 && appends <= 101.0 + conflicts,
        "append calls: {appends}"
    );
    assert!(events >= f64::from(1 + ok), "events appended: {events}");
    let timed = value(
        &after,
        "es_command_seconds_count",
        &[("category", "ledger")],
    );
    assert_eq!(
        timed,
        Some(102.0),
        "every command is timed, whatever its outcome"
    );

    // Phase 2: a projection held behind its feed: the lag shows the events it has not
    // handled and grows older; let go, it falls to 0 and the events are counted.
    let (open, gate) = watch::channel(false);
    let config = RunnerConfig {
        lag_every: Some(Duration::from_millis(100)),
        batch_size: 10,
        ..RunnerConfig::default()
    };
    let head = store
        .head_position()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let behind = es_core::contract::position::distance(0, head) as f64;
    let runner = ProjectionRunner::with_config(store.clone(), config)
        .spawn(AtLeastOnce::new(Gated { open: gate }, store.clone()));
    let lagging = scrape_until(addr, "the held projection's lag", |s| {
        value(s, "es_projection_lag_events", &[("projection", "gated")]) == Some(behind)
            && value(s, "es_projection_lag_seconds", &[("projection", "gated")]).unwrap_or(0.0)
                > 0.2
    })
    .await;
    assert_eq!(
        value(
            &lagging,
            "es_projection_events_total",
            &[("projection", "gated")]
        ),
        None
    );
    open.send_replace(true);
    let caught_up = scrape_until(addr, "the projection caught up", |s| {
        value(s, "es_projection_lag_events", &[("projection", "gated")]) == Some(0.0)
    })
    .await;
    assert_eq!(
        value(
            &caught_up,
            "es_projection_lag_seconds",
            &[("projection", "gated")]
        ),
        Some(0.0)
    );
    let handled = value(
        &caught_up,
        "es_projection_events_total",
        &[("projection", "gated")],
    );
    assert!(handled >= Some(behind), "handled {handled:?} of {behind}");
    runner.shutdown().await;

    // A projection stopped by a failure at its first event keeps reporting its whole lag.
    let broken = ProjectionRunner::with_config(
        store.clone(),
        RunnerConfig {
            max_attempts: 1,
            ..config
        },
    )
    .spawn(AtLeastOnce::new(Broken, store.clone()));
    let failed = scrape_until(addr, "the failed projection's lag", |s| {
        value(s, "es_projection_lag_events", &[("projection", "broken")]) == Some(behind)
            && value(s, "es_projection_lag_seconds", &[("projection", "broken")]).unwrap_or(0.0)
                > 0.2
    })
    .await;
    assert!(
        matches!(
            broken.status(),
            es_core::projection::ProjectionStatus::Failed(_)
        ),
        "the broken projection did not fail: {:?}",
        broken.status()
    );
    assert_eq!(
        value(
            &failed,
            "es_projection_events_total",
            &[("projection", "broken")]
        ),
        None
    );
    broken.shutdown().await;

    // Phase 3: the relay delivers 9 records and dead-letters the poisoned one.
    let stream = StreamId::new("doc", "relayed").unwrap_or_else(|e| panic!("{e}"));
    for i in 0..10u64 {
        let event = NewEvent::new("Noted", 1, "{}").unwrap_or_else(|e| panic!("{e}"));
        let kind = if i == 4 { "Poison" } else { "Noted" };
        let outbox = vec![message(&event, &stream, kind)];
        store
            .append(
                AppendRequest::new(stream.clone(), ExpectedVersion::Exact(i), vec![event])
                    .with_outbox(outbox),
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let relay = Relay::new(
        store.clone(),
        Broker,
        RelayConfig {
            backlog_every: Some(Duration::from_millis(100)),
            idle_poll: Duration::from_millis(50),
            ..RelayConfig::default()
        },
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(relay.run(async move {
        let _ = stopped.await;
    }));
    let relayed = scrape_until(addr, "the relay's figures", |s| {
        value(s, "es_relay_records_total", &[("outcome", "delivered")]) == Some(9.0)
            && value(s, "es_relay_records_total", &[("outcome", "dead_lettered")]) == Some(1.0)
            && value(s, "es_outbox_backlog", &[("outbox", "0")]) == Some(0.0)
            && value(s, "es_outbox_dead_letters", &[("outbox", "0")]) == Some(1.0)
    })
    .await;
    assert!(value(&relayed, "es_relay_batch_records_count", &[]).unwrap_or(0.0) >= 1.0);
    let _ = stop.send(());
    running
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"));
}
