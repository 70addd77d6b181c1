//! The store's connection: to one server, (feature `sentinel`) to the primary that Redis
//! Sentinel names, followed across failovers, or (feature `cluster`) to a Redis Cluster. See the
//! crate docs, sections "Production" and "Redis Cluster".

#[cfg(any(feature = "sentinel", feature = "cluster"))]
use std::sync::Arc;

use redis::aio::{ConnectionLike, ConnectionManager, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, Cmd, Pipeline, RedisFuture, RedisResult, Value};

/// The store's shared connection: a [`ConnectionManager`] that reconnects by itself, and with
/// Sentinel (feature `sentinel`) one that moves to the new primary after a failover. Cheap to
/// clone; clones share the connection.
#[derive(Clone)]
pub(crate) struct Connection {
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    Direct(ConnectionManager),
    #[cfg(feature = "sentinel")]
    Sentinel(Arc<sentinel::Following>),
    /// A Redis Cluster: the cluster connection routes each command by its first key (and
    /// follows `MOVED`/`ASK` redirects, failovers and slot moves); `seed` is a connection to
    /// the first node given, for [`RedisStore::connection`](crate::RedisStore::connection).
    #[cfg(feature = "cluster")]
    Cluster {
        cluster: redis::cluster_async::ClusterConnection,
        seed: ConnectionManager,
    },
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Direct(_) => "direct",
            #[cfg(feature = "sentinel")]
            Kind::Sentinel(_) => "sentinel",
            #[cfg(feature = "cluster")]
            Kind::Cluster { .. } => "cluster",
        };
        f.debug_struct("Connection")
            .field("kind", &kind)
            .finish_non_exhaustive()
    }
}

impl Connection {
    pub(crate) fn direct(conn: ConnectionManager) -> Self {
        Self {
            kind: Kind::Direct(conn),
        }
    }

    /// The connection manager in use now (the current primary's, with Sentinel; the first
    /// node's, on a cluster).
    pub(crate) fn current(&self) -> ConnectionManager {
        match &self.kind {
            Kind::Direct(conn) => conn.clone(),
            #[cfg(feature = "sentinel")]
            Kind::Sentinel(following) => following.current(),
            #[cfg(feature = "cluster")]
            Kind::Cluster { seed, .. } => seed.clone(),
        }
    }

    #[cfg(feature = "cluster")]
    pub(crate) fn cluster(
        cluster: redis::cluster_async::ClusterConnection,
        seed: ConnectionManager,
    ) -> Self {
        Self {
            kind: Kind::Cluster { cluster, seed },
        }
    }

    /// The cluster connection, on a cluster.
    #[cfg(feature = "cluster")]
    #[allow(clippy::match_wildcard_for_single_variants)] // one variant more with `sentinel`
    pub(crate) fn cluster_connection(&self) -> Option<redis::cluster_async::ClusterConnection> {
        match &self.kind {
            Kind::Cluster { cluster, .. } => Some(cluster.clone()),
            _ => None,
        }
    }

    /// Sends `cmd` where `like` goes: on a cluster, to the primary serving `like`'s first key
    /// (so a script or function is loaded where the call that missed it runs); elsewhere to
    /// the one server.
    pub(crate) async fn query_where(&mut self, cmd: &Cmd, like: &Cmd) -> RedisResult<Value> {
        #[cfg(feature = "cluster")]
        if let Kind::Cluster { cluster, .. } = &mut self.kind {
            use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
            // `FCALL`/`EVALSHA <name> <numkeys> <key> ...`: the first key is the fourth word.
            let slot = match like.args_iter().nth(3) {
                Some(redis::Arg::Simple(key)) => Some(crate::keys::slot_of_key(key)),
                _ => None,
            };
            let routing = slot.map_or(
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary),
                cluster::at_slot,
            );
            return cluster.route_command(cmd.clone(), routing).await;
        }
        let _ = like;
        self.req_packed_command(cmd).await
    }

    /// Whether this is a connection to a Redis Cluster.
    #[cfg_attr(not(feature = "cluster"), allow(clippy::unused_self))]
    pub(crate) fn is_cluster(&self) -> bool {
        #[cfg(feature = "cluster")]
        if let Kind::Cluster { .. } = &self.kind {
            return true;
        }
        false
    }

    /// Sends `cmd` to the primary serving `slot` (on a cluster) or to the one server; a
    /// server's error reply is `Err`.
    pub(crate) async fn query_at_slot(&mut self, cmd: &Cmd, slot: u16) -> RedisResult<Value> {
        #[cfg(feature = "cluster")]
        if let Kind::Cluster { cluster, .. } = &mut self.kind {
            return match cluster
                .route_command(cmd.clone(), cluster::at_slot(slot))
                .await?
            {
                Value::ServerError(err) => Err(err.into()),
                reply => Ok(reply),
            };
        }
        let _ = slot;
        match self.req_packed_command(cmd).await? {
            Value::ServerError(err) => Err(err.into()),
            reply => Ok(reply),
        }
    }

    /// Sends `cmd` to every primary (on a cluster) or to the one server: one reply each, a
    /// server's error reply as `Err`.
    pub(crate) async fn query_every_primary(&mut self, cmd: &Cmd) -> RedisResult<Vec<Value>> {
        #[cfg(feature = "cluster")]
        if let Kind::Cluster { cluster, .. } = &mut self.kind {
            use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
            let routing = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
            return match cluster.route_command(cmd.clone(), routing).await? {
                Value::Map(replies) => replies
                    .into_iter()
                    .map(|(_, reply)| match reply {
                        Value::ServerError(err) => Err(err.into()),
                        reply => Ok(reply),
                    })
                    .collect(),
                Value::ServerError(err) => Err(err.into()),
                other => Ok(vec![other]),
            };
        }
        match self.req_packed_command(cmd).await? {
            Value::ServerError(err) => Err(err.into()),
            reply => Ok(vec![reply]),
        }
    }

    #[cfg(feature = "sentinel")]
    pub(crate) fn sentinel(following: Arc<sentinel::Following>) -> Self {
        Self {
            kind: Kind::Sentinel(following),
        }
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.kind {
            Kind::Direct(conn) => conn.req_packed_command(cmd),
            #[cfg(feature = "sentinel")]
            Kind::Sentinel(following) => {
                let following = Arc::clone(following);
                Box::pin(async move {
                    let mut conn = following.current();
                    let result = conn.req_packed_command(cmd).await;
                    following.after(result.as_ref().map(std::slice::from_ref));
                    result
                })
            }
            #[cfg(feature = "cluster")]
            Kind::Cluster { cluster, .. } => cluster.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.kind {
            Kind::Direct(conn) => conn.req_packed_commands(cmd, offset, count),
            #[cfg(feature = "sentinel")]
            Kind::Sentinel(following) => {
                let following = Arc::clone(following);
                Box::pin(async move {
                    let mut conn = following.current();
                    let result = conn.req_packed_commands(cmd, offset, count).await;
                    following.after(result.as_ref().map(Vec::as_slice));
                    result
                })
            }
            #[cfg(feature = "cluster")]
            Kind::Cluster { cluster, .. } => cluster.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.kind {
            Kind::Direct(conn) => conn.get_db(),
            #[cfg(feature = "sentinel")]
            Kind::Sentinel(following) => following.current().get_db(),
            #[cfg(feature = "cluster")]
            Kind::Cluster { .. } => 0,
        }
    }
}

/// Where the store's own extra connections (the head watcher, the settings monitor) go: a fixed
/// server, the primary the sentinels name at the time of connecting, or a cluster.
#[derive(Clone)]
pub(crate) enum Target {
    Client(Box<Client>),
    #[cfg(feature = "sentinel")]
    Sentinel(Arc<sentinel::Following>),
    #[cfg(feature = "cluster")]
    Cluster(Arc<cluster::Nodes>),
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Client(_) => f.write_str("Target::Client"),
            #[cfg(feature = "sentinel")]
            Target::Sentinel(_) => f.write_str("Target::Sentinel"),
            #[cfg(feature = "cluster")]
            Target::Cluster(_) => f.write_str("Target::Cluster"),
        }
    }
}

impl Target {
    /// Whether this target moves to whatever primary the sentinels name.
    #[cfg_attr(not(feature = "sentinel"), allow(clippy::unused_self))]
    pub(crate) fn follows_primary(&self) -> bool {
        #[cfg(feature = "sentinel")]
        if matches!(self, Target::Sentinel(_)) {
            return true;
        }
        false
    }

    /// A connection of its own, with these time-outs.
    // Asking the sentinels awaits; without the feature nothing does.
    pub(crate) async fn connect(
        &self,
        connect_timeout: std::time::Duration,
        response_timeout: std::time::Duration,
    ) -> RedisResult<Side> {
        let settings = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(response_timeout));
        let client = match self {
            Target::Client(client) => (**client).clone(),
            #[cfg(feature = "sentinel")]
            Target::Sentinel(following) => following.primary().await?,
            #[cfg(feature = "cluster")]
            Target::Cluster(nodes) => {
                return Ok(Side::Cluster(
                    nodes.connect(connect_timeout, response_timeout).await?,
                ))
            }
        };
        Ok(Side::Node(
            client
                .get_multiplexed_async_connection_with_config(&settings)
                .await?,
        ))
    }
}

/// A connection of the store's background tasks: to one server, or to a cluster.
#[derive(Clone)]
pub(crate) enum Side {
    Node(MultiplexedConnection),
    #[cfg(feature = "cluster")]
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Side {
    /// On a cluster, a connection that sends every command to the primary serving `slot`.
    #[cfg(feature = "cluster")]
    pub(crate) fn at_slot(&self, slot: u16) -> AtSlot {
        match self {
            Side::Node(conn) => AtSlot::Node(conn.clone()),
            Side::Cluster(conn) => AtSlot::Cluster(conn.clone(), slot),
        }
    }
}

impl ConnectionLike for Side {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Side::Node(conn) => conn.req_packed_command(cmd),
            #[cfg(feature = "cluster")]
            Side::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Side::Node(conn) => conn.req_packed_commands(cmd, offset, count),
            #[cfg(feature = "cluster")]
            Side::Cluster(conn) => conn.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Side::Node(conn) => conn.get_db(),
            #[cfg(feature = "cluster")]
            Side::Cluster(_) => 0,
        }
    }
}

/// A connection pinned to the primary of one hash slot on a cluster (server commands such as
/// `INFO` and `CONFIG GET` then read that node), or to the one server.
#[cfg(feature = "cluster")]
pub(crate) enum AtSlot {
    Node(MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection, u16),
}

#[cfg(feature = "cluster")]
impl ConnectionLike for AtSlot {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            AtSlot::Node(conn) => conn.req_packed_command(cmd),
            AtSlot::Cluster(conn, slot) => {
                let routing = cluster::at_slot(*slot);
                Box::pin(conn.route_command(cmd.clone(), routing))
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            AtSlot::Node(conn) => conn.req_packed_commands(cmd, offset, count),
            AtSlot::Cluster(conn, slot) => {
                use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
                let route =
                    SingleNodeRoutingInfo::SpecificNode(Route::new(*slot, SlotAddr::Master));
                Box::pin(conn.route_pipeline(cmd.clone(), offset, count, route))
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            AtSlot::Node(conn) => conn.get_db(),
            AtSlot::Cluster(..) => 0,
        }
    }
}

#[cfg(feature = "cluster")]
pub(crate) mod cluster {
    //! Connections to a Redis Cluster.

    use std::time::Duration;

    use redis::cluster::{ClusterClient, ClusterClientBuilder};
    use redis::cluster_async::ClusterConnection;
    use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
    use redis::{ConnectionInfo, RedisResult};

    /// The routing of a command to the primary serving `slot`.
    pub(crate) fn at_slot(slot: u16) -> RoutingInfo {
        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(
            slot,
            SlotAddr::Master,
        )))
    }

    /// The nodes to start from and how to reach them (user, password, TLS), for the store's
    /// connections to the cluster.
    pub(crate) struct Nodes {
        pub(crate) seeds: Vec<ConnectionInfo>,
        /// The CA and client certificate for `rediss://` nodes (feature `tls`).
        #[cfg(feature = "tls")]
        pub(crate) certificates: Option<redis::TlsCertificates>,
        /// How many times a command is retried across redirects, failovers and reconnections.
        pub(crate) retries: u32,
        /// TCP settings (keepalive) for every node connection.
        pub(crate) tcp: redis::io::tcp::TcpSettings,
    }

    impl Nodes {
        /// A client with these time-outs.
        pub(crate) fn client(
            &self,
            connect_timeout: Duration,
            response_timeout: Duration,
        ) -> RedisResult<ClusterClient> {
            let builder = ClusterClientBuilder::new(self.seeds.clone())
                .connection_timeout(connect_timeout)
                .response_timeout(response_timeout)
                .retries(self.retries)
                .tcp_settings(self.tcp.clone())
                .min_retry_wait(MIN_RETRY_WAIT_MS)
                .max_retry_wait(MAX_RETRY_WAIT_MS);
            #[cfg(feature = "tls")]
            let builder = match &self.certificates {
                Some(certificates) => builder.certs(certificates.clone()),
                None => builder,
            };
            builder.build()
        }

        /// A cluster connection of its own, with these time-outs.
        pub(crate) async fn connect(
            &self,
            connect_timeout: Duration,
            response_timeout: Duration,
        ) -> RedisResult<ClusterConnection> {
            self.client(connect_timeout, response_timeout)?
                .get_async_connection()
                .await
        }
    }

    /// The shortest and longest wait between two tries of a command that met a failover, a
    /// slot being moved (`TRYAGAIN`) or a lost connection, in milliseconds: with the default
    /// 20 retries, a command keeps trying for about half a minute, longer than a failover
    /// takes with a `cluster-node-timeout` of a few seconds.
    const MIN_RETRY_WAIT_MS: u64 = 50;
    const MAX_RETRY_WAIT_MS: u64 = 2_000;
}

#[cfg(feature = "sentinel")]
pub(crate) mod sentinel {
    //! Following the primary that Redis Sentinel names.

    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, PoisonError, RwLock};
    use std::time::Duration;

    use redis::aio::{ConnectionManager, ConnectionManagerConfig};
    use redis::{
        AsyncConnectionConfig, Client, ConnectionAddr, ConnectionInfo, ErrorKind, RedisError,
        RedisResult, Value,
    };

    /// The current primary's connection, and the sentinels to ask when it fails.
    pub(crate) struct Following {
        /// The sentinels' connection settings, with the TLS settings (CA, client certificate)
        /// if their URLs are `rediss://`.
        sentinels: Vec<ConnectionInfo>,
        /// The primary's connection settings (user, password, database, TCP, TLS), without its
        /// address.
        node: ConnectionInfo,
        /// The primary's address and connection.
        current: RwLock<(String, ConnectionManager)>,
        config: ConnectionManagerConfig,
        refreshing: AtomicBool,
        service: String,
    }

    /// How often a refresh asks the sentinels before it gives up until the next failure: a
    /// failover takes the sentinels' `down-after-milliseconds` and an election, seconds.
    const REFRESH_ATTEMPTS: u32 = 20;
    const REFRESH_DELAY: Duration = Duration::from_millis(250);

    /// Where finding the primary failed.
    #[derive(Debug)]
    pub(crate) enum Endpoint {
        /// At the sentinel of this index (in the order given to the builder); or, when no
        /// majority names a primary, the last sentinel that failed (the first if none did).
        Sentinel(usize),
        /// At the server the sentinels name (`host:port`).
        Primary(String),
    }

    impl Following {
        /// Asks the sentinels for the primary of `service` and connects to it.
        pub(crate) async fn connect(
            sentinels: Vec<ConnectionInfo>,
            service: &str,
            node: ConnectionInfo,
            config: ConnectionManagerConfig,
        ) -> Result<Arc<Self>, (Endpoint, RedisError)> {
            let primary = find_primary(&sentinels, &node, service, &config).await?;
            let address = primary.get_connection_info().addr().to_string();
            let conn = ConnectionManager::new_with_config(primary, config.clone())
                .await
                .map_err(|err| (Endpoint::Primary(address.clone()), err))?;
            tracing::info!(service, primary = %address, "Redis Sentinel names the primary");
            Ok(Arc::new(Self {
                sentinels,
                node,
                current: RwLock::new((address, conn)),
                config,
                refreshing: AtomicBool::new(false),
                service: service.to_owned(),
            }))
        }

        /// A client for the primary the sentinels name now (see [`find_primary`]).
        pub(crate) async fn primary(&self) -> RedisResult<Client> {
            find_primary(&self.sentinels, &self.node, &self.service, &self.config)
                .await
                .map_err(|(_, err)| err)
        }

        pub(crate) fn current(&self) -> ConnectionManager {
            self.current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .1
                .clone()
        }

        /// After a command: if it failed the way a failover makes commands fail (the connection
        /// lost, or the server now a replica), asks the sentinels in the background.
        pub(crate) fn after(self: &Arc<Self>, result: Result<&[Value], &redis::RedisError>) {
            let failed = match result {
                Err(err) => {
                    err.is_io_error()
                        || err.is_connection_dropped()
                        || err.is_connection_refusal()
                        || err.is_timeout()
                        || matches!(err.code(), Some("READONLY" | "MASTERDOWN" | "LOADING"))
                }
                Ok(values) => values.iter().any(|value| {
                    matches!(value, Value::ServerError(err)
                        if matches!(err.code(), "READONLY" | "MASTERDOWN" | "LOADING"))
                }),
            };
            if failed && !self.refreshing.swap(true, Ordering::AcqRel) {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime.spawn(Arc::clone(self).refresh());
                } else {
                    self.refreshing.store(false, Ordering::Release);
                }
            }
        }

        /// Asks the sentinels until they name a primary other than the current one (or the
        /// current one answers as a primary again), and moves the connection there.
        async fn refresh(self: Arc<Self>) {
            for _ in 0..REFRESH_ATTEMPTS {
                match find_primary(&self.sentinels, &self.node, &self.service, &self.config).await {
                    Ok(client) => {
                        let address = client.get_connection_info().addr().to_string();
                        let same = self
                            .current
                            .read()
                            .unwrap_or_else(PoisonError::into_inner)
                            .0
                            == address;
                        if same {
                            // The sentinels have not failed over (yet), or the primary is back.
                            tokio::time::sleep(REFRESH_DELAY).await;
                            continue;
                        }
                        match ConnectionManager::new_with_config(client, self.config.clone()).await
                        {
                            Ok(conn) => {
                                tracing::warn!(
                                    service = %self.service,
                                    primary = %address,
                                    "Redis Sentinel names a new primary; the store follows it"
                                );
                                *self.current.write().unwrap_or_else(PoisonError::into_inner) =
                                    (address, conn);
                                break;
                            }
                            Err(err) => {
                                tracing::debug!(error = %err, primary = %address, "cannot connect to the new primary yet");
                            }
                        }
                    }
                    // Waiting does not mend a certificate: say so where operators look.
                    Err((at, err)) if crate::error::is_tls_error(&err) => {
                        tracing::warn!(
                            error = %err,
                            endpoint = ?at,
                            "TLS to Redis fails (the certificate is not trusted or does not name \
                             the address); the store cannot follow the primary"
                        );
                    }
                    Err((Endpoint::Primary(address), err)) => {
                        tracing::debug!(error = %err, primary = %address, "the server the sentinels name is not a primary yet");
                    }
                    Err((Endpoint::Sentinel(_), err)) => {
                        tracing::debug!(error = %err, "the sentinels name no primary yet");
                    }
                }
                tokio::time::sleep(REFRESH_DELAY).await;
            }
            self.refreshing.store(false, Ordering::Release);
        }
    }

    /// A client for the primary that a majority of the sentinels name now, once it answers
    /// `ROLE` as a primary. A sentinel that has not heard of a failover yet names the old
    /// primary, which may be back as a primary for a moment before the sentinels make it a
    /// replica; a majority does not follow it there.
    ///
    /// The primary is reached at the address the sentinels report (an IP address unless they
    /// announce host names), over TLS if `node` is a TLS address, with its CA and client
    /// certificate: its certificate must be valid for that address.
    async fn find_primary(
        sentinels: &[ConnectionInfo],
        node: &ConnectionInfo,
        service: &str,
        config: &ConnectionManagerConfig,
    ) -> Result<Client, (Endpoint, RedisError)> {
        let timeouts = AsyncConnectionConfig::new()
            .set_connection_timeout(config.connection_timeout())
            .set_response_timeout(config.response_timeout());
        let mut votes: HashMap<(String, u16), usize> = HashMap::new();
        let mut last_error = None;
        for (index, sentinel) in sentinels.iter().enumerate() {
            let named: RedisResult<Option<(String, u16)>> = async {
                let mut conn = Client::open(sentinel.clone())?
                    .get_multiplexed_async_connection_with_config(&timeouts)
                    .await?;
                redis::cmd("SENTINEL")
                    .arg("GET-MASTER-ADDR-BY-NAME")
                    .arg(service)
                    .query_async(&mut conn)
                    .await
            }
            .await;
            match named {
                Ok(Some(address)) => *votes.entry(address).or_default() += 1,
                Ok(None) => {}
                Err(err) => last_error = Some((Endpoint::Sentinel(index), err)),
            }
        }
        let majority = sentinels.len() / 2 + 1;
        let Some(((host, port), _)) = votes.into_iter().find(|(_, n)| *n >= majority) else {
            return Err(last_error.unwrap_or_else(|| {
                let err = RedisError::from((
                    ErrorKind::MasterNameNotFoundBySentinel,
                    "no majority of the sentinels names a primary",
                    service.to_owned(),
                ));
                (Endpoint::Sentinel(0), err)
            }));
        };
        let address = format!("{host}:{port}");
        let at_primary = |err| (Endpoint::Primary(address.clone()), err);
        let client =
            Client::open(node.clone().set_addr(at(node.addr(), host, port))).map_err(at_primary)?;
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&timeouts)
            .await
            .map_err(at_primary)?;
        let role: Value = redis::cmd("ROLE")
            .query_async(&mut conn)
            .await
            .map_err(at_primary)?;
        match role {
            Value::Array(items) if matches!(items.first(), Some(Value::BulkString(r)) if r == b"master") => {
                Ok(client)
            }
            other => Err(at_primary(RedisError::from((
                ErrorKind::Server(redis::ServerErrorKind::ReadOnly),
                "the server the sentinels name is not a primary (yet)",
                format!("{other:?}"),
            )))),
        }
    }

    /// `node`'s kind of address (TLS with its settings, or plain TCP) at `host` and `port`.
    fn at(node: &ConnectionAddr, host: String, port: u16) -> ConnectionAddr {
        match node {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host,
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => ConnectionAddr::Tcp(host, port),
        }
    }
}
