//! The Kafka-protocol broker: finding tansu, and brokers of their own.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::child::ChildServer;
use crate::{free_port, run, wait_for_port, Result, ServerError};

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
        fs::create_dir_all(dir)?;
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
        let out = fs::OpenOptions::new()
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
                     (or let `cargo xtask test` install it), or point $TANSU at the binary",
                    bin.display()
                ))
            })?;
        self.server.child = Some(child);
        let up = wait_for_port(self.port, true, Duration::from_secs(30), "tansu");
        if let Err(e) = up.and_then(|()| self.wait_until_serving()) {
            let log = fs::read_to_string(&log).unwrap_or_default();
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

/// Finds the tansu binary ([`tansu_bin`]) and checks it can keep data in SQLite
/// ([`KafkaStorage::Sqlite`]: builds without the `libsql` feature cannot); returns its path and
/// `tansu --version`'s first line.
///
/// The check starts a broker on SQLite storage in a scratch directory under `scratch` and stops
/// it: without the feature tansu exits at once, saying `FeatureNotEnabled`.
pub fn find_tansu(scratch: &Path) -> Result<(PathBuf, String)> {
    let bin = tansu_bin();
    let version = Command::new(&bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            ServerError(format!(
                "the Kafka broker tansu ({}) cannot run ({e}): install it with \
                 `{TANSU_INSTALL}` (about 15 minutes on 2 cores; or let `cargo xtask test` \
                 install it), or point $TANSU at the binary",
                bin.display()
            ))
        })?;
    let version = String::from_utf8_lossy(&version.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    let probe = scratch.join(format!("tansu-probe-{}", std::process::id()));
    let _ = fs::remove_dir_all(&probe);
    fs::create_dir_all(&probe)?;
    let result = probe_sqlite(&bin, &probe);
    let _ = fs::remove_dir_all(&probe);
    if result? {
        Ok((bin, version))
    } else {
        Err(ServerError(format!(
            "the Kafka broker tansu ({}, {version}) lacks SQLite storage, which the broker \
             restart tests use: reinstall it with `{TANSU_INSTALL} --force`",
            bin.display()
        )))
    }
}

/// Whether `bin` starts a broker on SQLite storage in `dir` (it runs for two seconds, or exits
/// at once saying `FeatureNotEnabled`).
fn probe_sqlite(bin: &Path, dir: &Path) -> Result<bool> {
    let log = dir.join("tansu.log");
    let out = fs::File::create(&log)?;
    let url = format!("tcp://127.0.0.1:{}", free_port()?);
    let mut child = Command::new(bin)
        .arg("broker")
        .args(["--listener-url", &url, "--advertised-listener-url", &url])
        .args(["--storage-engine", "sqlite:///probe.db"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()?;
    let start = Instant::now();
    let exited = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if start.elapsed() > Duration::from_secs(2) {
            break None;
        }
        sleep(Duration::from_millis(50));
    };
    if exited.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let text = fs::read_to_string(&log).unwrap_or_default();
    match exited {
        _ if text.contains("FeatureNotEnabled") => Ok(false),
        None => Ok(true),
        Some(status) => Err(ServerError(format!(
            "tansu exited at once ({status}) when started on SQLite storage:\n{text}"
        ))),
    }
}
