//! `es projections rebuild` of a projection registered through `es_cli::Registry`, on the real
//! PostgreSQL (`DATABASE_URL`) and Redis (`REDIS_URL`), each in a fresh schema or prefix:
//! interrupted mid-rebuild, then resumed; the read model ends with every event exactly once
//! and the checkpoint at the head. The run is in-process (`Registry::run`), with the interrupt
//! fired once the read model holds part of the feed; the binary's Ctrl-C wiring is tested in
//! `cli.rs`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use es_core::projection::HandlerError;
use es_core::{
    AppendRequest, EventStore, ExpectedVersion, NewEvent, Projection, RecordedEvent, StreamId,
    StreamingStore,
};
use es_postgres::PgStore;
use es_redis::RedisStore;
use es_testkit::support::unique_name;
use serde_json::json;

/// The read model: every position handled, in order, and how often it was dropped.
#[derive(Default)]
struct Model {
    handled: Vec<u64>,
    resets: u32,
}

/// Records each event's position; slow enough (1 ms per event) that an interrupt lands
/// mid-rebuild.
#[derive(Clone)]
struct Recorder(Arc<Mutex<Model>>);

impl Projection for Recorder {
    fn name(&self) -> &'static str {
        "recorder"
    }

    async fn handle(&mut self, event: &RecordedEvent) -> Result<(), HandlerError> {
        tokio::time::sleep(Duration::from_millis(1)).await;
        self.0.lock().unwrap().handled.push(event.global_position);
        Ok(())
    }

    async fn reset(&mut self) -> Result<(), HandlerError> {
        let mut model = self.0.lock().unwrap();
        model.handled.clear();
        model.resets += 1;
        Ok(())
    }
}

const EVENTS: u64 = 600;

async fn seed<S: EventStore>(store: &S) -> Vec<u64> {
    let mut positions = Vec::new();
    for batch in 0..EVENTS / 50 {
        let stream = StreamId::new("order", &batch.to_string()).unwrap();
        let events = (0..50)
            .map(|n| NewEvent::from_value("OrderLine", 1, &json!({ "n": n })))
            .collect();
        let result = store
            .append(AppendRequest::new(
                stream,
                ExpectedVersion::NoStream,
                events,
            ))
            .await
            .unwrap();
        positions.extend(result.positions);
    }
    positions
}

async fn interrupted_then_resumed<S: StreamingStore>(store: S, conn: Vec<String>) {
    let positions = seed(&store).await;
    let head = store.head_position().await.unwrap();
    assert_eq!(positions.last(), Some(&head));
    let model = Arc::new(Mutex::new(Model::default()));
    let registry = {
        let model = Arc::clone(&model);
        es_cli::Registry::new().projection(move || Recorder(Arc::clone(&model)))
    };
    let args = |extra: &[&str]| {
        let mut args = vec!["es".to_owned()];
        args.extend(conn.iter().cloned());
        args.extend(["projections", "rebuild", "recorder"].map(str::to_owned));
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    };

    // A projection that ran before: the rebuild must drop what it had.
    model.lock().unwrap().handled.push(999_999);

    // Interrupted once a quarter of the feed is in the read model.
    let watched = Arc::clone(&model);
    let interrupt = async move {
        while watched.lock().unwrap().handled.len() < (EVENTS / 4) as usize {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let mut out = Vec::new();
    let err = registry
        .run(args(&[]), &mut out, interrupt)
        .await
        .expect_err("the rebuild is interrupted");
    assert!(err.is_interrupted(), "{err}");
    let text = String::from_utf8(out).unwrap();
    let checkpoint = store.load_checkpoint("recorder").await.unwrap();
    assert_eq!(
        text.trim(),
        format!(
            "interrupted rebuilding recorder at position {} of {head}; \
             `es projections rebuild recorder --resume` goes on from there",
            checkpoint.position
        )
    );
    assert_eq!(
        checkpoint.generation, 1,
        "the rebuild started a new generation"
    );
    assert!(
        checkpoint.position < head,
        "interrupted mid-rebuild: {checkpoint:?}, head {head}"
    );
    {
        let model = model.lock().unwrap();
        assert_eq!(model.resets, 1);
        let done: Vec<u64> = positions
            .iter()
            .copied()
            .filter(|p| *p <= checkpoint.position)
            .collect();
        assert_eq!(
            model.handled, done,
            "what the checkpoint covers is in the read model, once, in order, and nothing after it"
        );
        assert!(done.len() >= (EVENTS / 4) as usize);
    }

    // Resumed: no reset, from the checkpoint to the head.
    let mut out = Vec::new();
    registry
        .run(args(&["--resume"]), &mut out, std::future::pending())
        .await
        .expect("the resumed rebuild finishes");
    let text = String::from_utf8(out).unwrap();
    assert_eq!(
        text.trim(),
        format!(
            "resumed and finished recorder: at position {head} (head {head}), checkpoint \
             generation 1 (was 1), stopped cleanly"
        )
    );
    let model = model.lock().unwrap();
    assert_eq!(model.resets, 1, "resuming drops nothing");
    assert_eq!(
        model.handled, positions,
        "every event exactly once, in feed order: nothing lost, nothing replayed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_interrupted_and_resumed_on_postgres() {
    let url = es_test_support::database_url();
    let schema = unique_name("t_cli_rebuild", '_');
    let store = PgStore::builder_from_url(url.as_str())
        .schema(schema.as_str())
        .build()
        .await
        .expect("the test store builds");
    let conn = vec![format!("--url={url}"), format!("--schema={schema}")];
    interrupted_then_resumed(store, conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_interrupted_and_resumed_on_redis() {
    let url = es_test_support::redis_url();
    let prefix = unique_name("t:cli-rebuild", ':');
    let store = RedisStore::builder(url.as_str())
        .prefix(prefix.as_str())
        .build()
        .await
        .expect("the test store builds");
    let conn = vec![format!("--url={url}"), format!("--redis-prefix={prefix}")];
    interrupted_then_resumed(store, conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unregistered_projection_is_a_clear_error() {
    let mut out = Vec::new();
    let err = es_cli::Registry::new()
        .run(
            [
                "es",
                "--url=postgres://nowhere.invalid/x",
                "projections",
                "rebuild",
                "ghost",
            ],
            &mut out,
            std::future::pending(),
        )
        .await
        .expect_err("nothing registered");
    assert!(!err.is_interrupted());
    assert!(
        err.to_string()
            .contains("no projection `ghost` is registered in this `es` (registered: none)"),
        "{err}"
    );
}

/// `es state` of a registered aggregate: its state at a version and at the head, loaded through
/// a repository; a category without a registration still shows raw events.
async fn registered_state<S: StreamingStore>(store: S, conn: Vec<String>) {
    use es_testkit::domain::{Ledger, LedgerCommand};
    let repo = es_core::Repository::builder(store.clone()).build().unwrap();
    for command in [
        LedgerCommand::Open,
        LedgerCommand::Credit(5),
        LedgerCommand::Credit(7),
    ] {
        repo.execute::<Ledger>("a", &command).await.unwrap();
    }
    let registry = es_cli::Registry::new().aggregate::<Ledger>();
    let state = |extra: &'static [&'static str]| {
        let mut args = vec!["es".to_owned()];
        args.extend(conn.iter().cloned());
        args.extend(["state", "ledger-a", "--json"].map(str::to_owned));
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    };
    let mut out = Vec::new();
    registry
        .run(state(&["--version", "2"]), &mut out, std::future::pending())
        .await
        .unwrap();
    let at_two: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(at_two["stream"], "ledger-a");
    assert_eq!(at_two["version"], 2);
    assert_eq!(at_two["state"]["balance"], 5);
    assert_eq!(at_two["state"]["open"], true);
    let mut out = Vec::new();
    registry
        .run(state(&[]), &mut out, std::future::pending())
        .await
        .unwrap();
    let latest: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(
        (
            latest["version"].as_u64(),
            latest["state"]["balance"].as_i64()
        ),
        (Some(3), Some(12))
    );
    // The stock registry knows no aggregate: the raw events up to version 2.
    let mut out = Vec::new();
    es_cli::Registry::new()
        .run(state(&["--version", "2"]), &mut out, std::future::pending())
        .await
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(text.lines().count(), 2, "{text}");

    // Events of an older schema need the application's upcaster: registered, the state is
    // upcast; not registered, the load fails and says so.
    let old = StreamId::new("ledger", "old").unwrap();
    store
        .append(AppendRequest::new(
            old,
            ExpectedVersion::NoStream,
            vec![
                NewEvent::from_value("Opened", 1, &json!({})),
                NewEvent::from_value("Credited", 1, &json!({ "amount": 40 })),
            ],
        ))
        .await
        .unwrap();
    let mut old_args = vec!["es".to_owned()];
    old_args.extend(conn.iter().cloned());
    old_args.extend(["state", "ledger-old", "--json"].map(str::to_owned));
    let upcasting = es_cli::Registry::new()
        .aggregate::<Ledger>()
        .upcaster::<Ledger>(es_core::upcast::map("Credited", 1, |mut payload| {
            payload["currency"] = json!("EUR");
            Ok(payload)
        }));
    let mut out = Vec::new();
    upcasting
        .run(old_args.clone(), &mut out, std::future::pending())
        .await
        .unwrap();
    let upcast: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(upcast["state"]["balance"], 40);
    assert_eq!(upcast["state"]["currency"], "EUR");
    let err = registry
        .run(old_args, &mut Vec::new(), std::future::pending())
        .await
        .expect_err("a v1 event without its upcaster");
    assert!(err.to_string().contains("ledger-old"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_aggregate_state_on_postgres() {
    let url = es_test_support::database_url();
    let schema = unique_name("t_cli_state", '_');
    let store = PgStore::builder_from_url(url.as_str())
        .schema(schema.as_str())
        .build()
        .await
        .expect("the test store builds");
    let conn = vec![format!("--url={url}"), format!("--schema={schema}")];
    registered_state(store, conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_aggregate_state_on_redis() {
    let url = es_test_support::redis_url();
    let prefix = unique_name("t:cli-state", ':');
    let store = RedisStore::builder(url.as_str())
        .prefix(prefix.as_str())
        .build()
        .await
        .expect("the test store builds");
    let conn = vec![format!("--url={url}"), format!("--redis-prefix={prefix}")];
    registered_state(store, conn).await;
}
