//! The orchestrator (`es-chaos run`): starts a server of its own and the processes, injects the
//! scheduled faults, stops them, lets everything catch up, collects the history and checks it.
//!
//! `es-chaos run --dir D [--store postgres|redis|all] [--seconds N | --minutes N] [--writers K]
//! [--tasks T] [--seed S] [--append-timeout-ms N] [--pace-ms A..B] [--partitions P]`
//!
//! With `--partitions P` (P > 1) every process builds the store with P feed partitions; the
//! subscribers follow every partition; the projection runs as a consumer group of two worker
//! processes (both subject to the kill faults, so partitions change hands under faults); on
//! Redis, where each partition has an outbox of its own, the two relay processes are a relay
//! group over the outboxes (PostgreSQL keeps one outbox, published by one relay at a time). The
//! end marker is appended once per partition, and the history is checked per partition.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use es_core::projection::partition_checkpoint;
use es_core::{
    AppendRequest, CheckpointStore, EventStore, ExpectedVersion, NewEvent, OutboxStore,
    Partitioning, ReadAll,
};
use es_postgres::PgStore;
use es_redis::redis;
use es_redis::RedisStore;
use es_test_support::{PgServer, RedisServer};
use futures::TryStreamExt;
use sqlx::{AssertSqlSafe, PgPool};

use crate::check::{self, FeedEvent, Group, History, Model, Report, Subscriber};
use crate::cli::{Opts, StoreKind};
use crate::ids;
use crate::logs;
use crate::schedule::{self, Fault, FaultKind, Plan};
use crate::stores::{
    self, END_TYPE, FILTERED_CATEGORY, NAMESPACE, PG_GAPS, PG_INLINE, PG_MODEL, PROJECTION,
};

/// The writers' pause between requests by default (ms): Redis takes appends faster, and its
/// at-least-once projection pays an fsync per event.
fn default_pace(store: StoreKind) -> &'static str {
    match store {
        StoreKind::Postgres => "5..60",
        StoreKind::Redis => "10..100",
    }
}

/// How long the end of a run waits for the processes to finish and catch up.
const CATCH_UP: Duration = Duration::from_secs(300);

/// How long the end of a run waits for a consumer that makes no progress.
const STALLED: Duration = Duration::from_secs(60);

/// The exit code of a consumer that stopped on an error it logged (a subscription or relay that
/// cannot go on): it is not restarted, it would stop again.
const FATAL: i32 = 2;

/// A run's settings.
#[derive(Debug, Clone)]
struct Config {
    exe: PathBuf,
    dir: PathBuf,
    seed: u64,
    duration: Duration,
    writers: u16,
    tasks: u8,
    append_timeout: Duration,
    /// The writers' pause between requests (`A..B` ms), if set; see [`default_pace`].
    pace: Option<String>,
    /// The store's feed partitions.
    partitioning: Partitioning,
    keep: bool,
}

/// `es-chaos run ...`: returns success only if every store's run found no violation.
pub(crate) fn main(args: &[String]) -> Result<ExitCode> {
    let opts = Opts::parse(
        args,
        &[
            "dir",
            "store",
            "seconds",
            "minutes",
            "writers",
            "tasks",
            "seed",
            "append-timeout-ms",
            "pace-ms",
            "partitions",
        ],
        &["keep"],
    )?;
    let stores = match opts.get("store").unwrap_or("all") {
        "all" => vec![StoreKind::Postgres, StoreKind::Redis],
        one => vec![one.parse()?],
    };
    let duration = match (opts.get("seconds"), opts.get("minutes")) {
        (Some(_), Some(_)) => bail!("give --seconds or --minutes, not both"),
        (_, Some(_)) => Duration::from_secs(opts.parsed_required::<u64>("minutes")? * 60),
        _ => Duration::from_secs(opts.parsed("seconds", 60)?),
    };
    anyhow::ensure!(
        duration >= Duration::from_secs(10),
        "a run needs at least 10 seconds"
    );
    let seed = match opts.get("seed") {
        Some(_) => opts.parsed_required("seed")?,
        None => random_seed(),
    };
    let config = Config {
        exe: std::env::current_exe().context("cannot find the es-chaos binary")?,
        dir: PathBuf::from(opts.required("dir")?),
        seed,
        duration,
        writers: opts.parsed("writers", 4)?,
        tasks: opts.parsed("tasks", 3)?,
        append_timeout: Duration::from_millis(opts.parsed("append-timeout-ms", 2000)?),
        pace: opts.get("pace-ms").map(str::to_owned),
        partitioning: stores::partitioning(opts.parsed("partitions", 1)?)?,
        keep: opts.flag("keep"),
    };
    if let Some(pace) = &config.pace {
        crate::writer::parse_range(pace)?;
    }
    anyhow::ensure!(
        (1..=64).contains(&config.writers),
        "--writers must be 1 to 64"
    );
    anyhow::ensure!((1..=16).contains(&config.tasks), "--tasks must be 1 to 16");
    anyhow::ensure!(
        config.partitioning.count() <= 64,
        "--partitions must be 1 to 64"
    );
    let partitions = config.partitioning.count();
    // Shown only with several partitions, so that single-feed runs print what they always did.
    let (partitioned, reproduce) = if partitions > 1 {
        (
            format!(", {partitions} feed partitions"),
            format!(" --partitions {partitions}"),
        )
    } else {
        (String::new(), String::new())
    };
    let mut failed = false;
    for store in stores {
        eprintln!(
            "es-chaos: {}: seed {seed}, {}s of faults, {} writer processes x {} tasks{partitioned}",
            store.name(),
            duration.as_secs(),
            config.writers,
            config.tasks
        );
        let report = run_store(&config, store)?;
        let violations = report.total();
        println!(
            "es-chaos {} (seed {seed}, {}s{partitioned}):\n{}",
            store.name(),
            duration.as_secs(),
            report.render()
        );
        if violations > 0 {
            failed = true;
            println!(
                "es-chaos {}: {violations} violations. Reproduce with: cargo xtask chaos --store \
                 {} --seconds {} --writers {} --seed {seed}{reproduce}\n",
                store.name(),
                store.name(),
                duration.as_secs(),
                config.writers
            );
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn random_seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    crate::writer::mix(nanos as u64 ^ u64::from(std::process::id()) << 32) % 1_000_000_000
}

/// One store's run, start to report.
fn run_store(config: &Config, store: StoreKind) -> Result<Report> {
    let dir = config.dir.join(store.name());
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let server = Server::start(store, &dir)?;
    let url = server.url();
    let admin = rt.block_on(Admin::connect(store, &url, config.partitioning))?;
    let mut run = Run {
        config: config.clone(),
        store,
        dir,
        rt,
        server,
        url,
        admin,
        procs: Vec::new(),
        actions: Vec::new(),
        injected: BTreeMap::new(),
        skipped: BTreeMap::new(),
        extra: BTreeMap::new(),
        notes: Vec::new(),
        restarts: HashMap::new(),
        faults_log: None,
    };
    run.faults_log = Some(
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(run.dir.join("faults.log"))?,
    );
    run.start_processes()?;
    let plan = Plan {
        seed: config.seed,
        store,
        duration: config.duration,
        writers: config.writers,
        inline_writers: run.inline_writers(),
        consumers: run.consumers().len(),
        append_timeout: config.append_timeout,
    };
    let faults = schedule::schedule(&plan);
    eprintln!(
        "es-chaos: {}: {} faults scheduled; processes log under {}",
        store.name(),
        faults.len(),
        run.dir.display()
    );
    let started = Instant::now();
    run.inject(&faults)?;
    let fault_phase = started.elapsed();
    let marker = run.quiesce()?;
    let history = run.collect(marker)?;
    let mut report = check::check(&history);
    for (kind, n) in &run.injected {
        report.add(&format!("faults injected {kind}"), *n);
    }
    for (kind, n) in &run.skipped {
        report.add(&format!("faults skipped {kind}"), *n);
    }
    for (name, n) in &run.extra {
        report.add(name, *n);
    }
    report.add("fault phase seconds", fault_phase.as_secs());
    report.add(
        "catch-up seconds",
        started.elapsed().saturating_sub(fault_phase).as_secs(),
    );
    run.shutdown();
    if report.total() == 0 && !config.keep {
        let _ = fs::remove_dir_all(&run.dir);
    } else {
        eprintln!("es-chaos: logs kept in {}", run.dir.display());
    }
    Ok(report)
}

/// The server of a run.
enum Server {
    Pg(PgServer),
    Redis(RedisServer),
}

impl Server {
    fn start(store: StoreKind, dir: &Path) -> Result<Self> {
        let server_dir = dir.join("server");
        Ok(match store {
            StoreKind::Postgres => Self::Pg(PgServer::start(&server_dir, &[])?),
            StoreKind::Redis => {
                let server = RedisServer::start(
                    &server_dir,
                    &["--appendonly", "yes", "--appendfsync", "always"],
                )?;
                let server = Self::Redis(server);
                server.record_pid(dir);
                server
            }
        })
    }

    /// Records the redis-server pid, so that `cargo xtask chaos` can stop a server left behind
    /// by an interrupted run.
    fn record_pid(&self, dir: &Path) {
        if let Self::Redis(server) = self {
            if let Some(pid) = server.pid() {
                let _ = fs::write(dir.join("server/redis-server.pid"), pid.to_string());
            }
        }
    }

    fn url(&self) -> String {
        match self {
            Self::Pg(s) => s.url("postgres"),
            Self::Redis(s) => s.url(),
        }
    }

    fn kill9(&mut self) -> Result<()> {
        match self {
            Self::Pg(s) => s.kill9()?,
            Self::Redis(s) => s.kill9()?,
        }
        Ok(())
    }

    fn terminate(&mut self) -> Result<()> {
        match self {
            Self::Pg(s) => s.stop()?,
            Self::Redis(s) => s.terminate()?,
        }
        Ok(())
    }

    fn restart(&mut self, dir: &Path) -> Result<()> {
        match self {
            Self::Pg(s) => s.restart()?,
            Self::Redis(s) => s.restart()?,
        }
        self.record_pid(dir);
        Ok(())
    }
}

/// The orchestrator's own connection to the store: faults, the end marker, the final reads.
enum Admin {
    Pg { pool: PgPool, store: PgStore },
    Redis { store: RedisStore },
}

impl Admin {
    async fn connect(store: StoreKind, url: &str, partitioning: Partitioning) -> Result<Self> {
        match store {
            StoreKind::Postgres => {
                let pool = stores::pg_pool(stores::pg_options(url, "chaos-orchestrator", true)?, 4);
                // One append task: it keeps its connection, and the pool's others are for the
                // faults and the final reads.
                let store = stores::pg_store(
                    PgStore::builder(pool.clone())
                        .schema(NAMESPACE)
                        .partitioning(partitioning)
                        .writers(1)
                        .poll_interval(Duration::from_millis(500)),
                )
                .await?;
                for table in [
                    format!("{PG_INLINE} (stream_id text PRIMARY KEY, n bigint NOT NULL)"),
                    format!(
                        "{PG_MODEL} (stream_id text PRIMARY KEY, n bigint NOT NULL, \
                         last_version bigint NOT NULL)"
                    ),
                    format!(
                        "{PG_GAPS} (stream_id text NOT NULL, expected bigint NOT NULL, \
                         got bigint NOT NULL, position bigint NOT NULL)"
                    ),
                ] {
                    sqlx::query(AssertSqlSafe(format!(
                        "CREATE TABLE IF NOT EXISTS \"{NAMESPACE}\".{table}"
                    )))
                    .execute(&pool)
                    .await?;
                }
                Ok(Self::Pg { pool, store })
            }
            StoreKind::Redis => Ok(Self::Redis {
                store: stores::redis_store(url, Duration::from_secs(10), partitioning).await?,
            }),
        }
    }

    fn pool(&self) -> Result<&PgPool> {
        match self {
            Self::Pg { pool, .. } => Ok(pool),
            Self::Redis { .. } => bail!("not a PostgreSQL run"),
        }
    }

    fn redis(&self) -> Result<redis::aio::ConnectionManager> {
        match self {
            Self::Redis { store } => Ok(store.connection()),
            Self::Pg { .. } => bail!("not a Redis run"),
        }
    }
}

/// A process the orchestrator runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Role {
    Writer(u16),
    Subscriber(u16),
    /// The projection: its single runner (`None`), or a worker of its consumer group.
    Projection(Option<u16>),
    Relay(u16),
}

/// The workers of the projection's consumer group on a store with several partitions.
const PROJECTION_WORKERS: u16 = 2;

impl Role {
    fn name(self) -> String {
        match self {
            Self::Writer(w) => format!("writer-{w}"),
            Self::Subscriber(s) => format!("sub-{s}"),
            Self::Projection(None) => "projection".to_owned(),
            Self::Projection(Some(p)) => format!("projection-{p}"),
            Self::Relay(r) => format!("relay-{r}"),
        }
    }
}

struct Proc {
    role: Role,
    incarnation: u32,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    stopped: bool,
}

impl Proc {
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn send(&mut self, line: &str) -> bool {
        match self.stdin.as_mut() {
            Some(stdin) => writeln!(stdin, "{line}")
                .and_then(|()| stdin.flush())
                .is_ok(),
            None => false,
        }
    }

    /// kill -9 and reap.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.stdin = None;
        self.stopped = false;
    }
}

/// Sends `signal` (`STOP`, `CONT`) to `pid`.
fn signal(pid: u32, signal: &str) -> bool {
    Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether a fault was injected: `Err` with the reason it was skipped.
type Applied<T = ()> = std::result::Result<T, String>;

/// Something to do when a fault's time is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Continue(Role),
    ResetTimeout,
}

struct Run {
    config: Config,
    store: StoreKind,
    dir: PathBuf,
    rt: tokio::runtime::Runtime,
    server: Server,
    url: String,
    admin: Admin,
    procs: Vec<Proc>,
    actions: Vec<(Instant, Action)>,
    injected: BTreeMap<&'static str, u64>,
    skipped: BTreeMap<&'static str, u64>,
    extra: BTreeMap<String, u64>,
    notes: Vec<(String, String)>,
    /// Unexpected exits per process.
    restarts: HashMap<Role, u32>,
    faults_log: Option<fs::File>,
}

impl Drop for Run {
    fn drop(&mut self) {
        for proc in &mut self.procs {
            if let Some(pid) = proc.pid() {
                signal(pid, "CONT");
            }
            proc.kill();
        }
    }
}

impl Run {
    fn pace(&self) -> String {
        self.config
            .pace
            .clone()
            .unwrap_or_else(|| default_pace(self.store).to_owned())
    }

    fn inline_writers(&self) -> Vec<u16> {
        (0..self.config.writers)
            .filter(|&w| self.is_inline(w))
            .collect()
    }

    fn partitions(&self) -> u32 {
        self.config.partitioning.count()
    }

    /// The projection processes: one runner, or the workers of its consumer group.
    fn projections(&self) -> Vec<Role> {
        if self.config.partitioning.is_single() {
            vec![Role::Projection(None)]
        } else {
            (0..PROJECTION_WORKERS)
                .map(|p| Role::Projection(Some(p)))
                .collect()
        }
    }

    /// The consumer processes, in the order the schedule takes them for consumer faults: the
    /// projection (or its group's workers) and the relays first, so that even a short run kills
    /// and pauses them, then the subscribers.
    fn consumers(&self) -> Vec<Role> {
        let mut roles = self.projections();
        roles.extend([Role::Relay(0), Role::Relay(1)]);
        roles.extend([Role::Subscriber(0), Role::Subscriber(1)]);
        roles
    }

    /// On PostgreSQL, odd writers (or the only one) run the inline projection.
    fn is_inline(&self, writer: u16) -> bool {
        self.store == StoreKind::Postgres && (self.config.writers == 1 || writer % 2 == 1)
    }

    /// Where `role` logs. The relays share one file, the broker's: one append per publish
    /// call, so the file holds every publication in the order the broker received them. The
    /// workers of the projection's group share one file too, so that it holds their claims in
    /// order.
    fn log_path(&self, role: Role) -> PathBuf {
        match role {
            Role::Relay(_) => self.dir.join("broker.log"),
            Role::Projection(_) => self.dir.join("projection.log"),
            _ => self.dir.join(format!("{}.log", role.name())),
        }
    }

    fn spawn(&self, role: Role, incarnation: u32) -> Result<Proc> {
        let mut cmd = Command::new(&self.config.exe);
        let store = self.store.name();
        let log = self.log_path(role);
        let seed = self.config.seed.to_string();
        let partitions = self.partitions().to_string();
        match role {
            Role::Writer(w) => {
                cmd.args(["writer", "--store", store, "--url", &self.url])
                    .args(["--id", &w.to_string()])
                    .args(["--incarnation", &incarnation.to_string()])
                    .args(["--seed", &seed])
                    .args(["--tasks", &self.config.tasks.to_string()])
                    .args([
                        "--append-timeout-ms",
                        &self.config.append_timeout.as_millis().to_string(),
                    ])
                    .args(["--pace-ms", &self.pace()])
                    .args(["--partitions", &partitions])
                    .arg("--log")
                    .arg(&log);
                if self.is_inline(w) {
                    cmd.arg("--inline");
                }
            }
            Role::Subscriber(s) => {
                cmd.args(["subscriber", "--store", store, "--url", &self.url])
                    .args(["--partitions", &partitions])
                    .arg("--log")
                    .arg(&log);
                if s == 1 {
                    cmd.args(["--category", FILTERED_CATEGORY]);
                }
            }
            Role::Projection(worker) => {
                cmd.args(["projection", "--store", store, "--url", &self.url])
                    .args(["--partitions", &partitions])
                    .arg("--log")
                    .arg(&log);
                if let Some(worker) = worker {
                    cmd.args(["--member", &format!("projection-{worker}-{incarnation}")]);
                }
            }
            Role::Relay(r) => {
                cmd.args(["relay", "--store", store, "--url", &self.url])
                    .args(["--id", &r.to_string()])
                    .args(["--incarnation", &incarnation.to_string()])
                    .args(["--seed", &seed])
                    .args(["--partitions", &partitions])
                    .arg("--log")
                    .arg(&log);
            }
        }
        let stderr_path = self.dir.join(format!("{}.stderr", role.name()));
        let stderr = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&stderr_path)
            .with_context(|| format!("cannot open {}", stderr_path.display()))?;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {}", role.name()))?;
        let stdin = child.stdin.take();
        Ok(Proc {
            role,
            incarnation,
            child: Some(child),
            stdin,
            stopped: false,
        })
    }

    fn start_processes(&mut self) -> Result<()> {
        let mut roles: Vec<Role> = self.consumers();
        roles.extend((0..self.config.writers).map(Role::Writer));
        for role in roles {
            let proc = self.spawn(role, 0)?;
            self.procs.push(proc);
        }
        Ok(())
    }

    fn proc_mut(&mut self, role: Role) -> Option<&mut Proc> {
        self.procs.iter_mut().find(|p| p.role == role)
    }

    /// Kills `role` with SIGKILL and starts its next incarnation.
    fn kill_and_restart(&mut self, role: Role) -> Result<()> {
        let Some(index) = self.procs.iter().position(|p| p.role == role) else {
            return Ok(());
        };
        self.procs[index].kill();
        let incarnation = self.procs[index].incarnation + 1;
        self.procs[index] = self.spawn(role, incarnation)?;
        Ok(())
    }

    fn record(&mut self, line: &str) {
        if let Some(file) = self.faults_log.as_mut() {
            let _ = writeln!(file, "{line}");
        }
    }

    fn stderr_tail(&self, role: Role) -> String {
        let text = fs::read_to_string(self.dir.join(format!("{}.stderr", role.name())))
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(5).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }

    /// Restarts processes that exited on their own (a violation: nothing may end them during
    /// the fault phase but the orchestrator).
    fn check_children(&mut self) -> Result<()> {
        let mut exited = Vec::new();
        for proc in &mut self.procs {
            if let Some(child) = proc.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    exited.push((proc.role, proc.incarnation, status));
                    proc.child = None;
                    proc.stdin = None;
                }
            }
        }
        for (role, incarnation, status) in exited {
            let fatal = status.code() == Some(FATAL) && !matches!(role, Role::Writer(_));
            let tail = self.stderr_tail(role);
            self.notes.push((
                "process_exit".into(),
                format!(
                    "{} (incarnation {incarnation}) exited on its own with {status}: {tail}",
                    role.name()
                ),
            ));
            let count = self.restarts.entry(role).or_default();
            *count += 1;
            if *count <= 5 && !fatal {
                let proc = self.spawn(role, incarnation + 1)?;
                if let Some(slot) = self.proc_mut(role) {
                    *slot = proc;
                }
            }
        }
        Ok(())
    }

    /// Runs the actions that are due (all of them with `all`). An action that fails (the server
    /// is down) is tried again a little later.
    fn due_actions(&mut self, all: bool) {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.actions)
            .into_iter()
            .partition(|(at, _)| all || *at <= now);
        self.actions = later;
        for (_, action) in due {
            match action {
                Action::Continue(role) => {
                    if let Some(proc) = self.proc_mut(role) {
                        if proc.stopped {
                            if let Some(pid) = proc.pid() {
                                signal(pid, "CONT");
                            }
                            proc.stopped = false;
                        }
                    }
                }
                Action::ResetTimeout => {
                    if self.set_statement_timeout(None).is_err() {
                        self.actions
                            .push((now + Duration::from_millis(500), Action::ResetTimeout));
                    }
                }
            }
        }
    }

    /// Sleeps until `until`, keeping the actions and the processes going.
    fn wait_until(&mut self, until: Instant) -> Result<()> {
        loop {
            self.due_actions(false);
            self.check_children()?;
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            sleep((until - now).min(Duration::from_millis(50)));
        }
    }

    /// The fault phase.
    fn inject(&mut self, faults: &[Fault]) -> Result<()> {
        let start = Instant::now();
        let mut next_report = Duration::from_secs(30);
        for fault in faults {
            self.wait_until(start + fault.at)?;
            let name = fault.kind.name();
            let applied = self
                .apply(fault)
                .with_context(|| format!("injecting {name}"))?;
            let elapsed = start.elapsed();
            let outcome = match &applied {
                Ok(()) => "injected".to_owned(),
                Err(reason) => format!("skipped ({reason})"),
            };
            self.record(&format!(
                "{:>8.3}s {name} {outcome} {fault:?}",
                elapsed.as_secs_f64()
            ));
            let counts = if applied.is_ok() {
                &mut self.injected
            } else {
                &mut self.skipped
            };
            *counts.entry(name).or_default() += 1;
            if elapsed >= next_report {
                next_report += Duration::from_secs(30);
                let total: u64 = self.injected.values().sum();
                eprintln!(
                    "es-chaos: {}: {}s, {total} faults injected",
                    self.store.name(),
                    elapsed.as_secs()
                );
            }
        }
        self.wait_until(start + self.config.duration)
    }

    fn count(&mut self, name: &str, n: u64) {
        *self.extra.entry(name.to_owned()).or_default() += n;
    }

    /// Injects one fault: `Ok(Err(reason))` if there was nothing to hit; `Err` if the run cannot
    /// go on (the server does not come back).
    fn apply(&mut self, fault: &Fault) -> Result<Applied> {
        let now = Instant::now();
        let writer = Role::Writer(fault.writer);
        let send = |run: &mut Self, line: String| {
            if run.proc_mut(writer).is_some_and(|p| p.send(&line)) {
                Ok(())
            } else {
                Err(format!("{} does not take commands", writer.name()))
            }
        };
        Ok(match fault.kind {
            FaultKind::StatementTimeout if fault.wide => {
                if let Err(e) = self.set_statement_timeout(Some(fault.ms)) {
                    return Ok(Err(format!("{e:#}")));
                }
                self.actions.push((
                    now + Duration::from_millis(fault.window_ms),
                    Action::ResetTimeout,
                ));
                self.count("statement_timeout server-wide windows", 1);
                Ok(())
            }
            FaultKind::StatementTimeout => send(self, format!("stmt-timeout {}", fault.ms)),
            FaultKind::InlineStall => {
                let how = if fault.wide { "idle" } else { "sleep" };
                send(self, format!("stall {} {how}", fault.ms))
            }
            FaultKind::TerminateBackend => self.terminate_backend(fault.writer),
            FaultKind::WriterStop => {
                let stopped = self.stop_for(writer, fault.ms);
                if stopped.is_ok() && u128::from(fault.ms) > self.config.append_timeout.as_millis()
                {
                    self.count("writer_sigstop longer than the append time-out", 1);
                }
                stopped
            }
            FaultKind::ConsumerStop => {
                let consumers = self.consumers();
                let role = consumers[fault.consumer % consumers.len()];
                let stopped = self.stop_for(role, fault.ms);
                if stopped.is_ok() && u128::from(fault.ms) > crate::stores::GROUP_LEASE.as_millis()
                {
                    self.count("consumer_sigstop longer than the leases", 1);
                    if let Role::Projection(Some(_)) = role {
                        self.count(
                            "consumer_sigstop of a group worker, longer than its lease",
                            1,
                        );
                    }
                }
                stopped
            }
            FaultKind::WriterKill => {
                self.kill_and_restart(writer)?;
                Ok(())
            }
            FaultKind::ConsumerKill => {
                let consumers = self.consumers();
                self.kill_and_restart(consumers[fault.consumer % consumers.len()])?;
                Ok(())
            }
            FaultKind::ServerKill | FaultKind::ServerRestart => {
                if fault.kind == FaultKind::ServerKill {
                    self.server.kill9()?;
                } else {
                    self.server.terminate()?;
                }
                self.wait_until(Instant::now() + Duration::from_millis(fault.ms))?;
                self.server.restart(&self.dir)?;
                Ok(())
            }
            FaultKind::ClientKill => {
                let mut cmd = redis::cmd("CLIENT");
                cmd.arg("KILL")
                    .arg("TYPE")
                    .arg("normal")
                    .arg("SKIPME")
                    .arg("yes");
                match self.redis_admin::<u64>(&cmd) {
                    Ok(0) => Err("no client connected".to_owned()),
                    Ok(killed) => {
                        self.count("client_kill connections dropped", killed);
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            FaultKind::ClientPause => {
                let mut cmd = redis::cmd("CLIENT");
                cmd.arg("PAUSE").arg(fault.ms).arg("WRITE");
                let paused = self.redis_admin::<()>(&cmd);
                if paused.is_ok() && u128::from(fault.ms) > 2000 {
                    self.count("client_pause longer than the response time-out", 1);
                }
                paused
            }
        })
    }

    /// SIGSTOP of `role`'s process, and its SIGCONT `ms` later.
    fn stop_for(&mut self, role: Role, ms: u64) -> Applied {
        let stopped = match self.proc_mut(role) {
            Some(proc) if !proc.stopped => match proc.pid() {
                Some(pid) if signal(pid, "STOP") => {
                    proc.stopped = true;
                    Ok(())
                }
                _ => Err("no process to stop".to_owned()),
            },
            _ => Err("already stopped".to_owned()),
        };
        if stopped.is_ok() {
            self.actions.push((
                Instant::now() + Duration::from_millis(ms),
                Action::Continue(role),
            ));
        }
        stopped
    }

    /// Runs an admin command on Redis, a few times if the connection is being re-established.
    fn redis_admin<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Applied<T> {
        let mut conn = self.admin.redis().map_err(|e| e.to_string())?;
        let mut last = String::new();
        for _ in 0..10 {
            match self.rt.block_on(cmd.query_async::<T>(&mut conn)) {
                Ok(value) => return Ok(value),
                Err(e) => last = e.to_string(),
            }
            sleep(Duration::from_millis(200));
        }
        Err(last)
    }

    /// `ALTER SYSTEM SET statement_timeout` (or `RESET` with `None`) and a configuration reload:
    /// every session without a setting of its own (the writers') takes it at once.
    fn set_statement_timeout(&self, ms: Option<u64>) -> Result<()> {
        let pool = self.admin.pool()?.clone();
        let sql = match ms {
            Some(ms) => format!("ALTER SYSTEM SET statement_timeout = {ms}"),
            None => "ALTER SYSTEM RESET statement_timeout".to_owned(),
        };
        self.rt.block_on(async move {
            tokio::time::timeout(Duration::from_secs(5), async {
                sqlx::query(AssertSqlSafe(sql)).execute(&pool).await?;
                sqlx::query("SELECT pg_reload_conf()")
                    .execute(&pool)
                    .await?;
                anyhow::Ok(())
            })
            .await?
        })
    }

    /// Terminates one backend of `writer` (of another writer if it has none, just restarted),
    /// preferring one inside a transaction or a statement.
    fn terminate_backend(&mut self, writer: u16) -> Applied {
        let pool = self.admin.pool().map_err(|e| e.to_string())?.clone();
        let application = format!("chaos-w{writer}");
        let hit: Result<Option<(i32, String)>> = self.rt.block_on(async move {
            tokio::time::timeout(Duration::from_secs(5), async {
                let row: Option<(i32, String)> = sqlx::query_as(
                    "SELECT pid, coalesce(state, '') FROM pg_stat_activity \
                     WHERE application_name LIKE 'chaos-w%' AND pid <> pg_backend_pid() \
                     ORDER BY application_name = $1 DESC, (state IN ('active', \
                     'idle in transaction', 'idle in transaction (aborted)')) DESC, random() \
                     LIMIT 1",
                )
                .bind(&application)
                .fetch_optional(&pool)
                .await?;
                if let Some((pid, _)) = &row {
                    sqlx::query("SELECT pg_terminate_backend($1)")
                        .bind(pid)
                        .execute(&pool)
                        .await?;
                }
                anyhow::Ok(row)
            })
            .await?
        });
        match hit {
            Ok(Some((_, state))) => {
                if state != "idle" {
                    self.count("terminate_backend in a transaction or statement", 1);
                }
                Ok(())
            }
            Ok(None) => Err("no writer has a connection".to_owned()),
            Err(e) => Err(format!("{e:#}")),
        }
    }

    /// Ends every fault, lets the writers finish, appends the end marker (one per partition) and
    /// waits until every consumer has caught up with it. Returns each marker's position, by
    /// partition.
    fn quiesce(&mut self) -> Result<BTreeMap<u32, u64>> {
        self.due_actions(true);
        for proc in &mut self.procs {
            if proc.stopped {
                if let Some(pid) = proc.pid() {
                    signal(pid, "CONT");
                }
                proc.stopped = false;
            }
        }
        // Nothing may be left of a time-out window.
        let resetting = Instant::now();
        while self.store == StoreKind::Postgres && self.set_statement_timeout(None).is_err() {
            if resetting.elapsed() > CATCH_UP {
                bail!("cannot reset the statement time-out");
            }
            sleep(Duration::from_millis(200));
        }
        self.check_children()?;
        let writers: Vec<Role> = (0..self.config.writers).map(Role::Writer).collect();
        for &role in &writers {
            if let Some(proc) = self.proc_mut(role) {
                proc.send("stop");
            }
        }
        let phase = Instant::now();
        self.wait_for_exit(&writers, "writers finish their last requests")?;
        self.phase("writers finished", phase);
        let markers = match self.append_markers() {
            Ok(markers) => markers,
            Err(e) => {
                self.notes.push((
                    "liveness".into(),
                    format!("cannot append the end marker: {e:#}"),
                ));
                BTreeMap::new()
            }
        };
        let subscribers = [Role::Subscriber(0), Role::Subscriber(1)];
        if !markers.is_empty() {
            let phase = Instant::now();
            self.wait_for_exit(&subscribers, "subscribers deliver the end marker")?;
            self.phase("subscribers delivered the end marker", phase);
            let phase = Instant::now();
            // Progress: the sum over the partitions of the checkpoint, up to the marker.
            let target = markers.values().sum();
            let caught_up = self.wait_for(target, |run| {
                markers
                    .iter()
                    .map(|(&p, &marker)| run.checkpoint(p).ok().map(|c| c.min(marker)))
                    .sum()
            });
            self.phase("the projection caught up", phase);
            if !caught_up {
                let at: Vec<String> = markers
                    .iter()
                    .map(|(&p, &marker)| format!("{marker}{}", self.of(p)))
                    .collect();
                self.notes.push((
                    "liveness".into(),
                    format!(
                        "the projection did not reach the end marker at {}",
                        at.join(", ")
                    ),
                ));
            }
        }
        let phase = Instant::now();
        let drained = self.wait_for(u64::MAX, |run| run.outbox_len().ok().map(|n| u64::MAX - n));
        self.phase("the relays drained the outbox", phase);
        if !drained {
            self.notes.push((
                "liveness".into(),
                "the relays did not drain the outbox".into(),
            ));
        }
        let remaining: Vec<Role> = self
            .procs
            .iter()
            .filter(|p| p.child.is_some())
            .map(|p| p.role)
            .collect();
        for proc in &mut self.procs {
            proc.stdin = None;
        }
        self.wait_for_exit(&remaining, "the projection and relays stop")?;
        Ok(markers)
    }

    /// ` of partition <p>` with several partitions, nothing with one.
    fn of(&self, partition: u32) -> String {
        if self.config.partitioning.is_single() {
            String::new()
        } else {
            format!(" of partition {partition}")
        }
    }

    fn phase(&mut self, what: &str, since: Instant) {
        let line = format!("end: {what} in {:.1}s", since.elapsed().as_secs_f64());
        self.record(&line);
    }

    /// Polls `progress` (every 200 ms, keeping crashed processes restarted) until it reaches
    /// `target`; gives up when it has not moved for [`STALLED`] or [`CATCH_UP`] passed.
    fn wait_for(&mut self, target: u64, mut progress: impl FnMut(&Self) -> Option<u64>) -> bool {
        let start = Instant::now();
        let (mut last, mut moved) = (None, Instant::now());
        while start.elapsed() < CATCH_UP && moved.elapsed() < STALLED {
            let now = progress(self);
            if now.is_some_and(|p| p >= target) {
                return true;
            }
            if now != last {
                (last, moved) = (now, Instant::now());
            }
            let _ = self.check_children();
            sleep(Duration::from_millis(200));
        }
        false
    }

    /// Waits until `roles` exit; a non-zero exit and a process still running after
    /// [`CATCH_UP`] are violations.
    fn wait_for_exit(&mut self, roles: &[Role], what: &str) -> Result<()> {
        let start = Instant::now();
        loop {
            let mut running = Vec::new();
            for proc in &mut self.procs {
                if !roles.contains(&proc.role) {
                    continue;
                }
                let Some(child) = proc.child.as_mut() else {
                    continue;
                };
                match child.try_wait()? {
                    Some(status) => {
                        proc.child = None;
                        if !status.success() {
                            let role = proc.role;
                            let tail = self.dir.join(format!("{}.stderr", role.name()));
                            let tail = fs::read_to_string(tail).unwrap_or_default();
                            let tail: Vec<&str> = tail.lines().rev().take(5).collect();
                            self.notes.push((
                                "process_exit".into(),
                                format!(
                                    "{} exited with {status} while {what}: {}",
                                    role.name(),
                                    tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                                ),
                            ));
                        }
                    }
                    None => running.push(proc.role),
                }
            }
            if running.is_empty() {
                return Ok(());
            }
            if start.elapsed() > CATCH_UP {
                for role in running {
                    self.notes.push((
                        "liveness".into(),
                        format!("{} still running {CATCH_UP:?} after: {what}", role.name()),
                    ));
                    if let Some(proc) = self.proc_mut(role) {
                        proc.kill();
                    }
                }
                return Ok(());
            }
            sleep(Duration::from_millis(100));
        }
    }

    /// Appends the end marker of each partition (control event `p + 1` to the `p`th of
    /// [`stores::marker_streams`]); returns their positions by partition.
    fn append_markers(&self) -> Result<BTreeMap<u32, u64>> {
        let mut markers = BTreeMap::new();
        for (n, stream) in (1..).zip(stores::marker_streams(self.config.partitioning)) {
            let partition = self.config.partitioning.partition_of(&stream);
            let request = AppendRequest::new(
                stream,
                ExpectedVersion::Any,
                vec![NewEvent::from_value(END_TYPE, 1, &serde_json::json!({}))
                    .with_id(ids::control_id(n))],
            );
            let position = self.rt.block_on(async {
                let result = match &self.admin {
                    Admin::Pg { store, .. } => append_retrying(store, request).await?,
                    Admin::Redis { store } => append_retrying(store, request).await?,
                };
                result
                    .positions
                    .first()
                    .copied()
                    .context("the marker got no position")
            })?;
            markers.insert(partition, position);
        }
        Ok(markers)
    }

    /// The projection's checkpoint in `partition`: its own with one partition, the partition's
    /// ([`partition_checkpoint`]) in a consumer group.
    fn checkpoint(&self, partition: u32) -> Result<u64> {
        let name = if self.config.partitioning.is_single() {
            PROJECTION.to_owned()
        } else {
            partition_checkpoint(PROJECTION, partition)
        };
        self.rt.block_on(async {
            Ok(match &self.admin {
                Admin::Pg { store, .. } => store.load_checkpoint(&name).await?.position,
                Admin::Redis { store } => store.load_checkpoint(&name).await?.position,
            })
        })
    }

    fn outbox_len(&self) -> Result<u64> {
        self.rt.block_on(async {
            match &self.admin {
                Admin::Pg { store, .. } => outbox_len(store).await,
                Admin::Redis { store } => outbox_len(store).await,
            }
        })
    }

    /// Reads every log and the store's final state.
    fn collect(&mut self, markers: BTreeMap<u32, u64>) -> Result<History> {
        let mut history = History {
            partitions: self.partitions(),
            markers,
            append_timeout_ms: u64::try_from(self.config.append_timeout.as_millis())
                .unwrap_or(u64::MAX),
            notes: std::mem::take(&mut self.notes),
            ..History::default()
        };
        for w in 0..self.config.writers {
            let lines = logs::read_writer_log(&self.log_path(Role::Writer(w)))?;
            history.add_writer_log(w, lines);
        }
        for s in 0..2 {
            let role = Role::Subscriber(s);
            history.subscribers.push(Subscriber {
                name: role.name(),
                category: (s == 1).then(|| FILTERED_CATEGORY.to_owned()),
                log: logs::read_subscriber_log(&self.log_path(role))?,
            });
        }
        for (role, name) in [
            (Role::Projection(None), "projection"),
            (Role::Relay(0), "relays"),
        ] {
            let log = logs::read_consumer_log(&self.log_path(role))?;
            history.published.extend(log.published);
            history.consumer_failures.extend(
                log.failures
                    .into_iter()
                    .map(|(kind, message)| (name.to_owned(), kind, message)),
            );
            if !log.claims.is_empty() || !log.owned.is_empty() {
                let group = match role {
                    Role::Relay(_) => "relay group",
                    _ => "projection group",
                };
                history.groups.push(Group {
                    name: group.to_owned(),
                    claims: log.claims,
                    owned: log.owned,
                });
            }
        }
        let inline: BTreeSet<u16> = self.inline_writers().into_iter().collect();
        self.rt.block_on(async {
            match &self.admin {
                Admin::Pg { pool, store } => {
                    read_store(store, &mut history).await?;
                    history.models = pg_models(pool, inline).await?;
                }
                Admin::Redis { store } => {
                    read_store(store, &mut history).await?;
                    history.models = vec![redis_model(store).await?];
                }
            }
            anyhow::Ok(())
        })?;
        Ok(history)
    }

    fn shutdown(&mut self) {
        for proc in &mut self.procs {
            proc.kill();
        }
        let _ = self.server.terminate();
    }
}

async fn append_retrying<S: EventStore>(
    store: &S,
    request: AppendRequest,
) -> Result<es_core::AppendResult> {
    stores::retry("append the end marker", || {
        let request = request.clone();
        async move { Ok(store.append(request).await?) }
    })
    .await
}

/// The feed, the outbox's leftovers and dead letters, and the epochs.
/// Records pending in every outbox of the store.
async fn outbox_len<S: OutboxStore>(store: &S) -> Result<u64> {
    let mut pending = 0;
    for outbox in 0..store.outbox_partitions() {
        pending += store.outbox_partition(outbox)?.outbox_len().await?;
    }
    Ok(pending)
}

/// The feed, the outboxes' leftovers and dead letters, and the epochs, of every partition.
async fn read_store<S: EventStore + OutboxStore>(store: &S, history: &mut History) -> Result<()> {
    history.feed.clear();
    for partition in store.partitioning().partitions() {
        history.feed.extend(read_feed(store, partition).await?);
        history
            .epochs
            .insert(partition, store.partition_epochs(partition).await?);
    }
    history.outbox_left = outbox_len(store).await?;
    history.dead_letters.clear();
    for outbox in 0..store.outbox_partitions() {
        let dead = store.outbox_partition(outbox)?.dead_letters(1000).await?;
        history.dead_letters.extend(dead.into_iter().map(|d| {
            format!(
                "outbox position {} (message {:032x} of `{}`) after {} attempts: {}",
                d.record.position,
                d.record.message.message_id.as_u128(),
                d.record.stream_id,
                d.attempts,
                d.error
            )
        }));
    }
    Ok(())
}

async fn read_feed<S: EventStore>(store: &S, partition: u32) -> Result<Vec<FeedEvent>> {
    stores::retry("read the final feed", || async {
        let events: Vec<FeedEvent> = store
            .read_all(ReadAll::after(0).partition(partition))
            .map_ok(|e| FeedEvent {
                partition: e.partition,
                position: e.global_position,
                id: e.event_id.as_u128(),
                stream: e.stream_id.to_string(),
                version: e.stream_version,
            })
            .try_collect()
            .await?;
        Ok(events)
    })
    .await
}

async fn pg_models(pool: &PgPool, inline: BTreeSet<u16>) -> Result<Vec<Model>> {
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT stream_id, n, last_version FROM \"{NAMESPACE}\".{PG_MODEL}"
    )))
    .fetch_all(pool)
    .await?;
    let gaps: Vec<(String, i64, i64, i64)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT stream_id, expected, got, position FROM \"{NAMESPACE}\".{PG_GAPS} \
         ORDER BY position"
    )))
    .fetch_all(pool)
    .await?;
    let inline_rows: Vec<(String, i64)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT stream_id, n FROM \"{NAMESPACE}\".{PG_INLINE}"
    )))
    .fetch_all(pool)
    .await?;
    let count = |n: i64| u64::try_from(n).unwrap_or(0);
    Ok(vec![
        Model {
            name: "exactly-once projection".into(),
            rows: rows
                .into_iter()
                .map(|(s, n, v)| (s, (count(n), count(v))))
                .collect(),
            gaps: gaps
                .into_iter()
                .map(|(s, e, g, p)| format!("{s} {e} {g} {p}"))
                .collect(),
            only_writers: None,
            only_category: None,
        },
        Model {
            name: "inline projection".into(),
            rows: inline_rows
                .into_iter()
                .map(|(s, n)| (s, (count(n), 0)))
                .collect(),
            gaps: Vec::new(),
            only_writers: Some(inline),
            only_category: None,
        },
    ])
}

async fn redis_model(store: &RedisStore) -> Result<Model> {
    let mut conn = store.connection();
    let rows: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(stores::redis_model_key())
        .query_async(&mut conn)
        .await?;
    let gaps: Vec<String> = redis::cmd("LRANGE")
        .arg(stores::redis_gaps_key())
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await?;
    let mut model = Model {
        name: "at-least-once projection".into(),
        only_category: Some(FILTERED_CATEGORY.to_owned()),
        gaps,
        ..Model::default()
    };
    for (stream, value) in rows {
        let (n, last) = value
            .split_once(' ')
            .with_context(|| format!("bad read model row {value:?}"))?;
        model.rows.insert(stream, (n.parse()?, last.parse()?));
    }
    Ok(model)
}
