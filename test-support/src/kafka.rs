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

/// How to install `socat`, the TLS front of a [`KafkaBroker`] with TLS, for error messages.
pub const SOCAT_INSTALL: &str = "apt-get install -y socat";

/// A SCRAM mechanism of a [`ScramUser`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scram {
    /// `SCRAM-SHA-256`.
    Sha256,
    /// `SCRAM-SHA-512`.
    Sha512,
}

impl Scram {
    /// The name `tansu user create --mechanism` takes.
    fn tansu_name(self) -> &'static str {
        match self {
            Self::Sha256 => "scram256",
            Self::Sha512 => "scram512",
        }
    }
}

/// A user a [`KafkaBroker`] with authentication knows, by a SCRAM credential.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramUser {
    /// The user name.
    pub name: String,
    /// The password.
    pub password: String,
    /// The mechanism whose credential the broker stores (one per user and mechanism).
    pub mechanism: Scram,
}

impl std::fmt::Debug for ScramUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramUser")
            .field("name", &self.name)
            .field("password", &"***")
            .field("mechanism", &self.mechanism)
            .finish()
    }
}

/// How a [`KafkaBroker::start_secured`] broker serves its clients.
///
/// tansu 0.6.0 cannot serve TLS itself (its `--cert` and `--key` options exclude each other,
/// and the acceptor it would build from them is never used: connections stay plaintext), so
/// TLS is served by `socat` in front of it: a TLS listener on a port of its own, with the given
/// certificate, forwarding each connection to tansu on loopback; tansu advertises that port, so
/// every connection a client makes goes through TLS. SASL is tansu's own (SCRAM-SHA-256 and
/// SCRAM-SHA-512; it offers no PLAIN).
#[derive(Debug, Clone, Default)]
pub struct KafkaSecurity {
    /// The certificate chain and private key (PEM files) the TLS front serves; `None` for
    /// plaintext.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// With TLS: require a client certificate signed by the CA in this PEM file.
    pub client_ca: Option<PathBuf>,
    /// SCRAM users; any turns tansu's `--authentication` on (every client must then
    /// authenticate with SASL/SCRAM before anything but `ApiVersions`).
    pub users: Vec<ScramUser>,
}

/// The TLS front of a broker: `socat` on a port of its own.
#[derive(Debug)]
struct TlsFront {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    server: ChildServer,
}

/// A Kafka-protocol broker of its own: a [tansu](https://github.com/tansu-io/tansu) child
/// process listening (and advertising itself) on 127.0.0.1 only; with
/// [`start_secured`](Self::start_secured), behind a TLS front and with SASL/SCRAM.
#[derive(Debug)]
pub struct KafkaBroker {
    dir: PathBuf,
    port: u16,
    storage: KafkaStorage,
    authentication: bool,
    tls: Option<TlsFront>,
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
            authentication: false,
            tls: None,
            server: ChildServer::new("tansu", port),
        };
        broker.spawn()?;
        Ok(broker)
    }

    /// Starts a broker on free ports, secured as `security` says (see [`KafkaSecurity`]).
    ///
    /// With users, the broker keeps its data in SQLite ([`KafkaStorage::Sqlite`]): it first runs
    /// without authentication while `tansu user create` stores each user's credential (tansu's
    /// own commands cannot authenticate), then again with `--authentication`. tansu's commands
    /// ([`create_topic`](Self::create_topic)) do not work on such a broker; create topics with a
    /// Kafka client that authenticates. With TLS, [`brokers`](Self::brokers) is the TLS front's
    /// address.
    pub fn start_secured(dir: &Path, security: &KafkaSecurity) -> Result<Self> {
        fs::create_dir_all(dir)?;
        let port = free_port()?;
        let storage = if security.users.is_empty() {
            KafkaStorage::Memory
        } else {
            KafkaStorage::Sqlite
        };
        let tls = match &security.tls {
            Some((cert, key)) => Some(TlsFront {
                cert: cert.canonicalize()?,
                key: key.canonicalize()?,
                client_ca: match &security.client_ca {
                    Some(ca) => Some(ca.canonicalize()?),
                    None => None,
                },
                server: ChildServer::new("socat (TLS front of tansu)", free_port()?),
            }),
            None => None,
        };
        let mut broker = Self {
            dir: dir.canonicalize()?,
            port,
            storage,
            authentication: false,
            tls,
            server: ChildServer::new("tansu", port),
        };
        if !security.users.is_empty() {
            // Plaintext, advertising itself, while the users are made.
            let front = broker.tls.take();
            broker.spawn()?;
            for user in &security.users {
                run(
                    Command::new(tansu_bin())
                        .args(["user", "create", "--broker", &broker.url()])
                        .args(["--mechanism", user.mechanism.tansu_name()])
                        .args([&user.name, &user.password])
                        .stdin(Stdio::null()),
                    "tansu user create",
                )
                .map_err(|e| ServerError(e.0.replace(&user.password, "***")))?;
            }
            broker.server.terminate()?;
            broker.authentication = true;
            broker.tls = front;
        }
        broker.spawn()?;
        broker.spawn_tls_front()?;
        Ok(broker)
    }

    /// Starts the TLS front, if the broker has one, unless it runs.
    fn spawn_tls_front(&mut self) -> Result<()> {
        let Some(front) = self.tls.as_mut() else {
            return Ok(());
        };
        if front.server.child.is_some() {
            return Ok(());
        }
        let Some(socat) = crate::on_path("socat") else {
            return Err(ServerError(format!(
                "socat is not on PATH: the Kafka TLS tests serve TLS with it in front of tansu \
                 (which cannot serve TLS itself); install it with `{SOCAT_INSTALL}` (or let \
                 `cargo xtask test` install it)"
            )));
        };
        let log = self.dir.join("socat.log");
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let verify = match &front.client_ca {
            Some(ca) => format!("verify=1,cafile={}", ca.display()),
            None => "verify=0".to_owned(),
        };
        let listen = format!(
            "OPENSSL-LISTEN:{},bind=127.0.0.1,reuseaddr,fork,cert={},key={},{verify}",
            front.server.port,
            front.cert.display(),
            front.key.display()
        );
        let child = Command::new(socat)
            .args([listen, format!("TCP:127.0.0.1:{}", self.port)])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        front.server.child = Some(child);
        if let Err(e) = wait_for_port(front.server.port, true, Duration::from_secs(10), "socat") {
            let log = fs::read_to_string(&log).unwrap_or_default();
            return Err(ServerError(format!("{e}\nsocat log:\n{log}")));
        }
        Ok(())
    }

    fn spawn(&mut self) -> Result<()> {
        let bin = tansu_bin();
        let url = format!("tcp://127.0.0.1:{}", self.port);
        // Clients connect to what the broker advertises: the TLS front, when it has one.
        let advertised = match &self.tls {
            Some(front) => format!("tcp://127.0.0.1:{}", front.server.port),
            None => url.clone(),
        };
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
        let mut command = Command::new(&bin);
        command
            .arg("broker")
            .args([
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
            ])
            .args(["--storage-engine", storage]);
        if self.authentication {
            command.arg("--authentication");
        }
        let child = command
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

    /// Waits until the broker answers its admin API (the port opens before storage is ready);
    /// with authentication (which tansu's commands cannot do) or a TLS front (which it
    /// advertises), until it answers `ApiVersions` on its own port.
    fn wait_until_serving(&mut self) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Some(child) = self.server.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    return Err(ServerError(format!("tansu exited: {status}")));
                }
            }
            let serving = if self.authentication || self.tls.is_some() {
                answers_api_versions(self.port)
            } else {
                Command::new(tansu_bin())
                    .args(["topic", "list", "--broker", &self.url()])
                    .stdin(Stdio::null())
                    .output()
                    .is_ok_and(|o| o.status.success())
            };
            if serving {
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

    /// The `bootstrap.servers` value: `127.0.0.1:port`, the TLS front's port when it has one.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.client_port())
    }

    /// The port clients connect to: the TLS front's when it has one, else tansu's.
    pub fn client_port(&self) -> u16 {
        self.tls
            .as_ref()
            .map_or(self.port, |front| front.server.port)
    }

    /// The port of the TLS front, if the broker has one.
    pub fn tls_port(&self) -> Option<u16> {
        self.tls.as_ref().map(|front| front.server.port)
    }

    /// The broker URL tansu's own commands take: `tcp://127.0.0.1:port` (tansu's plaintext
    /// port, also behind a TLS front).
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
        self.spawn()?;
        self.spawn_tls_front()
    }

    /// Leaves the broker running when this value is dropped; returns its port and pid.
    pub fn detach(mut self) -> (u16, Option<u32>) {
        if let Some(front) = self.tls.as_mut() {
            front.server.detach();
        }
        self.server.detach()
    }
}

/// Whether a Kafka-protocol server on 127.0.0.1:`port` answers an `ApiVersions` request (v0,
/// which needs no authentication).
fn answers_api_versions(port: u16) -> bool {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpStream};

    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    // Size, then api key 18 (ApiVersions), version 0, correlation id 1, a null client id.
    let request: [u8; 14] = [0, 0, 0, 10, 0, 18, 0, 0, 0, 0, 0, 1, 0xff, 0xff];
    let mut size = [0u8; 4];
    stream.write_all(&request).is_ok()
        && stream.read_exact(&mut size).is_ok()
        && u32::from_be_bytes(size) > 0
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
