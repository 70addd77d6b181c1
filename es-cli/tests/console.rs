//! `es console` on the real PostgreSQL (`DATABASE_URL`) and Redis (`REDIS_URL`), each in a fresh
//! schema or key prefix, driven by Debian's headless Chromium: the test writes events (a
//! causation chain across two streams, a registered aggregate, a long stream, hostile text, an
//! outbox dead letter, a projection checkpoint), runs the console in-process
//! (`Registry::run`, with an aggregate registered), loads each page in Chromium, checks the DOM
//! the page has after its scripts ran, and stores a screenshot of each page under
//! `target/console-screenshots/` (the artifacts). Writes go over plain HTTP: refused without the
//! token, with a wrong one and on a console without a token, with nothing changed; accepted
//! with the token.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use es_core::contract::Rejection;
use es_core::{
    Aggregate, AppendRequest, ApplyEvent, Checkpoint, DomainEvent, EventSchema, EventStore,
    ExpectedVersion, Metadata, NewEvent, OutboxMessage, PayloadError, StreamId, StreamingStore,
};
use es_postgres::PgStore;
use es_redis::RedisStore;
use es_testkit::support::unique_name;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use uuid::Uuid;

const TOKEN: &str = "console-test-token";

// ---- The registered aggregate -------------------------------------------------------------

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Account {
    owner: Option<String>,
    balance: i64,
}

#[derive(Debug)]
enum AccountEvent {
    Opened { owner: String },
    Moved { delta: i64 },
}

impl DomainEvent for AccountEvent {
    const EVENT_TYPES: &'static [EventSchema] = &[
        EventSchema {
            name: "Opened",
            version: 1,
        },
        EventSchema {
            name: "Moved",
            version: 1,
        },
    ];

    fn event_type(&self) -> &'static str {
        match self {
            AccountEvent::Opened { .. } => "Opened",
            AccountEvent::Moved { .. } => "Moved",
        }
    }

    fn schema_version(&self) -> u32 {
        1
    }

    fn to_payload(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(&match self {
            AccountEvent::Opened { owner } => json!({ "owner": owner }),
            AccountEvent::Moved { delta } => json!({ "delta": delta }),
        })
    }

    fn from_payload(event_type: &str, payload: &[u8]) -> Result<Self, PayloadError> {
        Self::from_value(
            event_type,
            serde_json::from_slice(payload).map_err(PayloadError::Invalid)?,
        )
    }

    fn from_value(event_type: &str, payload: Value) -> Result<Self, PayloadError> {
        #[derive(Deserialize)]
        struct Opened {
            owner: String,
        }
        #[derive(Deserialize)]
        struct Moved {
            delta: i64,
        }
        match event_type {
            "Opened" => {
                let o: Opened = serde_json::from_value(payload).map_err(PayloadError::Invalid)?;
                Ok(AccountEvent::Opened { owner: o.owner })
            }
            "Moved" => {
                let m: Moved = serde_json::from_value(payload).map_err(PayloadError::Invalid)?;
                Ok(AccountEvent::Moved { delta: m.delta })
            }
            other => Err(PayloadError::UnknownType(other.to_owned())),
        }
    }
}

impl ApplyEvent<Account> for AccountEvent {
    fn apply_to(&self, state: &mut Account) {
        match self {
            AccountEvent::Opened { owner } => state.owner = Some(owner.clone()),
            AccountEvent::Moved { delta } => state.balance += delta,
        }
    }
}

/// The aggregate's error: it never fails.
#[derive(Debug)]
enum Never {}

impl std::fmt::Display for Never {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {}
    }
}

impl std::error::Error for Never {}

impl Aggregate for Account {
    const CATEGORY: &'static str = "account";
    type Command = ();
    type Event = AccountEvent;
    type Error = Never;

    fn handle(&self, (): &()) -> Result<Vec<AccountEvent>, Never> {
        Ok(Vec::new())
    }
}

// ---- Seeding ------------------------------------------------------------------------------

/// What the seed wrote that the checks need.
struct Seeded {
    correlation: Uuid,
    /// The ids of the chain order-1 v1 -> v2 -> v3 -> shipment-1 v1.
    chain: [Uuid; 4],
    /// The global position of order-1 v1 (the projection's checkpoint).
    checkpoint: u64,
}

fn stream(text: &str) -> StreamId {
    StreamId::parse(text).unwrap()
}

fn new_event(event_type: &str, payload: &Value) -> NewEvent {
    NewEvent::from_value(event_type, 1, payload)
}

/// The hostile text: it would change the page's title if it ever ran as markup.
const HOSTILE: &str = "<script>document.title='pwned'</script>";
const HOSTILE_IMG: &str = "<img src=x onerror=\"document.title='pwned'\">";

async fn append(store: &impl EventStore, request: AppendRequest) -> Vec<u64> {
    store.append(request).await.unwrap().positions
}

async fn seed<S: StreamingStore>(store: &S) -> Seeded {
    let correlation = Uuid::now_v7();
    let chain = [
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
    ];
    let meta = |cause: Option<Uuid>| {
        let m = Metadata::new()
            .with_correlation_id(correlation)
            .with_actor("ada");
        match cause {
            Some(c) => m.with_causation_id(c),
            None => m,
        }
    };
    let message = |key: &str| OutboxMessage {
        message_id: Uuid::now_v7(),
        source_event_id: chain[0],
        topic: "orders".to_owned(),
        key: key.to_owned(),
        message_type: "order.placed".to_owned(),
        schema_version: 1,
        payload: bytes::Bytes::from(json!({ "key": key }).to_string()),
        metadata: Metadata::new(),
    };
    let positions = append(
        store,
        AppendRequest::new(
            stream("order-1"),
            ExpectedVersion::NoStream,
            vec![
                new_event("OrderPlaced", &json!({ "total": 120 }))
                    .with_id(chain[0])
                    .with_metadata(meta(None).with("request", "r-7")),
                new_event("OrderPaid", &json!({ "amount": 120 }))
                    .with_id(chain[1])
                    .with_metadata(meta(Some(chain[0]))),
                new_event("OrderShipped", &json!({ "carrier": "post" }))
                    .with_id(chain[2])
                    .with_metadata(meta(Some(chain[1]))),
            ],
        )
        .with_outbox(vec![message("order-1"), message("order-1b")]),
    )
    .await;
    append(
        store,
        AppendRequest::new(
            stream("shipment-1"),
            ExpectedVersion::NoStream,
            vec![new_event("ShipmentBooked", &json!({ "order": "order-1" }))
                .with_id(chain[3])
                .with_metadata(meta(Some(chain[2])))],
        ),
    )
    .await;
    other_streams(store).await;
    dead_letter_and_checkpoint(store, positions[0]).await;
    Seeded {
        correlation,
        chain,
        checkpoint: positions[0],
    }
}

/// A registered aggregate's stream, a long stream, hostile text and 60 one-event streams.
async fn other_streams(store: &impl EventStore) {
    append(
        store,
        AppendRequest::new(
            stream("account-7"),
            ExpectedVersion::NoStream,
            vec![
                new_event("Opened", &json!({ "owner": "ann" })),
                new_event("Moved", &json!({ "delta": 10 })),
                new_event("Moved", &json!({ "delta": -3 })),
            ],
        ),
    )
    .await;
    append(
        store,
        AppendRequest::new(
            stream("long-1"),
            ExpectedVersion::NoStream,
            (1..=30)
                .map(|n| new_event("Tick", &json!({ "n": n })))
                .collect(),
        ),
    )
    .await;
    append(
        store,
        AppendRequest::new(
            stream("note-evil"),
            ExpectedVersion::NoStream,
            vec![
                new_event("NoteTaken", &json!({ "text": HOSTILE })).with_metadata(
                    Metadata::new()
                        .with_actor(HOSTILE_IMG)
                        .with("comment", HOSTILE),
                ),
            ],
        ),
    )
    .await;
    for n in 0..60 {
        append(
            store,
            AppendRequest::new(
                stream(&format!("bulk-{n:02}")),
                ExpectedVersion::NoStream,
                vec![new_event("Made", &json!({ "n": n }))],
            ),
        )
        .await;
    }
}

/// A dead letter whose error is hostile text, and the projection `orders-view` checkpointed at
/// `checkpoint`.
async fn dead_letter_and_checkpoint<S: StreamingStore>(store: &S, checkpoint: u64) {
    // A dead letter whose error is hostile text.
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
                error: format!("broker refused {HOSTILE}"),
                attempts: 3,
            }],
        )
        .await
        .unwrap();
    store
        .save_checkpoint(
            "orders-view",
            Checkpoint {
                position: checkpoint,
                generation: 0,
            },
        )
        .await
        .unwrap();
}

// ---- The console, HTTP and Chromium -------------------------------------------------------

/// What the console prints, shared with the test.
#[derive(Clone, Default)]
struct Printed(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Printed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A console running in-process.
struct Console {
    base: String,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: JoinHandle<Result<(), es_cli::Error>>,
}

impl Console {
    async fn start(conn: &[String], extra: &[&str]) -> Self {
        let mut args = vec!["es".to_owned()];
        args.extend(conn.iter().cloned());
        args.extend(
            [
                "console",
                "--listen",
                "127.0.0.1:0",
                "--projection",
                "orders-view",
                "--sample-interval-ms",
                "200",
            ]
            .map(str::to_owned),
        );
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let printed = Printed::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = {
            let mut out = printed.clone();
            tokio::spawn(async move {
                let registry = es_cli::Registry::new().aggregate::<Account>();
                registry
                    .run(args, &mut out, async move {
                        let _ = stopped.await;
                    })
                    .await
            })
        };
        // The first line names the address; a console that fails to start ends its task.
        let line = loop {
            let text = String::from_utf8(printed.0.lock().unwrap().clone()).unwrap();
            if let Some(line) = text.lines().next().filter(|_| text.contains('\n')) {
                break line.to_owned();
            }
            assert!(
                !task.is_finished(),
                "the console stopped before listening: {:?}",
                task.await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let base = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .trim_end_matches('/')
            .to_owned();
        let addr: SocketAddr = base.trim_start_matches("http://").parse().unwrap();
        Console {
            base,
            addr,
            stop: Some(stop),
            task,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task
            .await
            .unwrap()
            .expect("the console stops cleanly when interrupted");
    }
}

/// One HTTP/1.1 request; returns the status, the headers and the body.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.extend([*name, ": ", value, "\r\n"]);
    }
    request.push_str("\r\n");
    request.push_str(body);
    socket.write_all(request.as_bytes()).await.unwrap();
    // The body ends after Content-Length bytes (chromedriver keeps the connection open), or
    // at the end of the connection.
    let mut response = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&response[..end]).to_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse::<usize>().unwrap());
            if length.is_some_and(|length| response.len() >= end + 4 + length) {
                break;
            }
        }
        let read = socket.read(&mut chunk).await.unwrap();
        if read == 0 {
            break;
        }
        response.extend_from_slice(&chunk[..read]);
    }
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_owned(), body.to_owned())
}

const FORM: (&str, &str) = ("Content-Type", "application/x-www-form-urlencoded");

/// Chromium's absolute path (chromedriver's `binary`).
fn chromium_path() -> PathBuf {
    let program = chromium();
    if program.is_absolute() {
        return program;
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join(&program))
        .find(|candidate| candidate.is_file())
        .unwrap_or(program)
}

/// Debian's Chromium: `$CHROMIUM`, or `chromium` on the path.
fn chromium() -> PathBuf {
    let program =
        std::env::var_os("CHROMIUM").map_or_else(|| PathBuf::from("chromium"), PathBuf::from);
    let found = std::process::Command::new(&program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "the console tests drive a headless Chromium and found none ({}): install it with \
         `apt-get install chromium` (or `cargo xtask setup`), or point $CHROMIUM at one",
        program.display()
    );
    program
}

/// How many times a Chromium that crashed (killed by a signal) is started again on the same page.
const CHROMIUM_CRASH_RETRIES: u32 = 2;

/// Runs Chromium headless on `url` with `args`, in a profile of its own (so tests can run
/// side by side); returns its standard output.
///
/// On a loaded machine the browser itself now and then dies of a signal (SIGSEGV in CI, on a
/// page it renders fine otherwise): that says nothing about the console, so the same page is
/// loaded again in a fresh profile, up to [`CHROMIUM_CRASH_RETRIES`] times, and each crash is
/// reported on stderr. A failure with an exit code, or a crash on every try, fails the test.
async fn run_chromium(url: &str, args: &[String]) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    let mut crashes = 0;
    loop {
        let profile = std::env::temp_dir().join(unique_name("es-console-chromium", '-'));
        std::fs::create_dir_all(&profile).unwrap();
        let output = tokio::process::Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--hide-scrollbars",
                // Nothing the page does not need: no extensions (Debian's launcher loads its
                // packaged ones), no component updates, no background requests.
                "--disable-extensions",
                "--disable-component-update",
                "--disable-background-networking",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(args)
            .arg(url)
            .output()
            .await
            .expect("chromium runs");
        let _ = std::fs::remove_dir_all(&profile);
        if output.status.success() {
            return String::from_utf8(output.stdout).unwrap();
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        if output.status.signal().is_some() && crashes < CHROMIUM_CRASH_RETRIES {
            crashes += 1;
            eprintln!(
                "chromium crashed on {url} ({}), loading the page again (crash {crashes}): {stderr}",
                output.status
            );
            continue;
        }
        panic!(
            "chromium failed on {url} ({}, after {crashes} earlier crash(es)): {stderr}",
            output.status
        );
    }
}

/// The page's DOM after its scripts ran (4 s of virtual time: the charts poll twice).
async fn dom(url: &str) -> String {
    run_chromium(
        url,
        &[
            "--virtual-time-budget=4000".to_owned(),
            "--dump-dom".to_owned(),
        ],
    )
    .await
}

fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    target.join("console-screenshots")
}

/// Stores a 1280x900 screenshot of `url` as `<name>.png` and checks it is a PNG.
async fn screenshot(url: &str, name: &str) -> PathBuf {
    let dir = screenshot_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.png"));
    let _ = std::fs::remove_file(&path);
    run_chromium(
        url,
        &[
            "--virtual-time-budget=4000".to_owned(),
            "--window-size=1280,900".to_owned(),
            format!("--screenshot={}", path.display()),
        ],
    )
    .await;
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 10_000,
        "{} is not a screenshot ({} bytes)",
        path.display(),
        bytes.len()
    );
    path
}

/// How often `needle` occurs in `haystack`.
fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

/// The `href` of the element with id `id` (as the DOM serializes it, `&` as `&amp;`).
fn href_of(dom: &str, id: &str) -> Option<String> {
    let tag_start = dom.find(&format!("id=\"{id}\""))?;
    let tag = &dom[dom[..tag_start].rfind('<')?..];
    let tag = &tag[..tag.find('>')?];
    let href = &tag[tag.find("href=\"")? + 6..];
    Some(href[..href.find('"')?].replace("&amp;", "&"))
}

/// The text of the element with id `id` (up to its first child tag).
fn text_of(dom: &str, id: &str) -> String {
    let start = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in {dom}"));
    let rest = &dom[start..];
    let rest = &rest[rest.find('>').unwrap() + 1..];
    rest[..rest.find('<').unwrap()].to_owned()
}

/// No hostile markup became an element or ran.
fn assert_inert(dom: &str) {
    assert!(
        !dom.contains("<script>document.title") && !dom.contains("<img src=\"x\""),
        "hostile text became markup: {dom}"
    );
    assert!(!dom.contains("<title>pwned"), "hostile text ran: {dom}");
}

// ---- The scenario -------------------------------------------------------------------------

async fn scenario<S: StreamingStore>(store: S, conn: Vec<String>, backend: &str) {
    let seeded = seed(&store).await;
    let console = Console::start(&conn, &["--token", TOKEN]).await;
    let shot = |name: &str| format!("{backend}-{name}");

    check_streams(&console, &shot("streams")).await;
    check_stream_and_events(&console, &seeded, &shot("event")).await;
    check_chain(&console, &seeded, &shot("chain")).await;
    check_state(&console, &shot("state")).await;
    check_projections(&store, &console, &seeded, &shot("projections")).await;
    check_hostile(&console).await;
    check_writes(&store, &console, &conn, &shot("outbox")).await;
    check_metrics(&console).await;
    console.stop().await;
}

async fn check_streams(console: &Console, shot: &str) {
    // Every stream, 50 a page, in id order, walking the `next` links.
    let mut url = console.url("/streams");
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let page = dom(&url).await;
        pages += 1;
        for part in page.split("href=\"/stream?id=").skip(1) {
            seen.push(part[..part.find('"').unwrap()].to_owned());
        }
        match href_of(&page, "next") {
            Some(next) => url = console.url(&next),
            None => break,
        }
    }
    assert_eq!(pages, 2, "65 streams are two pages of 50");
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(seen.len(), 65, "{seen:?}");
    assert_eq!(seen, sorted, "in stream-id order, each once");
    // The prefix search.
    let orders = dom(&console.url("/streams?prefix=order-")).await;
    assert_eq!(count(&orders, "href=\"/stream?id="), 1, "{orders}");
    assert!(orders.contains(">order-1</a>"), "{orders}");
    screenshot(&console.url("/streams"), shot).await;
}

async fn check_stream_and_events(console: &Console, seeded: &Seeded, shot: &str) {
    // A long stream in pages of 25.
    let first = dom(&console.url("/stream?id=long-1")).await;
    assert_eq!(
        count(&first, "href=\"/event?stream=long-1&amp;version="),
        25
    );
    let next = href_of(&first, "next").expect("a next page");
    assert_eq!(next, "/stream?id=long-1&from=26");
    let second = dom(&console.url(&next)).await;
    assert_eq!(
        count(&second, "href=\"/event?stream=long-1&amp;version="),
        5
    );
    assert!(href_of(&second, "next").is_none());
    // An event with its metadata and its audit links.
    let order = dom(&console.url("/stream?id=order-1")).await;
    assert!(
        order.contains("OrderPaid@v1") && order.contains(">ada<"),
        "{order}"
    );
    let event = dom(&console.url("/event?stream=order-1&version=2")).await;
    assert_eq!(text_of(&event, "type"), "OrderPaid@v1");
    assert_eq!(
        href_of(&event, "correlation").unwrap(),
        format!("/chain?correlation={}", seeded.correlation)
    );
    assert_eq!(
        href_of(&event, "causation").unwrap(),
        format!("/event?id={}", seeded.chain[0])
    );
    assert!(event.contains("\"amount\": 120"), "{event}");
    // The causation link leads to the causing event's page.
    let cause = dom(&console.url(&href_of(&event, "causation").unwrap())).await;
    assert!(
        cause.contains("<h1>order-1 version 1</h1>") && cause.contains("\"request\": \"r-7\""),
        "{cause}"
    );
    // An unknown event id is a 404 saying how much was read.
    let (status, _, body) = http(
        console.addr,
        "GET",
        &format!("/event?id={}", Uuid::now_v7()),
        &[],
        "",
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("(the whole feed)"), "{body}");
    screenshot(&console.url("/event?stream=order-1&version=2"), shot).await;
}

async fn check_chain(console: &Console, seeded: &Seeded, shot: &str) {
    let url = console.url(&format!("/chain?correlation={}", seeded.correlation));
    let chain = dom(&url).await;
    assert_eq!(
        count(&chain, "href=\"/event?stream=order-1&amp;"),
        3,
        "{chain}"
    );
    assert_eq!(
        count(&chain, "href=\"/event?stream=shipment-1&amp;"),
        1,
        "{chain}"
    );
    assert!(chain.contains("(all of it)"), "{chain}");
    let caused = dom(&console.url(&format!("/chain?caused_by={}", seeded.chain[2]))).await;
    assert_eq!(count(&caused, "href=\"/event?stream="), 1, "{caused}");
    assert!(
        caused.contains("href=\"/event?stream=shipment-1&amp;version=1\""),
        "{caused}"
    );
    screenshot(&url, shot).await;
}

async fn check_state(console: &Console, shot: &str) {
    // The registered aggregate at its last version, rendered by the server.
    let last = dom(&console.url("/state?stream=account-7")).await;
    assert_eq!(text_of(&last, "shown"), "3");
    assert!(last.contains("\"balance\": 7"), "{last}");
    // The slider's script: the server renders version 1, the script moves to version 2.
    let moved = dom(&console.url("/state?stream=account-7&version=1#v=2")).await;
    assert_eq!(text_of(&moved, "shown"), "2", "{moved}");
    assert!(moved.contains("\"balance\": 10"), "{moved}");
    assert!(moved.contains("\"owner\": \"ann\""), "{moved}");
    assert_eq!(text_of(&moved, "event-type"), "Moved");
    // An unregistered category: the events that make the state.
    let raw = dom(&console.url("/state?stream=order-1&version=2")).await;
    assert!(raw.contains("No aggregate is registered"), "{raw}");
    assert!(
        raw.contains("\"type\": \"OrderPaid\"") && !raw.contains("\"type\": \"OrderShipped\""),
        "{raw}"
    );
    screenshot(&console.url("/state?stream=account-7&version=2"), shot).await;
    slider_by_keyboard(console).await;
}

/// A user moving the slider: through chromedriver, the page at version 1 gets the keys
/// `ArrowRight` (version 2) and then `End` (version 3), as a person would press them on the
/// focused slider; after each the page shows the state at that version, fetched by its script.
async fn slider_by_keyboard(console: &Console) {
    let driver = WebDriver::start().await;
    driver
        .call(
            "POST",
            "/url",
            &json!({ "url": console.url("/state?stream=account-7&version=1") }),
        )
        .await;
    let slider = driver.find("#version").await;
    assert_eq!(driver.text_of("#shown").await, "1");
    assert!(driver.text_of("#state").await.contains("\"balance\": 0"));
    for (key, version, balance) in [("\u{E014}", "2", 10), ("\u{E010}", "3", 7)] {
        driver
            .call(
                "POST",
                &format!("/element/{slider}/value"),
                &json!({ "text": key }),
            )
            .await;
        let mut waited = 0;
        while driver.text_of("#shown").await != version {
            waited += 1;
            assert!(waited < 200, "the slider never showed version {version}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let state = driver.text_of("#state").await;
        assert!(
            state.contains(&format!("\"balance\": {balance}")),
            "{state}"
        );
        let url = driver.call("GET", "/url", &Value::Null).await;
        assert!(
            url.as_str()
                .unwrap()
                .ends_with(&format!("version={version}")),
            "{url}"
        );
    }
    drop(driver);
}

/// A chromedriver with one headless Chromium session, spoken to over plain HTTP (the W3C
/// `WebDriver` protocol).
struct WebDriver {
    process: tokio::process::Child,
    addr: SocketAddr,
    session: String,
    profile: PathBuf,
}

impl WebDriver {
    async fn start() -> Self {
        let program = std::env::var_os("CHROMEDRIVER")
            .map_or_else(|| PathBuf::from("chromedriver"), PathBuf::from);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let process = tokio::process::Command::new(&program)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "the slider test drives Chromium through chromedriver and cannot run {} \
                     ({e}): install it with `apt-get install chromium-driver` (or `cargo xtask \
                     setup`), or point $CHROMEDRIVER at one",
                    program.display()
                )
            });
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut tries = 0;
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            tries += 1;
            assert!(tries < 400, "chromedriver never listened on {addr}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let profile = std::env::temp_dir().join(unique_name("es-console-webdriver", '-'));
        std::fs::create_dir_all(&profile).unwrap();
        let capabilities = json!({ "capabilities": { "alwaysMatch": { "goog:chromeOptions": {
            "binary": chromium_path(),
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--no-first-run", format!("--user-data-dir={}", profile.display())],
        } } } });
        let (status, _, body) = http(
            addr,
            "POST",
            "/session",
            &[("Content-Type", "application/json")],
            &capabilities.to_string(),
        )
        .await;
        assert_eq!(status, 200, "chromedriver refused the session: {body}");
        let reply: Value = serde_json::from_str(&body).unwrap();
        let session = reply["value"]["sessionId"].as_str().unwrap().to_owned();
        WebDriver {
            process,
            addr,
            session,
            profile,
        }
    }

    /// One command of the session; its `value`.
    async fn call(&self, method: &str, path: &str, body: &Value) -> Value {
        let body = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        let (status, _, reply) = http(
            self.addr,
            method,
            &format!("/session/{}{path}", self.session),
            &[("Content-Type", "application/json")],
            &body,
        )
        .await;
        assert_eq!(status, 200, "{method} {path}: {reply}");
        serde_json::from_str::<Value>(&reply).unwrap()["value"].clone()
    }

    /// The id of the element `css` selects.
    async fn find(&self, css: &str) -> String {
        let found = self
            .call(
                "POST",
                "/element",
                &json!({ "using": "css selector", "value": css }),
            )
            .await;
        found["element-6066-11e4-a52e-4f735466cecf"]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {found}"))
            .to_owned()
    }

    /// The rendered text of the element `css` selects.
    async fn text_of(&self, css: &str) -> String {
        let element = self.find(css).await;
        self.call("GET", &format!("/element/{element}/text"), &Value::Null)
            .await
            .as_str()
            .unwrap()
            .to_owned()
    }
}

impl Drop for WebDriver {
    /// Ends the session (which ends its Chromium) and chromedriver, also when a check failed.
    fn drop(&mut self) {
        use std::io::{Read, Write};
        if let Ok(mut socket) = std::net::TcpStream::connect(self.addr) {
            let _ = socket.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = write!(
                socket,
                "DELETE /session/{} HTTP/1.1\r\nHost: {}\r\nContent-Length: 0\r\n\r\n",
                self.session, self.addr
            );
            let mut reply = [0u8; 1024];
            let _ = socket.read(&mut reply);
        }
        let _ = self.process.start_kill();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

async fn check_projections<S: StreamingStore>(
    store: &S,
    console: &Console,
    seeded: &Seeded,
    shot: &str,
) {
    let head = store.head_position().await.unwrap();
    let page = dom(&console.url("/projections")).await;
    assert!(page.contains("<td>orders-view</td>"), "{page}");
    assert_eq!(
        text_of(&page, "lag-orders-view"),
        (head - seeded.checkpoint).to_string()
    );
    // The chart was drawn by the script from the sampled history.
    let chart = &page[page.find("id=\"lag-chart\"").unwrap()..];
    assert!(chart.contains("data-name=\"orders-view\""), "{chart}");
    let samples: usize = chart[chart.find("data-samples=\"").unwrap() + 14..]
        .split('"')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(samples >= 1, "{chart}");
    screenshot(&console.url("/projections"), shot).await;
    // The chart follows the lag: 5 more events, and a later sample shows them.
    let lag = head - seeded.checkpoint;
    append(
        store,
        AppendRequest::new(
            stream("bulk-00"),
            ExpectedVersion::Exact(1),
            (0..5)
                .map(|n| new_event("Made", &json!({ "n": n })))
                .collect(),
        ),
    )
    .await;
    let grown = (lag + 5).to_string();
    let mut polls = 0;
    loop {
        let page = dom(&console.url("/projections")).await;
        let chart = &page[page.find("id=\"lag-chart\"").unwrap()..];
        if chart.contains(&format!(">orders-view: {grown}<")) {
            break;
        }
        polls += 1;
        assert!(
            polls < 20,
            "the chart never showed a lag of {grown}: {chart}"
        );
    }
}

async fn check_hostile(console: &Console) {
    // Payload, actor and metadata holding markup show as text.
    let event = dom(&console.url("/event?stream=note-evil&version=1")).await;
    assert_inert(&event);
    assert!(
        event.contains("&lt;script&gt;document.title='pwned'&lt;/script&gt;"),
        "{event}"
    );
    assert!(event.contains("&lt;img src=x onerror="), "{event}");
    let stream = dom(&console.url("/stream?id=note-evil")).await;
    assert_inert(&stream);
    // A hostile search is refused and shown as text.
    let (status, _, body) = http(
        console.addr,
        "GET",
        "/streams?prefix=%3Cscript%3Edocument.title%3D'pwned'%3C%2Fscript%3E",
        &[],
        "",
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(!body.contains("<script>document"), "{body}");
    let page =
        dom(&console.url("/streams?prefix=%3Cscript%3Edocument.title%3D'pwned'%3C%2Fscript%3E"))
            .await;
    assert_inert(&page);
}

/// The outbox's (pending, dead letters) as the store reports them.
async fn outbox_counts<S: StreamingStore>(store: &S) -> (u64, u64) {
    let status = store.relay_status().await.unwrap();
    (status.pending, status.dead_letters)
}

async fn check_writes<S: StreamingStore>(
    store: &S,
    console: &Console,
    conn: &[String],
    shot: &str,
) {
    let before = outbox_counts(store).await;
    assert_eq!(before, (1, 1));
    let dead = store.dead_letters(10).await.unwrap();
    let position = dead[0].record.position;
    let page = dom(&console.url("/outbox")).await;
    assert_inert(&page);
    assert!(page.contains("broker refused &lt;script&gt;"), "{page}");
    let chart = &page[page.find("id=\"backlog-chart\"").unwrap()..];
    assert!(chart.contains("data-name=\"outbox 0 dead\""), "{chart}");
    screenshot(&console.url("/outbox"), shot).await;

    let form = |token: &str| format!("outbox=0&position={position}&token={token}");
    // No token: 401; a wrong one: 403, as a form field or a bearer header.
    let (status, _, body) = http(console.addr, "POST", "/outbox/requeue", &[FORM], &form("")).await;
    assert_eq!(status, 401, "{body}");
    let (status, _, body) = http(
        console.addr,
        "POST",
        "/outbox/requeue",
        &[FORM],
        &form("nope"),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let (status, _, body) = http(
        console.addr,
        "POST",
        "/outbox/requeue",
        &[FORM, ("Authorization", "Bearer console-test-tokeN")],
        &format!("outbox=0&position={position}"),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    // A console started without a token refuses even the right one.
    let read_only = Console::start(conn, &[]).await;
    let (status, _, body) = http(
        read_only.addr,
        "POST",
        "/outbox/requeue",
        &[FORM],
        &form(TOKEN),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("read-only"), "{body}");
    let listed = dom(&read_only.url("/outbox")).await;
    assert!(
        !listed.contains("action=\"/outbox/requeue\""),
        "no write forms: {listed}"
    );
    read_only.stop().await;
    assert_eq!(
        outbox_counts(store).await,
        before,
        "refused writes change nothing"
    );
    assert_eq!(store.dead_letters(10).await.unwrap().len(), 1);

    // The token: re-queued, then redirected to the outbox page.
    let (status, head, body) = http(
        console.addr,
        "POST",
        "/outbox/requeue",
        &[FORM],
        &form(TOKEN),
    )
    .await;
    assert_eq!(status, 303, "{head}{body}");
    assert!(head.contains("location: /outbox?requeued=1"), "{head}");
    assert_eq!(outbox_counts(store).await, (2, 0));
}

async fn check_metrics(console: &Console) {
    let (status, head, text) = http(console.addr, "GET", "/metrics", &[], "").await;
    assert_eq!(status, 200);
    assert!(head.contains("text/plain"), "{head}");
    let requests: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("es_console_requests_total{") && l.contains("page=\"streams\""))
        .collect();
    assert!(!requests.is_empty(), "{text}");
    let served: f64 = requests
        .iter()
        .filter(|l| l.contains("status=\"200\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert!(served >= 3.0, "three stream-list pages were served: {text}");
    assert!(
        text.contains("es_console_projection_lag{projection=\"orders-view\""),
        "{text}"
    );
    assert!(
        text.contains("es_console_outbox_dead_letters{outbox=\"0\"}"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_on_postgres() {
    chromium();
    let url = es_test_support::database_url();
    let schema = unique_name("t_console", '_');
    let store = PgStore::builder_from_url(url.as_str())
        .schema(schema.as_str())
        .build()
        .await
        .expect("the test store builds");
    let conn = vec![format!("--url={url}"), format!("--schema={schema}")];
    scenario(store, conn, "postgres").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_on_redis() {
    chromium();
    let url = es_test_support::redis_url();
    let prefix = unique_name("t:console", ':');
    let store = RedisStore::builder(url.as_str())
        .prefix(prefix.as_str())
        .build()
        .await
        .expect("the test store builds");
    let conn = vec![format!("--url={url}"), format!("--redis-prefix={prefix}")];
    scenario(store, conn, "redis").await;
}

/// A PostgreSQL store with 3 feed partitions: the projections page shows one checkpoint per
/// partition (the consumer-group checkpoints) against that partition's head, the audit chain
/// is found across every partition, and a scan cut by `--scan-limit` says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_on_a_partitioned_store() {
    use es_core::contract::position::distance;
    use es_core::projection::partition_checkpoint;
    use es_core::CheckpointStore;

    let partitioning = es_core::Partitioning::new(3).unwrap();
    let url = es_test_support::database_url();
    let schema = unique_name("t_console_parts", '_');
    let store = PgStore::builder_from_url(url.as_str())
        .schema(schema.as_str())
        .partitioning(partitioning)
        .build()
        .await
        .expect("the test store builds");
    // One chain of 12 events over 12 streams, so over every partition.
    let correlation = Uuid::now_v7();
    let ids: Vec<Uuid> = (0..12).map(|_| Uuid::now_v7()).collect();
    for (i, id) in ids.iter().enumerate() {
        let mut metadata = Metadata::new().with_correlation_id(correlation);
        if i > 0 {
            metadata = metadata.with_causation_id(ids[i - 1]);
        }
        append(
            &store,
            AppendRequest::new(
                stream(&format!("order-{i}")),
                ExpectedVersion::NoStream,
                vec![new_event("Step", &json!({ "i": i }))
                    .with_id(*id)
                    .with_metadata(metadata)],
            ),
        )
        .await;
    }
    // Partition 0's checkpoint at its head, the others where they started.
    let heads: Vec<u64> = futures::future::try_join_all((0..3).map(|p| store.partition_head(p)))
        .await
        .unwrap();
    assert!(
        heads.iter().all(|h| *h > 0),
        "every partition has events: {heads:?}"
    );
    store
        .save_checkpoint(
            &partition_checkpoint("orders-view", 0),
            Checkpoint {
                position: heads[0],
                generation: 0,
            },
        )
        .await
        .unwrap();
    let conn = vec![
        format!("--url={url}"),
        format!("--schema={schema}"),
        "--partitions=3".to_owned(),
    ];
    let console = Console::start(&conn, &[]).await;

    let (status, _, page) = http(console.addr, "GET", "/projections", &[], "").await;
    assert_eq!(status, 200, "{page}");
    for (partition, head) in heads.iter().enumerate() {
        let checkpoint = store
            .load_checkpoint(&partition_checkpoint("orders-view", partition as u32))
            .await
            .unwrap();
        assert_eq!(
            text_of(&page, &format!("lag-orders-view/p{partition}")),
            distance(checkpoint.position, *head).to_string(),
            "partition {partition}"
        );
    }
    assert_eq!(text_of(&page, "lag-orders-view/p0"), "0");

    let chain = dom(&console.url(&format!("/chain?correlation={correlation}"))).await;
    assert_eq!(count(&chain, "href=\"/event?stream=order-"), 12, "{chain}");
    assert!(chain.contains("(all of it)"), "{chain}");
    let last = dom(&console.url(&format!("/event?id={}", ids[11]))).await;
    assert!(last.contains("<h1>order-11 version 1</h1>"), "{last}");
    assert_eq!(
        href_of(&last, "causation").unwrap(),
        format!("/event?id={}", ids[10])
    );
    console.stop().await;

    // A scan limit below the feed's length: fewer events, and a warning.
    let cut = Console::start(&conn, &["--scan-limit", "5"]).await;
    let (status, _, chain) = http(
        cut.addr,
        "GET",
        &format!("/chain?correlation={correlation}"),
        &[],
        "",
    )
    .await;
    assert_eq!(status, 200, "{chain}");
    assert_eq!(count(&chain, "href=\"/event?stream=order-"), 5, "{chain}");
    assert!(
        chain.contains("the scan stopped at --scan-limit"),
        "{chain}"
    );
    cut.stop().await;
}
