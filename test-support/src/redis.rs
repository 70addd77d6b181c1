//! Redis: finding `redis-server`, and servers of their own.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::child::ChildServer;
use crate::{free_port, on_path, run, wait_for_port, Result, ServerError};

/// The oldest Redis major version the store supports (it loads Redis functions).
pub const MIN_REDIS_MAJOR: u32 = 7;

/// How to install Redis on Debian and Ubuntu, for error messages.
pub const REDIS_INSTALL: &str = "apt-get install -y redis-server";

/// Finds `redis-server` on `PATH` and checks it is at least [`MIN_REDIS_MAJOR`]; returns its
/// path and version (`7.0.15`).
pub fn find_redis() -> Result<(PathBuf, String)> {
    let Some(program) = on_path("redis-server") else {
        return Err(ServerError(format!(
            "redis-server is not on PATH: install Redis {MIN_REDIS_MAJOR} or later \
             (`{REDIS_INSTALL}`, or let `cargo xtask test` install it)"
        )));
    };
    let out = run(
        Command::new(&program).arg("--version").stdin(Stdio::null()),
        "redis-server --version",
    )?;
    let (version, major) = parse_redis_version(&out).ok_or_else(|| {
        ServerError(format!(
            "cannot read the version `{} --version` printed: {out}",
            program.display()
        ))
    })?;
    if major < MIN_REDIS_MAJOR {
        return Err(ServerError(format!(
            "redis-server {version} ({}) is too old: the store needs Redis {MIN_REDIS_MAJOR} or \
             later for its functions; install a newer one (`{REDIS_INSTALL}` on Debian 12 or \
             Ubuntu 24.04)",
            program.display()
        )));
    }
    Ok((program, version))
}

/// `Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64 build=...` ->
/// (`7.0.15`, 7).
fn parse_redis_version(text: &str) -> Option<(String, u32)> {
    let version = text
        .split_whitespace()
        .find_map(|word| word.strip_prefix("v="))?;
    let major = version.split('.').next()?.parse().ok()?;
    Some((version.to_owned(), major))
}

/// A redis-server child process of its own.
#[derive(Debug)]
pub struct RedisServer {
    dir: PathBuf,
    port: u16,
    args: Vec<String>,
    tls: bool,
    server: ChildServer,
}

impl RedisServer {
    /// Starts `redis-server` on a free port with its data in `dir` and extra `args`
    /// (for example `["--appendonly", "yes", "--appendfsync", "always"]`).
    pub fn start(dir: &Path, args: &[&str]) -> Result<Self> {
        fs::create_dir_all(dir)?;
        let port = free_port()?;
        let mut server = Self {
            dir: dir.canonicalize()?,
            port,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            tls: false,
            server: ChildServer::new("redis-server", port),
        };
        server.spawn()?;
        Ok(server)
    }

    /// Starts `redis-server` that accepts only TLS, on a free port (no plaintext port), with
    /// the server certificate of `certs` and their CA for client certificates, which it asks
    /// for but does not require (`tls-auth-clients optional`). Made a replica (`--replicaof`
    /// in `args`, or by Sentinel), it replicates over TLS (`tls-replication yes`), presenting
    /// the client certificate of `certs`.
    pub fn start_tls(dir: &Path, certs: &crate::TestCerts, args: &[&str]) -> Result<Self> {
        let mut all: Vec<String> = tls_settings(certs)
            .into_iter()
            .flat_map(|(name, value)| [format!("--{name}"), value])
            .collect();
        all.extend(args.iter().map(|a| (*a).to_owned()));
        fs::create_dir_all(dir)?;
        let port = free_port()?;
        let mut server = Self {
            dir: dir.canonicalize()?,
            port,
            args: all,
            tls: true,
            server: ChildServer::new("redis-server (TLS)", port),
        };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = self.dir.join("redis.log");
        let port = self.port.to_string();
        let ports: &[&str] = if self.tls {
            &["--port", "0", "--tls-port", &port]
        } else {
            &["--port", &port]
        };
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1"])
            .args(ports)
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
                    "cannot start redis-server ({e}): install it with `{REDIS_INSTALL}` \
                     (or let `cargo xtask test` install it)"
                ))
            })?;
        self.server.child = Some(child);
        wait_for_port(self.port, true, Duration::from_secs(30), "redis-server").map_err(|e| {
            let log = fs::read_to_string(&log).unwrap_or_default();
            ServerError(format!("{e}\nredis log:\n{log}"))
        })
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection URL: `redis://127.0.0.1:<port>`, or `rediss://127.0.0.1:<port>` for a TLS
    /// server.
    pub fn url(&self) -> String {
        if self.tls {
            format!("rediss://127.0.0.1:{}", self.port)
        } else {
            format!("redis://127.0.0.1:{}", self.port)
        }
    }

    /// The directory holding the server's data and its log (`redis.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
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

/// The TLS settings of a server or sentinel with the certificates of `certs`: its certificate
/// and key, the CA it checks clients and servers against, clients asked for a certificate but
/// not required to give one, and TLS (with the client certificate) to the servers it replicates
/// from or, for a sentinel, monitors and to the other sentinels.
fn tls_settings(certs: &crate::TestCerts) -> Vec<(&'static str, String)> {
    let path = |p: &Path| p.display().to_string();
    vec![
        ("tls-cert-file", path(&certs.server_cert)),
        ("tls-key-file", path(&certs.server_key)),
        ("tls-ca-cert-file", path(&certs.ca_cert)),
        ("tls-auth-clients", "optional".to_owned()),
        ("tls-replication", "yes".to_owned()),
        // The server certificate is for servers only (`serverAuth`); a server that asks for a
        // client certificate checks it is for clients.
        ("tls-client-cert-file", path(&certs.client_cert)),
        ("tls-client-key-file", path(&certs.client_key)),
    ]
}

/// A Redis Sentinel child process of its own (`redis-server <config> --sentinel`, the program
/// Debian's `redis-sentinel` package links to), monitoring one primary.
#[derive(Debug)]
pub struct RedisSentinel {
    dir: PathBuf,
    port: u16,
    tls: bool,
    server: ChildServer,
}

/// What a sentinel monitors, and how it is reached; see [`RedisSentinel::start_with`].
#[derive(Debug, Clone, Copy)]
pub struct SentinelConfig<'a> {
    /// The name it monitors the primary by (`sentinel monitor <service> ...`).
    pub service: &'a str,
    /// The primary's port on 127.0.0.1.
    pub primary_port: u16,
    /// How many sentinels must agree that the primary is down.
    pub quorum: u32,
    /// How long the primary may not answer before it is thought down, in milliseconds.
    pub down_after_ms: u64,
    /// With certificates, the sentinel accepts only TLS (`port 0`, `tls-port`) and talks TLS to
    /// the servers it monitors and to the other sentinels, as [`RedisServer::start_tls`]
    /// servers do.
    pub tls: Option<&'a crate::TestCerts>,
    /// A password the monitored servers require (`sentinel auth-pass`), which the sentinel then
    /// requires of its clients too (`requirepass`), the other sentinels included
    /// (`sentinel sentinel-pass`).
    pub password: Option<&'a str>,
}

impl RedisSentinel {
    /// Starts a sentinel on a free port, with its config file, state and log (`sentinel.log`) in
    /// `dir`, monitoring the primary on 127.0.0.1:`primary_port` as `service`, with `quorum`
    /// sentinels to agree that it is down after `down_after_ms` milliseconds without an answer.
    /// In plaintext, without passwords; see [`start_with`](Self::start_with) for more.
    pub fn start(
        dir: &Path,
        service: &str,
        primary_port: u16,
        quorum: u32,
        down_after_ms: u64,
    ) -> Result<Self> {
        Self::start_with(
            dir,
            &SentinelConfig {
                service,
                primary_port,
                quorum,
                down_after_ms,
                tls: None,
                password: None,
            },
        )
    }

    /// Starts a sentinel on a free port, with its config file, state and log (`sentinel.log`) in
    /// `dir`, as `config` says.
    pub fn start_with(dir: &Path, config: &SentinelConfig<'_>) -> Result<Self> {
        let SentinelConfig {
            service,
            primary_port,
            quorum,
            down_after_ms,
            tls,
            password,
        } = *config;
        fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let port = free_port()?;
        let ports = match tls {
            None => format!("port {port}\n"),
            Some(_) => format!("port 0\ntls-port {port}\n"),
        };
        let tls_lines = tls
            .map(tls_settings)
            .unwrap_or_default()
            .into_iter()
            .map(|(name, value)| format!("{name} {value}\n"))
            .collect::<Vec<_>>()
            .concat();
        let auth = password
            .map(|password| {
                format!(
                    "requirepass {password}\nsentinel auth-pass {service} {password}\n\
                     sentinel sentinel-pass {password}\n"
                )
            })
            .unwrap_or_default();
        let config = format!(
            "{ports}{tls_lines}bind 127.0.0.1\ndaemonize no\ndir {dir}\nlogfile {log}\n\
             sentinel monitor {service} 127.0.0.1 {primary_port} {quorum}\n\
             sentinel down-after-milliseconds {service} {down_after_ms}\n\
             sentinel failover-timeout {service} 10000\n\
             sentinel parallel-syncs {service} 1\n{auth}",
            dir = dir.display(),
            log = dir.join("sentinel.log").display(),
        );
        let file = dir.join("sentinel.conf");
        fs::write(&file, config)?;
        let child = Command::new("redis-server")
            .arg(&file)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                ServerError(format!(
                    "cannot start redis-server --sentinel ({e}): install Redis with \
                     `{REDIS_INSTALL}` (or let `cargo xtask test` install it)"
                ))
            })?;
        let mut server = ChildServer::new("redis-sentinel", port);
        server.child = Some(child);
        wait_for_port(port, true, Duration::from_secs(30), "redis-sentinel").map_err(|e| {
            let log = fs::read_to_string(dir.join("sentinel.log")).unwrap_or_default();
            ServerError(format!("{e}\nsentinel log:\n{log}"))
        })?;
        Ok(Self {
            dir,
            port,
            tls: tls.is_some(),
            server,
        })
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its URL (`redis://127.0.0.1:<port>`, or `rediss://127.0.0.1:<port>` with TLS), without
    /// a password.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The directory holding its config, state and log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Kills it with SIGKILL.
    pub fn kill9(&mut self) -> Result<()> {
        self.server.kill9()
    }
}

#[cfg(test)]
mod tests {
    use super::parse_redis_version;

    #[test]
    fn reads_redis_server_versions() {
        assert_eq!(
            parse_redis_version(
                "Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64 build=1"
            ),
            Some(("7.0.15".to_owned(), 7))
        );
        assert_eq!(
            parse_redis_version("Redis server v=6.0.16 sha=0"),
            Some(("6.0.16".to_owned(), 6))
        );
        assert_eq!(parse_redis_version("redis-server: not found"), None);
    }
}
