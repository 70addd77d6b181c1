//! `cargo xtask setup [--check | --dry-run] [-p <package>]...`: what the tests need on this
//! machine, installed when missing.
//!
//! Each workspace package's tests need some of: PostgreSQL's server programs (14 or later),
//! `redis-server` (7 or later) with `redis-cli` (the cluster tests), the tansu Kafka-protocol broker with SQLite storage, Python with
//! kafka-python (the outside-client test), procps (`pgrep`, `kill`), a C toolchain with make and
//! perl (librdkafka is built from source), OpenSSL's headers with pkg-config (es-kafka's `tls`
//! feature builds librdkafka with the system OpenSSL), `openssl` (the TLS tests' certificates),
//! `socat` (the TLS front of the Kafka TLS tests: tansu 0.6.0 cannot serve TLS), Chromium with
//! chromedriver (the web console's tests drive it headless) and
//! cargo-nextest ([`PACKAGES`]). `cargo xtask test`,
//! `bench`, `chaos` and `db up` check what theirs need up front ([`ensure`]) and install what is
//! missing: Debian/Ubuntu packages with `apt-get` (as root, or through `sudo` when it needs no
//! password), tansu and cargo-nextest with `cargo install`, kafka-python with pip. One line per
//! step says what runs and how long it took. When something cannot be installed here (no root,
//! no sudo, no apt-get) nothing is installed: one message lists every missing thing with the
//! command that installs it.
//!
//! `--no-install` (or `XTASK_NO_INSTALL=1`) only checks, and fails listing what is missing;
//! `setup --dry-run` prints the commands it would run.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use es_test_support::{
    find_postgres, find_redis, find_redis_cli, find_tansu, is_root, TANSU_INSTALL,
};

use crate::{cargo, target_dir};

/// The variable that turns installing off, like `--no-install`.
pub(crate) const NO_INSTALL_VAR: &str = "XTASK_NO_INSTALL";

/// The flag that turns installing off.
pub(crate) const NO_INSTALL_FLAG: &str = "--no-install";

/// Something the tests need on the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Prereq {
    /// cargo-nextest, which runs the tests.
    Nextest,
    /// A C and C++ compiler, make and perl: librdkafka (es-kafka) and tansu build from source.
    CBuild,
    /// `pgrep` and `kill`, with which the test support stops and kills servers.
    Procps,
    /// PostgreSQL's server programs.
    Postgres,
    /// `redis-server`, and `redis-cli` (the cluster tests drive their cluster with it).
    Redis,
    /// The `openssl` command, with which the TLS tests make their certificates.
    OpenSsl,
    /// OpenSSL's headers and pkg-config: es-kafka's `tls` feature builds librdkafka with the
    /// system OpenSSL (openssl-sys finds it with pkg-config).
    OpenSslDev,
    /// `socat`, the TLS front of the Kafka TLS tests (tansu 0.6.0 cannot serve TLS).
    Socat,
    /// Debian's Chromium and chromedriver, with which the web console's tests drive it headless.
    Chromium,
    /// The tansu broker, with SQLite storage.
    Tansu,
    /// Python with kafka-python.
    KafkaPython,
    /// git, to clone the repository (`cargo xtask fresh`).
    Git,
}

/// A shared server a run starts for its tests (unless its variable is set).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Server {
    Postgres,
    Redis,
    /// A Redis Cluster of 3 primaries with a replica each.
    RedisCluster,
    Kafka,
}

impl Server {
    /// The program that runs it.
    fn prereq(self) -> Prereq {
        match self {
            Self::Postgres => Prereq::Postgres,
            Self::Redis | Self::RedisCluster => Prereq::Redis,
            Self::Kafka => Prereq::Tansu,
        }
    }
}

/// What a run needs: programs, and shared servers to start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Needs {
    pub(crate) prereqs: BTreeSet<Prereq>,
    pub(crate) servers: BTreeSet<Server>,
}

use Prereq::{CBuild, KafkaPython, Procps};

/// Every workspace package with what its tests need: programs for servers of their own, and the
/// shared servers (which imply their programs). A package missing here is treated as needing
/// everything; a unit test checks the list covers the workspace.
pub(crate) const PACKAGES: &[(&str, &[Prereq], &[Server])] = &[
    ("es-core", &[], &[]),
    ("es-derive", &[], &[]),
    ("es-memory", &[], &[]),
    ("es-testkit", &[], &[]),
    // The guide's samples run on the in-memory store; the server ones only compile, which
    // builds librdkafka (with es-kafka's `tls` feature: OpenSSL's headers).
    ("es-guide", &[CBuild, Prereq::OpenSslDev], &[]),
    ("example-bank", &[], &[]),
    ("xtask", &[], &[]),
    ("es-chaos", &[], &[]),
    ("es-bench", &[CBuild], &[]),
    (
        "es-test-support",
        &[Prereq::Postgres, Prereq::Redis, Procps],
        &[],
    ),
    ("es-postgres", &[Procps], &[Server::Postgres]),
    // The `es` binary's tests run it against PostgreSQL and Redis, and its web console in a
    // headless Chromium; its `tls` feature builds `ring` (C).
    (
        "es-cli",
        &[CBuild, Procps, Prereq::Chromium],
        &[Server::Postgres, Server::Redis],
    ),
    // The `tls` feature builds `ring` (C); the TLS tests make certificates with `openssl`; the
    // failover tests run sentinels with `redis-server --sentinel`; the cluster suite runs on a
    // shared cluster, the cluster fault tests on clusters of their own.
    (
        "es-redis",
        &[CBuild, Procps, Prereq::OpenSsl],
        &[Server::Redis, Server::RedisCluster],
    ),
    // The `tls` feature builds librdkafka with the system OpenSSL; the TLS tests make
    // certificates with `openssl` and serve TLS with `socat` in front of tansu.
    (
        "es-kafka",
        &[
            CBuild,
            Procps,
            KafkaPython,
            Prereq::OpenSslDev,
            Prereq::OpenSsl,
            Prereq::Socat,
        ],
        &[Server::Postgres, Server::Redis, Server::Kafka],
    ),
    (
        "example-bank-streaming",
        &[CBuild, Procps],
        &[Server::Postgres, Server::Kafka],
    ),
];

impl Needs {
    /// What `prereqs` and `servers` need, with the programs the servers imply.
    pub(crate) fn new(prereqs: &[Prereq], servers: &[Server]) -> Self {
        let mut needs = Self::default();
        needs.add(prereqs, servers);
        needs
    }

    fn add(&mut self, prereqs: &[Prereq], servers: &[Server]) {
        self.prereqs.extend(prereqs);
        self.servers.extend(servers);
        self.prereqs.extend(servers.iter().map(|s| s.prereq()));
        if !servers.is_empty() {
            self.prereqs.insert(Procps);
        }
    }

    /// What testing the whole workspace needs.
    pub(crate) fn workspace() -> Self {
        let mut needs = Self::new(&[Prereq::Nextest], &[]);
        for (_, prereqs, servers) in PACKAGES {
            needs.add(prereqs, servers);
        }
        needs
    }

    /// What testing the packages `specs` (names or cargo's `*`/`?` patterns) needs; everything
    /// when one matches no package listed in [`PACKAGES`].
    pub(crate) fn of_packages(specs: &[String]) -> Self {
        let mut needs = Self::new(&[Prereq::Nextest], &[]);
        for spec in specs {
            let matching: Vec<_> = PACKAGES
                .iter()
                .filter(|(name, _, _)| glob_match(spec, name))
                .collect();
            if matching.is_empty() {
                return Self::workspace();
            }
            for (_, prereqs, servers) in matching {
                needs.add(prereqs, servers);
            }
        }
        needs
    }

    /// What the fault-injecting checker needs (it starts PostgreSQL and Redis of its own).
    pub(crate) fn chaos() -> Self {
        Self::new(&[Prereq::Postgres, Prereq::Redis, Procps], &[])
    }

    /// Adds `other`.
    pub(crate) fn with(mut self, other: &Self) -> Self {
        self.prereqs.extend(&other.prereqs);
        self.servers.extend(&other.servers);
        self
    }
}

/// Whether `name` matches cargo's package pattern `pattern` (`*` and `?` wildcards).
fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[char], n: &[char]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some('*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some('?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    go(&p, &n)
}

/// Whether to install what is missing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Install what is missing, then check again.
    Install,
    /// Only check; fail listing what is missing.
    CheckOnly,
    /// Print what would be installed, install nothing.
    DryRun,
}

/// Takes `--no-install` out of `args`; the mode it and [`NO_INSTALL_VAR`] ask for.
pub(crate) fn mode_from(args: &[String]) -> (Mode, Vec<String>) {
    let mut mode = match std::env::var(NO_INSTALL_VAR) {
        Ok(v) if !v.is_empty() && v != "0" => Mode::CheckOnly,
        _ => Mode::Install,
    };
    let mut rest = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if arg == "--" {
            rest.push(arg.clone());
            rest.extend(args.by_ref().cloned());
        } else if arg == NO_INSTALL_FLAG {
            mode = Mode::CheckOnly;
        } else {
            rest.push(arg.clone());
        }
    }
    (mode, rest)
}

/// How a missing thing is installed.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Fix {
    /// Debian/Ubuntu packages.
    Apt(Vec<&'static str>),
    /// `cargo install` with these arguments.
    Cargo(Vec<&'static str>),
    /// kafka-python with pip, for this interpreter.
    Pip(String),
    /// Nothing here can fix it; the message says what to do.
    Manual,
}

/// A missing thing: what, why, and how to install it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Missing {
    what: &'static str,
    why: String,
    fix: Fix,
}

impl Missing {
    fn new(what: &'static str, why: impl Into<String>, fix: Fix) -> Self {
        Self {
            what,
            why: why.into(),
            fix,
        }
    }
}

/// Checks `prereq`: what was found (for the log), or what is missing.
fn check(prereq: Prereq) -> std::result::Result<String, Vec<Missing>> {
    match prereq {
        Prereq::Nextest => {
            let out = cargo().args(["nextest", "--version"]).output();
            match out {
                Ok(out) if out.status.success() => Ok(first_line(&out.stdout)),
                _ => Err(vec![Missing::new(
                    "cargo-nextest",
                    "`cargo nextest` is not installed",
                    Fix::Cargo(vec!["cargo-nextest", "--locked"]),
                )]),
            }
        }
        Prereq::CBuild => {
            let tools = [
                ("cc", "build-essential"),
                ("c++", "g++"),
                ("make", "make"),
                ("perl", "perl"),
            ];
            let missing: Vec<Missing> = tools
                .iter()
                .filter(|(program, _)| which(program).is_none())
                .map(|(program, package)| {
                    Missing::new(
                        program,
                        format!("`{program}` is not on PATH (librdkafka and tansu build with it)"),
                        Fix::Apt(vec![package]),
                    )
                })
                .collect();
            if missing.is_empty() {
                Ok("C toolchain: cc, c++, make, perl".to_owned())
            } else {
                Err(missing)
            }
        }
        Prereq::Procps => {
            let missing: Vec<&str> = ["pgrep", "kill"]
                .into_iter()
                .filter(|p| which(p).is_none())
                .collect();
            if missing.is_empty() {
                Ok("procps: pgrep, kill".to_owned())
            } else {
                Err(vec![Missing::new(
                    "procps",
                    format!("{} not on PATH", missing.join(" and ")),
                    Fix::Apt(vec!["procps"]),
                )])
            }
        }
        Prereq::Postgres => check_postgres(),
        Prereq::Redis => check_redis(),
        Prereq::OpenSsl => match which("openssl") {
            Some(openssl) => Ok(format!("openssl ({})", openssl.display())),
            None => Err(vec![Missing::new(
                "openssl",
                "`openssl` is not on PATH (the TLS tests make their certificates with it)",
                Fix::Apt(vec!["openssl"]),
            )]),
        },
        Prereq::OpenSslDev => check_openssl_dev(),
        Prereq::Socat => match which("socat") {
            Some(socat) => Ok(format!("socat ({})", socat.display())),
            None => Err(vec![Missing::new(
                "socat",
                "`socat` is not on PATH (the Kafka TLS tests serve TLS with it in front of \
                 tansu, which cannot serve TLS itself)",
                Fix::Apt(vec!["socat"]),
            )]),
        },
        Prereq::Chromium => match (which("chromium"), which("chromedriver")) {
            (Some(chromium), Some(driver)) => Ok(format!(
                "chromium ({}), chromedriver ({})",
                chromium.display(),
                driver.display()
            )),
            _ => Err(vec![Missing::new(
                "chromium",
                "`chromium` or `chromedriver` is not on PATH (the web console's tests drive \
                 Chromium headless, the slider's test through chromedriver)",
                Fix::Apt(vec!["chromium", "chromium-driver"]),
            )]),
        },
        Prereq::Tansu => check_tansu(),
        Prereq::KafkaPython => check_kafka_python(),
        Prereq::Git => match which("git") {
            Some(git) => Ok(format!("git ({})", git.display())),
            None => Err(vec![Missing::new(
                "git",
                "`git` is not on PATH",
                Fix::Apt(vec!["git"]),
            )]),
        },
    }
}

/// `redis-server` (7 or later) and `redis-cli`, with which the cluster tests create and drive
/// their cluster (Debian's redis-tools, which redis-server depends on).
fn check_redis() -> std::result::Result<String, Vec<Missing>> {
    match (find_redis(), find_redis_cli()) {
        (Ok((program, version)), Ok(cli)) => Ok(format!(
            "redis-server {version} ({}), redis-cli ({})",
            program.display(),
            cli.display()
        )),
        (server, cli) => {
            Err(server
                .err()
                .map(|e| {
                    Missing::new(
                        "redis-server",
                        e.to_string(),
                        Fix::Apt(vec!["redis-server"]),
                    )
                })
                .into_iter()
                .chain(cli.err().map(|e| {
                    Missing::new("redis-cli", e.to_string(), Fix::Apt(vec!["redis-tools"]))
                }))
                .collect())
        }
    }
}

/// pkg-config, and OpenSSL's headers and library as pkg-config finds them (`openssl.pc`, from
/// libssl-dev): what openssl-sys needs to build librdkafka with TLS.
fn check_openssl_dev() -> std::result::Result<String, Vec<Missing>> {
    let why_pkg_config = "`pkg-config` is not on PATH (openssl-sys finds OpenSSL with it for \
                          es-kafka's `tls` feature)";
    let Some(pkg_config) = which("pkg-config") else {
        return Err(vec![Missing::new(
            "OpenSSL headers",
            why_pkg_config,
            Fix::Apt(vec!["pkg-config", "libssl-dev"]),
        )]);
    };
    let version = Command::new(&pkg_config)
        .args(["--modversion", "openssl"])
        .stdin(Stdio::null())
        .output();
    match version {
        Ok(out) if out.status.success() => Ok(format!(
            "OpenSSL {} headers (pkg-config, {})",
            first_line(&out.stdout),
            pkg_config.display()
        )),
        _ => Err(vec![Missing::new(
            "OpenSSL headers",
            "pkg-config finds no `openssl` (es-kafka's `tls` feature builds librdkafka with the \
             system OpenSSL, whose headers libssl-dev installs)",
            Fix::Apt(vec!["libssl-dev"]),
        )]),
    }
}

fn check_postgres() -> std::result::Result<String, Vec<Missing>> {
    let install = match find_postgres() {
        Ok(install) => install,
        // A wrong PG_BIN is the user's to fix; installing would not change what it names.
        Err(e) if std::env::var_os("PG_BIN").is_some_and(|v| !v.is_empty()) => {
            return Err(vec![Missing::new("PostgreSQL", e.to_string(), Fix::Manual)])
        }
        Err(e) => {
            return Err(vec![Missing::new(
                "PostgreSQL",
                e.to_string(),
                Fix::Apt(vec!["postgresql"]),
            )])
        }
    };
    // As root the server runs as the `postgres` user, which PostgreSQL's packages create.
    if is_root() && !user_exists("postgres") {
        return Err(vec![Missing::new(
            "the postgres user",
            format!(
                "PostgreSQL refuses to run as root and runs as the `postgres` system user, which \
                 does not exist (PostgreSQL in {} was not installed by a package that makes it); \
                 create it with `useradd --system --user-group --no-create-home postgres`",
                install.bin.display()
            ),
            Fix::Manual,
        )]);
    }
    Ok(format!(
        "PostgreSQL {} ({}, found by {})",
        install.version,
        install.bin.display(),
        install.found_by
    ))
}

fn check_tansu() -> std::result::Result<String, Vec<Missing>> {
    let scratch = setup_dir();
    let _ = fs::create_dir_all(&scratch);
    match find_tansu(&scratch) {
        Ok((bin, version)) => Ok(format!("{version} ({}), SQLite storage", bin.display())),
        Err(e) if std::env::var_os("TANSU").is_some() => {
            Err(vec![Missing::new("tansu", e.to_string(), Fix::Manual)])
        }
        Err(e) => {
            let mut args: Vec<&'static str> = TANSU_INSTALL
                .strip_prefix("cargo install ")
                .unwrap_or(TANSU_INSTALL)
                .split(' ')
                .collect();
            // A build without SQLite storage is there: replace it.
            if e.to_string().contains("lacks SQLite") {
                args.push("--force");
            }
            Err(vec![Missing::new("tansu", e.to_string(), Fix::Cargo(args))])
        }
    }
}

/// The interpreter the outside-client test runs: `$PYTHON`, else `python3` (as es-kafka's).
fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

fn check_kafka_python() -> std::result::Result<String, Vec<Missing>> {
    let python = python();
    let works = |args: &[&str]| {
        Command::new(&python)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let pip_fix = Missing::new(
        "kafka-python",
        format!("`{python}` cannot import kafka (the outside-client test uses kafka-python)"),
        Fix::Pip(python.clone()),
    );
    if !works(&["--version"]) {
        if std::env::var_os("PYTHON").is_some() {
            return Err(vec![Missing::new(
                "Python",
                format!("PYTHON={python} does not run"),
                Fix::Manual,
            )]);
        }
        return Err(vec![
            Missing::new(
                "python3",
                "`python3` is not on PATH",
                Fix::Apt(vec!["python3", "python3-pip"]),
            ),
            pip_fix,
        ]);
    }
    if works(&["-c", "import kafka"]) {
        return Ok(format!("kafka-python ({python})"));
    }
    let mut missing = Vec::new();
    if !works(&["-m", "pip", "--version"]) {
        missing.push(Missing::new(
            "pip",
            format!("`{python} -m pip` does not run"),
            Fix::Apt(vec!["python3-pip"]),
        ));
    }
    missing.push(pip_fix);
    Err(missing)
}

/// The first line of a program's output.
fn first_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// `program` on `PATH`.
fn which(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|f| fs::metadata(f).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

fn user_exists(user: &str) -> bool {
    Command::new("id")
        .arg(user)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Where setup keeps its install logs and probes.
fn setup_dir() -> PathBuf {
    target_dir().join("es-setup")
}

/// How this user can install system packages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Privilege {
    Root,
    /// `sudo` works without asking for a password.
    Sudo,
    None,
}

fn privilege() -> Privilege {
    if is_root() {
        return Privilege::Root;
    }
    let sudo = Command::new("sudo")
        .args(["-n", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if sudo.is_ok_and(|s| s.success()) {
        Privilege::Sudo
    } else {
        Privilege::None
    }
}

/// One install command: a label, the program and its arguments, and another command to try
/// when the first fails.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Step {
    label: String,
    argv: Vec<String>,
    fallback: Option<Vec<String>>,
}

/// What to run for the missing things, or why nothing can be run.
#[derive(Debug, PartialEq, Eq)]
enum Plan {
    Run(Vec<Step>),
    /// Something cannot be installed here: the message listing everything, with commands.
    Blocked(String),
}

fn strings(words: &[&str]) -> Vec<String> {
    words.iter().map(|&w| w.to_owned()).collect()
}

/// The commands that install `missing`, given how this user may install system packages and
/// whether `apt-get` exists.
fn plan(missing: &[Missing], privilege: Privilege, has_apt: bool) -> Plan {
    let apt_prefix: Vec<&str> = match privilege {
        Privilege::Sudo => vec!["sudo"],
        _ => Vec::new(),
    };
    let apt_install = |packages: &[&str]| {
        let mut argv = apt_prefix.clone();
        argv.extend([
            "env",
            "DEBIAN_FRONTEND=noninteractive",
            "apt-get",
            "install",
            "-y",
            "--no-install-recommends",
        ]);
        argv.extend(packages);
        strings(&argv)
    };
    let pip = |python: &str, extra: &[&str]| {
        let mut argv = vec![python, "-m", "pip", "install", "--quiet"];
        if privilege != Privilege::Root {
            argv.push("--user");
        }
        argv.extend(extra);
        argv.push("kafka-python");
        strings(&argv)
    };

    // System packages first (the builds and pip need them), then cargo, then pip.
    let mut apt_packages: Vec<&str> = Vec::new();
    let mut apt_steps = Vec::new();
    let mut other_steps = Vec::new();
    let mut pip_steps = Vec::new();
    let mut manual = false;
    for m in missing {
        match &m.fix {
            Fix::Apt(packages) => {
                let new: Vec<&str> = packages
                    .iter()
                    .copied()
                    .filter(|p| !apt_packages.contains(p))
                    .collect();
                if new.is_empty() {
                    continue;
                }
                apt_packages.extend(&new);
                let label = if new == [m.what] {
                    m.what.to_owned()
                } else {
                    format!("{} ({})", m.what, new.join(" "))
                };
                apt_steps.push(Step {
                    label,
                    argv: apt_install(&new),
                    fallback: None,
                });
            }
            Fix::Cargo(cargo_args) => {
                let mut command = vec!["cargo", "install"];
                command.extend(cargo_args);
                other_steps.push(Step {
                    label: m.what.to_owned(),
                    argv: strings(&command),
                    fallback: None,
                });
            }
            Fix::Pip(python) => pip_steps.push(Step {
                label: m.what.to_owned(),
                argv: pip(python, &[]),
                // Debian's Python refuses to install into itself without this (PEP 668).
                fallback: Some(pip(python, &["--break-system-packages"])),
            }),
            Fix::Manual => manual = true,
        }
    }
    let can_apt = has_apt && privilege != Privilege::None;
    if manual || (!apt_packages.is_empty() && !can_apt) {
        return Plan::Blocked(blocked_message(missing, &apt_packages, privilege, has_apt));
    }
    let mut steps = Vec::new();
    if !apt_packages.is_empty() {
        let mut update = apt_prefix.clone();
        update.extend(["apt-get", "update"]);
        steps.push(Step {
            label: "package lists".to_owned(),
            argv: strings(&update),
            fallback: None,
        });
    }
    steps.extend(apt_steps);
    steps.extend(other_steps);
    steps.extend(pip_steps);
    Plan::Run(steps)
}

/// Every missing thing, and the commands that install them.
fn blocked_message(
    missing: &[Missing],
    apt_packages: &[&str],
    privilege: Privilege,
    has_apt: bool,
) -> String {
    let mut text = String::from("missing what the tests need:");
    for m in missing {
        let _ = write!(text, "\n  - {}: {}", m.what, m.why);
    }
    text.push_str("\nto install them:");
    if !apt_packages.is_empty() {
        let sudo = if privilege == Privilege::Root {
            ""
        } else {
            "sudo "
        };
        let _ = write!(
            text,
            "\n  {sudo}apt-get update && {sudo}apt-get install -y --no-install-recommends {}",
            apt_packages.join(" ")
        );
        if !has_apt {
            text.push_str(
                "\n    (Debian/Ubuntu package names; there is no apt-get here: install the \
                 same with this system's package manager)",
            );
        }
    }
    for m in missing {
        match &m.fix {
            Fix::Cargo(args) => {
                let _ = write!(text, "\n  cargo install {}", args.join(" "));
            }
            Fix::Pip(python) => {
                let _ = write!(
                    text,
                    "\n  {python} -m pip install --user kafka-python   (add \
                     --break-system-packages if pip refuses)"
                );
            }
            Fix::Manual => {
                let _ = write!(text, "\n  {}: see above", m.what);
            }
            Fix::Apt(_) => {}
        }
    }
    text.push_str(
        "\n(`cargo xtask test` installs all of them itself when run as root or with sudo that \
         needs no password, unless --no-install or XTASK_NO_INSTALL=1 is given)",
    );
    text
}

/// Checks every prerequisite of `needs`; returns what was found and what is missing.
fn check_all(needs: &Needs) -> (Vec<String>, Vec<Missing>) {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for &prereq in &needs.prereqs {
        match check(prereq) {
            Ok(line) => found.push(line),
            Err(m) => missing.extend(m),
        }
    }
    (found, missing)
}

/// Makes sure everything `needs` lists is here: checks all of it up front and, in
/// [`Mode::Install`], installs what is missing and checks again.
pub(crate) fn ensure(needs: &Needs, mode: Mode) -> Result<()> {
    let start = Instant::now();
    let (found, missing) = check_all(needs);
    for line in &found {
        eprintln!("xtask: found {line}");
    }
    if missing.is_empty() {
        eprintln!(
            "xtask: everything needed is here (checked in {})",
            took(start.elapsed())
        );
        return Ok(());
    }
    let has_apt = which("apt-get").is_some();
    let privilege = privilege();
    let steps = match (plan(&missing, privilege, has_apt), mode) {
        (Plan::Blocked(message), _) => bail!("{message}"),
        (Plan::Run(_), Mode::CheckOnly) => {
            // Say how it would be installed, as if nothing could be.
            bail!(
                "{}",
                blocked_message(&missing, &apt_packages(&missing), privilege, has_apt)
            )
        }
        (Plan::Run(steps), Mode::DryRun) => {
            for m in &missing {
                eprintln!("xtask: missing {}: {}", m.what, m.why);
            }
            for step in &steps {
                eprintln!("xtask: would run: {}", step.argv.join(" "));
                if let Some(fallback) = &step.fallback {
                    eprintln!("xtask:   and if that fails: {}", fallback.join(" "));
                }
            }
            return Ok(());
        }
        (Plan::Run(steps), Mode::Install) => steps,
    };
    let logs = setup_dir();
    fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    for step in &steps {
        install(step, &logs)?;
    }
    let (_, still) = check_all(needs);
    if !still.is_empty() {
        let list: Vec<String> = still
            .iter()
            .map(|m| format!("\n  - {}: {}", m.what, m.why))
            .collect();
        bail!("still missing after installing:{}", list.concat());
    }
    eprintln!(
        "xtask: installed everything needed in {}",
        took(start.elapsed())
    );
    Ok(())
}

/// The Debian packages `missing` asks for, each once.
fn apt_packages(missing: &[Missing]) -> Vec<&'static str> {
    let mut packages = Vec::new();
    for m in missing {
        if let Fix::Apt(list) = &m.fix {
            for p in list {
                if !packages.contains(p) {
                    packages.push(*p);
                }
            }
        }
    }
    packages
}

/// Runs one install step with its output in a log file: `xtask: installing X (command; log)
/// ... done in 12s`.
fn install(step: &Step, logs: &Path) -> Result<()> {
    let slug: String = step
        .label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let slug = slug.trim_matches('-');
    let log = logs.join(format!("{slug}.log"));
    let verb = if step.label == "package lists" {
        "updating"
    } else {
        "installing"
    };
    eprint!(
        "xtask: {verb} {} (`{}`, output in {}) ... ",
        step.label,
        step.argv.join(" "),
        log.display()
    );
    let start = Instant::now();
    let mut result = run_logged(&step.argv, &log, false);
    if result.is_err() {
        if let Some(fallback) = &step.fallback {
            eprint!("failed, trying `{}` ... ", fallback.join(" "));
            result = run_logged(fallback, &log, true);
        }
    }
    match result {
        Ok(()) => {
            eprintln!("done in {}", took(start.elapsed()));
            Ok(())
        }
        Err(e) => {
            eprintln!("FAILED after {}", took(start.elapsed()));
            let text = fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "installing {} failed: {e:#}\nlast lines of {}:\n{}",
                step.label,
                log.display(),
                tail.join("\n")
            )
        }
    }
}

/// Runs `argv` with stdout and stderr in `log` (appended to when `append`).
fn run_logged(argv: &[String], log: &Path, append: bool) -> Result<()> {
    let file = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(log)
        .with_context(|| format!("cannot write {}", log.display()))?;
    let (program, rest) = argv.split_first().context("an empty command")?;
    let mut cmd = if program == "cargo" {
        cargo()
    } else {
        Command::new(program)
    };
    cmd.args(rest);
    let status = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .status()
        .with_context(|| format!("cannot run `{program}`"))?;
    if !status.success() {
        bail!("`{}` failed ({status})", argv.join(" "));
    }
    Ok(())
}

/// `12s`, `3m05s`.
pub(crate) fn took(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// `cargo xtask setup [--check | --dry-run] [-p <package>]...`.
pub(crate) fn run(args: &[String]) -> Result<()> {
    let (mut mode, args) = mode_from(args);
    let mut packages = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--check" => mode = Mode::CheckOnly,
            "--dry-run" => mode = Mode::DryRun,
            "-p" | "--package" => {
                let name = args.next().context("`-p` needs a package name")?;
                packages.push(name.to_owned());
            }
            other => bail!(
                "unknown argument `{other}`\nusage: cargo xtask setup [--check | --dry-run] \
                 [-p <package>]..."
            ),
        }
    }
    let needs = if packages.is_empty() {
        Needs::workspace().with(&Needs::chaos())
    } else {
        Needs::of_packages(&packages)
    };
    ensure(&needs, mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn missing_everything() -> Vec<Missing> {
        vec![
            Missing::new("PostgreSQL", "not found", Fix::Apt(vec!["postgresql"])),
            Missing::new("redis-server", "too old", Fix::Apt(vec!["redis-server"])),
            Missing::new("procps", "no pgrep", Fix::Apt(vec!["procps"])),
            Missing::new(
                "tansu",
                "not found",
                Fix::Cargo(vec!["tansu", "--version", "0.6.0"]),
            ),
            Missing::new("python3", "none", Fix::Apt(vec!["python3", "python3-pip"])),
            Missing::new("pip", "none", Fix::Apt(vec!["python3-pip"])),
            Missing::new("kafka-python", "none", Fix::Pip("python3".to_owned())),
        ]
    }

    fn argv(step: &Step) -> String {
        step.argv.join(" ")
    }

    #[test]
    fn root_installs_with_apt_get_cargo_and_pip() {
        let Plan::Run(steps) = plan(&missing_everything(), Privilege::Root, true) else {
            panic!("root can install");
        };
        let commands: Vec<String> = steps.iter().map(argv).collect();
        let apt = "env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends";
        assert_eq!(
            commands,
            [
                "apt-get update".to_owned(),
                format!("{apt} postgresql"),
                format!("{apt} redis-server"),
                format!("{apt} procps"),
                format!("{apt} python3 python3-pip"),
                "cargo install tansu --version 0.6.0".to_owned(),
                "python3 -m pip install --quiet kafka-python".to_owned(),
            ]
        );
        assert_eq!(
            steps[6].fallback.as_ref().unwrap().join(" "),
            "python3 -m pip install --quiet --break-system-packages kafka-python"
        );
        assert_eq!(steps[1].label, "PostgreSQL (postgresql)");
    }

    #[test]
    fn sudo_prefixes_apt_and_pip_installs_for_the_user() {
        let Plan::Run(steps) = plan(&missing_everything(), Privilege::Sudo, true) else {
            panic!("sudo can install");
        };
        assert_eq!(argv(&steps[0]), "sudo apt-get update");
        assert!(argv(&steps[1]).starts_with("sudo env DEBIAN_FRONTEND=noninteractive apt-get"));
        assert_eq!(argv(&steps[5]), "cargo install tansu --version 0.6.0");
        assert_eq!(
            argv(&steps[6]),
            "python3 -m pip install --quiet --user kafka-python"
        );
    }

    #[test]
    fn without_root_or_sudo_one_message_lists_everything_with_its_command() {
        let Plan::Blocked(message) = plan(&missing_everything(), Privilege::None, true) else {
            panic!("nothing can be installed with apt-get");
        };
        for line in [
            "  - PostgreSQL: not found",
            "  - redis-server: too old",
            "  - procps: no pgrep",
            "  - tansu: not found",
            "  - kafka-python: none",
            "sudo apt-get update && sudo apt-get install -y --no-install-recommends postgresql \
             redis-server procps python3 python3-pip\n",
            "  cargo install tansu --version 0.6.0\n",
            "python3 -m pip install --user kafka-python",
        ] {
            assert!(message.contains(line), "{line:?} missing from:\n{message}");
        }
    }

    #[test]
    fn without_apt_get_the_message_says_so() {
        let Plan::Blocked(message) = plan(&missing_everything(), Privilege::Root, false) else {
            panic!("no apt-get");
        };
        assert!(message.contains("there is no apt-get here"), "{message}");
    }

    #[test]
    fn cargo_and_pip_alone_need_no_root() {
        let missing = vec![
            Missing::new("cargo-nextest", "no", Fix::Cargo(vec!["cargo-nextest"])),
            Missing::new("kafka-python", "no", Fix::Pip("python3".to_owned())),
        ];
        let Plan::Run(steps) = plan(&missing, Privilege::None, false) else {
            panic!("no system packages needed");
        };
        assert_eq!(steps.len(), 2);
        assert_eq!(argv(&steps[0]), "cargo install cargo-nextest");
    }

    #[test]
    fn something_no_install_can_fix_blocks_the_rest() {
        let mut missing = missing_everything();
        missing.push(Missing::new(
            "PostgreSQL",
            "PG_BIN=/x holds no initdb",
            Fix::Manual,
        ));
        let Plan::Blocked(message) = plan(&missing, Privilege::Root, true) else {
            panic!("a wrong PG_BIN blocks");
        };
        assert!(message.contains("PG_BIN=/x holds no initdb"), "{message}");
    }

    fn names(specs: &[&str]) -> Vec<String> {
        specs.iter().map(|&s| s.to_owned()).collect()
    }

    #[test]
    fn each_package_needs_only_its_servers() {
        let none = Needs::of_packages(&names(&["es-derive", "es-core", "es-memory"]));
        assert!(none.servers.is_empty());
        assert_eq!(none.prereqs, BTreeSet::from([Prereq::Nextest]));

        let pg = Needs::of_packages(&names(&["es-postgres"]));
        assert_eq!(pg.servers, BTreeSet::from([Server::Postgres]));
        assert!(
            !pg.prereqs.contains(&CBuild),
            "es-postgres does not build librdkafka"
        );
        assert!(pg.prereqs.contains(&Prereq::Postgres));

        let redis = Needs::of_packages(&names(&["es-redis"]));
        assert_eq!(
            redis.servers,
            BTreeSet::from([Server::Redis, Server::RedisCluster])
        );
        assert!(redis.prereqs.contains(&Prereq::OpenSsl));

        let kafka = Needs::of_packages(&names(&["es-kafka"]));
        assert_eq!(
            kafka.servers,
            BTreeSet::from([Server::Postgres, Server::Redis, Server::Kafka])
        );
        assert!(kafka.prereqs.contains(&KafkaPython) && kafka.prereqs.contains(&Prereq::Tansu));
        for tls in [Prereq::OpenSslDev, Prereq::OpenSsl, Prereq::Socat] {
            assert!(
                kafka.prereqs.contains(&tls),
                "es-kafka's TLS tests need {tls:?}"
            );
        }

        let streaming = Needs::of_packages(&names(&["example-bank-streaming"]));
        assert_eq!(
            streaming.servers,
            BTreeSet::from([Server::Postgres, Server::Kafka])
        );

        assert_eq!(
            Needs::of_packages(&names(&["no-such-crate"])),
            Needs::workspace()
        );
        assert_eq!(
            Needs::of_packages(&names(&["es-*"])),
            Needs::of_packages(&names(&[
                "es-core",
                "es-derive",
                "es-memory",
                "es-chaos",
                "es-bench",
                "es-test-support",
                "es-postgres",
                "es-redis",
                "es-kafka",
                "es-cli",
                "es-testkit",
                "es-guide"
            ]))
        );
        assert!(
            Needs::of_packages(&names(&["es-cli"]))
                .prereqs
                .contains(&Prereq::Chromium),
            "the console's tests drive Chromium"
        );
        let all = Needs::workspace();
        assert_eq!(
            all.servers,
            BTreeSet::from([
                Server::Postgres,
                Server::Redis,
                Server::RedisCluster,
                Server::Kafka
            ])
        );
        assert!(all.prereqs.contains(&CBuild) && all.prereqs.contains(&Prereq::Nextest));
    }

    #[test]
    fn matches_cargo_package_patterns() {
        assert!(glob_match("es-*", "es-core"));
        assert!(glob_match("*", "xtask"));
        assert!(glob_match("es-?edis", "es-redis"));
        assert!(!glob_match("es-*", "example-bank"));
        assert!(!glob_match("es-core", "es-cores"));
    }

    #[test]
    fn no_install_is_taken_out_of_the_arguments() {
        let (mode, rest) = mode_from(&names(&["-p", "x", "--no-install", "--", "--no-install"]));
        assert_eq!(mode, Mode::CheckOnly);
        assert_eq!(rest, names(&["-p", "x", "--", "--no-install"]));
    }

    /// The workspace members' package names, read from the manifests.
    fn workspace_packages() -> Vec<String> {
        let root = crate::project_root();
        let manifest = fs::read_to_string(root.join("Cargo.toml")).unwrap();
        let members = manifest
            .split_once("members = [")
            .and_then(|(_, rest)| rest.split_once(']'))
            .unwrap()
            .0;
        let mut dirs = Vec::new();
        for member in members.split(',').map(|m| m.trim().trim_matches('"')) {
            if member.is_empty() {
                continue;
            }
            if let Some(parent) = member.strip_suffix("/*") {
                for entry in fs::read_dir(root.join(parent)).unwrap().flatten() {
                    if entry.path().join("Cargo.toml").is_file() {
                        dirs.push(entry.path());
                    }
                }
            } else {
                dirs.push(root.join(member));
            }
        }
        dirs.iter()
            .map(|dir| {
                let text = fs::read_to_string(dir.join("Cargo.toml")).unwrap();
                let line = text
                    .lines()
                    .find(|l| l.starts_with("name = "))
                    .unwrap_or_else(|| panic!("no name in {}", dir.display()));
                line.trim_start_matches("name = ")
                    .trim_matches('"')
                    .to_owned()
            })
            .collect()
    }

    #[test]
    fn every_workspace_package_is_listed() {
        let listed: BTreeSet<&str> = PACKAGES.iter().map(|(name, _, _)| *name).collect();
        let members = workspace_packages();
        assert!(members.len() >= 12, "{members:?}");
        for member in &members {
            assert!(
                listed.contains(member.as_str()),
                "{member} is missing from setup::PACKAGES: say what its tests need"
            );
        }
        assert_eq!(listed.len(), members.len(), "{listed:?} vs {members:?}");
    }
}
