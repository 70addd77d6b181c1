//! A Redis Cluster of `redis-server` processes on loopback, created and driven with `redis-cli`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::redis::{RedisServer, REDIS_INSTALL};
use crate::{free_port, on_path, Result, ServerError};

/// How to install `redis-cli` on Debian and Ubuntu, for error messages.
pub const REDIS_CLI_INSTALL: &str = "apt-get install -y redis-tools";

/// The settings of a [`RedisCluster`].
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Primaries (at least 3: `redis-cli --cluster create` refuses fewer).
    pub primaries: usize,
    /// Replicas per primary.
    pub replicas: usize,
    /// `cluster-node-timeout` in milliseconds: how long a node may not answer before the others
    /// think it failed and its replica is promoted.
    pub node_timeout_ms: u64,
    /// A password every node requires (`requirepass`) and uses to replicate (`masterauth`).
    pub password: Option<String>,
    /// More `redis-server` arguments for every node (for example `["--appendfsync",
    /// "always"]`).
    pub args: Vec<String>,
}

impl Default for ClusterConfig {
    /// Three primaries with one replica each, a node time-out of 1.5 s, no password.
    fn default() -> Self {
        Self {
            primaries: 3,
            replicas: 1,
            node_timeout_ms: 1500,
            password: None,
            args: Vec::new(),
        }
    }
}

/// One node of a cluster as `CLUSTER NODES` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    /// The node id (40 hex digits).
    pub id: String,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Whether it is a primary (`master`).
    pub primary: bool,
    /// For a replica, its primary's id.
    pub primary_id: Option<String>,
    /// The slot ranges it serves (inclusive), for a primary.
    pub slots: Vec<(u16, u16)>,
    /// Whether the node that answered thinks it failed (`fail` or `fail?`).
    pub failed: bool,
}

impl ClusterNode {
    /// Whether it serves `slot`.
    pub fn serves(&self, slot: u16) -> bool {
        self.slots
            .iter()
            .any(|&(low, high)| (low..=high).contains(&slot))
    }
}

/// A Redis Cluster on 127.0.0.1: `primaries × (1 + replicas)` `redis-server` processes with
/// `cluster-enabled yes` and `appendonly yes`, each with a data directory of its own under the
/// cluster's, made into a cluster by `redis-cli --cluster create`. Every process is killed when
/// this value is dropped.
#[derive(Debug)]
pub struct RedisCluster {
    dir: PathBuf,
    config: ClusterConfig,
    /// Every node started, by port.
    servers: BTreeMap<u16, RedisServer>,
}

impl RedisCluster {
    /// Starts a cluster with `config` under `dir` and waits until every node reports
    /// `cluster_state:ok` and every replica is in sync.
    pub fn start(dir: &Path, config: &ClusterConfig) -> Result<Self> {
        find_redis_cli()?;
        if config.primaries < 3 {
            return Err(ServerError(
                "a Redis Cluster needs at least 3 primaries".to_owned(),
            ));
        }
        std::fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let mut cluster = Self {
            dir: dir.clone(),
            config: config.clone(),
            servers: BTreeMap::new(),
        };
        let count = config.primaries * (1 + config.replicas);
        for i in 0..count {
            // The cluster bus gets a free port of its own: the default (the port + 10000) may
            // be taken, or above 65535.
            let bus = free_port()?.to_string();
            let timeout = config.node_timeout_ms.to_string();
            let mut args: Vec<String> = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                &timeout,
                "--cluster-port",
                &bus,
                // A replica may be promoted however long it was cut off from its primary.
                "--cluster-replica-validity-factor",
                "0",
                // Replicas stay with the primary they were given.
                "--cluster-allow-replica-migration",
                "no",
                "--appendonly",
                "yes",
            ]
            .iter()
            .map(|a| (*a).to_owned())
            .collect();
            if let Some(password) = &config.password {
                args.extend(
                    ["--requirepass", password, "--masterauth", password].map(str::to_owned),
                );
            }
            args.extend(config.args.iter().cloned());
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let server = RedisServer::start(&dir.join(format!("node-{i}")), &args)?;
            cluster.servers.insert(server.port(), server);
        }
        let mut create = vec!["--cluster".to_owned(), "create".to_owned()];
        create.extend(
            cluster
                .servers
                .keys()
                .map(|port| format!("127.0.0.1:{port}")),
        );
        create.extend([
            "--cluster-replicas".to_owned(),
            config.replicas.to_string(),
            "--cluster-yes".to_owned(),
        ]);
        let first = *cluster.servers.keys().next().unwrap_or(&0);
        let args: Vec<&str> = create.iter().map(String::as_str).collect();
        cluster.cli(first, &args)?;
        cluster.wait_ok(Duration::from_secs(60))?;
        Ok(cluster)
    }

    /// The directory holding the nodes' directories (`node-<i>`, each with its `redis.log`,
    /// `nodes.conf` and AOF).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The ports of the nodes started, running or not.
    pub fn ports(&self) -> Vec<u16> {
        self.servers.keys().copied().collect()
    }

    /// A URL per node (`redis://127.0.0.1:<port>`, with the password if there is one).
    pub fn urls(&self) -> Vec<String> {
        self.servers.keys().map(|&port| self.url(port)).collect()
    }

    /// The URL of the node on `port`, with the password if there is one.
    pub fn url(&self, port: u16) -> String {
        match &self.config.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{port}"),
            None => format!("redis://127.0.0.1:{port}"),
        }
    }

    /// The server on `port`.
    pub fn server(&self, port: u16) -> Option<&RedisServer> {
        self.servers.get(&port)
    }

    /// Runs `redis-cli` against the node on `port` with `args`; its output.
    pub fn cli(&self, port: u16, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()]);
        if let Some(password) = &self.config.password {
            cmd.args(["-a", password, "--no-auth-warning"]);
        }
        let out =
            cmd.args(args).stdin(Stdio::null()).output().map_err(|e| {
                ServerError(format!("cannot run redis-cli ({e}): {REDIS_CLI_INSTALL}"))
            })?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let err = String::from_utf8_lossy(&out.stderr);
        // redis-cli exits 0 on a server's error reply and prints it; `--cluster` commands fail
        // with a non-zero status.
        if !out.status.success() || text.starts_with("ERR") || text.starts_with("(error)") {
            return Err(ServerError(format!(
                "redis-cli -p {port} {} failed ({}): {text}{err}",
                args.join(" "),
                out.status
            )));
        }
        Ok(text)
    }

    /// The ports of the nodes running now.
    fn live(&self) -> Vec<u16> {
        self.servers
            .iter()
            .filter(|(_, server)| server.pid().is_some())
            .map(|(&port, _)| port)
            .collect()
    }

    /// The cluster as a running node sees it (`CLUSTER NODES`).
    pub fn nodes(&self) -> Result<Vec<ClusterNode>> {
        let mut last = None;
        for port in self.live() {
            match self.cli(port, &["CLUSTER", "NODES"]) {
                Ok(text) => return parse_nodes(&text),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| ServerError("no node of the cluster runs".to_owned())))
    }

    /// The primaries, as a running node sees them.
    pub fn primaries(&self) -> Result<Vec<ClusterNode>> {
        Ok(self
            .nodes()?
            .into_iter()
            .filter(|n| n.primary && !n.failed)
            .collect())
    }

    /// The primary serving `slot`, as a running node sees it.
    pub fn primary_for_slot(&self, slot: u16) -> Result<ClusterNode> {
        self.nodes()?
            .into_iter()
            .find(|n| n.primary && !n.failed && n.serves(slot))
            .ok_or_else(|| ServerError(format!("no primary serves slot {slot}")))
    }

    /// The replicas of the primary with id `primary_id`.
    pub fn replicas_of(&self, primary_id: &str) -> Result<Vec<ClusterNode>> {
        Ok(self
            .nodes()?
            .into_iter()
            .filter(|n| n.primary_id.as_deref() == Some(primary_id))
            .collect())
    }

    /// Waits until every running node reports `cluster_state:ok`, sees every running node as
    /// not failed and agrees on which primary serves each slot, and every running replica's
    /// link to its primary is up and not syncing.
    pub fn wait_ok(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let last = match self.check_ok() {
                Ok(()) => return Ok(()),
                Err(e) => e.0,
            };
            if start.elapsed() > timeout {
                return Err(ServerError(format!(
                    "the cluster is not ok after {timeout:?}: {last}\n{}",
                    self.logs_tail()
                )));
            }
            sleep(Duration::from_millis(100));
        }
    }

    fn check_ok(&self) -> Result<()> {
        let live = self.live();
        let mut views = Vec::new();
        for &port in &live {
            let info = self.cli(port, &["CLUSTER", "INFO"])?;
            if !info.contains("cluster_state:ok") {
                return Err(ServerError(format!("node {port}: not cluster_state:ok")));
            }
            let nodes = parse_nodes(&self.cli(port, &["CLUSTER", "NODES"])?)?;
            for &other in &live {
                if !nodes.iter().any(|n| n.port == other && !n.failed) {
                    return Err(ServerError(format!(
                        "node {port} does not see node {other} as running"
                    )));
                }
            }
            let mut map: Vec<(u16, Vec<(u16, u16)>)> = nodes
                .iter()
                .filter(|n| n.primary && !n.slots.is_empty())
                .map(|n| (n.port, n.slots.clone()))
                .collect();
            map.sort();
            views.push(map);
            let replication = self.cli(port, &["INFO", "replication"])?;
            if replication.contains("role:slave")
                && (!replication.contains("master_link_status:up")
                    || replication.contains("master_sync_in_progress:1"))
            {
                return Err(ServerError(format!("replica {port} is not in sync")));
            }
        }
        if views.windows(2).any(|w| w[0] != w[1]) {
            return Err(ServerError(
                "the nodes do not agree on the slot map yet".to_owned(),
            ));
        }
        Ok(())
    }

    /// Kills the node on `port` with SIGKILL.
    pub fn kill9(&mut self, port: u16) -> Result<()> {
        self.servers
            .get_mut(&port)
            .ok_or_else(|| ServerError(format!("no node on port {port}")))?
            .kill9()
    }

    /// Starts the node on `port` again, with its data directory, `nodes.conf` and AOF.
    pub fn restart(&mut self, port: u16) -> Result<()> {
        self.servers
            .get_mut(&port)
            .ok_or_else(|| ServerError(format!("no node on port {port}")))?
            .restart()
    }

    /// Waits until a primary other than `old_primary_id` serves `slot` and the cluster is
    /// ok again (see [`RedisCluster::wait_ok`]); returns the new primary.
    pub fn wait_for_failover(
        &self,
        old_primary_id: &str,
        slot: u16,
        timeout: Duration,
    ) -> Result<ClusterNode> {
        let start = Instant::now();
        loop {
            if let Ok(node) = self.primary_for_slot(slot) {
                if node.id != old_primary_id {
                    let left = timeout.saturating_sub(start.elapsed());
                    self.wait_ok(left.max(Duration::from_secs(1)))?;
                    return self.primary_for_slot(slot);
                }
            }
            if start.elapsed() > timeout {
                return Err(ServerError(format!(
                    "no replica took over slot {slot} from {old_primary_id} within {timeout:?}\n{}",
                    self.logs_tail()
                )));
            }
            sleep(Duration::from_millis(100));
        }
    }

    /// Moves `slots` slots from the primary `from_id` to the primary `to_id` with
    /// `redis-cli --cluster reshard`, keys and all, and waits until the cluster is ok.
    pub fn reshard(&self, from_id: &str, to_id: &str, slots: usize) -> Result<()> {
        let port = *self.live().first().unwrap_or(&0);
        let host = format!("127.0.0.1:{port}");
        let slots = slots.to_string();
        let args = [
            "--cluster",
            "reshard",
            &host,
            "--cluster-from",
            from_id,
            "--cluster-to",
            to_id,
            "--cluster-slots",
            &slots,
            "--cluster-yes",
        ];
        // With a password, `redis-cli -a` passes it to the MIGRATE commands too.
        self.cli(port, &args)?;
        self.wait_ok(Duration::from_secs(60))
    }

    /// Moves one slot to the primary on `to_port` the way `redis-cli --cluster reshard` does,
    /// one step at a time: `CLUSTER SETSLOT <slot> IMPORTING` on the target, `MIGRATING` on the
    /// source, then `MIGRATE` of `batch` keys at a time with `pause` after each batch (so that
    /// clients meet the slot half-moved: `ASK` redirects and `TRYAGAIN`), then `CLUSTER
    /// SETSLOT <slot> NODE` on the target, the source and every other primary. Returns the
    /// number of keys moved.
    pub fn migrate_slot(
        &self,
        slot: u16,
        to_port: u16,
        batch: usize,
        pause: Duration,
    ) -> Result<usize> {
        let nodes = self.nodes()?;
        let source = nodes
            .iter()
            .find(|n| n.primary && !n.failed && n.serves(slot))
            .ok_or_else(|| ServerError(format!("no primary serves slot {slot}")))?
            .clone();
        let target = nodes
            .iter()
            .find(|n| n.port == to_port && n.primary)
            .ok_or_else(|| ServerError(format!("no primary on port {to_port}")))?
            .clone();
        if source.id == target.id {
            return Err(ServerError(format!(
                "slot {slot} is on the primary on port {to_port} already"
            )));
        }
        let slot_text = slot.to_string();
        self.cli(
            target.port,
            &["CLUSTER", "SETSLOT", &slot_text, "IMPORTING", &source.id],
        )?;
        self.cli(
            source.port,
            &["CLUSTER", "SETSLOT", &slot_text, "MIGRATING", &target.id],
        )?;
        let mut moved = 0;
        let batch_text = batch.max(1).to_string();
        loop {
            let keys = self.cli(
                source.port,
                &["CLUSTER", "GETKEYSINSLOT", &slot_text, &batch_text],
            )?;
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let to = target.port.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &to, "", "0", "10000"];
            if let Some(password) = &self.config.password {
                args.extend(["AUTH", password]);
            }
            args.push("KEYS");
            args.extend(keys.iter().copied());
            let reply = self.cli(source.port, &args)?;
            if !reply.trim().eq_ignore_ascii_case("OK") {
                return Err(ServerError(format!("MIGRATE replied {reply}")));
            }
            moved += keys.len();
            sleep(pause);
        }
        self.cli(
            target.port,
            &["CLUSTER", "SETSLOT", &slot_text, "NODE", &target.id],
        )?;
        self.cli(
            source.port,
            &["CLUSTER", "SETSLOT", &slot_text, "NODE", &target.id],
        )?;
        for other in nodes
            .iter()
            .filter(|n| n.primary && !n.failed && n.id != source.id && n.id != target.id)
        {
            // Best effort, as redis-cli does: the others learn it by gossip anyway.
            let _ = self.cli(
                other.port,
                &["CLUSTER", "SETSLOT", &slot_text, "NODE", &target.id],
            );
        }
        self.wait_ok(Duration::from_secs(60))?;
        Ok(moved)
    }

    /// Each node's data directory and process id (`None` once killed).
    pub fn processes(&self) -> Vec<(PathBuf, Option<u32>)> {
        self.servers
            .values()
            .map(|server| (server.dir().to_owned(), server.pid()))
            .collect()
    }

    /// Leaves every node running when this value is dropped; returns their ports.
    pub fn detach(mut self) -> Vec<u16> {
        let servers = std::mem::take(&mut self.servers);
        servers
            .into_values()
            .map(|server| server.detach().0)
            .collect()
    }

    /// The last lines of every node's log, for error messages.
    pub fn logs_tail(&self) -> String {
        let mut out = String::new();
        for (port, server) in &self.servers {
            let log = std::fs::read_to_string(server.dir().join("redis.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let _ = writeln!(out, "--- node {port} ---");
            for line in &lines[lines.len().saturating_sub(8)..] {
                let _ = writeln!(out, "{line}");
            }
        }
        out
    }
}

/// Finds `redis-cli` on `PATH`.
pub fn find_redis_cli() -> Result<PathBuf> {
    on_path("redis-cli").ok_or_else(|| {
        ServerError(format!(
            "redis-cli is not on PATH: the cluster tests create and drive their cluster with it; \
             install it (`{REDIS_CLI_INSTALL}`, or `{REDIS_INSTALL}` which brings it, or let \
             `cargo xtask test` install it)"
        ))
    })
}

/// Parses `CLUSTER NODES`: `<id> <ip:port@bus> <flags> <primary> <ping> <pong> <epoch> <link>
/// <slot> ...` per line. Slots being moved (`[<slot>->-<id>]`) are left out.
fn parse_nodes(text: &str) -> Result<Vec<ClusterNode>> {
    let bad = |line: &str| ServerError(format!("cannot read CLUSTER NODES line {line:?}"));
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                return Err(bad(line));
            }
            let port = fields[1]
                .split('@')
                .next()
                .and_then(|addr| addr.rsplit(':').next())
                .and_then(|port| port.parse().ok())
                .ok_or_else(|| bad(line))?;
            let flags: Vec<&str> = fields[2].split(',').collect();
            let primary = flags.contains(&"master");
            let failed = flags.iter().any(|f| *f == "fail" || *f == "fail?");
            let slots = fields[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .map(|s| {
                    let (low, high) = s.split_once('-').unwrap_or((s, s));
                    Ok((
                        low.parse().map_err(|_| bad(line))?,
                        high.parse().map_err(|_| bad(line))?,
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(ClusterNode {
                id: fields[0].to_owned(),
                port,
                primary,
                primary_id: (fields[3] != "-").then(|| fields[3].to_owned()),
                slots,
                failed,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::parse_nodes;

    #[test]
    fn reads_cluster_nodes() {
        let text = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004,host slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460 [5461->-67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1]
6ec23923021cf3ffec47632106199cb7f496ce01 127.0.0.1:30005@31005 master,fail - 1426238316232 1426238316232 5 disconnected 10923 10925-16383
";
        let nodes = parse_nodes(text).unwrap();
        assert_eq!(nodes.len(), 4);
        assert!(!nodes[0].primary);
        assert_eq!(nodes[0].port, 30004);
        assert_eq!(
            nodes[0].primary_id.as_deref(),
            Some("e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca")
        );
        assert_eq!(nodes[1].slots, [(5461, 10922)]);
        assert_eq!(nodes[2].slots, [(0, 5460)]);
        assert!(nodes[2].serves(5460) && !nodes[2].serves(5461));
        assert!(nodes[3].failed);
        assert_eq!(nodes[3].slots, [(10923, 10923), (10925, 16383)]);
    }
}
