//! Throwaway PostgreSQL and Redis servers on 127.0.0.1, for `cargo xtask` and for tests that must
//! control a server themselves (kill -9 and restart).
//!
//! Servers listen on a free loopback port, keep their data under a directory the caller chooses
//! (normally inside `target/`), and are stopped when dropped unless [`PgServer::detach`] /
//! [`RedisServer::detach`] was called.
//!
//! PostgreSQL refuses to run as root; when the current user is root, `initdb`, `pg_ctl` and the
//! server run as the `postgres` system user (created by Debian's PostgreSQL packages) through
//! `runuser`.
//!
//! Tests find the shared servers through `DATABASE_URL` and `REDIS_URL` ([`database_url`],
//! [`redis_url`]); when those are missing they fail with a message saying how to start them.

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

/// A redis-server child process of its own.
#[derive(Debug)]
pub struct RedisServer {
    dir: PathBuf,
    port: u16,
    args: Vec<String>,
    child: Option<Child>,
    detached: bool,
}

impl RedisServer {
    /// Starts `redis-server` on a free port with its data in `dir` and extra `args`
    /// (for example `["--appendonly", "yes", "--appendfsync", "always"]`).
    pub fn start(dir: &Path, args: &[&str]) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut server = Self {
            dir: dir.canonicalize()?,
            port: free_port()?,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            child: None,
            detached: false,
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
        self.child = Some(child);
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
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server with SIGKILL and waits for it to exit.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        wait_for_port(self.port, false, Duration::from_secs(30), "redis-server")
    }

    /// Starts the server again on the same port and data directory (it reloads its AOF).
    pub fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            self.kill9()?;
        }
        self.spawn()
    }

    /// Leaves the server running when this value is dropped; returns its port and pid.
    pub fn detach(mut self) -> (u16, Option<u32>) {
        self.detached = true;
        (self.port, self.pid())
    }
}

impl Drop for RedisServer {
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
