//! Throwaway PostgreSQL and Redis servers and Kafka brokers on 127.0.0.1, for `cargo xtask` and
//! for tests that must control a server themselves (kill -9 and restart).
//!
//! Servers listen on a free loopback port, keep their data under a directory the caller chooses
//! (normally inside `target/`), and are stopped when dropped unless [`PgServer::detach`] /
//! [`RedisServer::detach`] was called.
//!
//! PostgreSQL refuses to run as root; when the current user is root, `initdb`, `pg_ctl` and the
//! server run as the `postgres` system user (created by Debian's PostgreSQL packages) through
//! `runuser`.
//!
//! Tests find the shared servers through `DATABASE_URL`, `REDIS_URL` and `KAFKA_BROKERS`
//! ([`database_url`], [`redis_url`], [`kafka_brokers`]); when those are missing they fail with a
//! message saying how to start them.

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// Where Debian installs the PostgreSQL 15 binaries.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// An error starting or controlling a server, with the command's output when there is one.
#[derive(Debug)]
pub struct ServerError(pub String);

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ServerError {}

impl From<io::Error> for ServerError {
    fn from(e: io::Error) -> Self {
        Self(e.to_string())
    }
}

type Result<T> = std::result::Result<T, ServerError>;

/// A free TCP port on 127.0.0.1 (free when asked; another process could take it after).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
pub fn port_open(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

fn wait_for_port(port: u16, up: bool, timeout: Duration, what: &str) -> Result<()> {
    let start = Instant::now();
    while port_open(port) != up {
        if start.elapsed() > timeout {
            let state = if up { "accept connections" } else { "stop" };
            return Err(ServerError(format!(
                "{what} on port {port} did not {state} within {timeout:?}"
            )));
        }
        sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Whether process `pid` exists and is not a zombie.
fn process_alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the parenthesised command name.
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .output()
        .map_err(|e| ServerError(format!("{what}: cannot run {cmd:?}: {e}")))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(ServerError(format!(
            "{what} failed ({}):\n{text}",
            out.status
        )))
    }
}

/// A PostgreSQL cluster of its own: `initdb` into a directory, `pg_ctl` to start and stop.
#[derive(Debug)]
pub struct PgServer {
    dir: PathBuf,
    port: u16,
    as_postgres: bool,
    settings: Vec<(String, String)>,
    detached: bool,
}

impl PgServer {
    /// Initializes a cluster in `dir` (if it holds none) and starts it on a free port.
    ///
    /// `settings` are extra `-c name=value` server settings. The cluster uses trust
    /// authentication on loopback, superuser `postgres`.
    pub fn start(dir: &Path, settings: &[(&str, &str)]) -> Result<Self> {
        let bin = Path::new(PG_BIN);
        if !bin.join("initdb").exists() {
            return Err(ServerError(format!(
                "PostgreSQL binaries not found in {PG_BIN}: install them with \
                 `apt-get install -y postgresql-15` (or run .ci/run)"
            )));
        }
        std::fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let mut server = Self {
            dir,
            port: free_port()?,
            as_postgres: is_root(),
            settings: settings
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            detached: false,
        };
        if server.as_postgres {
            run(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&server.dir),
                "chown the PostgreSQL data directory",
            )?;
        }
        if !server.data_dir().join("PG_VERSION").exists() {
            let data = server.data_dir();
            let mut initdb = server.pg_command("initdb");
            initdb.arg("-D").arg(&data).args([
                "--auth=trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ]);
            run(&mut initdb, "initdb")?;
        }
        server.start_server()?;
        Ok(server)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn pg_command(&self, tool: &str) -> Command {
        let path = Path::new(PG_BIN).join(tool);
        if self.as_postgres {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(path);
            cmd
        } else {
            Command::new(path)
        }
    }

    fn start_server(&mut self) -> Result<()> {
        let mut options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c max_connections=300",
            self.port
        );
        for (k, v) in &self.settings {
            options = format!("{options} -c {k}={v}");
        }
        let data = self.data_dir();
        let log = self.dir.join("server.log");
        let mut cmd = self.pg_command("pg_ctl");
        cmd.arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(&log)
            .args(["-o", &options, "-w", "-t", "60", "start"])
            .stdin(Stdio::null());
        run(&mut cmd, "pg_ctl start").map_err(|e| {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            ServerError(format!("{e}\nserver log:\n{log}"))
        })?;
        wait_for_port(self.port, true, Duration::from_secs(30), "PostgreSQL")
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection URL for `database` as superuser `postgres`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// The server's process id, from `postmaster.pid`.
    pub fn pid(&self) -> Result<u32> {
        let pidfile = std::fs::read_to_string(self.data_dir().join("postmaster.pid"))?;
        pidfile
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .ok_or_else(|| ServerError("postmaster.pid holds no pid".into()))
    }

    /// Kills the postmaster and all its processes with SIGKILL, as a crash would, and waits until
    /// they are gone.
    pub fn kill9(&self) -> Result<()> {
        let pid = self.pid()?;
        let children = Command::new("pgrep")
            .args(["-P", &pid.to_string()])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let mut pids = vec![pid.to_string()];
        pids.extend(children.split_whitespace().map(str::to_owned));
        let mut kill = Command::new("kill");
        kill.arg("-9").args(&pids);
        // Some children may already have exited; only the postmaster must have been killed.
        let _ = kill.output();
        let start = Instant::now();
        while pids.iter().any(|p| process_alive(p)) {
            if start.elapsed() > Duration::from_secs(30) {
                return Err(ServerError(format!(
                    "postgres processes {pids:?} survived kill -9"
                )));
            }
            sleep(Duration::from_millis(20));
        }
        wait_for_port(self.port, false, Duration::from_secs(30), "PostgreSQL")?;
        // The dead postmaster may linger as a zombie, which makes a new postmaster believe it
        // still runs; its lock file is stale now.
        let _ = std::fs::remove_file(self.data_dir().join("postmaster.pid"));
        Ok(())
    }

    /// Starts the server again on the same port (after [`kill9`](Self::kill9) or
    /// [`stop`](Self::stop)); crash recovery replays the WAL.
    pub fn restart(&mut self) -> Result<()> {
        self.start_server()
    }

    /// Stops the server (fast shutdown).
    pub fn stop(&self) -> Result<()> {
        let mut cmd = self.pg_command("pg_ctl");
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-m", "fast", "-w", "stop"]);
        run(&mut cmd, "pg_ctl stop").map(|_| ())
    }

    /// Leaves the server running when this value is dropped.
    pub fn detach(mut self) -> (u16, PathBuf) {
        self.detached = true;
        (self.port, self.dir.clone())
    }

    /// Stops a detached server given its directory.
    pub fn stop_dir(dir: &Path) -> Result<()> {
        let server = Self {
            dir: dir.to_owned(),
            port: 0,
            as_postgres: is_root(),
            settings: Vec::new(),
            detached: true,
        };
        server.stop()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if !self.detached && port_open(self.port) {
            let _ = self.stop();
        }
    }
}

/// A server run as a child process on a loopback port: killed when dropped unless detached.
#[derive(Debug)]
struct ChildServer {
    /// What it is, for messages.
    what: &'static str,
    port: u16,
    child: Option<Child>,
    detached: bool,
}

impl ChildServer {
    fn new(what: &'static str, port: u16) -> Self {
        Self {
            what,
            port,
            child: None,
            detached: false,
        }
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the process with SIGKILL and waits until it exited and its port closed.
    fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        wait_for_port(self.port, false, Duration::from_secs(30), self.what)
    }

    /// Sends SIGTERM (a clean shutdown) and waits until the process exited and its port closed;
    /// SIGKILL after 30 s.
    fn terminate(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let start = Instant::now();
            while child.try_wait()?.is_none() {
                if start.elapsed() > Duration::from_secs(30) {
                    child.kill()?;
                    child.wait()?;
                    return Err(ServerError(format!(
                        "{} did not stop within 30s of SIGTERM; killed it",
                        self.what
                    )));
                }
                sleep(Duration::from_millis(20));
            }
        }
        wait_for_port(self.port, false, Duration::from_secs(30), self.what)
    }

    /// Kills the process if this value started it and it was not killed yet.
    fn kill_if_running(&mut self) -> Result<()> {
        if self.child.is_some() {
            self.kill9()?;
        }
        Ok(())
    }

    /// Leaves the process running when this value is dropped; returns its port and pid.
    fn detach(&mut self) -> (u16, Option<u32>) {
        self.detached = true;
        (self.port, self.pid())
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A redis-server child process of its own.
#[derive(Debug)]
pub struct RedisServer {
    dir: PathBuf,
    port: u16,
    args: Vec<String>,
    server: ChildServer,
}

impl RedisServer {
    /// Starts `redis-server` on a free port with its data in `dir` and extra `args`
    /// (for example `["--appendonly", "yes", "--appendfsync", "always"]`).
    pub fn start(dir: &Path, args: &[&str]) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let port = free_port()?;
        let mut server = Self {
            dir: dir.canonicalize()?,
            port,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            server: ChildServer::new("redis-server", port),
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = self.dir.join("redis.log");
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log)
            .args(["--daemonize", "no", "--save", ""])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                ServerError(format!(
                    "cannot start redis-server ({e}): install it with \
                     `apt-get install -y redis-server` (or run .ci/run)"
                ))
            })?;
        self.server.child = Some(child);
        wait_for_port(self.port, true, Duration::from_secs(30), "redis-server").map_err(|e| {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            ServerError(format!("{e}\nredis log:\n{log}"))
        })
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's process id.
    pub fn pid(&self) -> Option<u32> {
        self.server.pid()
    }

    /// Kills the server with SIGKILL and waits for it to exit.
    pub fn kill9(&mut self) -> Result<()> {
        self.server.kill9()
    }

    /// Stops the server cleanly (SIGTERM: Redis writes and fsyncs its AOF, then exits) and waits
    /// until it is gone.
    pub fn terminate(&mut self) -> Result<()> {
        self.server.terminate()
    }

    /// Starts the server again on the same port and data directory (it reloads its AOF).
    pub fn restart(&mut self) -> Result<()> {
        self.server.kill_if_running()?;
        self.spawn()
    }

    /// Leaves the server running when this value is dropped; returns its port and pid.
    pub fn detach(mut self) -> (u16, Option<u32>) {
        self.server.detach()
    }
}

/// The shared PostgreSQL server's URL from `DATABASE_URL`, or a panic that says how to get one.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| {
        panic!(
            "DATABASE_URL is not set: this test needs PostgreSQL. Run the whole suite with \
             `cargo xtask test` (it starts a throwaway server), or start one with \
             `cargo xtask db up` and export the DATABASE_URL it prints."
        )
    })
}

/// The shared Redis server's URL from `REDIS_URL`, or a panic that says how to get one.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| {
        panic!(
            "REDIS_URL is not set: this test needs Redis. Run the whole suite with \
             `cargo xtask test` (it starts a throwaway server), or start one with \
             `cargo xtask db up` and export the REDIS_URL it prints."
        )
    })
}

/// A fresh directory for a test's own server under the workspace's `target/` directory.
pub fn scratch_dir(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    let unique = format!(
        "{name}-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos() ^ u128::from(free_port().unwrap_or(0))
    );
    let dir = target.join("es-scratch").join(unique);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Where a [`KafkaBroker`] keeps its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KafkaStorage {
    /// In the broker's memory (`memory://`): fast, lost when the broker stops.
    Memory,
    /// In a database file in the broker's directory (`sqlite://`, tansu's libsql engine):
    /// survives kill -9 and restart.
    /// Needs tansu built with the `libsql` feature.
    Sqlite,
}

/// How to install the broker binary, for error messages.
pub const TANSU_INSTALL: &str =
    "cargo install tansu --version 0.6.0 --features dynostore,libsql --locked";

/// The tansu binary: `$TANSU` if set, else `tansu` on `PATH`, else `~/.cargo/bin/tansu`.
pub fn tansu_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("TANSU") {
        return PathBuf::from(bin);
    }
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("tansu"))
            .find(|bin| bin.is_file())
    });
    on_path
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo/bin/tansu")))
        .unwrap_or_else(|| PathBuf::from("tansu"))
}

/// A Kafka-protocol broker of its own: a [tansu](https://github.com/tansu-io/tansu) child
/// process listening (and advertising itself) on 127.0.0.1 only.
#[derive(Debug)]
pub struct KafkaBroker {
    dir: PathBuf,
    port: u16,
    storage: KafkaStorage,
    server: ChildServer,
}

impl KafkaBroker {
    /// Starts a broker on a free port, logging to `dir/tansu.log` and, with
    /// [`KafkaStorage::Sqlite`], keeping its data in `dir/tansu.db`.
    pub fn start(dir: &Path, storage: KafkaStorage) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let port = free_port()?;
        let mut broker = Self {
            dir: dir.canonicalize()?,
            port,
            storage,
            server: ChildServer::new("tansu", port),
        };
        broker.spawn()?;
        Ok(broker)
    }

    fn spawn(&mut self) -> Result<()> {
        let bin = tansu_bin();
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let storage = match self.storage {
            KafkaStorage::Memory => "memory://tansu/",
            // Relative to the working directory, which is `dir`.
            KafkaStorage::Sqlite => "sqlite:///tansu.db",
        };
        let log = self.dir.join("tansu.log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = Command::new(&bin)
            .arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", storage])
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .map_err(|e| {
                ServerError(format!(
                    "cannot start the Kafka broker {} ({e}): install it with `{TANSU_INSTALL}` \
                     (or run .ci/run), or point $TANSU at the binary",
                    bin.display()
                ))
            })?;
        self.server.child = Some(child);
        let up = wait_for_port(self.port, true, Duration::from_secs(30), "tansu");
        if let Err(e) = up.and_then(|()| self.wait_until_serving()) {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            let hint = if log.contains("FeatureNotEnabled") {
                format!(
                    "\n(this tansu lacks the storage engine: reinstall it with `{TANSU_INSTALL}`)"
                )
            } else {
                String::new()
            };
            let _ = self.kill9();
            return Err(ServerError(format!("{e}{hint}\ntansu log:\n{log}")));
        }
        Ok(())
    }

    /// Waits until the broker answers its admin API (the port opens before storage is ready).
    fn wait_until_serving(&mut self) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Some(child) = self.server.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    return Err(ServerError(format!("tansu exited: {status}")));
                }
            }
            let listed = Command::new(tansu_bin())
                .args(["topic", "list", "--broker", &self.url()])
                .stdin(Stdio::null())
                .output();
            if listed.is_ok_and(|o| o.status.success()) {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(30) {
                return Err(ServerError(format!(
                    "tansu on port {} did not answer `topic list` within 30s",
                    self.port
                )));
            }
            sleep(Duration::from_millis(100));
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The `bootstrap.servers` value: `127.0.0.1:port`.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker URL tansu's own commands take: `tcp://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    /// The directory holding its log (and data, with [`KafkaStorage::Sqlite`]).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The broker's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.server.pid()
    }

    /// Creates `topic` with `partitions` partitions with `tansu topic create`.
    pub fn create_topic(&self, topic: &str, partitions: u32) -> Result<()> {
        run(
            Command::new(tansu_bin())
                .args(["topic", "create", "--broker", &self.url()])
                .args(["--partitions", &partitions.to_string(), topic])
                .stdin(Stdio::null()),
            "tansu topic create",
        )
        .map(|_| ())
    }

    /// Kills the broker with SIGKILL and waits for it to exit.
    pub fn kill9(&mut self) -> Result<()> {
        self.server.kill9()
    }

    /// Starts the broker again on the same port and directory (killing it first if it runs).
    pub fn restart(&mut self) -> Result<()> {
        self.server.kill_if_running()?;
        self.spawn()
    }

    /// Leaves the broker running when this value is dropped; returns its port and pid.
    pub fn detach(mut self) -> (u16, Option<u32>) {
        self.server.detach()
    }
}

/// The shared Kafka broker's `bootstrap.servers` from `KAFKA_BROKERS`, or a panic that says how
/// to get one.
pub fn kafka_brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| {
        panic!(
            "KAFKA_BROKERS is not set: this test needs a Kafka-protocol broker. Run the whole \
             suite with `cargo xtask test` (it starts a throwaway broker), or start one with \
             `tansu broker --listener-url tcp://127.0.0.1:9092 --advertised-listener-url \
             tcp://127.0.0.1:9092 --storage-engine memory://tansu/` and export \
             KAFKA_BROKERS=127.0.0.1:9092 (install tansu with `{TANSU_INSTALL}`)."
        )
    })
}
