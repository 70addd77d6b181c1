//! `cargo xtask db up|down|env`: PostgreSQL, Redis, a Redis Cluster and the Kafka broker left running for running
//! tests by hand.
//!
//! `up` starts them detached under `target/es-services/dev` and prints `export` lines (also kept
//! in `target/es-services/dev/env`), so `eval "$(cargo xtask db up)"` sets up a shell for
//! `cargo nextest run -p es-postgres some_test`. `down` stops them and removes their data.

use std::fs;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use es_test_support::port_open;

use crate::services;
use crate::setup::{self, Mode, Needs, Server};

/// `db up` starts every service.
const ALL_SERVERS: [Server; 4] = [
    Server::Postgres,
    Server::Redis,
    Server::RedisCluster,
    Server::Kafka,
];

const USAGE: &str = "usage: cargo xtask db up [--no-install] | down | env";

pub(crate) fn run(args: &[String]) -> Result<()> {
    let (mode, args) = setup::mode_from(args);
    match args.as_slice() {
        [cmd] if cmd == "up" => up(mode),
        [cmd] if cmd == "down" => down(),
        [cmd] if cmd == "env" => env(),
        _ => bail!(USAGE),
    }
}

fn dev_dir() -> PathBuf {
    services::root().join("dev")
}

fn env_file() -> PathBuf {
    dev_dir().join("env")
}

fn up(mode: Mode) -> Result<()> {
    if let Ok(exports) = fs::read_to_string(env_file()) {
        if exports.lines().filter_map(port).all(port_open) {
            eprintln!("xtask: already running (`cargo xtask db down` stops them)");
            print!("{exports}");
            return Ok(());
        }
    }
    let dir = dev_dir();
    if dir.exists() {
        // What is left of an earlier `up` whose servers died: start afresh.
        services::remove_detached(&dir)?;
    }
    setup::ensure(&Needs::new(&[], &ALL_SERVERS), mode)?;
    let urls = services::start_detached(&dir)?;
    let lines: Vec<String> = urls
        .iter()
        .map(|(var, url)| format!("export {var}={url}\n"))
        .collect();
    let exports = lines.concat();
    fs::write(env_file(), &exports)
        .with_context(|| format!("cannot write {}", env_file().display()))?;
    eprintln!("xtask: wrote {}", env_file().display());
    print!("{exports}");
    Ok(())
}

fn down() -> Result<()> {
    let dir = dev_dir();
    if !dir.exists() {
        eprintln!("xtask: nothing to stop in {}", dir.display());
        return Ok(());
    }
    services::remove_detached(&dir)
}

fn env() -> Result<()> {
    let file = env_file();
    let exports = fs::read_to_string(&file).with_context(|| {
        format!(
            "cannot read {}: start the servers with `cargo xtask db up`",
            file.display()
        )
    })?;
    print!("{exports}");
    Ok(())
}

/// The port in an `export NAME=scheme://host:port/...` line.
fn port(line: &str) -> Option<u16> {
    let (_, after) = line.rsplit_once(':')?;
    let digits = after
        .find(|c: char| !c.is_ascii_digit())
        .map_or(after, |end| &after[..end]);
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::port;

    #[test]
    fn finds_the_port_in_an_export_line() {
        assert_eq!(
            port("export DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres"),
            Some(5432)
        );
        assert_eq!(port("export REDIS_URL=redis://127.0.0.1:6379"), Some(6379));
        assert_eq!(port("export KAFKA_BROKERS=127.0.0.1:9092"), Some(9092));
        assert_eq!(port(""), None);
    }
}
