//! A writer process: several tasks appending random requests to one store, with idempotent
//! retries, logging every outcome before acting on it.
//!
//! `es-chaos writer --store S --url U --id W --incarnation I --seed X --tasks T --log F
//! [--inline] [--append-timeout-ms N] [--pace-ms A..B] [--partitions P]`
//!
//! Each task draws requests from its own seeded generator: a stream (16 hot `acct-*` streams, 64
//! `order-*` streams, or a fresh `fresh-*` stream), an [`ExpectedVersion`] mode (`Any`,
//! `NoStream`, `StreamExists`, or `Exact` of the version it just read), 1 to 50 events, and on
//! about a third of the requests outbox messages for some of the events. Ids come from
//! [`crate::ids`], so a retry re-sends the same ids. The request is logged (`req`), then sent
//! until it has an outcome: a transient error ([`StoreError::Unavailable`] and other errors
//! whose outcome is unknown) is followed by re-sending the exact same request; an inline
//! projection failure is retried a few times; a conflict ends it. Every attempt is logged
//! (`ack` / `err`) before the next step, and one acknowledged request in ten is re-sent once
//! more, which must come back as a duplicate with the same result. A restarted process reads its
//! log and re-sends each task's request that has no outcome yet before drawing new ones.
//!
//! With `--inline` (PostgreSQL), the store runs an inline projection that counts each stream's
//! events in `chaos_inline` and, at random (about 1% each, decided from the seed, the request
//! and the attempt), fails or stalls briefly. On command from the orchestrator (stdin) it also
//! stalls longer than the append time-out (`stall <ms> sleep|idle`), or sets a short
//! `statement_timeout` in the append's transaction and runs into it (`stmt-timeout <ms>`).
//! `stop` makes the tasks finish their current request and exit; end of input without `stop`
//! means the orchestrator is gone, and the process exits at once.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use es_core::projection::HandlerError;
use es_core::{
    AppendRequest, AppendResult, EventStore, ExpectedVersion, Metadata, NewEvent, OutboxMessage,
    Partitioning, RecordedEvent, StoreError, StreamId,
};
use es_postgres::PgStore;
use futures::future::BoxFuture;
use serde_json::json;
use sqlx::{AssertSqlSafe, PgConnection};
use tokio::io::AsyncBufReadExt;

use crate::cli::{Opts, StoreKind};
use crate::ids::{self, ReqKey};
use crate::logs::{LogFile, WriterLine};
use crate::stores::{self, NAMESPACE, PG_INLINE};

/// Hot streams of category `acct` (also the category a subscriber filters on).
const HOT_STREAMS: u64 = 16;
/// Streams of category `order`.
const ORDER_STREAMS: u64 = 64;
/// Attempts of a request whose inline projection failed, before giving up.
const INLINE_ATTEMPTS: u32 = 5;
/// Errors of unknown outcome other than `Unavailable` tolerated per request before giving up.
const OTHER_ERRORS: u32 = 50;
/// How long a request is retried while the store is unavailable.
const REQUEST_PATIENCE: Duration = Duration::from_secs(300);

/// A writer's settings.
#[derive(Debug, Clone)]
struct Config {
    store: StoreKind,
    url: String,
    id: u16,
    incarnation: u32,
    seed: u64,
    tasks: u8,
    log: PathBuf,
    inline: bool,
    append_timeout: Duration,
    pace: (u64, u64),
    partitioning: Partitioning,
}

/// Parses `A..B` (milliseconds).
pub(crate) fn parse_range(text: &str) -> Result<(u64, u64)> {
    let (a, b) = text
        .split_once("..")
        .ok_or_else(|| anyhow::anyhow!("expected A..B, got {text:?}"))?;
    let (a, b) = (a.parse()?, b.parse()?);
    anyhow::ensure!(a <= b, "empty range {text:?}");
    Ok((a, b))
}

/// `es-chaos writer ...`.
pub(crate) fn main(args: &[String]) -> Result<()> {
    let opts = Opts::parse(
        args,
        &[
            "store",
            "url",
            "id",
            "incarnation",
            "seed",
            "tasks",
            "log",
            "append-timeout-ms",
            "pace-ms",
            "partitions",
        ],
        &["inline"],
    )?;
    let config = Config {
        store: opts.parsed_required("store")?,
        url: opts.required("url")?.to_owned(),
        id: opts.parsed_required("id")?,
        incarnation: opts.parsed("incarnation", 0)?,
        seed: opts.parsed_required("seed")?,
        tasks: opts.parsed("tasks", 3)?,
        log: PathBuf::from(opts.required("log")?),
        inline: opts.flag("inline"),
        append_timeout: Duration::from_millis(opts.parsed("append-timeout-ms", 2000)?),
        pace: parse_range(opts.get("pace-ms").unwrap_or("5..60"))?,
        partitioning: stores::partitioning(opts.parsed("partitions", 1)?)?,
    };
    anyhow::ensure!(config.tasks >= 1, "--tasks must be at least 1");
    stores::block_on(run(config))
}

/// Commands from the orchestrator, and the attempt number of each request in flight (read by
/// the inline projection).
#[derive(Debug, Default)]
struct Control {
    stop: AtomicBool,
    /// Pending `stmt-timeout` commands (milliseconds).
    timeouts: Mutex<VecDeque<u64>>,
    /// Pending `stall` commands (milliseconds, idle instead of `pg_sleep`).
    stalls: Mutex<VecDeque<(u64, bool)>>,
    /// First event id of a request in flight → its attempt number.
    attempts: Mutex<HashMap<u128, u32>>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Control {
    fn command(&self, line: &str) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["stop"] => self.stop.store(true, Ordering::SeqCst),
            ["stmt-timeout", ms] => {
                if let Ok(ms) = ms.parse() {
                    locked(&self.timeouts).push_back(ms);
                }
            }
            ["stall", ms, how] => {
                if let Ok(ms) = ms.parse() {
                    locked(&self.stalls).push_back((ms, *how == "idle"));
                }
            }
            _ => eprintln!("es-chaos writer: unknown command {line:?}"),
        }
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// What the log says about each task: its next sequence number and the request it left without
/// an outcome.
#[derive(Debug, Default)]
struct TaskHistory {
    next_seq: u64,
    pending: Option<Spec>,
}

fn read_history(config: &Config) -> Result<BTreeMap<u8, TaskHistory>> {
    let mut tasks: BTreeMap<u8, TaskHistory> = BTreeMap::new();
    for line in crate::logs::read_writer_log(&config.log)? {
        match line {
            WriterLine::Req {
                t,
                s,
                stream,
                exp,
                n,
                pad,
                ob,
            } => {
                let task = tasks.entry(t).or_default();
                task.next_seq = task.next_seq.max(s + 1);
                task.pending = Some(Spec {
                    key: ReqKey {
                        writer: config.id,
                        task: t,
                        seq: s,
                    },
                    stream,
                    expected: exp,
                    events: n,
                    pad,
                    outbox: ob,
                });
            }
            WriterLine::End { t, s, .. } => {
                let task = tasks.entry(t).or_default();
                if task.pending.as_ref().is_some_and(|p| p.key.seq == s) {
                    task.pending = None;
                }
            }
            _ => {}
        }
    }
    Ok(tasks)
}

/// A request, as logged: enough to rebuild it exactly.
#[derive(Debug, Clone, PartialEq)]
struct Spec {
    key: ReqKey,
    stream: String,
    expected: ExpectedVersion,
    events: u16,
    pad: u16,
    outbox: Vec<u16>,
}

impl Spec {
    fn line(&self) -> WriterLine {
        WriterLine::Req {
            t: self.key.task,
            s: self.key.seq,
            stream: self.stream.clone(),
            exp: self.expected,
            n: self.events,
            pad: self.pad,
            ob: self.outbox.clone(),
        }
    }

    fn request(&self) -> Result<AppendRequest> {
        let stream = StreamId::parse(&self.stream)?;
        let first = ids::event_id(self.key, 0);
        let pad = "x".repeat(usize::from(self.pad));
        let events = (0..self.events)
            .map(|i| {
                let payload = json!({
                    "w": self.key.writer, "t": self.key.task, "s": self.key.seq, "i": i, "pad": pad,
                });
                NewEvent::from_value("ChaosMoved", 1, &payload)
                    .with_id(ids::event_id(self.key, i))
                    .with_metadata(Metadata::new().with_correlation_id(first))
            })
            .collect();
        let outbox = self
            .outbox
            .iter()
            .map(|&i| OutboxMessage {
                message_id: ids::message_id(self.key, i),
                source_event_id: ids::event_id(self.key, i),
                topic: "chaos.moved".into(),
                key: self.stream.clone(),
                message_type: "ChaosMoved".into(),
                schema_version: 1,
                payload: Bytes::from(json!({ "s": self.key.seq, "i": i }).to_string()),
                metadata: Metadata::new().with_causation_id(ids::event_id(self.key, i)),
            })
            .collect();
        Ok(AppendRequest::new(stream, self.expected, events).with_outbox(outbox))
    }
}

/// What the tasks of one process share.
struct Shared<S> {
    store: S,
    log: Arc<LogFile>,
    control: Arc<Control>,
    config: Config,
}

async fn run(config: Config) -> Result<()> {
    let history = read_history(&config)?;
    let log = Arc::new(LogFile::open(&config.log)?);
    log.write(&WriterLine::Start {
        incarnation: config.incarnation,
        pid: std::process::id(),
    });
    let control = Arc::new(Control::default());
    {
        let control = Arc::clone(&control);
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                control.command(&line);
            }
            if !control.stopping() {
                // The orchestrator is gone.
                std::process::exit(3);
            }
        });
    }
    match config.store {
        StoreKind::Postgres => {
            let options = stores::pg_options(&config.url, &format!("chaos-w{}", config.id), false)?;
            let pool = stores::pg_pool(options, 12);
            let mut builder = PgStore::builder(pool)
                .schema(NAMESPACE)
                .partitioning(config.partitioning)
                .run_migrations(false)
                .append_timeout(config.append_timeout)
                .poll_interval(Duration::from_millis(500));
            if config.inline {
                let inline = Arc::new(Inline {
                    seed: config.seed,
                    control: Arc::clone(&control),
                    log: Arc::clone(&log),
                });
                builder = builder.inline_projection("chaos_inline", move |conn, events| {
                    let inline = Arc::clone(&inline);
                    Box::pin(async move { inline.handle(conn, events).await })
                        as BoxFuture<'_, Result<(), HandlerError>>
                });
            }
            let store = stores::pg_store(builder).await?;
            run_tasks(store, log, control, config, history).await
        }
        StoreKind::Redis => {
            let store =
                stores::redis_store(&config.url, Duration::from_secs(2), config.partitioning)
                    .await?;
            run_tasks(store, log, control, config, history).await
        }
    }
}

async fn run_tasks<S: EventStore>(
    store: S,
    log: Arc<LogFile>,
    control: Arc<Control>,
    config: Config,
    mut history: BTreeMap<u8, TaskHistory>,
) -> Result<()> {
    let shared = Arc::new(Shared {
        store,
        log,
        control,
        config,
    });
    let mut tasks = Vec::new();
    for t in 0..shared.config.tasks {
        let task = history.remove(&t).unwrap_or_default();
        let shared = Arc::clone(&shared);
        tasks.push(tokio::spawn(
            async move { task_loop(&shared, t, task).await },
        ));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// `SplitMix64`: mixes the seed with small numbers into independent generator seeds.
pub(crate) fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

async fn task_loop<S: EventStore>(shared: &Shared<S>, t: u8, history: TaskHistory) -> Result<()> {
    let config = &shared.config;
    let mut rng = fastrand::Rng::with_seed(mix(config.seed
        ^ mix(u64::from(config.id) << 40 | u64::from(t) << 32 | u64::from(config.incarnation))));
    if let Some(pending) = history.pending {
        // Left without an outcome by an earlier incarnation: re-send it as it was.
        drive(shared, &pending, &mut rng).await?;
    }
    let mut seq = history.next_seq.max(1);
    while !shared.control.stopping() {
        let (lo, hi) = config.pace;
        tokio::time::sleep(Duration::from_millis(rng.u64(lo..=hi))).await;
        if shared.control.stopping() {
            break;
        }
        let key = ReqKey {
            writer: config.id,
            task: t,
            seq,
        };
        seq += 1;
        let spec = draw(&shared.store, key, &mut rng).await;
        shared.log.write(&spec.line());
        drive(shared, &spec, &mut rng).await?;
    }
    Ok(())
}

/// Draws the next request.
async fn draw<S: EventStore>(store: &S, key: ReqKey, rng: &mut fastrand::Rng) -> Spec {
    let roll = rng.u8(0..100);
    let (stream, fresh) = if roll < 25 {
        (format!("acct-{}", rng.u64(0..HOT_STREAMS)), false)
    } else if roll < 90 {
        (format!("order-{}", rng.u64(0..ORDER_STREAMS)), false)
    } else {
        (
            format!("fresh-w{}t{}s{}", key.writer, key.task, key.seq),
            true,
        )
    };
    let mode = rng.u8(0..100);
    let expected = if fresh {
        if mode < 70 {
            ExpectedVersion::NoStream
        } else {
            ExpectedVersion::Any
        }
    } else if mode < 35 {
        ExpectedVersion::Any
    } else if mode < 45 {
        ExpectedVersion::NoStream
    } else if mode < 60 {
        ExpectedVersion::StreamExists
    } else {
        // Exact: the version just read (another writer may move it first: a conflict).
        match StreamId::parse(&stream) {
            Ok(id) => match store.stream_version(&id).await {
                Ok(v) => ExpectedVersion::Exact(v),
                Err(_) => ExpectedVersion::Any,
            },
            Err(_) => ExpectedVersion::Any,
        }
    };
    let size = rng.u8(0..100);
    let events: u16 = if size < 60 {
        rng.u16(1..=3)
    } else if size < 90 {
        rng.u16(4..=20)
    } else {
        rng.u16(21..=50)
    };
    let outbox = if rng.u8(0..100) < 35 {
        let mut chosen: Vec<u16> = (0..events).filter(|_| rng.u8(0..100) < 40).collect();
        if chosen.is_empty() {
            chosen.push(rng.u16(0..events));
        }
        chosen
    } else {
        Vec::new()
    };
    Spec {
        key,
        stream,
        expected,
        events,
        pad: rng.u16(0..200),
        outbox,
    }
}

/// The variant of a store error, for the log.
pub(crate) fn error_kind(e: &StoreError) -> &'static str {
    match e {
        StoreError::Conflict { .. } => "conflict",
        StoreError::DuplicateEvent { .. } => "duplicate",
        StoreError::PayloadTooLarge { .. } => "payload_too_large",
        StoreError::InvalidRequest { .. } => "invalid_request",
        StoreError::InlineProjection { .. } => "inline_projection",
        StoreError::InvalidStreamId(_) => "invalid_stream_id",
        StoreError::Corrupt { .. } => "corrupt",
        StoreError::Unavailable(_) => "unavailable",
        StoreError::LostTail { .. } => "lost_tail",
        StoreError::Fenced { .. } => "fenced",
        StoreError::Backend(_) => "backend",
        _ => "other",
    }
}

/// Sends `spec` until it has an outcome, logging every attempt.
async fn drive<S: EventStore>(
    shared: &Shared<S>,
    spec: &Spec,
    rng: &mut fastrand::Rng,
) -> Result<()> {
    let request = spec.request()?;
    let (t, s) = (spec.key.task, spec.key.seq);
    let first = ids::event_id(spec.key, 0).as_u128();
    let log = &shared.log;
    let start = Instant::now();
    let mut backoff = Duration::from_millis(20);
    let (mut attempt, mut inline_failures, mut other_errors) = (0u32, 0u32, 0u32);
    let end = |r: &str| {
        log.write(&WriterLine::End {
            t,
            s,
            r: r.to_owned(),
        });
    };
    let outcome = loop {
        attempt += 1;
        locked(&shared.control.attempts).insert(first, attempt);
        let sent = Instant::now();
        let err = match shared.store.append(request.clone()).await {
            Ok(result) => {
                log.write(&ack(t, s, attempt, &result, false, sent));
                check_result(log, spec, &result);
                if rng.u8(0..100) < 10 {
                    attempt += 1;
                    locked(&shared.control.attempts).insert(first, attempt);
                    resend_after_success(shared, spec, &request, &result, attempt).await;
                }
                break "ok";
            }
            Err(e) => e,
        };
        log.write(&WriterLine::Err {
            t,
            s,
            a: attempt,
            e: error_kind(&err).to_owned(),
            msg: err.to_string(),
            ms: millis(sent),
        });
        match err {
            StoreError::Conflict { .. } => break "conflict",
            StoreError::InlineProjection { .. } => {
                inline_failures += 1;
                if inline_failures >= INLINE_ATTEMPTS {
                    break "inline";
                }
            }
            StoreError::DuplicateEvent { .. } => {
                log.write(&WriterLine::Viol {
                    what: "duplicate_on_retry".into(),
                    detail: format!(
                        "{}: re-sending the same request to `{}` was refused as a partial \
                         duplicate: {err}",
                        spec.key, spec.stream
                    ),
                });
                break "duplicate";
            }
            StoreError::InvalidRequest { .. }
            | StoreError::PayloadTooLarge { .. }
            | StoreError::InvalidStreamId(_) => {
                log.write(&WriterLine::Viol {
                    what: "valid_request_refused".into(),
                    detail: format!("{}: {err}", spec.key),
                });
                break "invalid";
            }
            StoreError::Unavailable(_) => {
                if start.elapsed() > REQUEST_PATIENCE {
                    break "gave_up";
                }
            }
            _ => {
                // Backend, corrupt, or something new: the outcome is unknown, so the same request
                // is sent again, which is safe; too many of them end the request.
                other_errors += 1;
                if other_errors >= OTHER_ERRORS || start.elapsed() > REQUEST_PATIENCE {
                    break "gave_up";
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    };
    locked(&shared.control.attempts).remove(&first);
    end(outcome);
    Ok(())
}

fn millis(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn ack(t: u8, s: u64, a: u32, result: &AppendResult, after_ok: bool, sent: Instant) -> WriterLine {
    WriterLine::Ack {
        ms: millis(sent),
        t,
        s,
        a,
        v: result.stream_version,
        p: result.positions.clone(),
        dup: result.duplicate,
        after_ok,
    }
}

/// Checks an acknowledgement on its own: one position per event, strictly increasing, and a
/// stream version that leaves room for the events.
fn check_result(log: &LogFile, spec: &Spec, result: &AppendResult) {
    let n = usize::from(spec.events);
    let bad = result.positions.len() != n
        || !result.positions.windows(2).all(|w| w[0] < w[1])
        || result.stream_version < n as u64
        || match spec.expected {
            ExpectedVersion::Exact(v) if !result.duplicate => result.stream_version != v + n as u64,
            ExpectedVersion::NoStream if !result.duplicate => result.stream_version != n as u64,
            _ => false,
        };
    if bad {
        log.write(&WriterLine::Viol {
            what: "bad_ack".into(),
            detail: format!(
                "{}: {} events to `{}` expecting {:?} acknowledged as version {} at {:?}",
                spec.key, n, spec.stream, spec.expected, result.stream_version, result.positions
            ),
        });
    }
}

/// Re-sends an acknowledged request: it must be reported as a duplicate with the same result.
async fn resend_after_success<S: EventStore>(
    shared: &Shared<S>,
    spec: &Spec,
    request: &AppendRequest,
    first: &AppendResult,
    attempt: u32,
) {
    let (t, s) = (spec.key.task, spec.key.seq);
    let sent = Instant::now();
    match shared.store.append(request.clone()).await {
        Ok(again) => {
            shared.log.write(&ack(t, s, attempt, &again, true, sent));
            if !again.duplicate
                || again.positions != first.positions
                || again.stream_version != first.stream_version
            {
                shared.log.write(&WriterLine::Viol {
                    what: "retry_mismatch".into(),
                    detail: format!(
                        "{}: re-sent after success to `{}`: first version {} at {:?}, then \
                         version {} at {:?} (duplicate: {})",
                        spec.key,
                        spec.stream,
                        first.stream_version,
                        first.positions,
                        again.stream_version,
                        again.positions,
                        again.duplicate
                    ),
                });
            }
        }
        Err(err) => {
            // A fault hit the re-send; the first acknowledgement stands.
            shared.log.write(&WriterLine::Err {
                t,
                s,
                a: attempt,
                e: error_kind(&err).to_owned(),
                msg: err.to_string(),
                ms: millis(sent),
            });
        }
    }
}

/// The inline projection of `--inline` writers.
struct Inline {
    seed: u64,
    control: Arc<Control>,
    log: Arc<LogFile>,
}

impl Inline {
    /// Logs a fault injected into attempt `attempt` of the append of `events`.
    fn inject(&self, what: &str, events: &[RecordedEvent], attempt: u32, ms: u64) {
        let key = events
            .first()
            .and_then(|e| ids::decode(e.event_id.as_u128()))
            .map(|(_, key, _)| key);
        self.log.write(&WriterLine::Inj {
            what: what.to_owned(),
            t: key.map(|k| k.task),
            s: key.map(|k| k.seq),
            a: Some(attempt),
            ms: Some(ms),
        });
    }

    async fn handle(
        &self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<(), HandlerError> {
        let Some(first) = events.first() else {
            return Ok(());
        };
        let id = first.event_id.as_u128();
        let attempt = locked(&self.control.attempts)
            .get(&id)
            .copied()
            .unwrap_or(0);
        let timeout = locked(&self.control.timeouts).pop_front();
        if let Some(ms) = timeout {
            // A statement time-out inside the append's transaction, after its allocation.
            self.inject("stmt_timeout", events, attempt, ms);
            sqlx::query(AssertSqlSafe(format!("SET LOCAL statement_timeout = {ms}")))
                .execute(&mut *conn)
                .await?;
            sqlx::query("SELECT pg_sleep($1)")
                .bind((Duration::from_millis(ms) * 4).as_secs_f64() + 0.05)
                .execute(&mut *conn)
                .await?;
        }
        let stall = locked(&self.control.stalls).pop_front();
        if let Some((ms, idle)) = stall {
            let what = if idle { "stall_idle" } else { "stall_sleep" };
            self.inject(what, events, attempt, ms);
            pause(conn, ms, idle).await?;
        }
        let roll = mix(self.seed ^ mix(id as u64 ^ (id >> 64) as u64) ^ u64::from(attempt)) % 1000;
        if roll < 10 {
            self.inject("inline_fail", events, attempt, 0);
            return Err("injected inline projection failure".into());
        }
        if roll < 20 {
            let ms = 20 + roll * 15;
            self.inject("inline_short_stall", events, attempt, ms);
            pause(conn, ms, roll % 2 == 0).await?;
        }
        let stream = first.stream_id.as_str();
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO \"{NAMESPACE}\".{PG_INLINE} (stream_id, n) VALUES ($1, $2) \
             ON CONFLICT (stream_id) DO UPDATE SET n = {PG_INLINE}.n + excluded.n"
        )))
        .bind(stream)
        .bind(i64::try_from(events.len())?)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

/// Stalls an append's transaction: `pg_sleep` (a statement that runs long) or an idle client.
async fn pause(conn: &mut PgConnection, ms: u64, idle: bool) -> Result<(), HandlerError> {
    if idle {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        // The next statement finds out whether the server gave up on the transaction.
        sqlx::query("SELECT 1").execute(&mut *conn).await?;
    } else {
        sqlx::query("SELECT pg_sleep($1)")
            .bind(Duration::from_millis(ms).as_secs_f64())
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_rebuild_exactly_from_their_log_line() {
        let spec = Spec {
            key: ReqKey {
                writer: 2,
                task: 1,
                seq: 9,
            },
            stream: "order-5".into(),
            expected: ExpectedVersion::Exact(3),
            events: 4,
            pad: 7,
            outbox: vec![1, 3],
        };
        let WriterLine::Req {
            t,
            s,
            stream,
            exp,
            n,
            pad,
            ob,
        } = spec.line()
        else {
            panic!("not a request line");
        };
        let again = Spec {
            key: ReqKey {
                writer: 2,
                task: t,
                seq: s,
            },
            stream,
            expected: exp,
            events: n,
            pad,
            outbox: ob,
        };
        assert_eq!(again, spec);
        let (a, b) = (spec.request().unwrap(), again.request().unwrap());
        assert_eq!(a, b);
        assert_eq!(a.events.len(), 4);
        assert_eq!(a.outbox.len(), 2);
        assert_eq!(a.outbox[1].source_event_id, a.events[3].event_id);
    }

    #[test]
    fn ranges_parse() {
        assert_eq!(parse_range("5..60").unwrap(), (5, 60));
        assert!(parse_range("9..1").is_err());
        assert!(parse_range("9").is_err());
    }
}
