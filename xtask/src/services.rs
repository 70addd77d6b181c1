//! The servers the tests and benchmarks talk to, started under `target/es-services/`.
//!
//! Each service is one entry in [`SERVICES`]: its name, the environment variable through which
//! tests find it, and how to start it, stop it and remove it. To add a service, add an entry there
//! with its functions (and a [`Server`] for it); `test`, `bench` and `db` pick it up from the
//! list. A run starts only the services it is asked for.
//!
//! A run's servers are stopped when its [`Services`] is dropped. So that Ctrl-C (which kills
//! xtask before any destructor runs) leaves nothing behind either, every run also starts a
//! *reaper*: this binary again, ignoring terminal signals and blocked reading a pipe from the run.
//! When the run ends the pipe closes; unless the run said it stopped its servers itself, the
//! reaper stops them. Directories left by earlier runs are removed when the next run starts.

use std::collections::BTreeSet;
use std::env;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{self, Child, ChildStdin, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use es_test_support::{
    process_alive, ClusterConfig, KafkaBroker, KafkaStorage, PgServer, RedisCluster, RedisServer,
};

use crate::setup::Server;

/// One server the tests need.
struct Service {
    /// The server a run asks for by this name.
    kind: Server,
    /// Short name; its directory is `<name>-<pid>` for a run, `dev/<name>` for `db up`.
    name: &'static str,
    /// What it is, for messages.
    what: &'static str,
    /// The variable tests read its address from. When it is already set, nothing is started.
    env_var: &'static str,
    /// Starts it with its data and log in the directory.
    start: fn(&Path) -> Result<Started>,
    /// Stops a server left running in the directory (by `db up`, or by an interrupted run);
    /// `Ok(false)` when none was running. Its files stay.
    stop_dir: fn(&Path) -> Result<bool>,
    /// Stops a server left running in the directory, if any, and removes the directory with
    /// everything the server kept (PostgreSQL may keep its cluster outside it).
    remove_dir: fn(&Path) -> Result<()>,
}

/// Every service, in start order.
const SERVICES: &[Service] = &[
    Service {
        kind: Server::Postgres,
        name: "pg",
        what: "PostgreSQL",
        env_var: "DATABASE_URL",
        start: start_postgres,
        stop_dir: stop_postgres,
        remove_dir: remove_postgres,
    },
    Service {
        kind: Server::Redis,
        name: "redis",
        what: "Redis",
        env_var: "REDIS_URL",
        start: start_redis,
        stop_dir: stop_redis,
        remove_dir: remove_redis,
    },
    Service {
        kind: Server::RedisCluster,
        name: "redis-cluster",
        what: "a Redis Cluster (3 primaries, 1 replica each)",
        env_var: "REDIS_CLUSTER_URLS",
        start: start_redis_cluster,
        stop_dir: stop_redis_cluster,
        remove_dir: remove_redis_cluster,
    },
    Service {
        kind: Server::Kafka,
        name: "kafka",
        what: "the Kafka broker (tansu)",
        env_var: "KAFKA_BROKERS",
        start: start_kafka,
        stop_dir: stop_kafka,
        remove_dir: remove_kafka,
    },
];

/// A started server: stopped when dropped, unless detached.
struct Started {
    url: String,
    log: PathBuf,
    server: Box<dyn Detach>,
}

/// A server that can be left running when its handle is dropped.
trait Detach {
    fn detach(self: Box<Self>);
}

impl Detach for PgServer {
    fn detach(self: Box<Self>) {
        (*self).detach();
    }
}

impl Detach for RedisServer {
    fn detach(self: Box<Self>) {
        (*self).detach();
    }
}

impl Detach for RedisCluster {
    fn detach(self: Box<Self>) {
        (*self).detach();
    }
}

impl Detach for KafkaBroker {
    fn detach(self: Box<Self>) {
        (*self).detach();
    }
}

/// PostgreSQL with its default (durable) settings; its own cluster, superuser `postgres`.
fn start_postgres(dir: &Path) -> Result<Started> {
    let server = PgServer::start(dir, &[])?;
    Ok(Started {
        url: server.url("postgres"),
        log: dir.join("server.log"),
        server: Box::new(server),
    })
}

fn stop_postgres(dir: &Path) -> Result<bool> {
    if !dir.join("data/postmaster.pid").exists() {
        return Ok(false);
    }
    PgServer::stop_dir(dir)?;
    Ok(true)
}

fn remove_postgres(dir: &Path) -> Result<()> {
    PgServer::remove_dir(dir)?;
    Ok(())
}

/// Redis with an append-only file fsynced every second.
fn start_redis(dir: &Path) -> Result<Started> {
    let server = RedisServer::start(dir, &["--appendonly", "yes", "--appendfsync", "everysec"])?;
    write_pid(dir, "redis-server", server.pid())?;
    Ok(Started {
        url: server.url(),
        log: dir.join("redis.log"),
        server: Box::new(server),
    })
}

fn stop_redis(dir: &Path) -> Result<bool> {
    stop_pid(dir, "redis-server")
}

fn remove_redis(dir: &Path) -> Result<()> {
    stop_redis(dir)?;
    remove_all(dir)
}

/// A Redis Cluster of 3 primaries with a replica each, every node with an append-only file
/// fsynced every second; its nodes' URLs, comma-separated. Each node's pid is recorded in its
/// directory (`node-<i>`).
fn start_redis_cluster(dir: &Path) -> Result<Started> {
    let cluster = RedisCluster::start(dir, &ClusterConfig::default())?;
    for (node, pid) in cluster.processes() {
        write_pid(&node, "redis-server", pid)?;
    }
    Ok(Started {
        url: cluster.urls().join(","),
        log: dir.to_owned(),
        server: Box::new(cluster),
    })
}

/// Stops the cluster's nodes left running in `dir`'s `node-<i>` directories.
fn stop_redis_cluster(dir: &Path) -> Result<bool> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(false);
    };
    let mut stopped = false;
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with("node-") {
            stopped |= stop_pid(&entry.path(), "redis-server")?;
        }
    }
    Ok(stopped)
}

fn remove_redis_cluster(dir: &Path) -> Result<()> {
    stop_redis_cluster(dir)?;
    remove_all(dir)
}

/// A Kafka-protocol broker keeping its data in memory: tests create topics of their own, and a
/// test that restarts a broker starts a durable one of its own.
fn start_kafka(dir: &Path) -> Result<Started> {
    let broker = KafkaBroker::start(dir, KafkaStorage::Memory)?;
    write_pid(dir, "tansu", broker.pid())?;
    Ok(Started {
        url: broker.brokers(),
        log: dir.join("tansu.log"),
        server: Box::new(broker),
    })
}

fn stop_kafka(dir: &Path) -> Result<bool> {
    stop_pid(dir, "tansu")
}

fn remove_kafka(dir: &Path) -> Result<()> {
    stop_kafka(dir)?;
    remove_all(dir)
}

/// Removes `dir` and everything in it; nothing to do if it is gone.
fn remove_all(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// Records the pid of a server started as a child process, for [`stop_pid`].
fn write_pid(dir: &Path, program: &str, pid: Option<u32>) -> Result<()> {
    if let Some(pid) = pid {
        fs::write(dir.join(format!("{program}.pid")), pid.to_string())?;
    }
    Ok(())
}

/// Stops the `program` whose pid [`write_pid`] recorded in `dir`: SIGTERM, then SIGKILL after 30s.
fn stop_pid(dir: &Path, program: &str) -> Result<bool> {
    let Ok(pid) = fs::read_to_string(dir.join(format!("{program}.pid"))) else {
        return Ok(false);
    };
    let pid = pid.trim();
    // The pid may have been reused since; only signal the program.
    let is_program = fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(program));
    if !is_program || !process_alive(pid) {
        return Ok(false);
    }
    let _ = Command::new("kill").arg(pid).status();
    let start = Instant::now();
    while process_alive(pid) {
        if start.elapsed() > Duration::from_secs(30) {
            let _ = Command::new("kill").args(["-9", pid]).status();
            bail!("{program} {pid} did not stop within 30s of SIGTERM; killed it");
        }
        sleep(Duration::from_millis(50));
    }
    Ok(true)
}

/// Where the servers keep their data and logs.
pub(crate) fn root() -> PathBuf {
    crate::target_dir().join("es-services")
}

/// The servers of one run of the tests or benchmarks, stopped when dropped.
pub(crate) struct Services {
    /// The variables to give the child, for the servers started here.
    env: Vec<(&'static str, String)>,
    /// The started servers with their directories, in start order.
    started: Vec<(&'static Service, PathBuf, Started)>,
    reaper: Option<Reaper>,
}

impl Services {
    /// Starts, each in a fresh `target/es-services/<name>-<pid>`, every service of `servers`
    /// whose variable is not already set.
    pub(crate) fn start(servers: &BTreeSet<Server>) -> Result<Self> {
        let root = root();
        remove_stale(&root);
        let mut wanted = Vec::new();
        for service in SERVICES.iter().filter(|s| servers.contains(&s.kind)) {
            if let Ok(url) = env::var(service.env_var) {
                eprintln!(
                    "xtask: {} is set, using {} at {url}",
                    service.env_var, service.what
                );
            } else {
                let dir = root.join(format!("{}-{}", service.name, process::id()));
                wanted.push((service, dir));
            }
        }
        let mut services = Self {
            env: Vec::new(),
            started: Vec::new(),
            reaper: None,
        };
        if wanted.is_empty() {
            return Ok(services);
        }
        services.reaper = Some(Reaper::spawn(&wanted)?);
        for (service, dir) in wanted {
            let _ = fs::remove_dir_all(&dir);
            let started = (service.start)(&dir)
                .with_context(|| format!("cannot start {} in {}", service.what, dir.display()))?;
            eprintln!(
                "xtask: started {} at {} (log: {})",
                service.what,
                started.url,
                started.log.display()
            );
            services.env.push((service.env_var, started.url.clone()));
            services.started.push((service, dir, started));
        }
        Ok(services)
    }

    /// Gives `cmd` the variables of the servers started here.
    pub(crate) fn apply(&self, cmd: &mut Command) {
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
    }

    /// Stops the servers. Their directories are removed, or kept (and their logs pointed out)
    /// when `keep_logs`.
    pub(crate) fn stop(mut self, keep_logs: bool) {
        for (service, dir, server) in std::mem::take(&mut self.started).into_iter().rev() {
            let log = server.log.clone();
            drop(server);
            if keep_logs {
                eprintln!("xtask: {} log kept: {}", service.what, log.display());
            } else {
                let _ = (service.remove_dir)(&dir);
            }
        }
        self.release_reaper();
    }

    fn release_reaper(&mut self) {
        if let Some(reaper) = self.reaper.take() {
            reaper.release();
        }
    }
}

impl Drop for Services {
    fn drop(&mut self) {
        while let Some(server) = self.started.pop() {
            drop(server);
        }
        self.release_reaper();
    }
}

/// Removes directories of runs whose xtask is gone, stopping any server still running there,
/// and PostgreSQL clusters kept outside directories that are gone
/// ([`es_test_support::remove_orphaned_clusters`]).
fn remove_stale(root: &Path) {
    for dir in es_test_support::remove_orphaned_clusters() {
        eprintln!(
            "xtask: removed the orphaned PostgreSQL cluster {}",
            dir.display()
        );
    }
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((service, pid)) = name.rsplit_once('-') else {
            continue;
        };
        let Some(service) = SERVICES.iter().find(|s| s.name == service) else {
            continue;
        };
        if pid.parse::<u32>().is_err() || process_alive(pid) {
            continue;
        }
        let _ = (service.remove_dir)(&entry.path());
    }
}

/// The hidden task run by the reaper: `__reap <name>=<dir>...`.
pub(crate) const REAP_TASK: &str = "__reap";

/// What a run writes to its reaper when it stopped its servers itself.
const RELEASED: &str = "released";

/// A child that stops the run's servers if the run dies without stopping them.
struct Reaper {
    child: Child,
    pipe: ChildStdin,
}

impl Reaper {
    fn spawn(services: &[(&Service, PathBuf)]) -> Result<Self> {
        let exe = env::current_exe().context("cannot find the xtask binary")?;
        // The shell ignores the signals Ctrl-C and a closing terminal send to the whole process
        // group; the ignored dispositions survive `exec`.
        let mut child = Command::new("sh")
            .args(["-c", r#"trap "" HUP INT QUIT TERM; exec "$0" "$@""#])
            .arg(exe)
            .arg(REAP_TASK)
            .args(
                services
                    .iter()
                    .map(|(s, dir)| format!("{}={}", s.name, dir.display())),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .context("cannot start the reaper")?;
        let pipe = child.stdin.take().context("the reaper has no stdin")?;
        Ok(Self { child, pipe })
    }

    /// Tells the reaper the servers were stopped, and waits for it.
    fn release(mut self) {
        let _ = self.pipe.write_all(RELEASED.as_bytes());
        drop(self.pipe);
        let _ = self.child.wait();
    }
}

/// The reaper: waits until the run closes its stdin, then stops the servers unless released.
pub(crate) fn reap(args: &[String]) -> Result<()> {
    let mut said = String::new();
    let _ = std::io::stdin().read_to_string(&mut said);
    if said == RELEASED {
        return Ok(());
    }
    for arg in args {
        let (name, dir) = arg.split_once('=').context("expected <service>=<dir>")?;
        let service = SERVICES
            .iter()
            .find(|s| s.name == name)
            .context("unknown service")?;
        match (service.stop_dir)(Path::new(dir)) {
            Ok(true) => eprintln!(
                "xtask: stopped {} in {dir} (the run was interrupted)",
                service.what
            ),
            Ok(false) => {}
            Err(e) => eprintln!("xtask: cannot stop {} in {dir}: {e:#}", service.what),
        }
    }
    Ok(())
}

/// Starts every service detached, each in `dir/<name>`; returns `(variable, url)` pairs.
/// If one fails to start, those already started are stopped.
pub(crate) fn start_detached(dir: &Path) -> Result<Vec<(&'static str, String)>> {
    let mut started = Vec::new();
    for service in SERVICES {
        let sub = dir.join(service.name);
        let server = (service.start)(&sub)
            .with_context(|| format!("cannot start {} in {}", service.what, sub.display()))?;
        eprintln!(
            "xtask: started {} at {} (log: {})",
            service.what,
            server.url,
            server.log.display()
        );
        started.push((service.env_var, server));
    }
    Ok(started
        .into_iter()
        .map(|(var, server)| {
            server.server.detach();
            (var, server.url)
        })
        .collect())
}

/// Stops the servers [`start_detached`] left running in `dir` and removes `dir`.
pub(crate) fn remove_detached(dir: &Path) -> Result<()> {
    let mut failed = Vec::new();
    for service in SERVICES.iter().rev() {
        let sub = dir.join(service.name);
        if !sub.exists() {
            continue;
        }
        match (service.remove_dir)(&sub) {
            Ok(()) => eprintln!("xtask: stopped {} in {}", service.what, sub.display()),
            Err(e) => failed.push(format!("{}: {e:#}", service.what)),
        }
    }
    if !failed.is_empty() {
        bail!("cannot stop {}", failed.join("; "));
    }
    remove_all(dir)
}
