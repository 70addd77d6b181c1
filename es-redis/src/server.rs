//! The server's settings the store depends on (eviction policy, persistence, identity), read
//! when the store is built and re-read by a background task while it runs.
//!
//! See the crate docs, section "Server settings".

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::RedisError;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::conn::Side;
use crate::Error;

/// The server settings a store runs under, as last read from the server (when the store was
/// built, then every [`server_check_interval`](crate::RedisStoreBuilder::server_check_interval)
/// and after every reconnection of the store's background task). See
/// [`RedisStore::server_settings`](crate::RedisStore::server_settings).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerSettings {
    /// The server's version (`redis_version`).
    pub version: String,
    /// The server process's random identity (`run_id`), new in every process: a restart or a
    /// failover changes it.
    pub run_id: String,
    /// Whether the append-only file is on (`aof_enabled` in `INFO persistence`).
    pub appendonly: bool,
    /// `appendfsync` (`always`, `everysec` or `no`); `None` when `CONFIG GET` is refused.
    pub appendfsync: Option<String>,
    /// The RDB snapshot schedule (`save`, for example `3600 1 300 100`; empty when RDB snapshots
    /// are off); `None` when `CONFIG GET` is refused.
    pub save: Option<String>,
    /// `maxmemory` in bytes (0: no limit).
    pub maxmemory: u64,
    /// `maxmemory-policy` (`noeviction`, `allkeys-lru`, `volatile-lru`, ...; `unknown` if the
    /// server does not report it).
    pub maxmemory_policy: String,
    /// The server's replication role (`master` or `slave`; `unknown` if not reported).
    pub role: String,
}

impl ServerSettings {
    /// Whether the eviction policy can evict keys without an expiry, which every key of the
    /// store is: anything but `noeviction` and the `volatile-*` policies (an unknown policy
    /// counts as one that can).
    pub fn can_evict(&self) -> bool {
        can_evict(&self.maxmemory_policy)
    }

    /// The major version (`7` of `7.0.15`; 0 if it cannot be read).
    pub fn major_version(&self) -> u32 {
        self.version
            .split('.')
            .next()
            .and_then(|major| major.parse().ok())
            .unwrap_or(0)
    }

    /// Whether the server persists anything (the AOF, or an RDB snapshot schedule); `None` when
    /// the AOF is off and the schedule cannot be read.
    pub fn persists(&self) -> Option<bool> {
        if self.appendonly {
            return Some(true);
        }
        self.save.as_ref().map(|save| !save.trim().is_empty())
    }
}

impl fmt::Display for ServerSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unknown = "unknown (CONFIG GET refused)";
        write!(f, "Redis {} (run_id {}): ", self.version, self.run_id)?;
        if self.appendonly {
            let fsync = self.appendfsync.as_deref().unwrap_or(unknown);
            write!(f, "appendonly yes, appendfsync {fsync}")?;
        } else {
            f.write_str("appendonly no")?;
        }
        match self.save.as_deref().map(str::trim) {
            Some("") => f.write_str(", RDB snapshots off")?,
            Some(save) => write!(f, ", RDB save \"{save}\"")?,
            None => write!(f, ", RDB save {unknown}")?,
        }
        write!(
            f,
            ", maxmemory-policy {}, maxmemory {}, role {}",
            self.maxmemory_policy, self.maxmemory, self.role
        )
    }
}

/// Whether `policy` can evict keys that have no expiry.
pub(crate) fn can_evict(policy: &str) -> bool {
    !(policy == "noeviction" || policy.starts_with("volatile-"))
}

/// Reads the settings: `INFO` (server, memory and persistence sections) and `CONFIG GET` of
/// `appendfsync` and `save` (which `INFO` does not show; left unknown if `CONFIG` is refused or
/// renamed).
pub(crate) async fn read_settings<C: ConnectionLike>(
    conn: &mut C,
) -> Result<ServerSettings, Error> {
    let mut sections = redis::cmd("INFO");
    sections
        .arg("server")
        .arg("memory")
        .arg("persistence")
        .arg("replication");
    // Several sections in one `INFO` is Redis 7; an older server refuses it, and its default
    // sections hold these three as well.
    let info: String = match sections.query_async(conn).await {
        Ok(info) => info,
        Err(err) if is_connection_error(&err) => return Err(Error::connection(err)),
        Err(_) => match redis::cmd("INFO").query_async(conn).await {
            Ok(info) => info,
            Err(err) if is_connection_error(&err) || crate::error::is_permission_error(&err) => {
                return Err(Error::connection(err))
            }
            Err(err) => {
                return Err(Error::SettingUnknown {
                    setting: "INFO",
                    reason: format!(
                        "the server refused `INFO` ({err}); the store needs it (its append \
                         function reads the server's run_id to detect restarts and failovers)"
                    ),
                })
            }
        },
    };
    let fields: HashMap<&str, &str> = info
        .lines()
        .filter_map(|line| line.trim_end().split_once(':'))
        .collect();
    let run_id = fields
        .get("run_id")
        .filter(|id| !id.is_empty())
        .ok_or_else(|| Error::SettingUnknown {
            setting: "run_id",
            reason: "`INFO server` shows no run_id; the store needs it to detect restarts and \
                     failovers"
                .to_owned(),
        })?;
    let config = |name: &'static str| {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("GET").arg(name);
        cmd
    };
    let appendfsync = config_value(conn, config("appendfsync"), "appendfsync").await?;
    let save = config_value(conn, config("save"), "save").await?;
    Ok(ServerSettings {
        version: fields
            .get("redis_version")
            .map_or_else(|| "unknown".to_owned(), |v| (*v).to_owned()),
        run_id: (*run_id).to_owned(),
        appendonly: fields.get("aof_enabled") == Some(&"1"),
        appendfsync,
        save,
        maxmemory: fields
            .get("maxmemory")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        maxmemory_policy: fields
            .get("maxmemory_policy")
            .map_or_else(|| "unknown".to_owned(), |v| (*v).to_owned()),
        role: fields
            .get("role")
            .map_or_else(|| "unknown".to_owned(), |v| (*v).to_owned()),
    })
}

/// The settings of the servers the store's partitions live on (`slots`, on a cluster; the one
/// server otherwise), reduced to one: the first that can evict keys, else the first that
/// persists nothing, else the first. So the store refuses appends if any partition's primary
/// can evict, and reports the first partition's server otherwise.
pub(crate) async fn read_at_slots(conn: &Side, slots: &[u16]) -> Result<ServerSettings, Error> {
    let mut all = Vec::with_capacity(slots.len().max(1));
    match conn {
        Side::Node(_) => all.push(read_settings(&mut conn.clone()).await?),
        #[cfg(feature = "cluster")]
        Side::Cluster(_) => {
            for &slot in slots {
                all.push(read_settings(&mut conn.at_slot(slot)).await?);
            }
        }
    }
    worst(all).ok_or_else(|| Error::SettingUnknown {
        setting: "INFO",
        reason: "the store has no partition whose server could be read".to_owned(),
    })
}

/// The settings of `all` that the store must act on: the first that can evict keys, else the
/// first that persists nothing, else the first.
pub(crate) fn worst(all: Vec<ServerSettings>) -> Option<ServerSettings> {
    let pick = all
        .iter()
        .position(ServerSettings::can_evict)
        .or_else(|| all.iter().position(|s| s.persists() == Some(false)))
        .unwrap_or(0);
    all.into_iter().nth(pick)
}

/// One `CONFIG GET <name>`: the value, or `None` if the server refuses the command (renamed,
/// disabled, or denied by an ACL) or does not know the setting.
async fn config_value<C: ConnectionLike>(
    conn: &mut C,
    cmd: redis::Cmd,
    name: &str,
) -> Result<Option<String>, Error> {
    match cmd.query_async::<HashMap<String, String>>(conn).await {
        Ok(map) => Ok(map.get(name).cloned()),
        Err(err) if is_connection_error(&err) => Err(Error::connection(err)),
        Err(err) => {
            tracing::debug!(error = %err, setting = name, "CONFIG GET refused");
            Ok(None)
        }
    }
}

fn is_connection_error(err: &RedisError) -> bool {
    err.is_io_error()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_timeout()
}

/// What the store requires of the server, and the opt-outs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Requirements {
    pub(crate) allow_eviction: bool,
    pub(crate) allow_no_persistence: bool,
}

impl Requirements {
    /// Checks `settings` as `build` does.
    pub(crate) fn check(self, settings: &ServerSettings) -> Result<(), Error> {
        if !self.allow_eviction && settings.can_evict() {
            return Err(Error::EvictionPolicy {
                policy: settings.maxmemory_policy.clone(),
            });
        }
        if !self.allow_no_persistence {
            match settings.persists() {
                Some(true) => {}
                Some(false) => return Err(Error::NoPersistence),
                None => {
                    return Err(Error::SettingUnknown {
                        setting: "save",
                        reason: "the append-only file is off and `CONFIG GET save` is refused, so \
                                 whether the server persists anything is unknown; allow `CONFIG \
                                 GET` for the store's user, turn on the append-only file, or opt \
                                 out with `RedisStoreBuilder::allow_no_persistence(true)`"
                            .to_owned(),
                    })
                }
            }
        }
        Ok(())
    }
}

/// The settings shared by a store's handles and its background task.
#[derive(Debug)]
pub(crate) struct Server {
    settings: Mutex<ServerSettings>,
    /// The last settings read can evict the store's keys, and the store does not allow it.
    refusing: AtomicBool,
    requirements: Requirements,
    wake: Arc<Notify>,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// How the background task reaches the server.
#[derive(Debug, Clone)]
pub(crate) struct MonitorConfig {
    pub(crate) client: crate::conn::Target,
    pub(crate) interval: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) response_timeout: Duration,
    pub(crate) prefix: Arc<str>,
    /// On a cluster, the hash slots of the store's partitions: the settings read are those of
    /// the primaries serving them.
    pub(crate) slots: Vec<u16>,
}

impl Server {
    pub(crate) fn new(settings: ServerSettings, requirements: Requirements) -> Self {
        let refusing = !requirements.allow_eviction && settings.can_evict();
        Self {
            settings: Mutex::new(settings),
            refusing: AtomicBool::new(refusing),
            requirements,
            wake: Arc::new(Notify::new()),
            task: Mutex::new(None),
        }
    }

    /// The settings as last read.
    pub(crate) fn settings(&self) -> ServerSettings {
        self.settings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The eviction policy appends must be refused for, if the last settings read have one.
    pub(crate) fn refusal(&self) -> Option<Error> {
        if !self.refusing.load(Ordering::Acquire) {
            return None;
        }
        Some(Error::EvictionPolicy {
            policy: self.settings().maxmemory_policy,
        })
    }

    /// Asks the background task to read the settings now (after an append saw a new server
    /// incarnation).
    pub(crate) fn recheck(&self) {
        self.wake.notify_one();
    }

    /// Records freshly read settings, logging what changed.
    fn update(&self, new: &ServerSettings, prefix: &str) {
        let refusing = !self.requirements.allow_eviction && new.can_evict();
        let old = {
            let mut settings = self.settings.lock().unwrap_or_else(PoisonError::into_inner);
            std::mem::replace(&mut *settings, new.clone())
        };
        self.refusing.store(refusing, Ordering::Release);
        if old == *new {
            return;
        }
        if refusing && !old.can_evict() {
            tracing::error!(
                prefix,
                policy = %new.maxmemory_policy,
                "the Redis server can now evict the store's keys; appends are refused until \
                 `maxmemory-policy` is `noeviction` or volatile-*"
            );
        } else if !refusing && old.can_evict() && !self.requirements.allow_eviction {
            tracing::info!(prefix, policy = %new.maxmemory_policy, "eviction is off again; appends resume");
        }
        if new.persists() == Some(false) && old.persists() != Some(false) {
            tracing::warn!(prefix, settings = %new, "the Redis server no longer persists anything");
        }
        if old.run_id == new.run_id {
            tracing::info!(prefix, settings = %new, "the Redis server's settings changed");
        } else {
            tracing::info!(prefix, settings = %new, "the Redis server is a new process (restart or failover)");
        }
    }

    /// Starts the background task that re-reads the settings (without a Tokio runtime nothing
    /// starts, and the settings stay as read by `build`).
    pub(crate) fn start_monitor(self: &Arc<Self>, config: MonitorConfig) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let task = runtime.spawn(monitor(
            Arc::downgrade(self),
            Arc::clone(&self.wake),
            config,
        ));
        *self.task.lock().unwrap_or_else(PoisonError::into_inner) = Some(task);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(task) = self
            .task
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            task.abort();
        }
    }
}

/// The background task: on a connection of its own, reads the settings after every
/// (re)connection, every `interval`, and when woken.
async fn monitor(server: Weak<Server>, wake: Arc<Notify>, config: MonitorConfig) {
    const MIN_BACKOFF: Duration = Duration::from_millis(50);
    let mut conn: Option<Side> = None;
    let mut delays = es_core::Backoff::new(MIN_BACKOFF, config.interval).delays();
    let mut due = true;
    loop {
        if server.strong_count() == 0 {
            return;
        }
        let Some(c) = conn.as_mut() else {
            match connect(&config).await {
                Ok(c) => {
                    // A new connection may reach a new server: read the settings at once.
                    conn = Some(c);
                    due = true;
                }
                Err(err) => {
                    tracing::debug!(error = %err, "the store's settings monitor cannot connect");
                    delays.sleep().await;
                }
            }
            continue;
        };
        if !due {
            tokio::select! {
                () = tokio::time::sleep(config.interval) => {}
                () = wake.notified() => {}
            }
        }
        due = false;
        match read_at_slots(c, &config.slots).await {
            Ok(settings) => {
                delays.reset();
                match server.upgrade() {
                    Some(server) => server.update(&settings, &config.prefix),
                    None => return,
                }
                if settings.role != "master" && config.client.follows_primary() {
                    // With Sentinel, a primary that became a replica: ask the sentinels again.
                    tracing::debug!(role = %settings.role, "the settings monitor reached a replica; reconnecting");
                    conn = None;
                    delays.sleep().await;
                }
            }
            Err(err) => {
                tracing::debug!(error = %err, "reading the Redis server's settings failed; reconnecting");
                conn = None;
                delays.sleep().await;
            }
        }
    }
}

async fn connect(config: &MonitorConfig) -> redis::RedisResult<Side> {
    config
        .client
        .connect(config.connect_timeout, config.response_timeout)
        .await
}
