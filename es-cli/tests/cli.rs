//! The `es` binary against the real PostgreSQL (`DATABASE_URL`) and Redis (`REDIS_URL`) the
//! xtask starts, each test in a fresh schema or key prefix: the test writes through the stores'
//! public API, runs the built binary, and checks what it prints.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use es_core::contract::Rejection;
use es_core::{
    AppendRequest, Checkpoint, EventStore, ExpectedVersion, Metadata, NewEvent, OutboxMessage,
    SnapshotRecord, StreamId, StreamingStore,
};
use es_postgres::PgStore;
use es_redis::RedisStore;
use es_testkit::support::unique_name;
use serde_json::{json, Value};
use uuid::Uuid;

/// Runs `es` with `conn` (the store's options) and `args`; returns its output.
fn es(conn: &[String], args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_es"))
        .args(conn)
        .args(args)
        .env_remove("ES_URL")
        .stdin(Stdio::null())
        .output()
        .expect("the es binary runs")
}

/// Runs `es` and returns its standard output, failing the test if it failed.
fn es_ok(conn: &[String], args: &[&str]) -> String {
    let output = es(conn, args);
    let stdout = String::from_utf8(output.stdout).expect("UTF-8 output");
    assert!(
        output.status.success(),
        "es {args:?} failed ({}): {}{stdout}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Each line of `text` parsed as JSON.
fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}")))
        .collect()
}

fn stream(text: &str) -> StreamId {
    StreamId::parse(text).unwrap()
}

fn event(event_type: &str, n: u64) -> NewEvent {
    NewEvent::from_value(event_type, 1, &json!({ "n": n }))
}

/// Writes the data every scenario inspects: three orders, an account, metadata on one event,
/// one outbox message per order event.
async fn seed<S: StreamingStore>(store: &S, correlation: Uuid) {
    let tagged = event("OrderPlaced", 1).with_metadata(
        Metadata::new()
            .with_correlation_id(correlation)
            .with_actor("ada")
            .with("request", "r-7"),
    );
    let message = |n: u64| OutboxMessage {
        message_id: Uuid::now_v7(),
        source_event_id: Uuid::now_v7(),
        topic: "orders".to_owned(),
        key: format!("order-{n}"),
        message_type: "order.placed".to_owned(),
        schema_version: 1,
        payload: bytes_of(&json!({ "n": n })),
        metadata: Metadata::new(),
    };
    store
        .append(
            AppendRequest::new(
                stream("order-1"),
                ExpectedVersion::NoStream,
                vec![tagged, event("OrderPaid", 2), event("OrderShipped", 3)],
            )
            .with_outbox(vec![message(1)]),
        )
        .await
        .unwrap();
    store
        .append(
            AppendRequest::new(
                stream("order-2"),
                ExpectedVersion::NoStream,
                vec![event("OrderPlaced", 4)],
            )
            .with_outbox(vec![message(2)]),
        )
        .await
        .unwrap();
    store
        .append(AppendRequest::new(
            stream("account-7"),
            ExpectedVersion::NoStream,
            vec![event("AccountOpened", 5)],
        ))
        .await
        .unwrap();
    store
        .append(AppendRequest::new(
            stream("order-10"),
            ExpectedVersion::NoStream,
            vec![event("OrderPlaced", 6)],
        ))
        .await
        .unwrap();
}

fn bytes_of(value: &Value) -> bytes::Bytes {
    bytes::Bytes::from(value.to_string())
}

/// Every command against one store, its output checked.
async fn scenario<S: StreamingStore>(store: S, conn: Vec<String>) {
    let correlation = Uuid::now_v7();
    seed(&store, correlation).await;
    check_streams(&conn);
    let positions = check_events(&conn, correlation);
    let head = check_state_head_tail(&store, &conn, &positions).await;
    check_projections(&store, &conn, &positions, head).await;
    check_outbox(&store, &conn).await;
    check_snapshots(&store, &conn).await;
}

fn check_streams(conn: &[String]) {
    let conn = conn.to_vec();
    // Streams: the table, JSON lines, paging with a limit, a category, a search.
    let table = es_ok(&conn, &["streams", "list"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["STREAM", "VERSION"]
    );
    let rows: Vec<Vec<&str>> = lines[1..]
        .iter()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        [
            vec!["account-7", "1"],
            vec!["order-1", "3"],
            vec!["order-10", "1"],
            vec!["order-2", "1"]
        ],
        "{table}"
    );
    let listed = json_lines(&es_ok(
        &conn,
        &["streams", "list", "--category", "order", "--json"],
    ));
    assert_eq!(
        listed,
        [
            json!({"stream": "order-1", "version": 3}),
            json!({"stream": "order-10", "version": 1}),
            json!({"stream": "order-2", "version": 1}),
        ]
    );
    let first = es_ok(&conn, &["streams", "list", "--limit", "2"]);
    assert!(
        first.contains("account-7") && first.contains("order-1 "),
        "{first}"
    );
    assert!(
        first.contains("more after order-1 (--after order-1)"),
        "{first}"
    );
    let rest = json_lines(&es_ok(
        &conn,
        &["streams", "list", "--after", "order-1", "--json"],
    ));
    assert_eq!(rest.len(), 2, "{rest:?}");
    assert_eq!(rest[0]["stream"], "order-10");
    let found = json_lines(&es_ok(&conn, &["streams", "search", "10", "--json"]));
    assert_eq!(found, [json!({"stream": "order-10", "version": 1})]);
    let refused = es(&conn, &["streams", "list", "--prefix", "order-*"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("may hold only"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

fn check_events(conn: &[String], correlation: Uuid) -> Vec<u64> {
    let conn = conn.to_vec();
    // A stream's events, with their metadata, as JSON lines and as a table.
    let events = json_lines(&es_ok(&conn, &["events", "order-1", "--json"]));
    assert_eq!(events.len(), 3);
    assert_eq!(events[0]["type"], "OrderPlaced");
    assert_eq!(events[0]["version"], 1);
    assert_eq!(events[0]["correlation_id"], correlation.to_string());
    assert_eq!(events[0]["actor"], "ada");
    assert_eq!(events[0]["metadata"], json!({"request": "r-7"}));
    assert_eq!(events[0]["payload"], json!({"n": 1}));
    assert_eq!(events[2]["type"], "OrderShipped");
    let positions: Vec<u64> = events
        .iter()
        .map(|e| e["position"].as_u64().unwrap())
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    let table = es_ok(&conn, &["events", "order-1", "--backward", "--limit", "2"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("POSITION") && lines[0].contains("CORRELATION"),
        "{table}"
    );
    assert_eq!(lines.len(), 3, "{table}");
    assert!(
        lines[1].contains("OrderShipped@v1") && lines[2].contains("OrderPaid@v1"),
        "{table}"
    );
    let missing = es_ok(&conn, &["events", "order-99"]);
    assert_eq!(missing.trim(), "stream order-99 has no events");
    positions
}

async fn check_state_head_tail<S: StreamingStore>(
    store: &S,
    conn: &[String],
    positions: &[u64],
) -> u64 {
    let conn = conn.to_vec();
    // State with no aggregate registered: the raw events up to the bound.
    let state = json_lines(&es_ok(
        &conn,
        &["state", "order-1", "--version", "2", "--json"],
    ));
    let types: Vec<&str> = state.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["OrderPlaced", "OrderPaid"]);
    let at_position = json_lines(&es_ok(
        &conn,
        &[
            "state",
            "order-1",
            "--position",
            &positions[0].to_string(),
            "--json",
        ],
    ));
    assert_eq!(at_position.len(), 1);
    let text = es_ok(&conn, &["state", "order-1", "--at", "2000-01-01T00:00:00Z"]);
    assert!(
        text.starts_with("order-1 at version 0: no aggregate registered"),
        "{text}"
    );

    // The head.
    let head = json_lines(&es_ok(&conn, &["head", "--json"]));
    let expected_head = store.head_position().await.unwrap();
    assert_eq!(head[0]["partition"], 0);
    assert_eq!(head[0]["head"], expected_head);

    // Tail from the start with filters: the order events of type OrderPlaced, in feed order.
    let tailed = json_lines(&es_ok(
        &conn,
        &[
            "tail",
            "--from-start",
            "--category",
            "order",
            "--type",
            "OrderPlaced",
            "--count",
            "3",
            "--json",
        ],
    ));
    let streams: Vec<&str> = tailed
        .iter()
        .map(|e| e["stream"].as_str().unwrap())
        .collect();
    assert_eq!(streams, ["order-1", "order-2", "order-10"]);
    expected_head
}

async fn check_projections<S: StreamingStore>(
    store: &S,
    conn: &[String],
    positions: &[u64],
    expected_head: u64,
) {
    let conn = conn.to_vec();
    // Projection checkpoints and lag.
    store
        .save_checkpoint(
            "orders_view",
            Checkpoint {
                position: positions[1],
                generation: 0,
            },
        )
        .await
        .unwrap();
    let status = json_lines(&es_ok(
        &conn,
        &[
            "projections",
            "status",
            "orders_view",
            "never_run",
            "--json",
        ],
    ));
    assert_eq!(status[0]["projection"], "orders_view");
    assert_eq!(status[0]["position"], positions[1]);
    assert_eq!(status[0]["lag"], expected_head - positions[1]);
    assert_eq!(status[1]["position"], 0);
    // Lag counts the positions of the head's epoch (the six events), not the epoch's number.
    assert_eq!(status[1]["lag"], 6);
}

async fn check_outbox<S: StreamingStore>(store: &S, conn: &[String]) {
    let conn = conn.to_vec();
    // The outbox: backlog, a dead letter, re-queued.
    let outbox = json_lines(&es_ok(&conn, &["outbox", "status", "--json"]));
    assert_eq!(outbox[0]["pending"], 2);
    assert_eq!(outbox[0]["dead_letters"], 0);
    let pending = json_lines(&es_ok(&conn, &["outbox", "pending", "--json"]));
    let keys: Vec<&str> = pending.iter().map(|r| r["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["order-1", "order-2"]);
    let generation = store
        .acquire_relay_lease("test-relay", Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    let records = store.pending_outbox(10).await.unwrap();
    store
        .dead_letter(
            generation,
            &[Rejection {
                position: records[0].position,
                message_id: records[0].message.message_id,
                error: "topic refused the record".to_owned(),
                attempts: 3,
            }],
        )
        .await
        .unwrap();
    let dead = json_lines(&es_ok(&conn, &["outbox", "dead", "--json"]));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["error"], "topic refused the record");
    assert_eq!(dead[0]["attempts"], 3);
    assert_eq!(dead[0]["stream"], "order-1");
    let status = es_ok(&conn, &["outbox", "status"]);
    assert!(status.contains("test-relay gen"), "{status}");
    assert!(status.contains("topic refused the record"), "{status}");
    let requeued = es_ok(&conn, &["outbox", "requeue", "--all"]);
    assert_eq!(requeued.trim(), "re-queued 1 of 1 dead letter(s)");
    let outbox = json_lines(&es_ok(&conn, &["outbox", "status", "--json"]));
    assert_eq!(
        (
            outbox[0]["pending"].as_u64(),
            outbox[0]["dead_letters"].as_u64()
        ),
        (Some(2), Some(0))
    );
    let pending = json_lines(&es_ok(&conn, &["outbox", "pending", "--json"]));
    let keys: Vec<&str> = pending.iter().map(|r| r["key"].as_str().unwrap()).collect();
    assert_eq!(
        keys,
        ["order-2", "order-1"],
        "a re-queued record goes to the end"
    );
}

async fn check_snapshots<S: StreamingStore>(store: &S, conn: &[String]) {
    let conn = conn.to_vec();
    // Snapshots: purge one stream's, and a category's.
    for (name, version) in [("order-1", 3), ("order-2", 1), ("account-7", 1)] {
        store
            .save_snapshot(SnapshotRecord {
                stream_id: stream(name),
                version,
                schema_version: 1,
                payload: bytes_of(&json!({ "v": version })),
                recorded_at: chrono::Utc::now(),
                event_id: None,
            })
            .await
            .unwrap();
    }
    let purged = es_ok(&conn, &["snapshots", "purge", "account-7"]);
    assert_eq!(purged.trim(), "purged 1 snapshot(s) of 1 stream(s)");
    assert!(store
        .load_snapshot(&stream("account-7"))
        .await
        .unwrap()
        .is_none());
    let purged = es_ok(&conn, &["snapshots", "purge", "--category", "order"]);
    assert_eq!(purged.trim(), "purged 2 snapshot(s) of 3 stream(s)");
    assert!(store
        .load_snapshot(&stream("order-1"))
        .await
        .unwrap()
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_on_postgres() {
    let url = es_test_support::database_url();
    let schema = unique_name("t_cli", '_');
    let store = PgStore::builder_from_url(url.as_str())
        .schema(schema.as_str())
        .build()
        .await
        .expect("the test store builds");
    let conn = vec![format!("--url={url}"), format!("--schema={schema}")];
    scenario(store, conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_on_redis() {
    let url = es_test_support::redis_url();
    let prefix = unique_name("t:cli", ':');
    let store = RedisStore::builder(url.as_str())
        .prefix(prefix.as_str())
        .build()
        .await
        .expect("the test store builds");
    let conn = vec![format!("--url={url}"), format!("--redis-prefix={prefix}")];
    scenario(store, conn).await;
}

#[test]
fn migrations_print_sql_and_grants_without_a_store() {
    let sql = es_ok(&[], &["migrations", "sql", "--schema", "billing"]);
    assert!(
        sql.contains("CREATE SCHEMA IF NOT EXISTS \"billing\";"),
        "{sql}"
    );
    assert!(sql.contains("INSERT INTO \"billing\".schema_migrations"));
    assert_eq!(sql, es_postgres::migration_script("billing").unwrap());
    let grants = es_ok(
        &[],
        &[
            "migrations",
            "grants",
            "--schema",
            "billing",
            "--role",
            "app",
        ],
    );
    assert_eq!(
        grants,
        es_postgres::grants_script("billing", "app").unwrap()
    );
    let bad = es(&[], &["migrations", "sql", "--schema", "x\"; drop"]);
    assert_eq!(bad.status.code(), Some(1));
}

#[test]
fn a_missing_or_foreign_url_is_a_clear_error() {
    let missing = es(&[], &["streams", "list"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("pass --url (or set ES_URL)"));
    let foreign = es(&["--url=mysql://root:hunter2@db/x".to_owned()], &["head"]);
    assert_eq!(foreign.status.code(), Some(1));
    let err = String::from_utf8_lossy(&foreign.stderr);
    assert!(
        err.contains("unsupported URL") && !err.contains("hunter2"),
        "{err}"
    );
    let usage = es(&[], &["streams", "nonsense"]);
    assert_eq!(usage.status.code(), Some(2));
}

/// Ctrl-C (SIGINT) stops a following `tail` of the real binary: exit code 130 and a message,
/// after the events it printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_tail_with_130() {
    use std::io::{BufRead, BufReader};
    let url = es_test_support::database_url();
    let schema = unique_name("t_cli_sigint", '_');
    let store = PgStore::builder_from_url(url.as_str())
        .schema(schema.as_str())
        .build()
        .await
        .expect("the test store builds");
    store
        .append(AppendRequest::new(
            stream("order-1"),
            ExpectedVersion::NoStream,
            vec![event("OrderPlaced", 1)],
        ))
        .await
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_es"))
        .args([format!("--url={url}"), format!("--schema={schema}")])
        .args(["tail", "--from-start", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("es starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().expect("a line").expect("readable");
    assert_eq!(json_lines(&first)[0]["stream"], "order-1");
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let output = child.wait_with_output().expect("es ends");
    assert_eq!(output.status.code(), Some(130));
    assert!(String::from_utf8_lossy(&output.stderr).contains("es: interrupted"));
}

/// Appends one event to each of `n` streams `order-0..n`.
async fn one_each<S: StreamingStore>(store: &S, n: u64) {
    for i in 0..n {
        store
            .append(AppendRequest::new(
                stream(&format!("order-{i}")),
                ExpectedVersion::NoStream,
                vec![event("OrderPlaced", i)],
            ))
            .await
            .unwrap();
    }
}

/// A store with several feed partitions: `--partitions` must say so; heads, the tail of every
/// partition and the per-partition outboxes of Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_stores() {
    let partitioning = es_core::Partitioning::new(3).unwrap();
    let url = es_test_support::database_url();
    let schema = unique_name("t_cli_parts", '_');
    let pg = PgStore::builder_from_url(url.as_str())
        .schema(schema.as_str())
        .partitioning(partitioning)
        .build()
        .await
        .expect("the test store builds");
    one_each(&pg, 12).await;
    let single = es(
        &[format!("--url={url}"), format!("--schema={schema}")],
        &["head"],
    );
    assert_eq!(single.status.code(), Some(1));
    let err = String::from_utf8_lossy(&single.stderr);
    assert!(err.contains("was created with 3 partition(s)"), "{err}");
    let conn = vec![
        format!("--url={url}"),
        format!("--schema={schema}"),
        "--partitions=3".to_owned(),
    ];
    let heads = json_lines(&es_ok(&conn, &["head", "--json"]));
    assert_eq!(heads.len(), 3);
    for (partition, head) in heads.iter().enumerate() {
        let expected = pg.partition_head(partition as u32).await.unwrap();
        assert_eq!(head["head"], expected, "partition {partition}");
    }
    let tailed = json_lines(&es_ok(
        &conn,
        &["tail", "--from-start", "--count", "12", "--json"],
    ));
    let mut streams: Vec<String> = tailed
        .iter()
        .map(|e| e["stream"].as_str().unwrap().to_owned())
        .collect();
    streams.sort();
    let mut expected: Vec<String> = (0..12).map(|i| format!("order-{i}")).collect();
    expected.sort();
    assert_eq!(streams, expected, "every partition's events, each once");
    let listed = json_lines(&es_ok(&conn, &["streams", "list", "--json"]));
    assert_eq!(listed.len(), 12);

    let url = es_test_support::redis_url();
    let prefix = unique_name("t:cli-parts", ':');
    let redis = RedisStore::builder(url.as_str())
        .prefix(prefix.as_str())
        .partitioning(partitioning)
        .build()
        .await
        .expect("the test store builds");
    one_each(&redis, 12).await;
    let conn = vec![
        format!("--url={url}"),
        format!("--redis-prefix={prefix}"),
        "--partitions=3".to_owned(),
    ];
    let outboxes = json_lines(&es_ok(&conn, &["outbox", "status", "--json"]));
    let numbered: Vec<u64> = outboxes
        .iter()
        .map(|o| o["outbox"].as_u64().unwrap())
        .collect();
    assert_eq!(numbered, [0, 1, 2], "one outbox per partition on Redis");
    let listed = json_lines(&es_ok(
        &conn,
        &["streams", "list", "--category", "order", "--json"],
    ));
    assert_eq!(listed.len(), 12);
    let tailed = json_lines(&es_ok(
        &conn,
        &["tail", "--from-start", "--count", "12", "--json"],
    ));
    assert_eq!(tailed.len(), 12);
}
