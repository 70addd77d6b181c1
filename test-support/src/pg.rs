//! PostgreSQL: finding the server programs, and clusters of their own.
//!
//! PostgreSQL refuses to run as root. When the current user is root, `initdb`, `pg_ctl`,
//! `pg_basebackup` and the server run as the `postgres` system user (created by the
//! distributions' PostgreSQL packages) through `runuser`. That user must be able to reach the
//! cluster's files: when it cannot enter the directory the caller chose (a checkout in root's home,
//! or in a `mktemp -d` directory, is mode 0700), the cluster lives in a directory of its own under
//! `/var/tmp` (or `/tmp`), mode 0700 and owned by `postgres`, and the caller's directory holds
//! symbolic links to it (`data`, `server.log`). Dropping the server (or [`PgServer::remove_dir`])
//! removes that directory and leaves a copy of the server log behind.

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::{free_port, is_root, process_alive, run, wait_for_port, Result, ServerError};

/// The oldest PostgreSQL major version the stores and their tests support.
pub const MIN_PG_MAJOR: u32 = 14;

/// The system user PostgreSQL runs as when the current user is root.
const PG_USER: &str = "postgres";

/// How to install PostgreSQL on Debian and Ubuntu, for error messages.
pub const PG_INSTALL: &str = "apt-get install -y postgresql";

/// A PostgreSQL installation: where its server programs are and which version they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgInstall {
    /// The directory holding `initdb`, `pg_ctl`, `postgres` and `pg_basebackup`.
    pub bin: PathBuf,
    /// How it was found: `$PG_BIN`, `pg_config --bindir`, `PATH`, or the directory searched.
    pub found_by: String,
    /// The version `initdb --version` reports, e.g. `15.14`.
    pub version: String,
    /// Its major version.
    pub major: u32,
}

/// Finds PostgreSQL's server programs and checks they are at least [`MIN_PG_MAJOR`].
///
/// Looks, in order, at `$PG_BIN` (which, when set, must hold `initdb`), at the directory
/// `pg_config --bindir` names, at the directories on `PATH` (for `initdb`), and then at the usual
/// installation directories: `/usr/lib/postgresql/<version>/bin` (Debian, Ubuntu; the highest
/// version), `/usr/pgsql-<version>/bin` (PGDG RPMs), `/usr/local/pgsql/bin` (built from
/// source), `/opt/homebrew/opt/postgresql@<version>/bin` and
/// `/usr/local/opt/postgresql@<version>/bin` (Homebrew).
pub fn find_postgres() -> Result<PgInstall> {
    let (bin, found_by) = PgSearch::from_env().locate()?;
    let (version, major) = pg_version(&bin)?;
    if major < MIN_PG_MAJOR {
        return Err(ServerError(format!(
            "PostgreSQL {version} in {} (found by {found_by}) is too old: the stores need \
             {MIN_PG_MAJOR} or later; install a newer one (`{PG_INSTALL}`) or point PG_BIN at one",
            bin.display()
        )));
    }
    Ok(PgInstall {
        bin,
        found_by,
        version,
        major,
    })
}

/// The version of the `initdb` in `bin`: its text and its major number.
fn pg_version(bin: &Path) -> Result<(String, u32)> {
    let initdb = bin.join("initdb");
    let out = run(Command::new(&initdb).arg("--version"), "initdb --version")?;
    parse_pg_version(&out).ok_or_else(|| {
        ServerError(format!(
            "cannot read the version `{} --version` printed: {out}",
            initdb.display()
        ))
    })
}

/// `initdb (PostgreSQL) 15.14 (Debian 15.14-0+deb12u1)` -> (`15.14`, 15).
fn parse_pg_version(text: &str) -> Option<(String, u32)> {
    let (_, after) = text.split_once("(PostgreSQL)")?;
    let version = after.split_whitespace().next()?;
    let major = version
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    Some((version.to_owned(), major))
}

/// The places [`find_postgres`] looks at, taken from the environment or given by a test.
#[derive(Debug, Clone)]
pub(crate) struct PgSearch {
    /// `$PG_BIN`.
    pub(crate) pg_bin: Option<OsString>,
    /// `$PATH`.
    pub(crate) path: Option<OsString>,
    /// The file system root the installation directories are searched under (`/`).
    pub(crate) root: PathBuf,
}

/// Installation directories: a parent, the prefix of its versioned children (`None`: the
/// parent's `bin` itself, unversioned), and the programs' directory inside a child.
const INSTALL_DIRS: &[(&str, Option<&str>)] = &[
    ("usr/lib/postgresql", Some("")),
    ("usr", Some("pgsql-")),
    ("usr/local/pgsql", None),
    ("opt/homebrew/opt", Some("postgresql@")),
    ("usr/local/opt", Some("postgresql@")),
];

impl PgSearch {
    pub(crate) fn from_env() -> Self {
        Self {
            pg_bin: std::env::var_os("PG_BIN").filter(|v| !v.is_empty()),
            path: std::env::var_os("PATH"),
            root: PathBuf::from("/"),
        }
    }

    /// The directory holding `initdb`, and how it was found.
    pub(crate) fn locate(&self) -> Result<(PathBuf, String)> {
        if let Some(dir) = &self.pg_bin {
            let dir = PathBuf::from(dir);
            if has_program(&dir, "initdb") {
                return Ok((dir, "$PG_BIN".to_owned()));
            }
            return Err(ServerError(format!(
                "PG_BIN={} holds no `initdb`: point PG_BIN at the directory of PostgreSQL's \
                 server programs, or unset it to search the usual places",
                dir.display()
            )));
        }
        let on_path = |name: &str| -> Option<PathBuf> {
            let path = self.path.as_ref()?;
            std::env::split_paths(path).find(|dir| has_program(dir, name))
        };
        if let Some(dir) = on_path("pg_config") {
            // pg_config may come with the client library alone, naming a directory without the
            // server programs; then the search goes on.
            let out = Command::new(dir.join("pg_config"))
                .arg("--bindir")
                .stderr(Stdio::null())
                .output();
            if let Some(out) = out.ok().filter(|o| o.status.success()) {
                let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
                if has_program(&bin, "initdb") {
                    return Ok((bin, "pg_config --bindir".to_owned()));
                }
            }
        }
        if let Some(dir) = on_path("initdb") {
            return Ok((dir, "PATH".to_owned()));
        }
        for (parent, prefix) in INSTALL_DIRS {
            let parent = self.root.join(parent);
            let found = match prefix {
                None => Some(parent.join("bin")).filter(|bin| has_program(bin, "initdb")),
                Some(prefix) => highest_version(&parent, prefix),
            };
            if let Some(bin) = found {
                return Ok((bin, "the usual installation directories".to_owned()));
            }
        }
        let searched: Vec<String> = INSTALL_DIRS
            .iter()
            .map(|(parent, prefix)| match prefix {
                None => format!("/{parent}/bin"),
                Some(prefix) => format!("/{parent}/{prefix}*/bin"),
            })
            .collect();
        Err(ServerError(format!(
            "PostgreSQL's server programs were not found: PG_BIN is not set, `pg_config \
             --bindir` names none, no `initdb` on PATH, none in {}. Install PostgreSQL \
             {MIN_PG_MAJOR} or later (`{PG_INSTALL}`, or let `cargo xtask test` install it), or \
             set PG_BIN to the directory holding `initdb`",
            searched.join(", ")
        )))
    }
}

/// The `bin` directory of the highest-versioned child of `parent` named `<prefix><version>`
/// that holds `initdb`.
fn highest_version(parent: &Path, prefix: &str) -> Option<PathBuf> {
    let entries = fs::read_dir(parent).ok()?;
    entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let version = version_key(name.strip_prefix(prefix)?)?;
            let bin = entry.path().join("bin");
            has_program(&bin, "initdb").then_some((version, bin))
        })
        .max()
        .map(|(_, bin)| bin)
}

/// `"15"` -> `[15]`, `"9.6"` -> `[9, 6]`; `None` unless it is dot-separated numbers.
fn version_key(text: &str) -> Option<Vec<u32>> {
    text.split('.').map(|part| part.parse().ok()).collect()
}

/// Whether `dir/name` is an executable file.
fn has_program(dir: &Path, name: &str) -> bool {
    fs::metadata(dir.join(name)).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A PostgreSQL cluster of its own: `initdb` into a directory, `pg_ctl` to start and stop.
#[derive(Debug)]
pub struct PgServer {
    /// The directory the caller chose.
    dir: PathBuf,
    /// Where the cluster (`data/`) and `server.log` are: `dir`, or a directory outside it.
    home: Home,
    /// The server programs.
    bin: PathBuf,
    port: u16,
    /// Whether the programs run as [`PG_USER`] (the current user is root).
    as_postgres: bool,
    settings: Vec<(String, String)>,
    detached: bool,
}

/// Where a cluster's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Home {
    path: PathBuf,
    /// Whether `path` is a directory outside the caller's, made for the server user.
    outside: bool,
}

impl PgServer {
    /// Initializes a cluster in `dir` (if it holds none) and starts it on a free port.
    ///
    /// `settings` are extra `-c name=value` server settings. The cluster uses trust
    /// authentication on loopback, superuser `postgres`. See the module docs for where the
    /// cluster's files are when the current user is root.
    pub fn start(dir: &Path, settings: &[(&str, &str)]) -> Result<Self> {
        Self::start_with_files(dir, settings, &[])
    }

    /// [`PgServer::start`] with TLS on (`ssl=on`), serving the certificate `cert` (PEM, with its
    /// chain) and its key `key`, for example from [`TestCerts`](crate::TestCerts).
    pub fn start_tls(dir: &Path, cert: &Path, key: &Path) -> Result<Self> {
        let (cert, key) = (fs::read(cert)?, fs::read(key)?);
        Self::start_with_files(
            dir,
            &[
                ("ssl", "on"),
                ("ssl_cert_file", "server.crt"),
                ("ssl_key_file", "server.key"),
            ],
            &[("server.crt", &cert), ("server.key", &key)],
        )
    }

    /// [`PgServer::start`], with `files` (name, contents) written into the data directory before
    /// the server starts: owned by the server's user, readable by it alone (mode 0600), as
    /// PostgreSQL wants a TLS key to be. Settings name them relative to the data directory
    /// (`ssl_cert_file=server.crt`).
    pub fn start_with_files(
        dir: &Path,
        settings: &[(&str, &str)],
        files: &[(&str, &[u8])],
    ) -> Result<Self> {
        let mut server = Self::prepare(dir, settings)?;
        let data = server.data_dir();
        if !data.join("PG_VERSION").exists() {
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
        for (name, contents) in files {
            write_private(&data, name, contents)?;
        }
        server.start_server()?;
        Ok(server)
    }

    /// Makes a streaming-replication standby of `primary` in `dir` (`pg_basebackup -R`) and
    /// starts it on a free port, with the extra `settings` (for example `hot_standby=on`).
    pub fn start_standby(primary: &Self, dir: &Path, settings: &[(&str, &str)]) -> Result<Self> {
        let mut server = Self::prepare(dir, settings)?;
        let mut backup = server.pg_command("pg_basebackup");
        backup
            .args(["-h", "127.0.0.1", "-p", &primary.port.to_string()])
            .args(["-U", "postgres", "-D"])
            .arg(server.data_dir())
            .args(["-R", "-X", "stream", "-c", "fast"]);
        run(&mut backup, "pg_basebackup")?;
        server.start_server()?;
        Ok(server)
    }

    /// Finds the programs and the place for the cluster's files; starts nothing.
    fn prepare(dir: &Path, settings: &[(&str, &str)]) -> Result<Self> {
        let install = find_postgres()?;
        fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let as_postgres = is_root();
        let home = Home::choose(&dir, as_postgres)?;
        Ok(Self {
            dir,
            home,
            bin: install.bin,
            port: free_port()?,
            as_postgres,
            settings: settings
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            detached: false,
        })
    }

    /// The server's handle for a cluster left in `dir` (detached, or by a process that died).
    fn of_dir(dir: &Path) -> Self {
        Self::handle(dir, Home::existing(dir))
    }

    /// A handle on a cluster that may be running, started by someone else: dropping it neither
    /// stops the server nor removes files. Without the programs it can only kill the server.
    fn handle(dir: &Path, home: Home) -> Self {
        Self {
            dir: dir.to_owned(),
            home,
            bin: find_postgres().map(|i| i.bin).unwrap_or_default(),
            port: 0,
            as_postgres: is_root(),
            settings: Vec::new(),
            detached: true,
        }
    }

    /// The cluster's data directory (`PGDATA`), wherever it is.
    pub fn data_dir(&self) -> PathBuf {
        self.home.path.join("data")
    }

    /// The server's log file, wherever it is.
    pub fn log_file(&self) -> PathBuf {
        self.home.path.join("server.log")
    }

    /// The directory the server was started in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn pg_command(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", PG_USER, "--"]).arg(path);
            cmd
        } else {
            Command::new(path)
        };
        // The server user may not be able to enter the current directory.
        cmd.current_dir(&self.home.path);
        cmd
    }

    fn start_server(&mut self) -> Result<()> {
        let mut options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c max_connections=300",
            self.port
        );
        for (k, v) in &self.settings {
            options = format!("{options} -c {k}={v}");
        }
        let log = self.log_file();
        let mut cmd = self.pg_command("pg_ctl");
        cmd.arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(&log)
            .args(["-o", &options, "-w", "-t", "60", "start"])
            .stdin(Stdio::null());
        run(&mut cmd, "pg_ctl start").map_err(|e| {
            let log = fs::read_to_string(&log).unwrap_or_default();
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
        let pidfile = fs::read_to_string(self.data_dir().join("postmaster.pid"))?;
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
        if self.port != 0 {
            wait_for_port(self.port, false, Duration::from_secs(30), "PostgreSQL")?;
        }
        // The dead postmaster may linger as a zombie, which makes a new postmaster believe it
        // still runs; its lock file is stale now.
        let _ = fs::remove_file(self.data_dir().join("postmaster.pid"));
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

    /// Whether a postmaster runs on this cluster's data directory.
    fn running(&self) -> bool {
        self.pid().is_ok_and(|pid| process_alive(&pid.to_string()))
    }

    /// Leaves the server running when this value is dropped; returns its port and directory.
    /// [`stop_dir`](Self::stop_dir) or [`remove_dir`](Self::remove_dir) stops it later.
    pub fn detach(mut self) -> (u16, PathBuf) {
        self.detached = true;
        if self.home.outside {
            let _ = fs::write(self.home.path.join(DETACHED), "");
        }
        (self.port, self.dir.clone())
    }

    /// Stops a server left running in `dir` (detached, or by a process that died); its files
    /// stay.
    pub fn stop_dir(dir: &Path) -> Result<()> {
        Self::of_dir(dir).stop()
    }

    /// Stops the server left running in `dir`, if one is, and removes `dir` together with the
    /// cluster's files wherever they are. Returns whether a server was running.
    pub fn remove_dir(dir: &Path) -> Result<bool> {
        let server = Self::of_dir(dir);
        let running = server.running();
        if running && server.stop().is_err() {
            server.kill9()?;
        }
        server.home.release(dir);
        match fs::remove_dir_all(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(ServerError(format!("cannot remove {}: {e}", dir.display())))
            }
            _ => Ok(running),
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        if self.running() && self.stop().is_err() {
            let _ = self.kill9();
        }
        self.home.release(&self.dir);
    }
}

/// The marker file of a detached server's outside directory.
const DETACHED: &str = "detached";
/// The file in an outside directory naming the process that made it and the caller's directory.
const OWNER: &str = "owner";
/// The name prefix of outside directories.
const OUTSIDE_PREFIX: &str = "es-pg-";

impl Home {
    /// Where the cluster for `dir` goes: where an earlier start put it, else `dir` itself if the
    /// server user can use it, else a new directory outside.
    fn choose(dir: &Path, as_postgres: bool) -> Result<Self> {
        let existing = Self::existing(dir);
        if existing.outside || !as_postgres {
            return Ok(existing);
        }
        let parent = dir.parent().unwrap_or(dir);
        if user_can_enter(PG_USER, parent)? {
            run(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(dir),
                "chown the PostgreSQL directory",
            )?;
            return Ok(existing);
        }
        if dir.join("data").exists() {
            return Err(ServerError(format!(
                "{}/data holds a cluster the `{PG_USER}` user cannot reach",
                dir.display()
            )));
        }
        Self::make_outside(dir)
    }

    /// The cluster's place as an earlier start left it: the target of `dir/data` when that is a
    /// symbolic link, else `dir`.
    fn existing(dir: &Path) -> Self {
        match fs::read_link(dir.join("data")) {
            Ok(target) => Self {
                path: target.parent().unwrap_or(&target).to_owned(),
                outside: true,
            },
            Err(_) => Self {
                path: dir.to_owned(),
                outside: false,
            },
        }
    }

    /// A new directory under `/var/tmp` (or `/tmp`), mode 0700, owned by the server user, with
    /// `dir/data` and `dir/server.log` linking into it.
    fn make_outside(dir: &Path) -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let base = outside_bases()
            .into_iter()
            .find(|b| b.is_dir())
            .ok_or_else(|| ServerError("neither /var/tmp nor /tmp exists".into()))?;
        let path = loop {
            let name = format!(
                "{OUTSIDE_PREFIX}{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            );
            let path = base.join(name);
            match fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => break path,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(ServerError(format!(
                        "cannot create {}: {e}",
                        path.display()
                    )))
                }
            }
        };
        let home = Self {
            path,
            outside: true,
        };
        let made = (|| {
            fs::write(
                home.path.join(OWNER),
                format!("{}\n{}\n", std::process::id(), dir.display()),
            )?;
            run(
                Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(&home.path),
                "chown the PostgreSQL directory",
            )?;
            std::os::unix::fs::symlink(home.path.join("data"), dir.join("data"))?;
            std::os::unix::fs::symlink(home.path.join("server.log"), dir.join("server.log"))?;
            Ok(())
        })();
        if let Err(e) = made {
            home.release(dir);
            return Err(e);
        }
        Ok(home)
    }

    /// Removes an outside directory, leaving a copy of the server log in `dir` in place of its
    /// link; nothing to do for a cluster inside `dir`.
    fn release(&self, dir: &Path) {
        if !self.outside {
            return;
        }
        let log = dir.join("server.log");
        if fs::symlink_metadata(&log).is_ok_and(|m| m.file_type().is_symlink()) {
            let _ = fs::remove_file(&log);
            let _ = fs::copy(self.path.join("server.log"), &log);
        }
        let data = dir.join("data");
        if fs::symlink_metadata(&data).is_ok_and(|m| m.file_type().is_symlink()) {
            let _ = fs::remove_file(&data);
        }
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Where outside directories are made, in order of preference.
fn outside_bases() -> [PathBuf; 2] {
    [PathBuf::from("/var/tmp"), PathBuf::from("/tmp")]
}

/// Whether `user` can enter `dir` (search permission on it and every directory above it).
fn user_can_enter(user: &str, dir: &Path) -> Result<bool> {
    let status = Command::new("runuser")
        .args(["-u", user, "--", "test", "-x"])
        .arg(dir)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| ServerError(format!("cannot run runuser: {e}")))?;
    match status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => Err(ServerError(format!(
            "`runuser -u {user}` failed ({status}): PostgreSQL refuses to run as root and runs \
             as the `{user}` system user, which PostgreSQL's packages create (`{PG_INSTALL}`)"
        ))),
    }
}

/// Stops and removes the outside directories whose cluster nobody will stop any more: the
/// process that made it is gone and did not detach the server, or the directory it was made for
/// no longer links to it. Returns the directories removed.
pub fn remove_orphaned_clusters() -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for base in outside_bases() {
        let Ok(entries) = fs::read_dir(&base) else {
            continue;
        };
        for entry in entries.flatten() {
            let home = entry.path();
            let is_ours = entry
                .file_name()
                .to_string_lossy()
                .starts_with(OUTSIDE_PREFIX);
            if is_ours && orphaned(&home) {
                let server = PgServer::handle(
                    &home,
                    Home {
                        path: home.clone(),
                        outside: true,
                    },
                );
                if server.running() && server.stop().is_err() {
                    let _ = server.kill9();
                }
                if fs::remove_dir_all(&home).is_ok() {
                    removed.push(home);
                }
            }
        }
    }
    removed
}

/// Whether the outside directory `home` is an orphan (see [`remove_orphaned_clusters`]).
fn orphaned(home: &Path) -> bool {
    let Ok(owner) = fs::read_to_string(home.join(OWNER)) else {
        // Being made right now, or not ours.
        return false;
    };
    let mut lines = owner.lines();
    let (Some(pid), Some(dir)) = (lines.next(), lines.next()) else {
        return false;
    };
    let linked = fs::read_link(Path::new(dir).join("data")).is_ok_and(|t| t == home.join("data"));
    !linked || (!process_alive(pid) && !home.join(DETACHED).exists())
}

/// Writes `dir/name` with mode 0600, owned by the owner of `dir`.
fn write_private(dir: &Path, name: &str, contents: &[u8]) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};

    let path = dir.join(name);
    let _ = fs::remove_file(&path);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    file.write_all(contents)?;
    let owner = fs::metadata(dir)?;
    std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory tree for a search test.
    fn tree(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("es-support-search-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// An executable file `dir/name` printing `output`.
    fn program(dir: &Path, name: &str, output: &str) {
        fs::create_dir_all(dir).unwrap();
        let file = dir.join(name);
        fs::write(&file, format!("#!/bin/sh\necho '{output}'\n")).unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn search(root: &Path) -> PgSearch {
        PgSearch {
            pg_bin: None,
            path: Some(OsString::new()),
            root: root.to_owned(),
        }
    }

    #[test]
    fn reads_initdb_versions() {
        assert_eq!(
            parse_pg_version("initdb (PostgreSQL) 15.14 (Debian 15.14-0+deb12u1)\n"),
            Some(("15.14".to_owned(), 15))
        );
        assert_eq!(
            parse_pg_version("initdb (PostgreSQL) 17beta2"),
            Some(("17beta2".to_owned(), 17))
        );
        assert_eq!(
            parse_pg_version("initdb (PostgreSQL) 9.6.24"),
            Some(("9.6.24".to_owned(), 9))
        );
        assert_eq!(parse_pg_version("something else"), None);
    }

    #[test]
    fn picks_the_highest_versioned_distribution_directory() {
        let root = tree("distro");
        for version in ["9.6", "14", "16", "notaversion"] {
            program(
                &root.join(format!("usr/lib/postgresql/{version}/bin")),
                "initdb",
                "",
            );
        }
        // A version directory without the server programs (client only) is passed over.
        fs::create_dir_all(root.join("usr/lib/postgresql/17/bin")).unwrap();
        let (bin, how) = search(&root).locate().unwrap();
        assert_eq!(bin, root.join("usr/lib/postgresql/16/bin"));
        assert_eq!(how, "the usual installation directories");
        let _ = fs::remove_dir_all(root);
    }

    #[test]
    fn searches_every_usual_place_in_order() {
        let root = tree("places");
        program(
            &root.join("opt/homebrew/opt/postgresql@16/bin"),
            "initdb",
            "",
        );
        program(
            &root.join("opt/homebrew/opt/postgresql@15/bin"),
            "initdb",
            "",
        );
        let (bin, _) = search(&root).locate().unwrap();
        assert_eq!(bin, root.join("opt/homebrew/opt/postgresql@16/bin"));
        program(&root.join("usr/local/pgsql/bin"), "initdb", "");
        let (bin, _) = search(&root).locate().unwrap();
        assert_eq!(bin, root.join("usr/local/pgsql/bin"));
        program(&root.join("usr/pgsql-14/bin"), "initdb", "");
        program(&root.join("usr/pgsql-16/bin"), "initdb", "");
        let (bin, _) = search(&root).locate().unwrap();
        assert_eq!(bin, root.join("usr/pgsql-16/bin"));
        program(&root.join("usr/lib/postgresql/15/bin"), "initdb", "");
        let (bin, _) = search(&root).locate().unwrap();
        assert_eq!(bin, root.join("usr/lib/postgresql/15/bin"));
        let _ = fs::remove_dir_all(root);
    }

    #[test]
    fn pg_bin_pg_config_and_path_come_before_the_usual_places() {
        let root = tree("env");
        program(&root.join("usr/lib/postgresql/16/bin"), "initdb", "");
        let on_path = root.join("path-bin");
        program(&on_path, "initdb", "");
        let mut search = search(&root);
        search.path = Some(std::env::join_paths([root.join("empty"), on_path.clone()]).unwrap());
        assert_eq!(
            search.locate().unwrap(),
            (on_path.clone(), "PATH".to_owned())
        );

        // pg_config naming a directory without initdb (a client-only install) is passed over.
        let config_dir = root.join("config-bin");
        program(
            &config_dir,
            "pg_config",
            &root.join("nowhere").display().to_string(),
        );
        search.path = Some(std::env::join_paths([config_dir.clone(), on_path.clone()]).unwrap());
        assert_eq!(search.locate().unwrap().0, on_path);
        let server_bin = root.join("server-bin");
        program(&server_bin, "initdb", "");
        program(&config_dir, "pg_config", &server_bin.display().to_string());
        assert_eq!(
            search.locate().unwrap(),
            (server_bin.clone(), "pg_config --bindir".to_owned())
        );

        let pg_bin = root.join("pg-bin");
        program(&pg_bin, "initdb", "");
        search.pg_bin = Some(pg_bin.clone().into_os_string());
        assert_eq!(search.locate().unwrap(), (pg_bin, "$PG_BIN".to_owned()));
        let _ = fs::remove_dir_all(root);
    }

    #[test]
    fn a_pg_bin_without_initdb_is_an_error_not_a_fallback() {
        let root = tree("bad-pg-bin");
        program(&root.join("usr/lib/postgresql/16/bin"), "initdb", "");
        let mut search = search(&root);
        search.pg_bin = Some(root.join("empty").into_os_string());
        let err = search.locate().unwrap_err().to_string();
        assert!(
            err.contains("PG_BIN=") && err.contains("holds no `initdb`"),
            "{err}"
        );
        let _ = fs::remove_dir_all(root);
    }

    #[test]
    fn nothing_found_says_where_it_looked_and_how_to_install() {
        let root = tree("none");
        let err = search(&root).locate().unwrap_err().to_string();
        for place in [
            "/usr/lib/postgresql/*/bin",
            "/usr/pgsql-*/bin",
            "/usr/local/pgsql/bin",
            "/opt/homebrew/opt/postgresql@*/bin",
            PG_INSTALL,
            "PG_BIN",
        ] {
            assert!(err.contains(place), "{place} missing from: {err}");
        }
        let _ = fs::remove_dir_all(root);
    }
}
