//! The processes that read what the writers wrote: subscribers, a projection and outbox relays.
//!
//! Every one takes `--partitions P` (default 1), the store's feed partitions.
//!
//! - `es-chaos subscriber --store S --url U --log F [--category C]`: subscribes from the last
//!   position in its log (0 the first time) and logs every delivered event; exits once it
//!   delivered the orchestrator's end marker, or on an error the subscription cannot retry. With
//!   several partitions it follows them all ([`EventStore::subscribe_all`]) from the last
//!   position its log holds for each, and exits once it delivered every partition's end marker.
//! - `es-chaos projection --store S --url U --log F [--member M]`: the read model `stream →
//!   (events, last version)`. On PostgreSQL it runs exactly once ([`es_postgres::ExactlyOnce`],
//!   the table `chaos_read_model`); on Redis at least once ([`es_core::AtLeastOnce`], a hash
//!   updated by a script that ignores versions it has already applied). Both record a version
//!   that does not follow the last one applied (a skip) in a gap list. With several partitions
//!   the process is worker `M` of the projection's consumer group
//!   ([`ProjectionRunner::spawn_group`], a short lease), which divides the partitions with the
//!   other worker process, each partition with its own fenced checkpoint; it logs each claim of a
//!   partition and each change of the partitions it runs. Runs until its stdin closes.
//! - `es-chaos relay --store S --url U --id N --incarnation I --seed X --log F`: an
//!   [`es_core::Relay`] whose publisher appends the records it publishes to `F`, the file all
//!   relays share as their broker (and, at random, fails a batch before or after publishing half
//!   of it, as a broker might; it never rejects a record for good). On a store with one outbox
//!   per partition (Redis with several partitions) the process is a worker of the relay group
//!   ([`Relay::spawn_group`]) over the outboxes, and logs each change of the outboxes it
//!   publishes. Runs until its stdin closes.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use es_core::outbox::PublishOutcome;
use es_core::projection::{BatchError, HandlerError, RunnerConfig};
use es_core::{
    AtLeastOnce, CheckpointStore, EventFilter, EventStore, FeedPosition, GroupConfig, LeaseStore,
    OutboxRecord, OutboxStore, Partitioning, Projection, ProjectionRunner, ProjectionSink,
    ProjectionStatus, Publisher, RecordedEvent, Relay, RelayConfig,
};
use es_postgres::{ExactlyOnce, PgProjection, PgStore};
use es_redis::redis;
use futures::StreamExt;
use sqlx::{AssertSqlSafe, PgConnection};
use tokio::io::AsyncReadExt;

use crate::cli::{Opts, StoreKind};
use crate::logs::{self, Delivered, LogFile};
use crate::stores::{self, END_TYPE, FILTERED_CATEGORY, NAMESPACE, PG_GAPS, PG_MODEL, PROJECTION};
use crate::writer::{error_kind, mix};

/// Resolves when stdin reaches its end (the orchestrator closed it, or died).
async fn stdin_closed() {
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    while let Ok(n) = stdin.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}

async fn pg_consumer_store(url: &str, name: &str, partitioning: Partitioning) -> Result<PgStore> {
    let pool = stores::pg_pool(stores::pg_options(url, name, true)?, 6);
    stores::pg_store(
        PgStore::builder(pool)
            .schema(NAMESPACE)
            .partitioning(partitioning)
            .run_migrations(false)
            .poll_interval(Duration::from_millis(500)),
    )
    .await
}

/// `es-chaos subscriber ...`.
pub(crate) fn subscriber(args: &[String]) -> Result<()> {
    let opts = Opts::parse(
        args,
        &["store", "url", "log", "category", "partitions"],
        &[],
    )?;
    let store: StoreKind = opts.parsed_required("store")?;
    let url = opts.required("url")?.to_owned();
    let log = PathBuf::from(opts.required("log")?);
    let partitioning = stores::partitioning(opts.parsed("partitions", 1)?)?;
    let filter = opts
        .get("category")
        .map_or_else(EventFilter::all, |c| EventFilter::all().category(c));
    stores::block_on(async move {
        match store {
            StoreKind::Postgres => {
                let store = pg_consumer_store(&url, "chaos-sub", partitioning).await?;
                subscribe(store, filter, &log).await
            }
            StoreKind::Redis => {
                let store = stores::redis_store(&url, Duration::from_secs(5), partitioning).await?;
                subscribe(store, filter, &log).await
            }
        }
    })
}

async fn subscribe<S: EventStore>(store: S, filter: EventFilter, path: &Path) -> Result<()> {
    let partitions = store.partitioning().count();
    let logs::Resume { after, mut markers } = logs::resume_point(path, partitions)?;
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let mut out = BufWriter::with_capacity(1 << 16, file);
    writeln!(out, "{}", logs::resumed_line(&after))?;
    out.flush()?;
    let feed = if partitions == 1 {
        store.subscribe(after[0], filter)
    } else {
        store.subscribe_all(&FeedPosition::from_positions(after), filter)
    };
    let mut feed = feed.ready_chunks(512);
    let closed = stdin_closed();
    tokio::pin!(closed);
    loop {
        if markers.len() == partitions as usize {
            return Ok(());
        }
        let chunk = tokio::select! {
            () = &mut closed => return Ok(()),
            chunk = feed.next() => chunk,
        };
        let Some(chunk) = chunk else {
            writeln!(out, "X ended the subscription ended without an error")?;
            out.flush()?;
            std::process::exit(2);
        };
        for item in chunk {
            match item {
                Ok(e) => {
                    let delivered = Delivered {
                        partition: e.partition,
                        position: e.global_position,
                        id: e.event_id.as_u128(),
                        stream: e.stream_id.to_string(),
                        version: e.stream_version,
                    };
                    writeln!(out, "{}", logs::delivered_line(&delivered, partitions))?;
                    if e.event_type == END_TYPE {
                        markers.insert(e.partition);
                    }
                }
                Err(err) => {
                    writeln!(out, "X {} {}", error_kind(&err), one_line(&err.to_string()))?;
                    out.flush()?;
                    std::process::exit(2);
                }
            }
        }
        out.flush()?;
    }
}

fn one_line(text: &str) -> String {
    text.replace('\n', " ")
}

/// `es-chaos projection ...`.
pub(crate) fn projection(args: &[String]) -> Result<()> {
    let opts = Opts::parse(args, &["store", "url", "log", "partitions", "member"], &[])?;
    let store: StoreKind = opts.parsed_required("store")?;
    let url = opts.required("url")?.to_owned();
    let log = Arc::new(LogFile::open(Path::new(opts.required("log")?))?);
    let partitioning = stores::partitioning(opts.parsed("partitions", 1)?)?;
    let member = opts.get("member").unwrap_or("projection").to_owned();
    stores::block_on(async move {
        match store {
            StoreKind::Postgres => {
                let store = pg_consumer_store(&url, "chaos-projection", partitioning).await?;
                let sink = {
                    let store = store.clone();
                    move || ExactlyOnce::new(&store, PgModel)
                };
                run_projection(store, sink, &log, &member).await
            }
            StoreKind::Redis => {
                let store = stores::redis_store(&url, Duration::from_secs(5), partitioning).await?;
                let sink = {
                    let store = store.clone();
                    move || {
                        let model = RedisModel {
                            conn: store.connection(),
                            script: redis::Script::new(REDIS_APPLY),
                        };
                        AtLeastOnce::new(model, store.clone())
                    }
                };
                run_projection(store, sink, &log, &member).await
            }
        }
    })
}

/// The projection runner's settings.
fn runner_config() -> RunnerConfig {
    RunnerConfig {
        // Enough to ride out a server restart of a few seconds with backoff capped at 5 s.
        max_attempts: 100,
        ..RunnerConfig::default()
    }
}

/// Runs `sink` until stdin closes: one runner on the single feed, or this process's worker of the
/// projection's consumer group (named `member`) on a store with several partitions. A runner
/// that fails is logged and started again (a host would restart it); the checker reports the
/// failures.
async fn run_projection<S, K, F>(store: S, sink: F, log: &Arc<LogFile>, member: &str) -> Result<()>
where
    S: EventStore + LeaseStore,
    K: ProjectionSink,
    F: Fn() -> K + Clone + Send + 'static,
{
    let runner = ProjectionRunner::with_config(store.clone(), runner_config());
    if !store.partitioning().is_single() {
        return run_group(&runner, sink, log, member).await;
    }
    let closed = stdin_closed();
    tokio::pin!(closed);
    loop {
        let handle = runner.spawn(sink());
        let failure = loop {
            tokio::select! {
                () = &mut closed => {
                    handle.shutdown().await;
                    return Ok(());
                }
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            if let ProjectionStatus::Failed(failure) = handle.status() {
                break failure;
            }
        };
        log.write_text(&format!("F {}\n", one_line(&failure.to_string())));
        handle.shutdown().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// [`run_projection`] as a consumer-group worker: logs every claim (through [`Claims`]) and
/// every change of the partitions it runs; a partition whose runner failed is logged and the
/// worker is started again.
async fn run_group<S, K, F>(
    runner: &ProjectionRunner<S>,
    sink: F,
    log: &Arc<LogFile>,
    member: &str,
) -> Result<()>
where
    S: EventStore + LeaseStore,
    K: ProjectionSink,
    F: Fn() -> K + Clone + Send + 'static,
{
    let closed = stdin_closed();
    tokio::pin!(closed);
    loop {
        let make = {
            let (sink, log, member) = (sink.clone(), Arc::clone(log), member.to_owned());
            move || Claims {
                sink: sink(),
                log: Arc::clone(&log),
                member: member.clone(),
            }
        };
        let group = runner.spawn_group(
            GroupConfig::new(member).lease_ttl(stores::GROUP_LEASE),
            make,
        );
        let mut owned = Vec::new();
        let failure = loop {
            tokio::select! {
                () = &mut closed => {
                    group.shutdown().await;
                    log.write_text(&logs::owned_line(member, &[]));
                    return Ok(());
                }
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            let now = group.owned();
            if now != owned {
                log.write_text(&logs::owned_line(member, &now));
                owned = now;
            }
            let failed = group
                .statuses()
                .into_iter()
                .find_map(|(p, status)| match status {
                    ProjectionStatus::Failed(failure) => Some((p, failure)),
                    _ => None,
                });
            if let Some(failed) = failed {
                break failed;
            }
        };
        let (partition, failure) = failure;
        log.write_text(&format!(
            "F {member} partition {partition}: {}\n",
            one_line(&failure.to_string())
        ));
        group.shutdown().await;
        log.write_text(&logs::owned_line(member, &[]));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A consumer-group worker's sink that logs each partition it claims (`C`), once the claim has
/// fenced the partition's checkpoint.
struct Claims<K> {
    sink: K,
    log: Arc<LogFile>,
    member: String,
}

impl<K: ProjectionSink> ProjectionSink for Claims<K> {
    fn name(&self) -> &str {
        self.sink.name()
    }

    fn filter(&self) -> EventFilter {
        self.sink.filter()
    }

    async fn checkpoint(&mut self) -> Result<u64, HandlerError> {
        self.sink.checkpoint().await
    }

    async fn apply(&mut self, events: &[RecordedEvent], checkpoint: u64) -> Result<(), BatchError> {
        self.sink.apply(events, checkpoint).await
    }

    async fn reset(&mut self) -> Result<(), HandlerError> {
        self.sink.reset().await
    }

    async fn claim(&mut self, partition: u32) -> Result<u64, HandlerError> {
        let position = self.sink.claim(partition).await?;
        self.log
            .write_text(&format!("C {} {partition} {position}\n", self.member));
        Ok(position)
    }

    async fn reset_group(&mut self, partitions: u32) -> Result<(), HandlerError> {
        self.sink.reset_group(partitions).await
    }
}

/// The exactly-once read model on PostgreSQL.
#[derive(Debug, Clone, Copy)]
struct PgModel;

impl PgProjection for PgModel {
    fn name(&self) -> &str {
        PROJECTION
    }

    async fn handle(
        &mut self,
        tx: &mut PgConnection,
        event: &RecordedEvent,
    ) -> Result<(), HandlerError> {
        // One statement: record a version that does not follow the last applied one, then count.
        sqlx::query(AssertSqlSafe(format!(
            "WITH prev AS (SELECT coalesce((SELECT last_version FROM \"{NAMESPACE}\".{PG_MODEL} \
                 WHERE stream_id = $1), 0) AS v), \
             gap AS (INSERT INTO \"{NAMESPACE}\".{PG_GAPS} (stream_id, expected, got, position) \
                 SELECT $1, prev.v + 1, $2, $3 FROM prev WHERE prev.v + 1 <> $2) \
             INSERT INTO \"{NAMESPACE}\".{PG_MODEL} AS m (stream_id, n, last_version) \
                 VALUES ($1, 1, $2) \
             ON CONFLICT (stream_id) DO UPDATE SET n = m.n + 1, last_version = $2"
        )))
        .bind(event.stream_id.as_str())
        .bind(i64::try_from(event.stream_version)?)
        .bind(i64::try_from(event.global_position)?)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    async fn reset(&mut self, tx: &mut PgConnection) -> Result<(), HandlerError> {
        sqlx::query(AssertSqlSafe(format!(
            "TRUNCATE \"{NAMESPACE}\".{PG_MODEL}, \"{NAMESPACE}\".{PG_GAPS}"
        )))
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
}

/// Applies one event to the Redis read model: KEYS = [model hash, gap list], ARGV = [stream,
/// version, position]. A version at or below the last applied one is a redelivery and ignored;
/// one that does not follow it is recorded in the gap list (and applied).
const REDIS_APPLY: &str = r"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
local n, last = 0, 0
if cur then
  local sp = string.find(cur, ' ')
  n = tonumber(string.sub(cur, 1, sp - 1))
  last = tonumber(string.sub(cur, sp + 1))
end
local v = tonumber(ARGV[2])
if v <= last then return 0 end
if v ~= last + 1 then
  redis.call('RPUSH', KEYS[2], ARGV[1] .. ' ' .. (last + 1) .. ' ' .. ARGV[2] .. ' ' .. ARGV[3])
end
redis.call('HSET', KEYS[1], ARGV[1], (n + 1) .. ' ' .. v)
return 1
";

/// The at-least-once read model on Redis.
#[derive(Clone)]
struct RedisModel {
    conn: redis::aio::ConnectionManager,
    script: redis::Script,
}

impl Projection for RedisModel {
    fn name(&self) -> &str {
        PROJECTION
    }

    /// One category only: with `appendfsync always` every handled event costs a round trip and
    /// an fsync, and the whole feed would outrun it.
    fn filter(&self) -> EventFilter {
        EventFilter::all().category(FILTERED_CATEGORY)
    }

    async fn handle(&mut self, event: &RecordedEvent) -> Result<(), HandlerError> {
        let _: i64 = self
            .script
            .key(stores::redis_model_key())
            .key(stores::redis_gaps_key())
            .arg(event.stream_id.as_str())
            .arg(event.stream_version)
            .arg(event.global_position)
            .invoke_async(&mut self.conn)
            .await?;
        Ok(())
    }

    async fn reset(&mut self) -> Result<(), HandlerError> {
        let _: i64 = redis::cmd("DEL")
            .arg(stores::redis_model_key())
            .arg(stores::redis_gaps_key())
            .query_async(&mut self.conn)
            .await?;
        Ok(())
    }
}

/// `es-chaos relay ...`.
pub(crate) fn relay(args: &[String]) -> Result<()> {
    let opts = Opts::parse(
        args,
        &[
            "store",
            "url",
            "id",
            "incarnation",
            "seed",
            "log",
            "partitions",
        ],
        &[],
    )?;
    let store: StoreKind = opts.parsed_required("store")?;
    let url = opts.required("url")?.to_owned();
    let id: u16 = opts.parsed_required("id")?;
    let incarnation: u32 = opts.parsed("incarnation", 0)?;
    let seed: u64 = opts.parsed_required("seed")?;
    let partitioning = stores::partitioning(opts.parsed("partitions", 1)?)?;
    let owner = format!("relay-{id}-{incarnation}");
    let publisher = FilePublisher {
        log: Arc::new(LogFile::open(Path::new(opts.required("log")?))?),
        owner: owner.clone(),
        rng: Arc::new(Mutex::new(fastrand::Rng::with_seed(mix(
            seed ^ mix(u64::from(id) << 32 | u64::from(incarnation))
        )))),
        in_flight: Arc::new(AtomicUsize::new(0)),
        broken: Arc::new(AtomicBool::new(false)),
    };
    let config = RelayConfig {
        owner,
        lease_ttl: Duration::from_secs(2),
        publish_timeout: Duration::from_secs(1),
        batch_size: 64,
        max_in_flight: RelayConfig::default().max_in_flight,
        idle_poll: Duration::from_millis(200),
        backoff: es_core::Backoff::new(Duration::from_millis(50), Duration::from_secs(1)),
        ..RelayConfig::default()
    };
    let log = Arc::clone(&publisher.log);
    let owner = publisher.owner.clone();
    let result = stores::block_on(async move {
        match store {
            StoreKind::Postgres => {
                let store = pg_consumer_store(&url, "chaos-relay", partitioning).await?;
                run_relay(store, publisher, config).await
            }
            StoreKind::Redis => {
                let store = stores::redis_store(&url, Duration::from_secs(5), partitioning).await?;
                run_relay(store, publisher, config).await
            }
        }
    });
    if let Err(e) = &result {
        log.write_text(&format!("X {owner}: {}\n", one_line(&format!("{e:#}"))));
    }
    result
}

/// Runs a relay until stdin closes: on a store with one outbox per partition, this process's
/// worker of the relay group, logging each change of the outboxes it publishes.
async fn run_relay<S>(store: S, publisher: FilePublisher, config: RelayConfig) -> Result<()>
where
    S: EventStore + OutboxStore + CheckpointStore + LeaseStore,
{
    if store.outbox_partitions() == 1 {
        return Relay::new(store, publisher, config)
            .run(stdin_closed())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"));
    }
    let (log, owner) = (Arc::clone(&publisher.log), config.owner.clone());
    let group = Relay::spawn_group(
        store,
        publisher,
        config,
        GroupConfig::new(owner.clone()).lease_ttl(stores::GROUP_LEASE),
    );
    let closed = stdin_closed();
    tokio::pin!(closed);
    let mut outboxes = Vec::new();
    loop {
        tokio::select! {
            () = &mut closed => break,
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        let now = group.owned();
        if now != outboxes {
            log.write_text(&logs::owned_line(&owner, &now));
            outboxes = now;
        }
    }
    group.shutdown().await;
    log.write_text(&logs::owned_line(&owner, &[]));
    Ok(())
}

/// Publishes by appending to the relay's log. As a broker might, it fails about 3% of the
/// batches before sending anything, and about 2% after the first half (the rest fail); it never
/// rejects a record for good, so every record must end up published. It answers after 0 to 60
/// ms, so the relay has several batches in flight. It is gapless, as `es-kafka` is: after a
/// failure it writes nothing (every record fails) until a call starts with none in flight.
///
/// A clone shares the log and the random draws but has its own calls in flight: a relay group
/// hands each outbox's relay a clone, and each relay's window is gapless on its own.
struct FilePublisher {
    log: Arc<LogFile>,
    owner: String,
    rng: Arc<Mutex<fastrand::Rng>>,
    /// Publish calls in progress.
    in_flight: Arc<AtomicUsize>,
    /// A batch failed: nothing more is written until a call starts with none in flight.
    broken: Arc<AtomicBool>,
}

impl Clone for FilePublisher {
    fn clone(&self) -> Self {
        Self {
            log: Arc::clone(&self.log),
            owner: self.owner.clone(),
            rng: Arc::clone(&self.rng),
            in_flight: Arc::new(AtomicUsize::new(0)),
            broken: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// The broker failure [`FilePublisher`] injects.
#[derive(Debug, Clone, thiserror::Error)]
#[error("injected broker failure")]
struct InjectedFailure;

/// Counts a publish call in progress until dropped (returned, or cut off by the relay).
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Publisher for FilePublisher {
    type Error = InjectedFailure;

    fn gapless(&self) -> bool {
        true
    }

    async fn publish(&self, records: &[OutboxRecord]) -> Vec<PublishOutcome<InjectedFailure>> {
        let _call = InFlight(&self.in_flight);
        if self.in_flight.fetch_add(1, Ordering::SeqCst) == 0 {
            self.broken.store(false, Ordering::SeqCst);
        }
        let (roll, answer_after) = {
            let mut rng = self
                .rng
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            (rng.u8(0..100), rng.u64(0..=60))
        };
        let sent = match roll {
            _ if self.broken.load(Ordering::SeqCst) => 0,
            0..=2 => 0,
            3..=4 => records.len() / 2,
            _ => records.len(),
        };
        if sent < records.len() {
            self.broken.store(true, Ordering::SeqCst);
        }
        let mut text = String::new();
        for r in &records[..sent] {
            let _ = writeln!(
                text,
                "P {} {} {} {} {}",
                self.owner,
                r.position,
                logs::hex(r.message.message_id),
                logs::hex(r.message.source_event_id),
                r.stream_id
            );
        }
        if !text.is_empty() {
            self.log.write_text(&text);
        }
        tokio::time::sleep(Duration::from_millis(answer_after)).await;
        let mut outcomes = vec![PublishOutcome::Acknowledged; sent];
        outcomes.resize(records.len(), PublishOutcome::Failed(InjectedFailure));
        outcomes
    }
}
