//! Server settings and lost tails, each tried against a redis-server of the test's own:
//!
//! - a server that can evict the store's keys (`maxmemory-policy allkeys-*`) is refused when the
//!   store is built, unless opted out; one switched to such a policy at runtime (`CONFIG SET`)
//!   gets its appends refused with the same typed error, instead of losing them;
//! - a server that persists nothing is refused unless opted out;
//! - a restart that loses the tail (RDB only: everything after the last `SAVE`) starts a new
//!   epoch: new positions never reuse lost ones, a subscriber or projection past the surviving
//!   head gets `StoreError::LostTail`, one below it goes on and sees every new event once;
//! - a head that moved back under a live handle (the store's keys deleted) does the same.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use es_core::contract::position::{epoch_of, first_of_epoch, EpochStart};
use es_core::contract::{Checkpoint, LeaseStore};
use es_core::projection::{AtLeastOnce, HandlerError, Projection, ProjectionStatus};
use es_core::{
    AppendRequest, AppendResult, CheckpointStore, EventFilter, EventStore, EventStream,
    ExpectedVersion, Metadata, NewEvent, OutboxMessage, OutboxStore, ProjectionRunner,
    RecordedEvent, StoreError, StreamId,
};
use es_redis::{Error, RedisStore};
use es_test_support::{scratch_dir, RedisServer};
use futures::StreamExt;
use serde_json::json;
use uuid::Uuid;

const PATIENCE: Duration = Duration::from_secs(60);

async fn redis_cmd(url: &str, cmd: &redis::Cmd) -> redis::Value {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    cmd.query_async(&mut conn).await.unwrap()
}

async fn config_set(url: &str, name: &str, value: &str) {
    redis_cmd(url, redis::cmd("CONFIG").arg("SET").arg(name).arg(value)).await;
}

fn event(n: u64) -> NewEvent {
    NewEvent::from_value("Noted", 1, &json!({ "n": n }))
}

fn big_event(bytes: usize) -> NewEvent {
    NewEvent::new("Blob", 1, format!("\"{}\"", "x".repeat(bytes))).unwrap()
}

fn message(source: &NewEvent) -> OutboxMessage {
    OutboxMessage {
        message_id: Uuid::now_v7(),
        source_event_id: source.event_id,
        topic: "notes".into(),
        key: "k".into(),
        message_type: "note.added".into(),
        schema_version: 1,
        payload: Bytes::from_static(b"{}"),
        metadata: Metadata::new(),
    }
}

/// The `EvictionPolicy` error inside a store error, if that is what it is.
fn eviction_policy(err: &StoreError) -> Option<String> {
    match err {
        StoreError::Backend(source) => match source.downcast_ref::<Error>() {
            Some(Error::EvictionPolicy { policy }) => Some(policy.clone()),
            _ => None,
        },
        _ => None,
    }
}

async fn append_until_acknowledged(store: &RedisStore, request: AppendRequest) -> AppendResult {
    let started = std::time::Instant::now();
    loop {
        match store.append(request.clone()).await {
            Ok(result) => return result,
            Err(err) if err.is_transient() => {
                assert!(started.elapsed() < PATIENCE, "unavailable too long: {err}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(other) => panic!("append failed: {other}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicting_server_is_refused_at_build_unless_allowed() {
    let dir = scratch_dir("es-redis-evict-build");
    let server = RedisServer::start(
        &dir,
        &[
            "--appendonly",
            "yes",
            "--maxmemory",
            "2mb",
            "--maxmemory-policy",
            "allkeys-lru",
        ],
    )
    .unwrap();
    let refused = RedisStore::builder(server.url())
        .prefix("evict")
        .build()
        .await;
    match refused {
        Err(err @ Error::EvictionPolicy { .. }) => {
            let text = err.to_string();
            assert!(
                text.contains("maxmemory-policy allkeys-lru") && text.contains("noeviction"),
                "the error names the setting, its value and the fix: {text}"
            );
        }
        other => panic!("expected EvictionPolicy, got {other:?}"),
    }

    // The opt-out, for data one can afford to lose.
    let store = RedisStore::builder(server.url())
        .prefix("evict")
        .allow_eviction(true)
        .build()
        .await
        .unwrap();
    let settings = store.server_settings();
    assert_eq!(settings.maxmemory_policy, "allkeys-lru");
    assert_eq!(settings.maxmemory, 2 * 1024 * 1024);
    assert!(settings.can_evict());
    let r = store
        .append(AppendRequest::new(
            StreamId::parse("order-1").unwrap(),
            ExpectedVersion::NoStream,
            vec![event(1)],
        ))
        .await
        .unwrap();
    assert_eq!(r.positions.len(), 1);

    // volatile-* policies evict only keys with an expiry, and the store sets none (the relay
    // lease included): accepted.
    config_set(&server.url(), "maxmemory-policy", "volatile-lru").await;
    let store = RedisStore::builder(server.url())
        .prefix("volatile")
        .build()
        .await
        .unwrap();
    assert!(!store.server_settings().can_evict());
    let e = event(2);
    let m = message(&e);
    store
        .append(
            AppendRequest::new(
                StreamId::parse("order-2").unwrap(),
                ExpectedVersion::NoStream,
                vec![e],
            )
            .with_outbox(vec![m]),
        )
        .await
        .unwrap();
    assert!(store
        .acquire_relay_lease("relay-1", Duration::from_secs(30))
        .await
        .unwrap()
        .is_some());
    // The leases of consumer groups too.
    assert_eq!(
        store
            .acquire_lease("relay", "partition:0", "w1", Duration::from_secs(30))
            .await
            .unwrap(),
        Some(1)
    );
    let keys: Vec<String> =
        match redis_cmd(&server.url(), redis::cmd("KEYS").arg("volatile:*")).await {
            redis::Value::Array(keys) => keys
                .into_iter()
                .map(|k| match k {
                    redis::Value::BulkString(k) => String::from_utf8(k).unwrap(),
                    other => panic!("{other:?}"),
                })
                .collect(),
            other => panic!("{other:?}"),
        };
    let group = store.keys().lease_group("relay");
    for key in [store.keys().relay_lease(), group.leases(), group.held()] {
        assert!(keys.iter().any(|k| k == key), "{key} not in {keys:?}");
    }
    for key in &keys {
        let ttl = redis_cmd(&server.url(), redis::cmd("PTTL").arg(key)).await;
        assert_eq!(ttl, redis::Value::Int(-1), "{key} has an expiry");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_to_an_evicting_policy_at_runtime_refuses_appends_instead_of_losing_them() {
    let dir = scratch_dir("es-redis-evict-runtime");
    let server = RedisServer::start(&dir, &["--appendonly", "yes"]).unwrap();
    let url = server.url();
    let store = RedisStore::builder(url.as_str())
        .prefix("evict")
        .server_check_interval(Duration::from_millis(50))
        .build()
        .await
        .unwrap();
    assert_eq!(store.server_settings().maxmemory_policy, "noeviction");
    let mut acknowledged: Vec<Uuid> = Vec::new();
    let append = |n: u64, e: NewEvent| {
        let store = store.clone();
        async move {
            let s = StreamId::new("order", &n.to_string()).unwrap();
            store
                .append(AppendRequest::new(s, ExpectedVersion::Any, vec![e]))
                .await
        }
    };
    for n in 0..20 {
        let e = event(n);
        acknowledged.push(e.event_id);
        append(n, e).await.unwrap();
    }

    // A memory limit 4 MiB above what the server uses now: the appends in the window before the
    // store reads the new policy stay below it (a server already over its limit would evict in
    // that window; see the crate docs), the large appends below would go over it.
    let used = match redis_cmd(&url, redis::cmd("INFO").arg("memory")).await {
        redis::Value::BulkString(info) => String::from_utf8(info)
            .unwrap()
            .lines()
            .find_map(|l| {
                l.strip_prefix("used_memory:")
                    .map(|v| v.trim().parse::<u64>().unwrap())
            })
            .unwrap(),
        other => panic!("INFO memory: {other:?}"),
    };
    config_set(&url, "maxmemory", &(used + 4 * 1024 * 1024).to_string()).await;
    config_set(&url, "maxmemory-policy", "allkeys-lru").await;
    // Appends go on until the store's background task has read the new policy (at most the
    // check interval and a round trip later); from then on each one is refused, typed.
    let started = std::time::Instant::now();
    let mut n = 100;
    let policy = loop {
        let e = event(n);
        let id = e.event_id;
        match append(n, e).await {
            Ok(_) => acknowledged.push(id),
            Err(err) => {
                break eviction_policy(&err)
                    .unwrap_or_else(|| panic!("expected EvictionPolicy, got {err:?}"));
            }
        }
        assert!(
            started.elapsed() < PATIENCE,
            "appends were never refused under allkeys-lru"
        );
        n += 1;
    };
    assert_eq!(policy, "allkeys-lru");
    assert_eq!(store.server_settings().maxmemory_policy, "allkeys-lru");

    // Appends that would push the server over maxmemory, where it would evict, are refused too,
    // and write nothing.
    let head = store.head_position().await.unwrap();
    for n in 1000..1040 {
        let err = append(n, big_event(200 * 1024)).await.unwrap_err();
        assert_eq!(
            eviction_policy(&err).as_deref(),
            Some("allkeys-lru"),
            "{err:?}"
        );
    }
    assert_eq!(store.head_position().await.unwrap(), head);

    // Nothing acknowledged was evicted.
    let stored: Vec<Uuid> = store
        .read_all(es_core::ReadAll::after(0))
        .map(|e| e.unwrap().event_id)
        .collect()
        .await;
    assert_eq!(stored, acknowledged);

    // Back to noeviction: appends resume once the store has read it.
    config_set(&url, "maxmemory-policy", "noeviction").await;
    let started = std::time::Instant::now();
    loop {
        match append(5000, event(5000)).await {
            Ok(_) => break,
            Err(err) => {
                assert!(eviction_policy(&err).is_some(), "{err:?}");
                assert!(started.elapsed() < PATIENCE, "appends never resumed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_persists_nothing_is_refused_unless_allowed() {
    let dir = scratch_dir("es-redis-no-persistence");
    // test-support starts redis-server with `--save ""`; no AOF either.
    let server = RedisServer::start(&dir, &[]).unwrap();
    let refused = RedisStore::builder(server.url()).prefix("np").build().await;
    assert!(matches!(refused, Err(Error::NoPersistence)), "{refused:?}");
    let store = RedisStore::builder(server.url())
        .prefix("np")
        .allow_no_persistence(true)
        .build()
        .await
        .unwrap();
    let settings = store.server_settings();
    assert_eq!(settings.persists(), Some(false));
    assert!(!settings.appendonly);
    assert_eq!(settings.save.as_deref(), Some(""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_settings_report_the_persistence_the_store_runs_under() {
    let dir = scratch_dir("es-redis-settings");
    let server = RedisServer::start(
        &dir,
        &[
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "900 1",
        ],
    )
    .unwrap();
    let store = RedisStore::builder(server.url())
        .prefix("settings")
        .server_check_interval(Duration::from_millis(50))
        .build()
        .await
        .unwrap();
    let settings = store.server_settings();
    assert!(settings.appendonly);
    assert_eq!(settings.appendfsync.as_deref(), Some("always"));
    assert_eq!(settings.save.as_deref(), Some("900 1"));
    assert_eq!(settings.maxmemory_policy, "noeviction");
    assert!(settings.version.starts_with(|c: char| c.is_ascii_digit()));
    assert_eq!(settings.run_id.len(), 40);
    let shown = settings.to_string();
    assert!(shown.contains("appendfsync always"), "{shown}");

    // Changes at runtime show up after the next check.
    config_set(&server.url(), "appendfsync", "everysec").await;
    let started = std::time::Instant::now();
    while store.server_settings().appendfsync.as_deref() != Some("everysec") {
        assert!(started.elapsed() < PATIENCE, "the change was never read");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_config_command_is_handled() {
    // With the AOF on, persistence is known from INFO: the store builds, and reports what it
    // cannot read as unknown.
    let dir = scratch_dir("es-redis-no-config-aof");
    let server = RedisServer::start(
        &dir,
        &["--appendonly", "yes", "--rename-command", "CONFIG", ""],
    )
    .unwrap();
    let store = RedisStore::builder(server.url())
        .prefix("noconfig")
        .build()
        .await
        .unwrap();
    let settings = store.server_settings();
    assert!(settings.appendonly);
    assert_eq!(settings.appendfsync, None);
    assert_eq!(settings.save, None);
    assert_eq!(settings.maxmemory_policy, "noeviction", "read from INFO");
    store
        .append(AppendRequest::new(
            StreamId::parse("order-1").unwrap(),
            ExpectedVersion::NoStream,
            vec![event(1)],
        ))
        .await
        .unwrap();

    // With the AOF off, whether RDB snapshots are on is unknown: refused unless opted out.
    let dir = scratch_dir("es-redis-no-config-rdb");
    let server =
        RedisServer::start(&dir, &["--save", "60 1", "--rename-command", "CONFIG", ""]).unwrap();
    match RedisStore::builder(server.url())
        .prefix("noconfig")
        .build()
        .await
    {
        Err(Error::SettingUnknown { setting, .. }) => assert_eq!(setting, "save"),
        other => panic!("expected SettingUnknown, got {other:?}"),
    }
    let store = RedisStore::builder(server.url())
        .prefix("noconfig")
        .allow_no_persistence(true)
        .build()
        .await
        .unwrap();
    assert_eq!(store.server_settings().persists(), None);

    // A server that refuses INFO cannot run the store at all.
    let dir = scratch_dir("es-redis-no-info");
    let server = RedisServer::start(
        &dir,
        &["--appendonly", "yes", "--rename-command", "INFO", ""],
    )
    .unwrap();
    let refused = RedisStore::builder(server.url())
        .prefix("noinfo")
        .allow_eviction(true)
        .allow_no_persistence(true)
        .build()
        .await;
    assert!(
        matches!(
            refused,
            Err(Error::SettingUnknown {
                setting: "INFO",
                ..
            })
        ),
        "{refused:?}"
    );
}

/// Appends `count` one-event appends to streams `<name>-<i>`, each with an outbox message.
async fn append_many(
    store: &RedisStore,
    name: &str,
    count: u64,
) -> Vec<(AppendRequest, AppendResult)> {
    let mut done = Vec::new();
    for i in 0..count {
        let e = event(i);
        let m = message(&e);
        let request = AppendRequest::new(
            StreamId::new(name, &i.to_string()).unwrap(),
            ExpectedVersion::Any,
            vec![e],
        )
        .with_outbox(vec![m]);
        let result = append_until_acknowledged(store, request.clone()).await;
        done.push((request, result));
    }
    done
}

/// Takes events from `sub` until it delivers `position`.
async fn take_until(sub: &mut EventStream, position: u64) -> Vec<RecordedEvent> {
    let mut seen = Vec::new();
    while seen
        .last()
        .is_none_or(|e: &RecordedEvent| e.global_position < position)
    {
        let next = tokio::time::timeout(PATIENCE, sub.next())
            .await
            .expect("the subscription delivers")
            .expect("the subscription goes on")
            .expect("no error");
        seen.push(next);
    }
    seen
}

/// Records the positions it handles.
#[derive(Clone, Default)]
struct Positions(Arc<Mutex<Vec<u64>>>);

impl Projection for Positions {
    fn name(&self) -> &'static str {
        "positions"
    }

    async fn handle(&mut self, event: &RecordedEvent) -> Result<(), HandlerError> {
        self.0.lock().unwrap().push(event.global_position);
        Ok(())
    }

    async fn reset(&mut self) -> Result<(), HandlerError> {
        self.0.lock().unwrap().clear();
        Ok(())
    }
}

/// Waits until the projection has failed; returns its message.
async fn failure_of<S: EventStore>(handle: &es_core::ProjectionHandle<S>) -> String {
    match tokio::time::timeout(PATIENCE, handle.wait_for(u64::MAX))
        .await
        .expect("the projection stops")
    {
        ProjectionStatus::Failed(failure) => failure.to_string(),
        other => panic!("expected the projection to fail, got {other:?}"),
    }
}

/// Kills the server with SIGKILL, restarts it, and waits until `store` reads the head again;
/// returns that head.
async fn kill_and_restart(server: &mut RedisServer, store: &RedisStore) -> u64 {
    tokio::task::block_in_place(|| server.kill9()).unwrap();
    tokio::task::block_in_place(|| server.restart()).unwrap();
    let started = std::time::Instant::now();
    loop {
        if let Ok(head) = store.head_position().await {
            return head;
        }
        assert!(started.elapsed() < PATIENCE, "the server did not come back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The outbox positions of the records `appends` wrote.
async fn outbox_positions_of(
    store: &RedisStore,
    appends: &[(AppendRequest, AppendResult)],
) -> Vec<u64> {
    store
        .pending_outbox(1000)
        .await
        .unwrap()
        .iter()
        .filter(|r| {
            appends
                .iter()
                .any(|(req, _)| req.outbox[0].message_id == r.message.message_id)
        })
        .map(|r| r.position)
        .collect()
}

/// Checks what the first appends after the loss (`fresh`) got: the positions of a new epoch,
/// recorded after the surviving head, none of the lost positions, and outbox positions above
/// every one handed out before. Returns the new epoch.
async fn check_new_epoch(
    store: &RedisStore,
    lost: &[(AppendRequest, AppendResult)],
    fresh: &[(AppendRequest, AppendResult)],
    first_epoch: u64,
    surviving_head: u64,
    highest_outbox_before: u64,
) -> u64 {
    let new_positions: Vec<u64> = fresh
        .iter()
        .flat_map(|(_, r)| r.positions.clone())
        .collect();
    let epoch = epoch_of(new_positions[0]);
    assert!(epoch > first_epoch);
    assert_eq!(
        new_positions,
        (0..fresh.len() as u64)
            .map(|i| first_of_epoch(epoch) + i)
            .collect::<Vec<_>>(),
        "the first append of the new incarnation begins a new epoch"
    );
    let lost_positions: Vec<u64> = lost.iter().flat_map(|(_, r)| r.positions.clone()).collect();
    assert!(
        lost_positions.iter().all(|p| !new_positions.contains(p)),
        "a lost position was handed out again"
    );
    let starts = [
        EpochStart {
            epoch: first_epoch,
            previous_head: 0,
        },
        EpochStart {
            epoch,
            previous_head: surviving_head,
        },
    ];
    assert_eq!(store.epochs().await.unwrap(), starts);

    // The outbox counter jumped too: every new record's position is above every position
    // handed out before the loss, so a relay's late delivery mark for a lost record can never
    // hit a new one.
    let new_outbox = outbox_positions_of(store, fresh).await;
    assert_eq!(new_outbox.len(), fresh.len());
    assert!(new_outbox
        .iter()
        .all(|p| *p > highest_outbox_before && epoch_of(*p) == epoch));
    epoch
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_that_lost_the_tail_starts_an_epoch_and_readers_past_it_get_lost_tail() {
    let dir = scratch_dir("es-redis-lost-tail");
    let mut server = RedisServer::start(&dir, &["--appendonly", "no", "--save", "3600 1"]).unwrap();
    let store = RedisStore::builder(server.url())
        .prefix("tail")
        .poll_interval(Duration::from_millis(100))
        .response_timeout(Duration::from_secs(5))
        .build()
        .await
        .unwrap();
    assert!(!store.server_settings().appendonly);

    let saved = append_many(&store, "saved", 10).await;
    // The store's first write began its first epoch; positions are dense within it.
    let first_epoch = epoch_of(saved[0].1.positions[0]);
    let surviving_head = store.head_position().await.unwrap();
    assert_eq!(surviving_head, saved[0].1.positions[0] + 9);
    redis_cmd(&server.url(), &redis::cmd("SAVE")).await;
    // Acknowledged, but only in memory: the RDB holds the first ten.
    let lost = append_many(&store, "lost", 10).await;
    let head = store.head_position().await.unwrap();
    assert_eq!(head, surviving_head + 10);
    let outbox_before = outbox_positions_of(&store, &lost).await;
    assert_eq!(outbox_before.len(), 10);
    let highest_outbox_before = outbox_before.iter().copied().max().unwrap();

    // One subscriber at the head, one stopped below the surviving head. The second reads
    // through a handle (another process, say) that fetches one entry per page, so that it has
    // not fetched ahead of what it delivered.
    let mut ahead = store.subscribe(0, EventFilter::all());
    take_until(&mut ahead, head).await;
    let reader = RedisStore::builder(server.url())
        .prefix("tail")
        .poll_interval(Duration::from_millis(100))
        .read_page_size(1)
        .build()
        .await
        .unwrap();
    let mut behind = reader.subscribe(0, EventFilter::all());
    let early = take_until(&mut behind, surviving_head - 3).await;
    assert_eq!(early.len(), 7);
    // A projection that has handled (and checkpointed) everything, live through the restart.
    let runner = ProjectionRunner::new(store.clone());
    let live = runner.spawn(AtLeastOnce::new(Positions::default(), store.clone()));
    assert!(matches!(
        tokio::time::timeout(PATIENCE, live.wait_for(head)).await.unwrap(),
        ProjectionStatus::Running { position } if position == head
    ));

    let recovered = kill_and_restart(&mut server, &store).await;
    assert_eq!(recovered, surviving_head, "the RDB holds the first ten");
    // A checkpoint past the surviving head, saved after the restart (as a runner that retried
    // its save through the outage does).
    let late = Checkpoint {
        position: head,
        generation: 0,
    };
    assert!(store.save_checkpoint("late", late).await.unwrap());

    let fresh = append_many(&store, "fresh", 5).await;
    let epoch = check_new_epoch(
        &store,
        &lost,
        &fresh,
        first_epoch,
        surviving_head,
        highest_outbox_before,
    )
    .await;
    let new_positions: Vec<u64> = fresh
        .iter()
        .flat_map(|(_, r)| r.positions.clone())
        .collect();

    // The subscriber past the surviving head is told, and ends.
    match tokio::time::timeout(PATIENCE, ahead.next()).await.unwrap() {
        Some(Err(StoreError::LostTail {
            position,
            head: h,
            epoch: e,
        })) => assert_eq!((position, h, e), (head, surviving_head, epoch)),
        other => panic!("expected LostTail, got {other:?}"),
    }
    assert!(ahead.next().await.is_none());

    // The one below it sees the rest of what survived, then every new event, once each.
    let rest = take_until(&mut behind, *new_positions.last().unwrap()).await;
    let expected: Vec<Uuid> = saved[early.len()..]
        .iter()
        .chain(&fresh)
        .map(|(req, _)| req.events[0].event_id)
        .collect();
    assert_eq!(
        rest.iter().map(|e| e.event_id).collect::<Vec<_>>(),
        expected
    );
    let ids: HashSet<Uuid> = early.iter().chain(&rest).map(|e| e.event_id).collect();
    assert_eq!(
        ids.len(),
        early.len() + rest.len(),
        "nothing delivered twice"
    );

    // Projections past the surviving head stop, naming the loss: the live one, and one started
    // from a checkpoint past it.
    let needle = format!("lost events after position {surviving_head}");
    let failure = failure_of(&live).await;
    assert!(failure.contains(&needle), "{failure}");
    let started_late = runner.spawn(AtLeastOnce::new(
        LateProjection(Positions::default()),
        store.clone(),
    ));
    let failure = failure_of(&started_late).await;
    assert!(failure.contains(&needle), "{failure}");
}

/// [`Positions`] under the name of the checkpoint saved past the head.
struct LateProjection(Positions);

impl Projection for LateProjection {
    fn name(&self) -> &'static str {
        "late"
    }

    async fn handle(&mut self, event: &RecordedEvent) -> Result<(), HandlerError> {
        self.0.handle(event).await
    }

    async fn reset(&mut self) -> Result<(), HandlerError> {
        self.0.reset().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_that_moved_back_under_a_live_handle_starts_an_epoch() {
    let store = common::store("moved-back").await;
    let before = append_many(&store, "order", 5).await;
    let old_head = before[4].1.positions[0];
    let mut sub = store.subscribe(0, EventFilter::all());
    take_until(&mut sub, old_head).await;

    // Every key of the store vanishes (a restore of an empty backup, a FLUSHDB), the epoch
    // history with them; the server process is the same.
    let mut conn = store.connection();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*", store.keys().prefix()))
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut conn)
        .await
        .unwrap();

    // The next append begins a new epoch above every position handed out before, recorded
    // with head 0: the store knows it holds nothing of what it had.
    let after = append_many(&store, "again", 1).await;
    let position = after[0].1.positions[0];
    let epoch = epoch_of(position);
    assert!(epoch > epoch_of(old_head));
    assert_eq!(position, first_of_epoch(epoch));
    assert_eq!(
        store.epochs().await.unwrap(),
        [EpochStart {
            epoch,
            previous_head: 0
        }]
    );
    match tokio::time::timeout(PATIENCE, sub.next()).await.unwrap() {
        Some(Err(StoreError::LostTail {
            position,
            head,
            epoch: e,
        })) => assert_eq!((position, head, e), (old_head, 0, epoch)),
        other => panic!("expected LostTail, got {other:?}"),
    }
    assert!(sub.next().await.is_none(), "the subscription ends there");
}
