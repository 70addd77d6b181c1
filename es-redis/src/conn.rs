//! The store's connection: to one server, or (feature `sentinel`) to the primary that Redis
//! Sentinel names, followed across failovers. See the crate docs, section "Production".

#[cfg(feature = "sentinel")]
use std::sync::Arc;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::{Client, Cmd, Pipeline, RedisFuture, RedisResult, Value};

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
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.kind {
            Kind::Direct(_) => "direct",
            #[cfg(feature = "sentinel")]
            Kind::Sentinel(_) => "sentinel",
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

    /// The connection manager in use now (the current primary's, with Sentinel).
    pub(crate) fn current(&self) -> ConnectionManager {
        match &self.kind {
            Kind::Direct(conn) => conn.clone(),
            #[cfg(feature = "sentinel")]
            Kind::Sentinel(following) => following.current(),
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
        }
    }

    fn get_db(&self) -> i64 {
        match &self.kind {
            Kind::Direct(conn) => conn.get_db(),
            #[cfg(feature = "sentinel")]
            Kind::Sentinel(following) => following.current().get_db(),
        }
    }
}

/// Where the store's own extra connections (the head watcher, the settings monitor) go: a fixed
/// server, or the primary the sentinels name at the time of connecting.
#[derive(Clone)]
pub(crate) enum Target {
    Client(Box<Client>),
    #[cfg(feature = "sentinel")]
    Sentinel(Arc<sentinel::Following>),
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Client(_) => f.write_str("Target::Client"),
            #[cfg(feature = "sentinel")]
            Target::Sentinel(_) => f.write_str("Target::Sentinel"),
        }
    }
}

impl Target {
    /// Whether this target moves to whatever primary the sentinels name.
    pub(crate) fn follows_primary(&self) -> bool {
        !matches!(self, Target::Client(_))
    }

    /// A client for the server to connect to now.
    // Asking the sentinels awaits; without the feature nothing does.
    #[cfg_attr(not(feature = "sentinel"), allow(clippy::unused_async))]
    pub(crate) async fn client(&self) -> RedisResult<Client> {
        match self {
            Target::Client(client) => Ok((**client).clone()),
            #[cfg(feature = "sentinel")]
            Target::Sentinel(following) => following.primary().await,
        }
    }
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
