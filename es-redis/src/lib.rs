//! The Redis event store for `es-core`: one atomic Lua function call per append (or per group of
//! concurrent appends), Redis streams for the per-stream logs, the global feed and the outbox,
//! `XREAD BLOCK` for live subscriptions. Needs Redis 7.0 or later.
//!
//! [`RedisStore`] implements [`EventStore`], [`SnapshotStore`], [`OutboxStore`],
//! [`CheckpointStore`] and [`LeaseStore`] with the same guarantees as `es-memory` and
//! `es-postgres`, proven by the same conformance suites: optimistic concurrency by
//! [`ExpectedVersion`], all-or-nothing batches, idempotent retries by event id, a global feed in
//! commit order that never skips, snapshots upserted if newer, outbox records written atomically
//! with their events, and the leases and fenced checkpoints of consumer groups.
//!
//! ```no_run
//! use es_core::{AppendRequest, EventStore, ExpectedVersion, NewEvent, StreamId};
//! use es_redis::RedisStore;
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let store = RedisStore::builder("redis://127.0.0.1:6379")
//!     .prefix("shop")
//!     .build()
//!     .await?;
//! let stream = StreamId::new("order", "42")?;
//! let event = NewEvent::new("OrderPlaced", 1, r#"{"total":1299}"#)?;
//! let result = store
//!     .append(AppendRequest::new(stream, ExpectedVersion::NoStream, vec![event]))
//!     .await?;
//! assert_eq!(result.stream_version, 1);
//! # Ok(())
//! # }
//! # let _ = example;
//! ```
//!
//! The URL may carry a password (`redis://:password@host`, `redis://user:password@host`,
//! `redis+unix:///path?pass=password`); it never appears in `Debug` output or error messages,
//! which show `redis://:***@host`.
//!
#![doc = include_str!("../DESIGN.md")]
#![doc(test(attr(deny(warnings))))]

mod append;
mod archive;
mod conn;
mod decode;
mod error;
mod keys;
mod lease;
mod list;
mod outbox;
mod protocol;
mod read;
mod script;
mod server;
mod subject_keys;
mod tenants;
mod watch;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::DateTime;
use conn::{Connection, Target};
use es_core::contract::position::EpochStart;
use es_core::contract::{Partitioning, StoreFuture};
use es_core::{
    AppendLimits, AppendRequest, AppendResult, EventStore, EventStream, ListStreams, ReadAll,
    ReadStream, SnapshotRecord, SnapshotStore, StoreError, StreamId, StreamPage,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::io::tcp::socket2::TcpKeepalive;
use redis::{IntoConnectionInfo, Value};

pub use error::Error;
pub use keys::{
    slot_of_tag, GroupKeys, KeyLayout, Keys, PartitionKeys, CLUSTER_SLOTS, MAX_PARTITIONS,
    MAX_PREFIX_LEN,
};
/// The `redis` crate this store is built on, for [`RedisStore::connection`].
pub use redis;
pub use server::ServerSettings;
pub use subject_keys::RedisKeyStore;
pub use tenants::RedisTenants;

use append::{Appender, GroupCommit, GroupLimits};
use error::store_error;
use script::Lua;
use server::{MonitorConfig, Requirements, Server};
use watch::{Head, WatchConfig};

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "es";

/// The Redis event and snapshot store. Cheap to clone; clones share the connection.
///
/// A handle that [`OutboxStore::outbox_partition`](es_core::OutboxStore::outbox_partition)
/// returned addresses the outbox, relay lease and dead letters of one feed partition; every
/// other method of it is the whole store's.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
    /// The feed partition whose outbox this handle's outbox methods address, if it was scoped
    /// to one.
    outbox_scope: Option<u32>,
}

pub(crate) struct Inner {
    pub(crate) conn: Connection,
    pub(crate) keys: Keys,
    pub(crate) page_size: u64,
    limits: AppendLimits,
    poll_interval: Duration,
    appender: Arc<Appender>,
    /// With group commit, one per feed partition (indexed by partition): appends are grouped
    /// within their partition, and the partitions' calls run concurrently.
    group: Option<Box<[GroupCommit]>>,
    save_snapshot: Lua,
    delete_snapshot: Lua,
    pub(crate) acquire_lease: Lua,
    pub(crate) release_lease: Lua,
    pub(crate) save_checkpoint: Lua,
    /// The functions of consumer-group leases.
    pub(crate) leases: lease::LeaseFunctions,
    /// Whether the store accepts a server that can evict its keys.
    pub(crate) allow_eviction: bool,
    /// Per feed partition, its head and the settings of its head watcher.
    heads: Arc<[Arc<Head>]>,
    watch: Box<[WatchConfig]>,
    server: Arc<Server>,
    /// The event archive, if the store has one.
    archive: Option<archive::ArchiveConfig>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.inner.keys.prefix())
            .field("partitioning", &self.inner.keys.partitioning())
            .field("outbox_scope", &self.outbox_scope)
            .field("limits", &self.inner.limits)
            .field("poll_interval", &self.inner.poll_interval)
            .field("page_size", &self.inner.page_size)
            .field("group_commit", &self.inner.group.is_some())
            .field("server", &self.inner.server.settings().to_string())
            .finish_non_exhaustive()
    }
}

/// Builds a [`RedisStore`]; see [`RedisStore::builder`].
///
/// Its `Debug` output shows the URL without its password (`redis://app:***@cache/0`).
#[derive(Clone)]
pub struct RedisStoreBuilder {
    url: String,
    prefix: String,
    limits: AppendLimits,
    poll_interval: Duration,
    response_timeout: Duration,
    connect_timeout: Duration,
    server_check_interval: Duration,
    page_size: u64,
    group_commit: bool,
    allow_eviction: bool,
    allow_no_persistence: bool,
    tls: TlsOptions,
    sentinel: Option<SentinelOptions>,
    wait: Option<(usize, Duration)>,
    layout: Option<KeyLayout>,
    partitioning: Partitioning,
    /// The cluster nodes' URLs, for a store on a Redis Cluster.
    cluster: Option<Vec<String>>,
    /// Where `archive_stream` moves events to.
    archive: Option<Arc<dyn es_core::contract::EventArchive>>,
}

/// The sentinels to ask for the primary, and the name they monitor it by. Their URLs show
/// without passwords in `Debug` output.
// Without the `sentinel` feature nothing sets it; the builder's `Debug` and `build` still read it.
#[cfg_attr(not(feature = "sentinel"), allow(dead_code))]
#[derive(Clone)]
struct SentinelOptions {
    service: String,
    urls: Vec<String>,
}

impl std::fmt::Debug for SentinelOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<String> = self
            .urls
            .iter()
            .map(|url| es_core::contract::redact_url(url))
            .collect();
        f.debug_struct("Sentinel")
            .field("service", &self.service)
            .field("sentinels", &urls)
            .finish()
    }
}

/// The TLS material a builder holds: CA certificates to trust instead of the system's, and a
/// client certificate and key for mutual TLS. Its `Debug` output shows what is set, never the
/// key.
#[derive(Clone, Default)]
struct TlsOptions {
    root_certificates: Option<Vec<u8>>,
    client: Option<(Vec<u8>, Vec<u8>)>,
}

impl TlsOptions {
    fn is_set(&self) -> bool {
        self.root_certificates.is_some() || self.client.is_some()
    }
}

impl std::fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = |set: bool| if set { "set" } else { "none" };
        f.debug_struct("Tls")
            .field(
                "root_certificates",
                &shown(self.root_certificates.is_some()),
            )
            .field("client_certificate", &shown(self.client.is_some()))
            .field(
                "client_key",
                &if self.client.is_some() { "***" } else { "none" },
            )
            .finish()
    }
}

impl std::fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStoreBuilder")
            .field("url", &es_core::contract::redact_url(&self.url))
            .field("prefix", &self.prefix)
            .field("limits", &self.limits)
            .field("poll_interval", &self.poll_interval)
            .field("response_timeout", &self.response_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("server_check_interval", &self.server_check_interval)
            .field("page_size", &self.page_size)
            .field("group_commit", &self.group_commit)
            .field("allow_eviction", &self.allow_eviction)
            .field("allow_no_persistence", &self.allow_no_persistence)
            .field("tls", &self.tls)
            .field("sentinel", &self.sentinel)
            .field("min_replicas_acked", &self.wait)
            .field("layout", &self.layout)
            .field("partitioning", &self.partitioning)
            .field(
                "cluster",
                &self.cluster.as_ref().map(|nodes| {
                    nodes
                        .iter()
                        .map(|url| es_core::contract::redact_url(url))
                        .collect::<Vec<_>>()
                }),
            )
            .field("archive", &self.archive.is_some())
            .finish()
    }
}

/// How many times the connection is re-established before a command waiting for it fails
/// (after the first attempt), and the back-off between attempts: 100 ms, doubling, with up to
/// as much again of jitter, at most 1 s. Together with the connection time-out this bounds how
/// long a command can wait for a connection; see the crate docs, section "Time-outs".
const RECONNECT_RETRIES: usize = 3;
const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(100);
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(1);

/// TCP keepalive on every connection: the first probe after 10 s of silence, then every 5 s,
/// and the connection is dropped after 3 unanswered probes. Idle connections to a vanished host
/// are noticed in about 25 s instead of the kernel's default of over two hours.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_PROBES: u32 = 3;

impl RedisStoreBuilder {
    /// The key prefix (default [`DEFAULT_PREFIX`]): 1 to [`MAX_PREFIX_LEN`] bytes of ASCII
    /// letters, digits or `_-.:`. Checked by [`build`](Self::build).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Size limits on appends (default [`AppendLimits::default`]).
    pub fn limits(mut self, limits: AppendLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The longest [`EventStore::wait_for_append`] waits without a wake-up (default 1 s); also
    /// how long the head watcher blocks in one `XREAD BLOCK`.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// How long a command may wait for its reply before it fails as
    /// [`StoreError::Unavailable`] (default 10 s). Large batches under `appendfsync always` need
    /// more than the few milliseconds a small append takes. See the crate docs, section
    /// "Time-outs".
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// How long one attempt to connect (TCP, then the handshake) may take (default 2 s). See the
    /// crate docs, section "Time-outs".
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How often the store's background task reads the server's settings again (default 1 s);
    /// it also reads them after each of its reconnections. While the last settings read let the
    /// server evict the store's keys, appends fail with [`Error::EvictionPolicy`]. See the crate
    /// docs, section "Server settings".
    pub fn server_check_interval(mut self, interval: Duration) -> Self {
        self.server_check_interval = interval;
        self
    }

    /// Accept a server whose `maxmemory-policy` can evict keys without an expiry (`allkeys-*`),
    /// default `false`. Only for data you can afford to lose (a cache, a throwaway test): under
    /// memory pressure such a server drops events, versions or the id index without an error,
    /// and the store can neither prevent nor always detect it.
    pub fn allow_eviction(mut self, allow: bool) -> Self {
        self.allow_eviction = allow;
        self
    }

    /// Accept a server that persists nothing (`appendonly no` and `save ""`), default `false`.
    /// Such a server loses every event on a restart, including the head that lets the store
    /// tell its readers about the loss (see the crate docs, section "Epochs and lost tails").
    pub fn allow_no_persistence(mut self, allow: bool) -> Self {
        self.allow_no_persistence = allow;
        self
    }

    /// Entries fetched per `XRANGE` page by reads (default 512).
    pub fn read_page_size(mut self, entries: u64) -> Self {
        self.page_size = entries;
        self
    }

    /// Whether concurrent appends through this store (and its clones) are committed in groups,
    /// several appends per script call (default `true`). See the crate docs, section "Group
    /// commit". Without it, every append is a script call of its own.
    pub fn group_commit(mut self, enabled: bool) -> Self {
        self.group_commit = enabled;
        self
    }

    /// Trust these CA certificates (PEM, one or more) for a `rediss://` URL instead of the
    /// system's. The server's certificate must chain to one of them and be valid for the URL's
    /// host name; otherwise `build` fails with [`Error::Tls`]. Setting this for a plain
    /// `redis://` URL is refused ([`Error::InvalidSetting`]): the store never connects in
    /// plaintext when TLS is configured. See the crate docs, section "Production".
    #[cfg(feature = "tls")]
    pub fn tls_root_certificates(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls.root_certificates = Some(pem.into());
        self
    }

    /// Present this client certificate and private key (both PEM) to a server that
    /// authenticates clients by certificate (`tls-auth-clients yes`). The key never appears in
    /// `Debug` output or errors.
    #[cfg(feature = "tls")]
    pub fn tls_client_certificate(
        mut self,
        certificate_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.tls.client = Some((certificate_pem.into(), key_pem.into()));
        self
    }

    /// Find the primary through Redis Sentinel: `sentinels` are the sentinels' URLs
    /// (`redis://host:26379`, with a password if they require one), `service` the name they
    /// monitor the primary by (`sentinel monitor <service> ...`). The builder's URL then gives
    /// the user, password and database for the primary and its replicas; its host and port are
    /// not used. After a failover the store moves to the primary the sentinels name: commands
    /// in flight fail as [`StoreError::Unavailable`] (retry them: appends are idempotent), and
    /// the first write on the new primary begins an epoch (see the crate docs, sections
    /// "Production" and "Epochs and lost tails").
    ///
    /// With TLS (feature `tls`) every URL is `rediss://`, the sentinels' and the builder's:
    /// the store then talks TLS to the sentinels and to the primary they name, verifying each
    /// against the builder's CA (`tls_root_certificates`, or the system's) and presenting its
    /// client certificate if one is set. The primary's certificate must be valid for the
    /// address the sentinels report (an IP address unless they announce host names). TLS for
    /// some and plaintext for others is refused ([`Error::MixedTls`]).
    #[cfg(feature = "sentinel")]
    pub fn sentinels(
        mut self,
        service: impl Into<String>,
        sentinels: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        self.sentinel = Some(SentinelOptions {
            service: service.into(),
            urls: sentinels.into_iter().map(Into::into).collect(),
        });
        self
    }

    /// Acknowledge an append only once `replicas` replicas have it (`WAIT`, at most `timeout`),
    /// default off. Then a failover to one of them loses no acknowledged append; an append the
    /// replicas do not confirm in time fails with [`StoreError::Unavailable`] whose source is
    /// [`Error::ReplicasNotAcked`] (it is stored on the primary: retry, appends are
    /// idempotent). Costs a replication round trip per script call, shared by a group. Without
    /// it, replication is asynchronous and a failover can lose the last acknowledged appends;
    /// see the crate docs, section "Production".
    pub fn min_replicas_acked(mut self, replicas: usize, timeout: Duration) -> Self {
        self.wait = Some((replicas, timeout));
        self
    }

    /// The key layout (default: [`KeyLayout::Classic`] on a standalone server or with
    /// Sentinel, [`KeyLayout::Tagged`] on a cluster, which refuses the classic layout). A store
    /// records its layout when it is first built and cannot be opened with another one
    /// ([`Error::LayoutMismatch`]). See the crate docs, sections "Key layout" and "Redis
    /// Cluster".
    pub fn key_layout(mut self, layout: KeyLayout) -> Self {
        self.layout = Some(layout);
        self
    }

    /// How the store divides its streams among feed partitions (default
    /// [`Partitioning::single`]: one feed). Each partition is a feed of its own, with its own
    /// positions, head, epochs and outbox (see [`es_core::contract::partition`]); in the
    /// [tagged](KeyLayout::Tagged) layout, which several partitions need and get by default,
    /// each has its own hash slot, so on a Redis Cluster the partitions spread over the
    /// primaries. A store records its partitioning when it is first built and cannot be opened
    /// with another ([`Error::LayoutMismatch`]). Asking for several partitions with
    /// [`KeyLayout::Classic`] is [`Error::InvalidSetting`]. See the crate docs, section "Redis
    /// Cluster".
    pub fn partitioning(mut self, partitioning: Partitioning) -> Self {
        self.partitioning = partitioning;
        self
    }

    /// The layout the store will use: the one set, or the default for the deployment (tagged
    /// on a cluster and for several partitions).
    /// The event archive [`EventStore::archive_stream`] moves events to (out of Redis), and
    /// that every read merges with: see the crate docs, section "Archiving". `build` claims it
    /// for this store (an identity recorded in the store's meta key) and fails with
    /// [`Error::Archive`] if it belongs to another store. Without one, `archive_stream` is
    /// [`StoreError::InvalidArchive`] and moves nothing.
    pub fn archive(mut self, archive: Arc<dyn es_core::contract::EventArchive>) -> Self {
        self.archive = Some(archive);
        self
    }

    fn layout(&self) -> KeyLayout {
        self.layout.unwrap_or(
            if self.cluster.is_some() || !self.partitioning.is_single() {
                KeyLayout::Tagged
            } else {
                KeyLayout::Classic
            },
        )
    }

    /// The key names of the store this builder opens.
    fn keys(&self) -> Result<Keys, Error> {
        match self.layout() {
            KeyLayout::Classic => Keys::new(&self.prefix),
            KeyLayout::Tagged => Keys::partitioned(&self.prefix, self.partitioning),
        }
    }

    /// Installs the store's Redis function library on the server if it does not hold it, and
    /// nothing else: the deployment step for stores whose own user may not run `FUNCTION LOAD`
    /// (see the crate docs, section "Production"). Call it on a builder whose URL names an
    /// administrative user; each version of this crate has a library of its own
    /// (`es_append_<hash>`), so run it when deploying a new version.
    pub async fn install_functions(&self) -> Result<(), Error> {
        let (_, mut conn) = self.connect().await?;
        let library = script::library().library;
        let loaded = library
            .loaded(&mut conn)
            .await
            .map_err(|source| Error::connect(&self.url, source))?;
        if !loaded {
            library
                .install(&mut conn)
                .await
                .map_err(|source| Error::connect(&self.url, source))?;
            tracing::info!(
                library = library.name(),
                "installed the store's Redis functions"
            );
        }
        Ok(())
    }

    /// Connects, checks the server's settings (see the crate docs, section "Server settings"),
    /// loads the scripts, checks the store's recorded key layout and returns the store.
    pub async fn build(self) -> Result<RedisStore, Error> {
        self.validate()?;
        let keys = self.keys()?;
        let (target, mut conn) = self.connect().await?;
        let requirements = Requirements {
            allow_eviction: self.allow_eviction,
            allow_no_persistence: self.allow_no_persistence,
        };
        let slots: Vec<u16> = keys
            .all_partitions()
            .iter()
            .map(PartitionKeys::slot)
            .collect();
        let settings = self.read_settings(&mut conn, &slots, requirements).await?;
        self.log_settings(&keys, &settings);
        if settings.major_version() < 7 {
            return Err(Error::UnsupportedVersion {
                version: settings.version.clone(),
            });
        }
        let script::Functions {
            append,
            lease_acquire,
            lease_release,
            leases_held,
            ..
        } = self.load_functions(&mut conn).await?;
        let save_snapshot = Lua::new(script::SAVE_SNAPSHOT);
        let delete_snapshot = Lua::new(script::DELETE_SNAPSHOT);
        let acquire_lease = Lua::new(script::ACQUIRE_LEASE);
        let release_lease = Lua::new(script::RELEASE_LEASE);
        let save_checkpoint = Lua::new(script::SAVE_CHECKPOINT);
        let check_layout = Lua::new(script::CHECK_LAYOUT);
        for script in [
            &save_snapshot,
            &delete_snapshot,
            &acquire_lease,
            &release_lease,
            &save_checkpoint,
            &check_layout,
        ] {
            script
                .load(&mut conn)
                .await
                .map_err(|source| Error::connect(&self.url, source))?;
        }
        self.check_layout(&mut conn, &keys, &check_layout).await?;
        let archive = self.claim_archive(&mut conn, &keys).await?;
        let server = Arc::new(Server::new(settings, requirements));
        server.start_monitor(MonitorConfig {
            client: target.clone(),
            interval: self.server_check_interval,
            connect_timeout: self.connect_timeout,
            response_timeout: self.response_timeout,
            prefix: keys.prefix().into(),
            slots,
        });
        let (watch, heads) = self.heads(&keys, &target);
        let appender = Arc::new(Appender {
            conn: conn.clone(),
            keys: keys.clone(),
            script: append,
            heads: Arc::clone(&heads),
            server: Arc::clone(&server),
            allow_eviction: self.allow_eviction,
            wait: self.wait,
        });
        let group = self.group_commit.then(|| group_commits(&keys, &appender));
        Ok(RedisStore {
            outbox_scope: None,
            inner: Arc::new(Inner {
                conn,
                keys,
                page_size: self.page_size,
                limits: self.limits,
                poll_interval: self.poll_interval,
                appender,
                group,
                save_snapshot,
                delete_snapshot,
                acquire_lease,
                release_lease,
                save_checkpoint,
                leases: lease::LeaseFunctions {
                    acquire: lease_acquire,
                    release: lease_release,
                    held: leases_held,
                },
                allow_eviction: self.allow_eviction,
                heads,
                watch,
                server,
                archive,
            }),
        })
    }

    /// Claims the builder's archive, if it has one, for this store: its identity is the prefix
    /// and a random id recorded in the meta key the first time (so two stores with the same
    /// prefix on different servers are told apart).
    async fn claim_archive(
        &self,
        conn: &mut Connection,
        keys: &Keys,
    ) -> Result<Option<archive::ArchiveConfig>, Error> {
        let Some(archive) = &self.archive else {
            return Ok(None);
        };
        let script = Lua::new(script::ARCHIVE_OWNER);
        let mut cmd = script.command(&[keys.meta()]);
        cmd.arg(uuid::Uuid::new_v4().hyphenated().to_string());
        let id = self
            .text_reply(
                conn,
                &script,
                &cmd,
                "unexpected reply from the archive identity",
            )
            .await?;
        let owner = format!("Redis store `{}` ({id})", keys.prefix());
        archive
            .claim(&owner)
            .await
            .map_err(|source| Error::Archive { source })?;
        Ok(Some(archive::ArchiveConfig {
            archive: Arc::clone(archive),
            delete: Lua::new(script::ARCHIVE),
        }))
    }
}

/// With group commit, one group per feed partition of `keys`, all sending through `appender`.
fn group_commits(keys: &Keys, appender: &Arc<Appender>) -> Box<[GroupCommit]> {
    keys.all_partitions()
        .iter()
        .map(|_| GroupCommit::new(Arc::clone(appender), GroupLimits::DEFAULT))
        .collect()
}

impl RedisStoreBuilder {
    /// Per feed partition of `keys`, the settings of its head watcher (on its own connections
    /// to `target`) and its head.
    fn heads(&self, keys: &Keys, target: &Target) -> (Box<[WatchConfig]>, Arc<[Arc<Head>]>) {
        let watch = keys
            .all_partitions()
            .iter()
            .map(|part| WatchConfig {
                client: target.clone(),
                feed: part.feed().into(),
                index: part.index().into(),
                block: self.poll_interval,
                connect_timeout: self.connect_timeout,
                response_timeout: self.response_timeout,
            })
            .collect();
        let heads = keys
            .all_partitions()
            .iter()
            .map(|_| Arc::new(Head::new()))
            .collect();
        (watch, heads)
    }

    /// The settings of the server the store's partitions live on (`slots`: on a cluster, each
    /// slot's primary; elsewhere the one server), each checked against `requirements`; the one
    /// to act on and report (see [`server::worst`]).
    async fn read_settings(
        &self,
        conn: &mut Connection,
        slots: &[u16],
        requirements: Requirements,
    ) -> Result<ServerSettings, Error> {
        #[cfg(feature = "cluster")]
        if let Some(cluster) = conn.cluster_connection() {
            let side = conn::Side::Cluster(cluster);
            let mut all = Vec::with_capacity(slots.len());
            for &slot in slots {
                let settings = server::read_settings(&mut side.at_slot(slot))
                    .await
                    .map_err(|err| err.at(&self.url))?;
                requirements.check(&settings)?;
                all.push(settings);
            }
            return server::worst(all).ok_or(Error::InvalidSetting("the store has no partition"));
        }
        let _ = slots;
        let settings = server::read_settings(conn)
            .await
            .map_err(|err| err.at(&self.url))?;
        requirements.check(&settings)?;
        Ok(settings)
    }

    /// Runs one of the scripts the build runs on the store's meta key and returns its text reply;
    /// another reply is `unexpected`, a refused command [`Error::NoPermission`].
    async fn text_reply(
        &self,
        conn: &mut Connection,
        script: &Lua,
        cmd: &redis::Cmd,
        unexpected: &'static str,
    ) -> Result<String, Error> {
        match script.invoke(conn, cmd).await {
            Ok(Value::BulkString(text)) => Ok(String::from_utf8_lossy(&text).into_owned()),
            Ok(other) => Err(Error::connect(
                &self.url,
                redis::RedisError::from((
                    redis::ErrorKind::Parse,
                    unexpected,
                    format!("{other:?}"),
                )),
            )),
            Err(source) if error::is_permission_error(&source) => Err(Error::NoPermission {
                url: Some(es_core::contract::redact_url(&self.url)),
                source,
            }),
            Err(source) => Err(Error::connect(&self.url, source)),
        }
    }

    /// Records the store's layout in its meta key if it has none, and refuses a store whose
    /// recorded layout is not `keys`' ([`Error::LayoutMismatch`]). A store without a meta key
    /// that has the classic layout's head is a classic store from before layouts were recorded.
    async fn check_layout(
        &self,
        conn: &mut Connection,
        keys: &Keys,
        script: &Lua,
    ) -> Result<(), Error> {
        let requested = keys.recorded_layout();
        let classic_index = keys.classic_index();
        let mut cmd = script.command(&[keys.meta(), &classic_index]);
        cmd.arg(&requested);
        let recorded = self
            .text_reply(conn, script, &cmd, "unexpected reply from the layout check")
            .await?;
        if recorded == requested {
            Ok(())
        } else {
            Err(Error::LayoutMismatch {
                prefix: keys.prefix().to_owned(),
                recorded,
                requested,
            })
        }
    }

    /// The one line a store logs when it is built: what it runs under.
    fn log_settings(&self, keys: &Keys, settings: &ServerSettings) {
        tracing::info!(
            prefix = keys.prefix(),
            layout = %keys.recorded_layout(),
            cluster = self.cluster.is_some(),
            url = %es_core::contract::redact_url(&self.url),
            tls = self.url.trim_start().starts_with("rediss:"),
            sentinel = self.sentinel.as_ref().map_or("none", |s| s.service.as_str()),
            min_replicas_acked = self.wait.map_or(0, |(replicas, _)| replicas),
            version = %settings.version,
            run_id = %settings.run_id,
            appendonly = settings.appendonly,
            appendfsync = settings.appendfsync.as_deref().unwrap_or("unknown"),
            save = settings.save.as_deref().unwrap_or("unknown"),
            maxmemory_policy = %settings.maxmemory_policy,
            maxmemory = settings.maxmemory,
            "Redis store on {settings}"
        );
    }

    /// The append function's library, loaded unless the server holds it; a user that may not
    /// load it gets [`Error::FunctionsNotInstalled`].
    async fn load_functions(&self, conn: &mut Connection) -> Result<script::Functions, Error> {
        let functions = script::library();
        let library = &functions.library;
        let loaded = library
            .loaded(conn)
            .await
            .map_err(|source| Error::connect(&self.url, source))?;
        if !loaded {
            library.install(conn).await.map_err(|source| {
                if error::is_permission_error(&source) {
                    Error::FunctionsNotInstalled {
                        library: library.name().to_owned(),
                        source,
                    }
                } else {
                    Error::connect(&self.url, source)
                }
            })?;
        }
        Ok(functions)
    }

    fn validate(&self) -> Result<(), Error> {
        for (duration, what) in [
            (self.poll_interval, "the poll interval must not be zero"),
            (
                self.response_timeout,
                "the response timeout must not be zero",
            ),
            (self.connect_timeout, "the connect timeout must not be zero"),
            (
                self.server_check_interval,
                "the server check interval must not be zero",
            ),
        ] {
            if duration.is_zero() {
                return Err(Error::InvalidSetting(what));
            }
        }
        if let Some((replicas, timeout)) = self.wait {
            if replicas == 0 || timeout.is_zero() {
                return Err(Error::InvalidSetting(
                    "min_replicas_acked needs at least one replica and a non-zero time-out",
                ));
            }
        }
        if self.page_size == 0 {
            return Err(Error::InvalidSetting("the read page size must not be zero"));
        }
        if !self.partitioning.is_single() && self.layout() == KeyLayout::Classic {
            return Err(Error::InvalidSetting(
                "the classic key layout has one feed; several feed partitions need the tagged \
                 layout (the default for them)",
            ));
        }
        if let Some(nodes) = &self.cluster {
            if nodes.is_empty() {
                return Err(Error::InvalidSetting(
                    "no cluster node addresses were given",
                ));
            }
            if self.sentinel.is_some() {
                return Err(Error::InvalidSetting(
                    "a store is on a Redis Cluster or behind Sentinel, not both",
                ));
            }
            if self.layout() == KeyLayout::Classic {
                return Err(Error::InvalidSetting(
                    "the classic key layout puts an append's keys in two hash slots, which a \
                     Redis Cluster refuses; use the tagged layout on a cluster",
                ));
            }
        }
        Ok(())
    }

    /// Where the store's own extra connections go, and the shared connection (with TCP
    /// keepalive), with the time-outs and reconnection budget of the crate docs, section
    /// "Time-outs".
    async fn connect(&self) -> Result<(Target, Connection), Error> {
        let info = self
            .url
            .as_str()
            .into_connection_info()
            .map_err(|source| Error::invalid_url(&self.url, source))?;
        let keepalive = TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(KEEPALIVE_PROBES);
        let tcp = info.tcp_settings().clone().set_keepalive(keepalive);
        let info = info.set_tcp_settings(tcp);
        let tls_url = match info.addr() {
            redis::ConnectionAddr::TcpTls { insecure: true, .. } => {
                return Err(Error::InvalidSetting(INSECURE_REFUSED))
            }
            redis::ConnectionAddr::TcpTls { .. } => true,
            _ => false,
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.response_timeout))
            .set_number_of_retries(RECONNECT_RETRIES)
            .set_min_delay(RECONNECT_MIN_DELAY)
            .set_max_delay(RECONNECT_MAX_DELAY);
        if let Some(sentinel) = &self.sentinel {
            return self.follow(sentinel, info, tls_url, config).await;
        }
        if let Some(nodes) = &self.cluster {
            return self.join_cluster(nodes, info, tls_url, config).await;
        }
        if self.tls.is_set() && !tls_url {
            return Err(Error::InvalidSetting(PLAINTEXT_REFUSED));
        }
        let client = if tls_url {
            redis::Client::open(self.tls_info(&self.url, info)?)
                .map_err(|source| Error::invalid_url(&self.url, source))?
        } else {
            redis::Client::open(info).map_err(|source| Error::invalid_url(&self.url, source))?
        };
        let conn = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(|source| Error::connect(&self.url, source))?;
        Ok((Target::Client(Box::new(client)), Connection::direct(conn)))
    }

    /// The connection to the primary the sentinels name, followed across failovers: TLS to
    /// every sentinel and to the primary, or to none of them.
    #[cfg(feature = "sentinel")]
    async fn follow(
        &self,
        sentinel: &SentinelOptions,
        node: redis::ConnectionInfo,
        tls_url: bool,
        config: ConnectionManagerConfig,
    ) -> Result<(Target, Connection), Error> {
        use conn::sentinel::{Endpoint, Following};

        if sentinel.urls.is_empty() {
            return Err(Error::InvalidSetting("no sentinel addresses were given"));
        }
        let mut sentinels = self.parse_nodes(Some(&self.url), &sentinel.urls, tls_url)?;
        let node = if tls_url {
            for (info, url) in sentinels.iter_mut().zip(&sentinel.urls) {
                *info = self.tls_info(url, info.clone())?;
            }
            self.tls_info(&self.url, node)?
        } else {
            node
        };
        let following = Following::connect(sentinels, &sentinel.service, node, config)
            .await
            .map_err(|(at, source)| match at {
                Endpoint::Sentinel(i) => Error::connect(&sentinel.urls[i], source),
                Endpoint::Primary(address) => {
                    let scheme = if tls_url { "rediss" } else { "redis" };
                    Error::connect(&format!("{scheme}://{address}"), source)
                }
            })?;
        Ok((
            Target::Sentinel(Arc::clone(&following)),
            Connection::sentinel(following),
        ))
    }

    /// Without the `sentinel` feature the builder has no way to set sentinels.
    #[cfg(not(feature = "sentinel"))]
    #[allow(clippy::unused_async)] // The same signature as with the feature.
    async fn follow(
        &self,
        _: &SentinelOptions,
        _: redis::ConnectionInfo,
        _: bool,
        _: ConnectionManagerConfig,
    ) -> Result<(Target, Connection), Error> {
        Err(Error::InvalidSetting(
            "Sentinel needs the `sentinel` feature of es-redis",
        ))
    }
}

impl RedisStoreBuilder {
    /// Parses the URLs of the nodes (sentinels, cluster nodes) a store connects through, with
    /// the store's own URL if it is not one of them: all of them TLS or none
    /// ([`Error::MixedTls`]), no TLS URL that skips verification, and no TLS settings on the
    /// builder without TLS URLs (`tls_url`: whether the store's URL is TLS).
    #[cfg(any(feature = "sentinel", feature = "cluster"))]
    fn parse_nodes(
        &self,
        own: Option<&str>,
        urls: &[String],
        tls_url: bool,
    ) -> Result<Vec<redis::ConnectionInfo>, Error> {
        let shown = |url: &str| es_core::contract::redact_url(url);
        let (mut tls, mut plaintext) = (Vec::new(), Vec::new());
        if let Some(own) = own {
            if tls_url {
                tls.push(shown(own));
            } else {
                plaintext.push(shown(own));
            }
        }
        let mut infos = Vec::with_capacity(urls.len());
        for url in urls {
            let info = url
                .as_str()
                .into_connection_info()
                .map_err(|source| Error::invalid_url(url, source))?;
            match info.addr() {
                redis::ConnectionAddr::TcpTls { insecure: true, .. } => {
                    return Err(Error::InvalidSetting(INSECURE_REFUSED))
                }
                redis::ConnectionAddr::TcpTls { .. } => tls.push(shown(url)),
                _ => plaintext.push(shown(url)),
            }
            infos.push(info);
        }
        if !tls.is_empty() && !plaintext.is_empty() {
            return Err(Error::MixedTls { tls, plaintext });
        }
        if self.tls.is_set() && !tls_url {
            return Err(Error::InvalidSetting(PLAINTEXT_REFUSED));
        }
        Ok(infos)
    }

    /// The connection to the cluster that `nodes` belong to: TLS to every node or to none,
    /// each node's URL with TCP keepalive; and a connection to the first node for
    /// [`RedisStore::connection`].
    #[cfg(feature = "cluster")]
    async fn join_cluster(
        &self,
        nodes: &[String],
        first: redis::ConnectionInfo,
        tls_url: bool,
        config: ConnectionManagerConfig,
    ) -> Result<(Target, Connection), Error> {
        let tcp = first.tcp_settings().clone();
        let infos = self
            .parse_nodes(None, nodes, tls_url)?
            .into_iter()
            .map(|info| info.set_tcp_settings(tcp.clone()))
            .collect();
        let cluster_nodes = Arc::new(conn::cluster::Nodes {
            seeds: infos,
            #[cfg(feature = "tls")]
            certificates: self.tls_certificates(),
            retries: CLUSTER_RETRIES,
            tcp,
        });
        let cluster = cluster_nodes
            .connect(self.connect_timeout, self.response_timeout)
            .await
            .map_err(|source| Error::connect(&nodes[0], source))?;
        let seed = if tls_url {
            redis::Client::open(self.tls_info(&nodes[0], first)?)
        } else {
            redis::Client::open(first)
        }
        .map_err(|source| Error::invalid_url(&nodes[0], source))?;
        let seed = ConnectionManager::new_with_config(seed, config)
            .await
            .map_err(|source| Error::connect(&nodes[0], source))?;
        Ok((
            Target::Cluster(cluster_nodes),
            Connection::cluster(cluster, seed),
        ))
    }

    /// The CA and client certificate set on the builder, for the cluster's nodes.
    #[cfg(all(feature = "cluster", feature = "tls"))]
    fn tls_certificates(&self) -> Option<redis::TlsCertificates> {
        #[allow(deprecated)]
        let provider = rustls::crypto::ring::default_provider();
        let _ = provider.install_default();
        self.tls.is_set().then(|| redis::TlsCertificates {
            client_tls: self
                .tls
                .client
                .as_ref()
                .map(|(cert, key)| redis::ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
            root_cert: self.tls.root_certificates.clone(),
        })
    }

    /// Without the `cluster` feature the builder has no way to name cluster nodes.
    #[cfg(not(feature = "cluster"))]
    #[allow(clippy::unused_async)] // The same signature as with the feature.
    async fn join_cluster(
        &self,
        _: &[String],
        _: redis::ConnectionInfo,
        _: bool,
        _: ConnectionManagerConfig,
    ) -> Result<(Target, Connection), Error> {
        Err(Error::InvalidSetting(
            "Redis Cluster needs the `cluster` feature of es-redis",
        ))
    }
}

/// How many times a command on a cluster is retried across redirects, failovers, slot moves
/// and reconnections before it fails (with waits of 50 ms doubling up to 2 s: about half a
/// minute in all).
#[cfg(feature = "cluster")]
const CLUSTER_RETRIES: u32 = 20;

/// Why `#insecure` is refused.
const INSECURE_REFUSED: &str = "`#insecure` in a `rediss://` URL turns off certificate checks, \
     which the store does not accept; give the server's CA with `tls_root_certificates`";

/// Why TLS certificates with a `redis://` URL are refused.
const PLAINTEXT_REFUSED: &str = "TLS certificates are set but the URL is not `rediss://`; the \
     store does not connect in plaintext when TLS is configured";

impl RedisStoreBuilder {
    /// The connection settings for the `rediss://` endpoint `url` (parsed as `info`), with the
    /// CA and client certificate set on the builder; without them, the system's CAs.
    #[cfg(feature = "tls")]
    fn tls_info(
        &self,
        url: &str,
        info: redis::ConnectionInfo,
    ) -> Result<redis::ConnectionInfo, Error> {
        // rustls needs a process-wide crypto provider; this crate brings `ring`. If the
        // application installed one already, that one stays. rustls deprecates `ring` for
        // lacking post-quantum key exchange, which Redis built on OpenSSL 3.0 (Debian 12) does
        // not offer either; `ring` builds with a C compiler alone, aws-lc needs more.
        #[allow(deprecated)]
        let provider = rustls::crypto::ring::default_provider();
        let _ = provider.install_default();
        if !self.tls.is_set() {
            return Ok(info);
        }
        let certificates = redis::TlsCertificates {
            client_tls: self
                .tls
                .client
                .as_ref()
                .map(|(cert, key)| redis::ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
            root_cert: self.tls.root_certificates.clone(),
        };
        let client =
            redis::Client::build_with_tls(info, certificates).map_err(|source| Error::Tls {
                url: es_core::contract::redact_url(url),
                source,
            })?;
        Ok(client.get_connection_info().clone())
    }

    /// Without the `tls` feature the `redis` crate refuses `rediss://` URLs when parsing them,
    /// so this is never reached.
    #[cfg(not(feature = "tls"))]
    #[allow(clippy::unused_self, clippy::unnecessary_wraps)] // The same signature as with the feature.
    fn tls_info(
        &self,
        _: &str,
        info: redis::ConnectionInfo,
    ) -> Result<redis::ConnectionInfo, Error> {
        Ok(info)
    }
}

impl RedisStore {
    /// Connects to `url` (`redis://host:port/db`) with the default prefix and settings.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        Self::builder(url).build().await
    }

    /// A builder for a store at `url`, to set the prefix, limits and timings.
    pub fn builder(url: impl Into<String>) -> RedisStoreBuilder {
        RedisStoreBuilder {
            url: url.into(),
            prefix: DEFAULT_PREFIX.to_owned(),
            limits: AppendLimits::default(),
            poll_interval: Duration::from_secs(1),
            response_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            server_check_interval: Duration::from_secs(1),
            page_size: 512,
            group_commit: true,
            allow_eviction: false,
            allow_no_persistence: false,
            tls: TlsOptions::default(),
            sentinel: None,
            wait: None,
            layout: None,
            partitioning: Partitioning::single(),
            cluster: None,
            archive: None,
        }
    }

    /// A builder for a store on the Redis Cluster that `nodes` belong to (`redis://host:port`,
    /// with the user and password if the cluster requires them, the same for every node; one
    /// node is enough, the others are found through it). The store uses the
    /// [tagged](KeyLayout::Tagged) key layout, so that every append touches one hash slot; see
    /// the crate docs, section "Redis Cluster".
    #[cfg(feature = "cluster")]
    pub fn cluster_builder(
        nodes: impl IntoIterator<Item = impl Into<String>>,
    ) -> RedisStoreBuilder {
        let nodes: Vec<String> = nodes.into_iter().map(Into::into).collect();
        let mut builder = Self::builder(nodes.first().cloned().unwrap_or_default());
        builder.cluster = Some(nodes);
        builder
    }

    /// The key names this store uses.
    pub fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    /// The limits enforced on appends.
    pub fn limits(&self) -> AppendLimits {
        self.inner.limits
    }

    /// A handle to the store's connection (it reconnects by itself), for tools and tests that
    /// need to look at the keys directly. With Sentinel it is the connection to the primary of
    /// the moment: after a failover, ask again. On a cluster it is a connection to the first
    /// node given to `RedisStore::cluster_builder` (feature `cluster`), which answers only for
    /// the slots it serves: use `RedisStore::cluster_connection` there.
    pub fn connection(&self) -> ConnectionManager {
        self.inner.conn.current()
    }

    /// On a cluster, the store's cluster connection (it routes each command by its first key
    /// and follows redirects and failovers); `None` for a store on a single server.
    #[cfg(feature = "cluster")]
    pub fn cluster_connection(&self) -> Option<redis::cluster_async::ClusterConnection> {
        self.inner.conn.cluster_connection()
    }

    /// The server's version, persistence and eviction settings, as last read (when the store
    /// was built, then by its background task every
    /// [`server_check_interval`](RedisStoreBuilder::server_check_interval)). See the crate
    /// docs, section "Server settings".
    pub fn server_settings(&self) -> ServerSettings {
        self.inner.server.settings()
    }
}

impl Inner {
    async fn append(&self, request: AppendRequest) -> Result<AppendResult, StoreError> {
        request.validate(&self.limits)?;
        if let Some(refusal) = self.server.refusal() {
            return Err(StoreError::backend(refusal));
        }
        let partition = self.keys.partition_of(&request.stream_id) as usize;
        match self
            .group
            .as_deref()
            .and_then(|groups| groups.get(partition))
        {
            Some(group) => group.append(request).await,
            None => self.appender.execute_one(&request).await,
        }
    }

    /// A multi-stream append: one all-or-nothing script call, never grouped with others.
    async fn append_streams(
        &self,
        requests: Vec<AppendRequest>,
    ) -> Result<Vec<AppendResult>, StoreError> {
        es_core::contract::validate_streams(&requests, &self.limits)?;
        if let Some(refusal) = self.server.refusal() {
            return Err(StoreError::backend(refusal));
        }
        self.appender.execute_streams(&requests).await
    }

    /// The head of `partition`, if the store has it.
    fn head(&self, partition: u32) -> Option<&Arc<Head>> {
        self.heads.get(usize::try_from(partition).ok()?)
    }

    /// Reads the head position of `partition` from the server.
    pub(crate) async fn read_head(&self, partition: u32) -> Result<u64, StoreError> {
        self.keys.partitioning().check(partition)?;
        let (Some(part), Some(head)) = (self.keys.partition(partition), self.head(partition))
        else {
            return Err(StoreError::NoSuchPartition {
                partition,
                partitions: self.keys.partitions(),
            });
        };
        let location = || partition_location("head", partition);
        let mut conn = self.conn.clone();
        let value = script::query(
            &mut conn,
            redis::cmd("HGET").arg(part.index()).arg("position"),
        )
        .await
        .map_err(|e| store_error(e, location))?;
        let position = decode::counter(value, &location())?;
        head.saw(position);
        Ok(position)
    }
}

impl EventStore for RedisStore {
    fn append(&self, request: AppendRequest) -> impl StoreFuture<AppendResult> {
        let inner = Arc::clone(&self.inner);
        async move { inner.append(request).await }
    }

    fn append_streams(&self, requests: Vec<AppendRequest>) -> impl StoreFuture<Vec<AppendResult>> {
        let inner = Arc::clone(&self.inner);
        async move { inner.append_streams(requests).await }
    }

    /// Moves the events out of Redis into the store's archive
    /// ([`RedisStoreBuilder::archive`]); see the crate docs, section "Archiving". Without an
    /// archive, [`StoreError::InvalidArchive`] saying how to configure one, and nothing moves.
    fn archive_stream(
        &self,
        stream: &StreamId,
        before: u64,
    ) -> impl StoreFuture<es_core::Archived> {
        archive::archive_stream(Arc::clone(&self.inner), stream.clone(), before)
    }

    fn stream_version(&self, stream: &StreamId) -> impl StoreFuture<u64> {
        let mut conn = self.inner.conn.clone();
        let key = self.inner.keys.version(stream);
        let stream = stream.clone();
        async move {
            let location = || format!("stream `{stream}` version key");
            let value = script::query(&mut conn, redis::cmd("GET").arg(&key))
                .await
                .map_err(|e| store_error(e, location))?;
            decode::counter(value, &location())
        }
    }

    /// A walk of the keyspace with `SCAN` per page: see the crate docs, section "Listing
    /// streams".
    fn list_streams(&self, list: ListStreams) -> impl StoreFuture<StreamPage> {
        list::list(Arc::clone(&self.inner), list)
    }

    /// With an archive, es-core's stream merge over the hot read (without its limit): gaps in
    /// the hot versions are read from the archive.
    fn read_stream(&self, stream: &StreamId, read: ReadStream) -> EventStream {
        let inner = Arc::clone(&self.inner);
        match &self.inner.archive {
            None => read::stream(inner, stream.clone(), read),
            Some(config) => {
                let hot = read::stream(
                    inner,
                    stream.clone(),
                    ReadStream {
                        limit: None,
                        ..read
                    },
                );
                es_core::contract::merge_stream_read(
                    hot,
                    Arc::clone(&config.archive),
                    stream.clone(),
                    read,
                    self.inner.page_size,
                )
            }
        }
    }

    /// With an archive, es-core's feed merge: per page the head, the hot page, then the
    /// archive up to a bound.
    fn read_all(&self, read: ReadAll) -> EventStream {
        let partition = match read.partition_in(&self.inner.keys.partitioning()) {
            Ok(partition) => partition,
            Err(err) => return es_core::contract::failed_read(err),
        };
        let Some(config) = &self.inner.archive else {
            return read::all(Arc::clone(&self.inner), partition, read);
        };
        let Some(feed) = self
            .inner
            .keys
            .partition(partition)
            .map(|p| Arc::<str>::from(p.feed()))
        else {
            return es_core::contract::failed_read(StoreError::NoSuchPartition {
                partition,
                partitions: self.inner.keys.partitions(),
            });
        };
        let hot = Arc::new(archive::HotPartition {
            inner: Arc::clone(&self.inner),
            partition,
            feed,
        });
        es_core::contract::merge_feed_read(
            hot,
            Arc::clone(&config.archive),
            partition,
            read,
            self.inner.page_size,
        )
    }

    fn partitioning(&self) -> Partitioning {
        self.inner.keys.partitioning()
    }

    fn partition_head(&self, partition: u32) -> impl StoreFuture<u64> {
        let inner = Arc::clone(&self.inner);
        async move { inner.read_head(partition).await }
    }

    fn partition_epochs(&self, partition: u32) -> impl StoreFuture<Vec<EpochStart>> {
        let inner = Arc::clone(&self.inner);
        async move {
            inner.keys.partitioning().check(partition)?;
            let Some(part) = inner.keys.partition(partition) else {
                return Err(StoreError::NoSuchPartition {
                    partition,
                    partitions: inner.keys.partitions(),
                });
            };
            let location = || partition_location("epoch history", partition);
            let mut conn = inner.conn.clone();
            let reply = script::query(
                &mut conn,
                redis::cmd("XRANGE").arg(part.epochs()).arg("-").arg("+"),
            )
            .await
            .map_err(|e| store_error(e, location))?;
            decode::epochs(reply)
        }
    }

    fn wait_for_partition(&self, partition: u32, after: u64) -> impl Future<Output = ()> + Send {
        let inner = &self.inner;
        let poll = inner.poll_interval;
        // A partition the store does not have never moves: wait the polling interval.
        let rx = inner.head(partition).map(|head| {
            if let Some(config) = inner.watch.get(partition as usize) {
                head.ensure_watching(config.clone());
            }
            head.subscribe()
        });
        async move {
            match rx {
                Some(rx) => es_core::contract::wait_on_watch(&rx, after, poll).await,
                None => tokio::time::sleep(poll).await,
            }
        }
    }
}

/// Where a partition's `what` is, for errors: "the head of feed partition 2".
pub(crate) fn partition_location(what: &str, partition: u32) -> String {
    format!("the {what} of feed partition {partition}")
}

impl SnapshotStore for RedisStore {
    fn load_snapshot(&self, stream: &StreamId) -> impl StoreFuture<Option<SnapshotRecord>> {
        let mut conn = self.inner.conn.clone();
        let key = self.inner.keys.snapshot(stream);
        let stream = stream.clone();
        async move {
            let location = || format!("snapshot of `{stream}`");
            let mut cmd = redis::cmd("HMGET");
            cmd.arg(&key)
                .arg("version")
                .arg("schema")
                .arg("payload")
                .arg("recorded_at")
                .arg("event_id");
            let reply = script::query(&mut conn, &cmd)
                .await
                .map_err(|e| store_error(e, location))?;
            decode_snapshot(stream.clone(), reply).map_err(|reason| StoreError::Corrupt {
                location: location(),
                reason,
            })
        }
    }

    fn save_snapshot(&self, snapshot: SnapshotRecord) -> impl StoreFuture<bool> {
        let inner = Arc::clone(&self.inner);
        async move {
            snapshot.validate()?;
            let key = inner.keys.snapshot(&snapshot.stream_id);
            let mut cmd = inner.save_snapshot.command(&[&key]);
            let mut buf = uuid::Uuid::encode_buffer();
            cmd.arg(snapshot.version)
                .arg(snapshot.schema_version)
                .arg(&snapshot.payload[..])
                .arg(snapshot.recorded_at.timestamp_micros())
                .arg(
                    snapshot
                        .event_id
                        .map_or("", |id| id.hyphenated().encode_lower(&mut buf)),
                );
            let mut conn = inner.conn.clone();
            let reply = inner
                .save_snapshot
                .invoke(&mut conn, &cmd)
                .await
                .map_err(|e| store_error(e, || format!("snapshot of `{}`", snapshot.stream_id)))?;
            match reply {
                Value::Int(written) => Ok(written == 1),
                other => Err(StoreError::backend(format!(
                    "unexpected reply from the snapshot script: {other:?}"
                ))),
            }
        }
    }

    fn delete_snapshot(&self, stream: &StreamId, version: u64) -> impl StoreFuture<bool> {
        let inner = Arc::clone(&self.inner);
        let stream = stream.clone();
        async move {
            let key = inner.keys.snapshot(&stream);
            let mut cmd = inner.delete_snapshot.command(&[&key]);
            cmd.arg(version);
            let mut conn = inner.conn.clone();
            let reply = inner
                .delete_snapshot
                .invoke(&mut conn, &cmd)
                .await
                .map_err(|e| store_error(e, || format!("snapshot of `{stream}`")))?;
            match reply {
                Value::Int(deleted) => Ok(deleted == 1),
                other => Err(StoreError::backend(format!(
                    "unexpected reply from the snapshot delete script: {other:?}"
                ))),
            }
        }
    }
}

fn decode_snapshot(stream: StreamId, reply: Value) -> Result<Option<SnapshotRecord>, String> {
    let Value::Array(fields) = reply else {
        return Err("HMGET returned no array".to_owned());
    };
    let mut fields = fields.into_iter();
    let mut next = || fields.next().unwrap_or(Value::Nil);
    let (version, schema, payload, recorded_at, event_id) =
        (next(), next(), next(), next(), next());
    if matches!(version, Value::Nil) {
        return Ok(None);
    }
    let num = |name: &str, v: Value| -> Result<i64, String> {
        match v {
            Value::BulkString(b) => std::str::from_utf8(&b)
                .ok()
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| format!("field `{name}` is not a number")),
            _ => Err(format!("field `{name}` is missing")),
        }
    };
    let version = u64::try_from(num("version", version)?).map_err(|_| "negative version")?;
    let schema_version =
        u32::try_from(num("schema", schema)?).map_err(|_| "schema version out of range")?;
    let Value::BulkString(payload) = payload else {
        return Err("field `payload` is missing".to_owned());
    };
    let recorded_at = DateTime::from_timestamp_micros(num("recorded_at", recorded_at)?)
        .ok_or("recorded_at out of range")?;
    let event_id = match event_id {
        Value::Nil => None,
        Value::BulkString(b) if b.is_empty() => None,
        Value::BulkString(b) => Some(
            std::str::from_utf8(&b)
                .ok()
                .and_then(|t| uuid::Uuid::parse_str(t).ok())
                .ok_or("field `event_id` is not a UUID")?,
        ),
        _ => return Err("field `event_id` is not a string".to_owned()),
    };
    Ok(Some(SnapshotRecord {
        stream_id: stream,
        version,
        schema_version,
        payload: Bytes::from(payload),
        recorded_at,
        event_id,
    }))
}
