//! Throwaway PostgreSQL and Redis servers, Redis Clusters and Kafka brokers on 127.0.0.1, for `cargo xtask` and
//! for tests that must control a server themselves (kill -9 and restart).
//!
//! Servers listen on a free loopback port, keep their data under a directory the caller chooses
//! (normally inside `target/`), and are stopped when dropped unless [`PgServer::detach`] /
//! [`RedisServer::detach`] / [`KafkaBroker::detach`] was called.
//!
//! The programs are found where they are usually installed ([`find_postgres`], [`find_redis`],
//! [`find_tansu`]); each says what is missing and how to install it. PostgreSQL refuses to run
//! as root: see [`PgServer`] for how it is run then, from any checkout location.
//!
//! Tests find the shared servers through `DATABASE_URL`, `REDIS_URL`, `REDIS_CLUSTER_URLS` and
//! `KAFKA_BROKERS` ([`database_url`], [`redis_url`], [`redis_cluster_urls`], [`kafka_brokers`]); when those are missing they fail with a
//! message saying how to start them.

mod child;
mod cluster;
mod kafka;
mod pg;
mod redis;
mod tls;

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

pub use cluster::{find_redis_cli, ClusterConfig, ClusterNode, RedisCluster, REDIS_CLI_INSTALL};
pub use kafka::{
    find_tansu, kafka_brokers, tansu_bin, KafkaBroker, KafkaSecurity, KafkaStorage, Scram,
    ScramUser, SOCAT_INSTALL, TANSU_INSTALL,
};
pub use pg::{
    find_postgres, remove_orphaned_clusters, PgInstall, PgServer, MIN_PG_MAJOR, PG_INSTALL,
};
pub use redis::{
    find_redis, RedisSentinel, RedisServer, SentinelConfig, MIN_REDIS_MAJOR, REDIS_INSTALL,
};
pub use tls::{TestCerts, OPENSSL_INSTALL};

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

/// Whether the current user is root.
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Whether process `pid` exists and is not a zombie.
pub fn process_alive(pid: &str) -> bool {
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

/// The directory of `name` on `PATH`, if it is there as an executable file.
fn on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|file| {
            std::fs::metadata(file)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
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

/// The shared Redis Cluster's node URLs from `REDIS_CLUSTER_URLS` (comma-separated), or a panic
/// that says how to get one.
pub fn redis_cluster_urls() -> Vec<String> {
    let urls = std::env::var("REDIS_CLUSTER_URLS").unwrap_or_else(|_| {
        panic!(
            "REDIS_CLUSTER_URLS is not set: this test needs a Redis Cluster. Run the suite with \
             `cargo xtask test -p es-redis` (it starts a throwaway 3-primary cluster), or start \
             one with `cargo xtask db up` and export the REDIS_CLUSTER_URLS it prints."
        )
    });
    urls.split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(str::to_owned)
        .collect()
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
