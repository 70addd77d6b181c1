//! `cargo xtask chaos [--store postgres|redis|all] [--minutes N | --seconds N] [--writers K]
//! [--seed S] [--partitions P]`: the fault-injecting checker.
//!
//! Builds `es-chaos` once in release (`cargo build --release -p es-chaos`) and runs its
//! orchestrator (`es-chaos run`), which starts PostgreSQL and Redis servers of its own under
//! `target/es-services/chaos-<pid>/<store>`, spawns the writer, subscriber, projection and relay
//! processes (the same binary), injects faults on a schedule drawn from the seed, and checks the
//! history; see `chaos/src/main.rs`. Other arguments go to `es-chaos run` as they are (for example
//! `--tasks`, `--append-timeout-ms`, `--pace-ms`, `--keep`). Without `--seed` a random seed is
//! drawn and printed; without a duration each store runs 60 s of faults. With `--partitions P`
//! the stores have P feed partitions, the projection runs as a consumer group of two processes
//! (and the Redis relays as a relay group over the per-partition outboxes), and the history is
//! checked per partition. A run that finds a violation keeps its logs and prints where, with the
//! command that reproduces its schedule.
//!
//! `cargo xtask test` runs [`short_runs`]. Directories of earlier runs whose xtask is gone are
//! removed first, stopping any server still running in them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{self, Command};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};
use es_test_support::{process_alive, PgServer};

use crate::setup::{self, Needs};
use crate::{cargo, services, target_dir};

/// The seed every `cargo xtask test` runs, so that CI always covers one known schedule.
pub(crate) const FIXED_SEED: u64 = 20_240_808;

/// Seconds of faults per store and seed in the short run of `cargo xtask test`.
const SHORT_SECONDS: u64 = 35;

/// The feed partitions of the short partitioned run of `cargo xtask test`.
const SHORT_PARTITIONS: u32 = 4;

pub(crate) fn run(args: &[String]) -> Result<()> {
    let (mode, args) = setup::mode_from(args);
    setup::ensure(&Needs::chaos(), mode)?;
    build()?;
    run_chaos(&args)
}

/// The short run `cargo xtask test` includes: each store for [`SHORT_SECONDS`] s on
/// [`FIXED_SEED`], then as long on a random seed (printed, to reproduce a failure), then as long
/// on [`FIXED_SEED`] with [`SHORT_PARTITIONS`] feed partitions (consumer groups under faults).
pub(crate) fn short_runs() -> Result<()> {
    build()?;
    let random = random_seed();
    eprintln!(
        "xtask: chaos: {SHORT_SECONDS}s per store on seed {FIXED_SEED}, then on random seed \
         {random} (reproduce with `cargo xtask chaos --seconds {SHORT_SECONDS} --seed {random}`), \
         then on seed {FIXED_SEED} with {SHORT_PARTITIONS} feed partitions"
    );
    let mut failed = Vec::new();
    for (seed, partitions) in [(FIXED_SEED, 1), (random, 1), (FIXED_SEED, SHORT_PARTITIONS)] {
        let mut args = vec![
            "--seconds".to_owned(),
            SHORT_SECONDS.to_string(),
            "--seed".to_owned(),
            seed.to_string(),
        ];
        if partitions > 1 {
            args.extend(["--partitions".to_owned(), partitions.to_string()]);
        }
        if let Err(e) = run_chaos(&args) {
            let partitioned = if partitions > 1 {
                format!(", {partitions} partitions")
            } else {
                String::new()
            };
            failed.push(format!("seed {seed}{partitioned}: {e:#}"));
        }
    }
    if !failed.is_empty() {
        bail!("the chaos check failed: {}", failed.join("; "));
    }
    Ok(())
}

fn build() -> Result<()> {
    crate::run(cargo().args(["build", "--release", "-p", "es-chaos"]))
}

/// Runs the built orchestrator in a fresh `target/es-services/chaos-<pid>`; removes the
/// directory afterwards unless the run failed.
fn run_chaos(args: &[String]) -> Result<()> {
    let root = services::root();
    remove_stale(&root);
    let dir = root.join(format!("chaos-{}", process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let binary = target_dir().join("release").join("es-chaos");
    let result = crate::run(
        Command::new(&binary)
            .arg("run")
            .arg("--dir")
            .arg(&dir)
            .args(args),
    );
    if result.is_ok() && !args.iter().any(|a| a == "--keep") {
        let _ = fs::remove_dir_all(&dir);
    } else {
        eprintln!("xtask: chaos logs kept in {}", dir.display());
    }
    result
}

fn random_seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (u64::from(nanos) ^ u64::from(process::id()).rotate_left(20)) % 1_000_000_000
}

/// Removes `chaos-<pid>` directories whose xtask is gone, stopping the servers left in them
/// (PostgreSQL through its data directory, Redis through the pid es-chaos recorded).
fn remove_stale(root: &Path) {
    es_test_support::remove_orphaned_clusters();
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("chaos-") else {
            continue;
        };
        if pid.parse::<u32>().is_err() || process_alive(pid) {
            continue;
        }
        for store in server_dirs(&entry.path()) {
            if store.join("data").exists() {
                // Also removes the cluster when it was kept outside the directory.
                let _ = PgServer::remove_dir(&store);
            }
            if let Ok(pid) = fs::read_to_string(store.join("redis-server.pid")) {
                let pid = pid.trim();
                let is_redis = fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains("redis-server"));
                if is_redis {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
        }
        let _ = fs::remove_dir_all(entry.path());
    }
}

/// The server directories of a run: `<run>/<store>/server`.
fn server_dirs(run: &Path) -> Vec<PathBuf> {
    fs::read_dir(run)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path().join("server"))
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default()
}
