//! Failover for real: a primary, a replica and three sentinels on loopback, each a process of
//! its own. Eight writers append through a store that finds the primary through the sentinels;
//! the replica is frozen (SIGSTOP) for a moment, as a lagging replica would be, the primary is
//! killed with SIGKILL during the appends, the sentinels promote the replica, and the store
//! follows it. With `min_replicas_acked(1, ..)` every acknowledged append is on the promoted
//! replica; without it, the appends acknowledged while the replica lagged are lost, which the
//! test measures and which readers past the surviving head learn of (`LostTail`).
//!
//! With the `tls` feature the same group runs over TLS only (`port 0`, `tls-port`,
//! `tls-replication yes`, the sentinels likewise) with a password on every server and sentinel:
//! the store reaches the sentinels and the primary they name over TLS, verifying both against
//! the test CA, and follows the failover; a wrong CA, a primary certificate not valid for the
//! address the sentinels report, and TLS for some endpoints but not others are typed errors.
#![cfg(feature = "sentinel")]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use es_core::{
    AppendRequest, AppendResult, EventFilter, EventStore, ExpectedVersion, NewEvent, ReadStream,
    StoreError, StreamId,
};
use es_redis::redis;
use es_redis::{Error, RedisStore, RedisStoreBuilder};
use es_test_support::{scratch_dir, RedisSentinel, RedisServer, SentinelConfig, TestCerts};
use futures::{StreamExt, TryStreamExt};

const SERVICE: &str = "es-primary";
const WRITERS: usize = 8;
const PATIENCE: Duration = Duration::from_secs(60);

/// How the servers and sentinels of a group are reached.
#[derive(Clone, Default)]
struct Security {
    /// TLS only, with these certificates (the servers' may be replaced by `node_certs`).
    certs: Option<TestCerts>,
    /// Other certificates for the primary and the replica than `certs`, signed by the same CA,
    /// for `localhost`.
    node_certs: Option<TestCerts>,
    /// The password every server and sentinel requires.
    password: Option<&'static str>,
}

impl Security {
    /// In plaintext, without passwords.
    fn plain() -> Self {
        Self::default()
    }

    /// TLS only and a password, with certificates the test makes in its scratch directory.
    #[cfg(feature = "tls")]
    fn tls(name: &str) -> Self {
        let certs =
            TestCerts::generate(&scratch_dir(name).join("certs")).expect("make test certificates");
        Self {
            certs: Some(certs),
            node_certs: None,
            password: Some(PASSWORD),
        }
    }

    /// `redis://127.0.0.1:<port>`, or `rediss://`, with the password if there is one. With
    /// `node_certs`, the host is `localhost` instead, the name those certificates are for.
    fn url(&self, port: u16) -> String {
        let host = if self.node_certs.is_some() {
            "localhost"
        } else {
            "127.0.0.1"
        };
        let scheme = if self.certs.is_some() {
            "rediss"
        } else {
            "redis"
        };
        let auth = self
            .password
            .map(|password| format!(":{password}@"))
            .unwrap_or_default();
        format!("{scheme}://{auth}{host}:{port}")
    }

    /// A store builder for the group's primary behind the sentinels, trusting the test CA.
    fn builder(&self, sentinels: &[RedisSentinel]) -> RedisStoreBuilder {
        let urls: Vec<String> = sentinels.iter().map(|s| self.url(s.port())).collect();
        // The URL gives the password; its host and port are not used.
        let builder = RedisStore::builder(self.url(1)).sentinels(SERVICE, urls);
        match &self.certs {
            #[cfg(feature = "tls")]
            Some(certs) => builder.tls_root_certificates(pem(&certs.ca_cert)),
            _ => builder,
        }
    }

    /// An administrator's connection to the server or sentinel on `port`.
    async fn connect(&self, port: u16) -> redis::aio::MultiplexedConnection {
        let url = self.url(port);
        let client = match &self.certs {
            #[cfg(feature = "tls")]
            Some(certs) => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem(&certs.ca_cert)),
                },
            ),
            _ => redis::Client::open(url),
        };
        client
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    async fn info(&self, port: u16, section: &str) -> String {
        let mut conn = self.connect(port).await;
        redis::cmd("INFO")
            .arg(section)
            .query_async(&mut conn)
            .await
            .unwrap()
    }

    /// The primary's address (host, port) that the sentinel on `port` names.
    async fn named(&self, port: u16) -> (String, u16) {
        redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(SERVICE)
            .query_async(&mut self.connect(port).await)
            .await
            .unwrap()
    }

    /// A data server with the arguments `args`, a password and TLS if the group has them.
    fn server(&self, dir: &std::path::Path, args: &[&str]) -> RedisServer {
        let mut all = vec!["--appendonly", "yes", "--appendfsync", "always"];
        if let Some(password) = self.password {
            // The primary comes back as a replica after the kill: both need both.
            all.extend(["--requirepass", password, "--masterauth", password]);
        }
        all.extend(args);
        match self.node_certs.as_ref().or(self.certs.as_ref()) {
            Some(certs) => RedisServer::start_tls(dir, certs, &all),
            None => RedisServer::start(dir, &all),
        }
        .expect("start redis-server")
    }
}

/// The password of every server and sentinel of a TLS group.
#[cfg(feature = "tls")]
const PASSWORD: &str = "stls-s3cret-pw";

#[cfg(feature = "tls")]
fn pem(path: &std::path::Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// A primary, its replica and three sentinels (quorum 2, down after 1 s).
struct Group {
    primary: RedisServer,
    replica: RedisServer,
    sentinels: Vec<RedisSentinel>,
    security: Security,
}

fn field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.trim_end().strip_prefix(name)?.strip_prefix(':'))
}

async fn start_group(name: &str, security: Security) -> Group {
    let dir = scratch_dir(name);
    let primary = security.server(&dir.join("primary"), &[]);
    let port = primary.port().to_string();
    let replica = security.server(&dir.join("replica"), &["--replicaof", "127.0.0.1", &port]);
    let started = Instant::now();
    while field(
        &security.info(replica.port(), "replication").await,
        "master_link_status",
    ) != Some("up")
    {
        assert!(started.elapsed() < PATIENCE, "the replica did not sync");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sentinels = (0..3)
        .map(|i| {
            RedisSentinel::start_with(
                &dir.join(format!("sentinel-{i}")),
                &SentinelConfig {
                    service: SERVICE,
                    primary_port: primary.port(),
                    quorum: 2,
                    down_after_ms: 1000,
                    tls: security.certs.as_ref(),
                    password: security.password,
                },
            )
            .expect("start a sentinel")
        })
        .collect();
    Group {
        primary,
        replica,
        sentinels,
        security,
    }
}

/// One acknowledged append: its request and result.
type Acked = (AppendRequest, AppendResult);

/// What a run saw.
struct Run {
    store: RedisStore,
    acked: Vec<Acked>,
    /// Appends acknowledged while the replica was frozen (before the kill).
    acked_while_frozen: usize,
    /// Appends acknowledged after the last point the replica was known to hold everything
    /// acknowledged (a `WAIT` just before the freeze), up to the kill: what a failover can lose.
    acked_since_sync: usize,
    /// How long after the kill the sentinels named the new primary.
    failover: Duration,
    /// How long after the kill the first append was acknowledged by the new primary.
    recovery: Duration,
    /// Appends refused because the replica did not acknowledge them in time.
    not_replicated: usize,
    group: Group,
}

/// Stops the replica and has the primary drop its link, so that what the primary writes from
/// now on reaches no replica (what a network partition or a slow replica does); 300 ms later
/// kills the primary with SIGKILL and lets the replica go on. Waits for all sentinels to name
/// the promoted replica, then restarts the old primary (from its AOF, with the appends the replica never
/// got), which the sentinels make a replica of the new one, discarding them. Returns the appends
/// acknowledged during the lag, the appends acknowledged when the primary was killed, the
/// appends acknowledged before the replica was last seen in sync, when the kill was, and how long
/// the sentinels took.
async fn lag_and_kill(
    group: &mut Group,
    acked_count: &AtomicUsize,
) -> (usize, usize, usize, Instant, Duration) {
    // Everything acknowledged before the WAIT was written before it, so the replica holds it
    // when the WAIT answers: only what is acknowledged after this count can be lost.
    let before_sync = acked_count.load(Ordering::Relaxed);
    let synced: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(10_000)
        .query_async(&mut group.security.connect(group.primary.port()).await)
        .await
        .unwrap();
    assert_eq!(synced, 1, "the replica is in sync before it is frozen");
    let replica_pid = group.replica.pid().unwrap();
    common::signal(replica_pid, "STOP");
    let before_freeze = acked_count.load(Ordering::Relaxed);
    let _: redis::Value = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("replica")
        .query_async(&mut group.security.connect(group.primary.port()).await)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let acked_while_frozen = acked_count.load(Ordering::Relaxed) - before_freeze;
    tokio::task::block_in_place(|| group.primary.kill9()).unwrap();
    let killed_at = Instant::now();
    let at_kill = acked_count.load(Ordering::Relaxed);
    common::signal(replica_pid, "CONT");

    // Every sentinel names the new primary before the old one comes back: one that has not
    // heard of the failover yet would otherwise take the returning old primary back as the
    // primary (split brain), which is Sentinel's to prevent, not the store's.
    let replica_port = group.replica.port();
    for sentinel in group.sentinels.iter().map(RedisSentinel::port) {
        loop {
            if group.security.named(sentinel).await.1 == replica_port {
                break;
            }
            assert!(
                killed_at.elapsed() < PATIENCE,
                "the sentinels did not fail over"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let failover = killed_at.elapsed();
    tokio::task::block_in_place(|| group.primary.restart()).unwrap();
    (
        acked_while_frozen,
        at_kill,
        before_sync,
        killed_at,
        failover,
    )
}

/// A writer appending 1 to 3 events at a time to a stream of its own until `stop`, retrying
/// each append while the store is unavailable; returns what was acknowledged.
fn spawn_writer(
    w: usize,
    store: RedisStore,
    stop: Arc<AtomicBool>,
    acked_count: Arc<AtomicUsize>,
    not_replicated: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<Vec<Acked>> {
    tokio::spawn(async move {
        let stream = StreamId::new("account", &w.to_string()).unwrap();
        let mut acked = Vec::new();
        let mut n = 0_usize;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let events = (0..=n % 3)
                .map(|i| NewEvent::new("Deposited", 1, format!("{{\"n\":{n},\"i\":{i}}}")).unwrap())
                .collect();
            let request = AppendRequest::new(stream.clone(), ExpectedVersion::Any, events);
            let started = Instant::now();
            loop {
                match store.append(request.clone()).await {
                    Ok(result) => {
                        acked.push((request, result));
                        acked_count.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Err(StoreError::Unavailable(source)) => {
                        if matches!(
                            source.downcast_ref::<Error>(),
                            Some(Error::ReplicasNotAcked { .. })
                        ) {
                            not_replicated.fetch_add(1, Ordering::Relaxed);
                        }
                        assert!(
                            started.elapsed() < PATIENCE,
                            "unavailable too long: {source}"
                        );
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(other) => panic!("append failed: {other}"),
                }
            }
        }
        acked
    })
}

async fn run(name: &str, security: Security, wait: bool) -> Run {
    let group = start_group(name, security).await;
    let security = group.security.clone();
    let mut builder = security
        .builder(&group.sentinels)
        .prefix("failover")
        .connect_timeout(Duration::from_millis(500))
        .response_timeout(Duration::from_secs(2));
    if wait {
        builder = builder.min_replicas_acked(1, Duration::from_millis(500));
    }
    let store = builder
        .build()
        .await
        .expect("a store through the sentinels");
    let primary_run_id = store.server_settings().run_id;
    let replica_run_id = field(
        &security.info(group.replica.port(), "server").await,
        "run_id",
    )
    .unwrap()
    .to_owned();

    let stop = Arc::new(AtomicBool::new(false));
    let acked_count = Arc::new(AtomicUsize::new(0));
    let not_replicated = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            spawn_writer(
                w,
                store.clone(),
                Arc::clone(&stop),
                Arc::clone(&acked_count),
                Arc::clone(&not_replicated),
            )
        })
        .collect();

    // Appends flow to both; then the replica lags (frozen) while appends go on, and the primary
    // dies.
    let wait_for = |count: usize| {
        let acked_count = Arc::clone(&acked_count);
        async move {
            let started = Instant::now();
            while acked_count.load(Ordering::Relaxed) < count {
                assert!(started.elapsed() < PATIENCE, "appends stalled");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    wait_for(200).await;
    let mut group = group;
    let (acked_while_frozen, at_kill, before_sync, killed_at, failover) =
        lag_and_kill(&mut group, &acked_count).await;
    wait_for(at_kill + 1).await;
    let recovery = killed_at.elapsed();
    wait_for(at_kill + 200).await;
    stop.store(true, Ordering::Relaxed);

    let mut acked = Vec::new();
    for writer in writers {
        acked.extend(
            tokio::time::timeout(PATIENCE, writer)
                .await
                .unwrap()
                .unwrap(),
        );
    }

    // The store follows the primary the sentinels name (the promoted replica; under the load of
    // these tests the sentinels have been seen to fail over once more, back to the returned old
    // primary once it had resynchronised): its settings monitor reads that server's run_id.
    let started = Instant::now();
    loop {
        let (_, port) = security.named(group.sentinels[0].port()).await;
        let primary = security.info(port, "server").await;
        let role = security.info(port, "replication").await;
        let settings = store.server_settings();
        if field(&primary, "run_id") == Some(settings.run_id.as_str())
            && field(&role, "role") == Some("master")
            && settings.run_id != primary_run_id
        {
            break;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the store did not follow the primary the sentinels name (127.0.0.1:{port}, run_id \
             {:?}; the promoted replica's is {replica_run_id}, the first primary's \
             {primary_run_id}); the store's settings: {settings}",
            field(&primary, "run_id"),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    Run {
        store,
        acked,
        acked_while_frozen,
        acked_since_sync: at_kill - before_sync,
        failover,
        recovery,
        not_replicated: not_replicated.load(Ordering::Relaxed),
        group,
    }
}

/// The acknowledged appends whose events the store no longer holds at the acknowledged
/// versions, with the highest acknowledged position among them.
async fn lost(run: &Run) -> Vec<&Acked> {
    let mut streams: HashMap<StreamId, HashMap<u64, uuid::Uuid>> = HashMap::new();
    for (request, _) in &run.acked {
        if streams.contains_key(&request.stream_id) {
            continue;
        }
        let events: Vec<_> = run
            .store
            .read_stream(&request.stream_id, ReadStream::forward())
            .try_collect()
            .await
            .unwrap();
        streams.insert(
            request.stream_id.clone(),
            events
                .into_iter()
                .map(|e| (e.stream_version, e.event_id))
                .collect(),
        );
    }
    run.acked
        .iter()
        .filter(|(request, result)| {
            let stored = &streams[&request.stream_id];
            let first = result.stream_version + 1 - request.events.len() as u64;
            request
                .events
                .iter()
                .enumerate()
                .any(|(i, e)| stored.get(&(first + i as u64)) != Some(&e.event_id))
        })
        .collect()
}

/// With `min_replicas_acked(1, ..)` nothing acknowledged is lost, and a reader at the last
/// position acknowledged before the failover reads on.
async fn nothing_acknowledged_is_lost(name: &str, security: Security) {
    let tls = security.certs.is_some();
    let run = run(name, security, true).await;
    let lost = lost(&run).await;
    eprintln!(
        "min_replicas_acked(1){}: {} appends acknowledged, {} while the replica was frozen, {} \
         refused as not replicated and retried, failover {:?} and first acknowledgement {:?} \
         after the kill; lost: {}",
        if tls { " over TLS" } else { "" },
        run.acked.len(),
        run.acked_while_frozen,
        run.not_replicated,
        run.failover,
        run.recovery,
        lost.len()
    );
    assert!(lost.is_empty(), "acknowledged appends lost: {}", lost.len());
    assert!(
        run.not_replicated > 0,
        "the frozen replica refused no append"
    );
    // At most one append per writer, whose WAIT the replica answered just before it froze, is
    // acknowledged after the freeze began; nothing written after it is.
    assert!(
        run.acked_while_frozen <= WRITERS,
        "{} appends were acknowledged while the only replica could not have them",
        run.acked_while_frozen
    );

    // The promoted replica began an epoch; a reader at the last acknowledged position before
    // the failover reads on without a loss.
    let epochs = run.store.epochs().await.unwrap();
    assert!(epochs.len() >= 2, "{epochs:?}");
    let last_before = run
        .acked
        .iter()
        .filter_map(|(_, r)| r.positions.last().copied())
        .filter(|p| es_core::contract::position::epoch_of(*p) < epochs.last().unwrap().epoch)
        .max()
        .unwrap();
    let mut feed = run.store.subscribe(last_before, EventFilter::all());
    let first = tokio::time::timeout(PATIENCE, feed.next()).await.unwrap();
    assert!(matches!(first, Some(Ok(_))), "{first:?}");
    drop(run.group);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_min_replicas_acked_every_acknowledged_append_survives_a_failover() {
    nothing_acknowledged_is_lost("redis-failover-wait", Security::plain()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_min_replicas_acked_a_failover_loses_what_the_replica_lacked_and_readers_learn_of_it(
) {
    let run = run("redis-failover-async", Security::plain(), false).await;
    let lost = lost(&run).await;
    eprintln!(
        "asynchronous replication: {} appends acknowledged, {} while the replica was frozen \
         (300 ms), failover {:?} and first acknowledgement {:?} after the kill; lost: {}",
        run.acked.len(),
        run.acked_while_frozen,
        run.failover,
        run.recovery,
        lost.len()
    );
    assert!(
        run.acked_while_frozen > 0,
        "nothing was appended while the replica lagged"
    );
    assert!(
        !lost.is_empty(),
        "a lagging replica lost nothing: the test did not lag it"
    );
    // What is lost is what the replica lacked: at most what was acknowledged after it was last
    // seen in sync (mostly while it was frozen; replication lags a little before that too).
    assert!(
        lost.len() <= run.acked_since_sync,
        "lost {} of {} acknowledged after the replica was last in sync ({} while frozen)",
        lost.len(),
        run.acked_since_sync,
        run.acked_while_frozen
    );

    // Readers past the surviving head learn of the loss.
    let epochs = run.store.epochs().await.unwrap();
    let epoch = epochs.last().unwrap();
    let past = lost
        .iter()
        .filter_map(|(_, r)| r.positions.last().copied())
        .max()
        .unwrap();
    assert!(
        past > epoch.previous_head,
        "{past} <= {}",
        epoch.previous_head
    );
    let mut feed = run.store.subscribe(past, EventFilter::all());
    match tokio::time::timeout(PATIENCE, feed.next()).await.unwrap() {
        Some(Err(StoreError::LostTail { position, head, .. })) => {
            assert_eq!(position, past);
            assert_eq!(head, epoch.previous_head);
        }
        other => panic!("expected LostTail, got {other:?}"),
    }
    drop(run.group);
}

#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_with_min_replicas_acked_every_acknowledged_append_survives_a_failover() {
    let security = Security::tls("redis-stls-failover");
    nothing_acknowledged_is_lost("redis-stls-failover", security).await;
}

#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_the_store_appends_and_reads_through_tls_sentinels() {
    use es_core::ReadAll;

    let group = start_group("redis-stls-ok", Security::tls("redis-stls-ok")).await;
    let certs = group.security.certs.clone().unwrap();
    // With a client certificate too, which the servers and sentinels ask for and check.
    let store = group
        .security
        .builder(&group.sentinels)
        .prefix("stls")
        .tls_client_certificate(pem(&certs.client_cert), pem(&certs.client_key))
        .build()
        .await
        .expect("a store through the TLS sentinels");
    let primary_run_id = field(
        &group.security.info(group.primary.port(), "server").await,
        "run_id",
    )
    .unwrap()
    .to_owned();
    assert_eq!(store.server_settings().run_id, primary_run_id);

    let stream = StreamId::new("account", "1").unwrap();
    common::append_two_and_read_back(&store, &stream).await;

    // The head watcher reaches the primary through the sentinels over TLS as well: a waiter
    // is woken by the next append.
    common::append_wakes_a_waiter(&store, &stream, 2).await;
    let all: Vec<_> = store
        .read_all(ReadAll::after(0))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(all.len(), 3);

    // A named ACL user in the builder's URL reaches the primary the sentinels name as well.
    let mut admin = group.security.connect(group.primary.port()).await;
    let () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("stls_app")
        .arg("on")
        .arg(format!(">{PASSWORD}-app"))
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .query_async(&mut admin)
        .await
        .unwrap();
    let user_store = RedisStore::builder(format!("rediss://stls_app:{PASSWORD}-app@127.0.0.1:1"))
        .sentinels(
            SERVICE,
            group.sentinels.iter().map(|s| group.security.url(s.port())),
        )
        .tls_root_certificates(pem(&certs.ca_cert))
        .prefix("stls")
        .build()
        .await
        .expect("a store as an ACL user through the TLS sentinels");
    let whoami: String = redis::cmd("ACL")
        .arg("WHOAMI")
        .query_async(&mut user_store.connection())
        .await
        .unwrap();
    assert_eq!(whoami, "stls_app");
    assert_eq!(user_store.stream_version(&stream).await.unwrap(), 3);

    // Everything went to the primary over TLS (it has no plaintext port), and reached the
    // replica over TLS replication.
    let replication = group
        .security
        .info(group.replica.port(), "replication")
        .await;
    assert_eq!(field(&replication, "master_link_status"), Some("up"));
    let shown = format!("{store:?}");
    assert!(!shown.contains("s3cret"), "{shown}");
}

#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_a_wrong_ca_for_the_sentinels_is_a_typed_error() {
    use es_testkit::support::everything_shown;

    let group = start_group("redis-stls-ca", Security::tls("redis-stls-ca")).await;
    let certs = group.security.certs.clone().unwrap();
    let last = group.sentinels.last().unwrap().port();
    let wrong = [
        // A CA that signed none of the certificates.
        group
            .security
            .builder(&group.sentinels)
            .tls_root_certificates(pem(&certs.other_ca_cert)),
        // The system's CAs, which do not hold the test CA.
        RedisStore::builder(format!("rediss://:{PASSWORD}@127.0.0.1:1")).sentinels(
            SERVICE,
            group.sentinels.iter().map(|s| group.security.url(s.port())),
        ),
    ];
    for builder in wrong {
        let err = builder
            .connect_timeout(Duration::from_secs(2))
            .build()
            .await
            .expect_err("must not trust the sentinels");
        // Every sentinel failed the handshake; the error names the last one asked.
        let Error::Tls { url, .. } = &err else {
            panic!("expected Error::Tls, got {err:?}");
        };
        assert_eq!(url, &format!("rediss://:***@127.0.0.1:{last}"));
        let shown = everything_shown(&err);
        assert!(!shown.contains("s3cret"), "a password is shown: {shown}");
    }
}

#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_the_primary_needs_a_certificate_for_the_address_the_sentinels_report() {
    // The primary and replica present a certificate the test CA signed for the host name
    // `localhost` only, the usual mistake: the test reaches them as `localhost` (and the store
    // its sentinels, whose certificates name both), but the sentinels report the primary as
    // 127.0.0.1, which its certificate does not name. Redis does not check host names
    // (replication and the sentinels work); the store does.
    let mut security = Security::tls("redis-stls-host");
    let certs = security.certs.clone().unwrap();
    security.node_certs = Some(TestCerts {
        server_cert: certs.localhost_only_cert.clone(),
        server_key: certs.localhost_only_key.clone(),
        ..certs
    });
    let group = start_group("redis-stls-host", security).await;
    let err = group
        .security
        .builder(&group.sentinels)
        .connect_timeout(Duration::from_secs(2))
        .build()
        .await
        .expect_err("must not trust the primary's certificate for 127.0.0.1");
    let Error::Tls { url, .. } = &err else {
        panic!("expected Error::Tls, got {err:?}");
    };
    assert_eq!(url, &format!("rediss://127.0.0.1:{}", group.primary.port()));
}

#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_for_some_endpoints_and_plaintext_for_others_is_refused_before_connecting() {
    use es_testkit::support::everything_shown;

    // Nothing listens on these ports: a store that tried to connect would fail with
    // `Error::Connect` or `Error::Tls`, not the refusals asserted here.
    let ports: Vec<u16> = (0..3)
        .map(|_| es_test_support::free_port().unwrap())
        .collect();
    let url = |scheme: &str, port: u16| format!("{scheme}://:s3cret-pw@127.0.0.1:{port}");
    // Never read: the refusals come before the certificates are.
    let ca = b"-----BEGIN CERTIFICATE-----\n".to_vec();
    let refused = |builder: RedisStoreBuilder| async move {
        let err = builder
            .connect_timeout(Duration::from_millis(200))
            .build()
            .await
            .expect_err("a mixed configuration must be refused");
        let shown = everything_shown(&err);
        assert!(!shown.contains("s3cret"), "a password is shown: {shown}");
        err
    };
    let mixed = |err: Error, tls: &[String], plaintext: &[String]| match err {
        Error::MixedTls {
            tls: t,
            plaintext: p,
        } => {
            let redacted = |urls: &[String]| -> Vec<String> {
                urls.iter().map(|u| u.replace("s3cret-pw", "***")).collect()
            };
            assert_eq!(t, redacted(tls));
            assert_eq!(p, redacted(plaintext));
        }
        other => panic!("expected Error::MixedTls, got {other:?}"),
    };

    // TLS sentinels, a plaintext primary.
    let sentinels: Vec<String> = ports[1..].iter().map(|p| url("rediss", *p)).collect();
    let err = refused(
        RedisStore::builder(url("redis", ports[0]))
            .sentinels(SERVICE, sentinels.clone())
            .tls_root_certificates(ca.clone()),
    )
    .await;
    mixed(err, &sentinels, &[url("redis", ports[0])]);

    // Plaintext sentinels, a TLS primary.
    let sentinels: Vec<String> = ports[1..].iter().map(|p| url("redis", *p)).collect();
    let err = refused(
        RedisStore::builder(url("rediss", ports[0]))
            .sentinels(SERVICE, sentinels.clone())
            .tls_root_certificates(ca.clone()),
    )
    .await;
    mixed(err, &[url("rediss", ports[0])], &sentinels);

    // One sentinel of two in plaintext.
    let sentinels = vec![url("rediss", ports[1]), url("redis", ports[2])];
    let err = refused(
        RedisStore::builder(url("rediss", ports[0]))
            .sentinels(SERVICE, sentinels.clone())
            .tls_root_certificates(ca.clone()),
    )
    .await;
    mixed(
        err,
        &[url("rediss", ports[0]), sentinels[0].clone()],
        &[sentinels[1].clone()],
    );

    // TLS certificates set, every URL plaintext: the store does not connect in plaintext.
    let err = refused(
        RedisStore::builder(url("redis", ports[0]))
            .sentinels(SERVICE, ports[1..].iter().map(|p| url("redis", *p)))
            .tls_root_certificates(ca.clone()),
    )
    .await;
    assert!(matches!(err, Error::InvalidSetting(_)), "{err:?}");

    // A sentinel URL that turns the certificate checks off.
    let err = refused(
        RedisStore::builder(url("rediss", ports[0]))
            .sentinels(SERVICE, [format!("{}/#insecure", url("rediss", ports[1]))])
            .tls_root_certificates(ca),
    )
    .await;
    assert!(matches!(err, Error::InvalidSetting(_)), "{err:?}");
}
