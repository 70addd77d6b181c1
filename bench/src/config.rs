//! Command-line selection and scale: which groups run, and whether this is a quick smoke run.

use std::sync::atomic::{AtomicBool, Ordering};

static QUICK: AtomicBool = AtomicBool::new(false);

/// Every group, in the order they run.
pub(crate) const GROUPS: &[&str] = &["memory", "postgres", "redis", "kafka"];

/// Whether `--quick` was given: small sizes and few repetitions, to check that every benchmark
/// runs end to end. Its figures are not meant to be quoted.
pub(crate) fn quick() -> bool {
    QUICK.load(Ordering::Relaxed)
}

/// `full` normally, `quick` in a quick run.
pub(crate) fn pick<T>(full: T, quick: T) -> T {
    if self::quick() {
        quick
    } else {
        full
    }
}

/// The parsed command line.
#[derive(Debug)]
pub(crate) struct Args {
    /// Selected groups and workloads (`memory`, `memory:rehydrate`, ...); empty means all.
    selected: Vec<String>,
}

pub(crate) const USAGE: &str = "\
Usage: es-bench [--quick] [GROUP | GROUP:WORKLOAD]...

Groups: memory, postgres, redis, kafka (all when none is given).
Workloads narrow a group, e.g. `memory:rehydrate`, `memory:dispatch`, `memory:append`,
`memory:command`, `memory:catch-up`, `memory:group`, `postgres:append`, `postgres:command`,
`postgres:read`, `postgres:rehydrate`, `postgres:catch-up`, `postgres:group`,
`postgres:processes`, `redis:append`, `redis:command`, `redis:read`, `redis:catch-up`,
`redis:group`, `redis:cluster`, `memory:personal`, `postgres:personal`, `redis:personal`,
`memory:telemetry`, `postgres:telemetry`, `redis:telemetry`, `postgres:archive`.
`telemetry` is commands with metrics and tracing on against the same commands with them off.
`personal` is appending and loading events with a personal field sealed (crypto-shredding)
against the same field in clear. `command` is the commands through the repository (load +
decide + append).
`group` is a projection's consumer group of 1, 2 and 4 workers over a store with 4 partitions.
`archive` is archiving a 1M-event history (hot table size before and after, reads of archived
events). `processes` is appends from several OS processes at 1, 4 and 16 feed partitions. `cluster` is
appends on the 3-primary Redis Cluster against one primary (REDIS_CLUSTER_URLS).

  --quick   small sizes and few repetitions: a smoke check that every benchmark runs

Environment: DATABASE_URL, REDIS_URL, REDIS_CLUSTER_URLS, KAFKA_BROKERS (`cargo xtask bench` sets
them).
";

impl Args {
    /// Parses `args`; `Err` carries the message to print (usage or an error).
    pub(crate) fn parse(args: impl IntoIterator<Item = String>) -> Result<Self, String> {
        let mut selected = Vec::new();
        for arg in args {
            match arg.as_str() {
                "--quick" => QUICK.store(true, Ordering::Relaxed),
                "-h" | "--help" => return Err(USAGE.to_owned()),
                other if GROUPS.contains(&other.split(':').next().unwrap_or_default()) => {
                    selected.push(other.to_owned());
                }
                other => return Err(format!("unknown argument `{other}`\n\n{USAGE}")),
            }
        }
        Ok(Self { selected })
    }

    /// Whether any workload of `group` runs.
    pub(crate) fn group(&self, group: &str) -> bool {
        self.selected.is_empty()
            || self
                .selected
                .iter()
                .any(|s| s.split(':').next() == Some(group))
    }

    /// Whether `workload` of `group` runs.
    pub(crate) fn wants(&self, group: &str, workload: &str) -> bool {
        self.selected.is_empty()
            || self.selected.iter().any(|s| match s.split_once(':') {
                None => s == group,
                Some((g, w)) => g == group && w == workload,
            })
    }
}
