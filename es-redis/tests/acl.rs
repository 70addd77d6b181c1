//! The store under a Redis ACL user limited to its key prefix and the commands it needs: the
//! `ACL SETUSER` line of the production recipe (docs/12-production.md), read from there. The
//! conformance suites run under such a user (one user and prefix per test, on the shared server,
//! `REDIS_URL`, whose default user is the administrator); users missing a right get typed
//! errors that do not show their password.

use std::error::Error as _;
use std::time::Duration;

use es_core::contract::{Checkpoint, LeaseStore};
use es_core::{
    AppendRequest, CheckpointStore, EventStore, ExpectedVersion, NewEvent, StoreError, StreamId,
};
use es_redis::redis::{self, aio::MultiplexedConnection};
use es_redis::{Error, RedisStore};
use es_testkit::support::{everything_shown, unique_name};

mod common;

const PASSWORD: &str = "acl-s3cret-pw";

/// A user of its own, with `rules`, on the server at `admin`; returns its URL.
async fn user_with(admin: &str, name: &str, rules: &[String]) -> String {
    common::set_user(admin, name, rules).await;
    common::url_with_user(admin, name, PASSWORD)
}

/// A store on the shared server under a fresh prefix, built by a fresh user that has exactly
/// the documented rights for that prefix; the library is installed by the administrator first.
async fn acl_store(name: &str) -> RedisStore {
    let admin = es_test_support::redis_url();
    RedisStore::builder(admin.as_str())
        .install_functions()
        .await
        .expect("the administrator installs the functions");
    let prefix = common::unique_prefix(name);
    let user = unique_name(&format!("t_acl_{name}"), '_');
    let url = user_with(
        &admin,
        &user,
        &common::documented_acl(&user, PASSWORD, &prefix),
    )
    .await;
    RedisStore::builder(url)
        .prefix(prefix)
        .build()
        .await
        .unwrap_or_else(|e| panic!("the documented ACL user cannot build the store: {e}"))
}

es_testkit::conformance_tests!(|| async { acl_store("conf").await });

mod streaming {
    es_testkit::streaming_conformance_tests!(|| async { super::acl_store("stream").await });
}

/// Multi-stream appends under the documented user: the all-or-nothing check pass needs no
/// command beyond the line.
mod multi {
    es_testkit::multi_conformance_tests!(|| async { super::acl_store("multi").await });
}

/// Closing streams under the documented user: the closed key is read and written by the
/// append function with the commands of the line (`MGET`, `SET`).
mod closing {
    es_testkit::closing_conformance_tests!(|| async { super::acl_store("close").await });
}

/// Crypto-shredding under the documented user: its key store needs no command beyond the line
/// (`SET .. NX GET`, `MGET`, `SET .. GET`).
mod shredding {
    es_testkit::shredding_conformance_tests!(|| async {
        let store = super::acl_store("shred").await;
        let keys = store.key_store();
        (store, keys)
    });
}

fn append_one(stream: &str) -> AppendRequest {
    AppendRequest::new(
        StreamId::new("account", stream).unwrap(),
        ExpectedVersion::Any,
        vec![NewEvent::new("Opened", 1, "{}").unwrap()],
    )
}

async fn connect(url: &str) -> MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The `es_redis::Error` inside a store error, which must be a `NoPermission`.
fn assert_no_permission(err: &StoreError) {
    let StoreError::Backend(source) = err else {
        panic!("expected StoreError::Backend, got {err:?}");
    };
    match source.downcast_ref::<Error>() {
        Some(Error::NoPermission { url: None, .. }) => {}
        other => panic!("expected Error::NoPermission, got {other:?} ({err})"),
    }
    let shown = everything_shown(err);
    assert!(!shown.contains("s3cret"), "the password is shown: {shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_user_is_refused_everything_outside_its_prefix_and_commands() {
    let admin = es_test_support::redis_url();
    let store = acl_store("fence").await;
    store.append(append_one("1")).await.unwrap();
    let prefix = store.keys().prefix().to_owned();
    let user = unique_name("t_acl_fence_raw", '_');
    let url = user_with(
        &admin,
        &user,
        &common::documented_acl(&user, PASSWORD, &prefix),
    )
    .await;
    let mut conn = connect(&url).await;

    // Its own keys: readable.
    let version: Option<String> = redis::cmd("GET")
        .arg(format!("{prefix}:{{account-1}}:version"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(version.as_deref(), Some("1"));

    // Another store's keys, and commands the store does not need: refused, `NOPERM`.
    let other = format!("{prefix}x:{{account-1}}:version");
    let refusals: Vec<(&str, redis::Cmd)> = vec![
        (
            "GET of another prefix",
            redis::cmd("GET").arg(&other).clone(),
        ),
        (
            "SET of another prefix",
            redis::cmd("SET").arg(&other).arg("9").clone(),
        ),
        (
            "FUNCTION LOAD",
            redis::cmd("FUNCTION")
                .arg("LOAD")
                .arg("REPLACE")
                .arg("#!lua name=evil\nredis.register_function('evil', function() return 1 end)")
                .clone(),
        ),
        (
            "FUNCTION FLUSH",
            redis::cmd("FUNCTION").arg("FLUSH").clone(),
        ),
        (
            "CONFIG GET",
            redis::cmd("CONFIG").arg("GET").arg("requirepass").clone(),
        ),
        (
            "CONFIG SET",
            redis::cmd("CONFIG")
                .arg("SET")
                .arg("maxmemory-policy")
                .arg("allkeys-lru")
                .clone(),
        ),
        ("FLUSHALL", redis::cmd("FLUSHALL").clone()),
        ("KEYS", redis::cmd("KEYS").arg("*").clone()),
        ("SCRIPT FLUSH", redis::cmd("SCRIPT").arg("FLUSH").clone()),
        ("EVAL", redis::cmd("EVAL").arg("return 1").arg(0).clone()),
        ("ACL LIST", redis::cmd("ACL").arg("LIST").clone()),
    ];
    for (what, cmd) in refusals {
        let err = cmd
            .query_async::<redis::Value>(&mut conn)
            .await
            .expect_err(what);
        assert_eq!(err.code(), Some("NOPERM"), "{what}: {err}");
    }
}

/// Consumer groups need the leases (the library's lease functions, on the group's keys under
/// the prefix) and the checkpoint fence: the documented user runs them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_user_takes_leases_and_fences_checkpoints() {
    let store = acl_store("lease").await;
    let ttl = Duration::from_secs(30);
    let group = "projection:orders";
    assert_eq!(
        store
            .acquire_lease(group, "partition:0", "w1", ttl)
            .await
            .unwrap(),
        Some(1)
    );
    assert_eq!(
        store
            .acquire_lease(group, "partition:0", "w1", ttl)
            .await
            .unwrap(),
        Some(1)
    );
    assert_eq!(
        store
            .acquire_lease(group, "partition:0", "w2", ttl)
            .await
            .unwrap(),
        None
    );
    // Expired leases leave the index on a later acquire (ZRANGEBYSCORE, ZREM).
    store
        .acquire_lease(group, "member:w9", "w9", Duration::from_millis(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    store
        .acquire_lease(group, "member:w1", "w1", ttl)
        .await
        .unwrap();
    let held = store.held_leases(group).await.unwrap();
    assert_eq!(
        held.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(),
        ["member:w1", "partition:0"]
    );
    store
        .release_lease(group, "partition:0", "w1", 1)
        .await
        .unwrap();
    assert_eq!(
        store
            .acquire_lease(group, "partition:0", "w2", ttl)
            .await
            .unwrap(),
        Some(2)
    );
    let name = es_core::projection::partition_checkpoint("orders", 0);
    let fenced = store.fence_checkpoint(&name).await.unwrap();
    assert_eq!((fenced.position, fenced.generation), (0, 1));
    assert!(store
        .save_checkpoint(
            &name,
            Checkpoint {
                position: 7,
                generation: 1
            }
        )
        .await
        .unwrap());
    let fenced = store.fence_checkpoint(&name).await.unwrap();
    assert_eq!((fenced.position, fenced.generation), (7, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_that_may_not_load_the_functions_needs_them_installed_first() {
    // A server of its own, which holds no library yet.
    let dir = es_test_support::scratch_dir("redis-acl-functions");
    let server = es_test_support::RedisServer::start(&dir, &["--appendonly", "yes"])
        .expect("start redis-server");
    let admin = server.url();
    let url = user_with(
        &admin,
        "shop_app",
        &common::documented_acl("shop_app", PASSWORD, "shop"),
    )
    .await;

    let err = RedisStore::builder(url.as_str())
        .prefix("shop")
        .build()
        .await
        .expect_err("the library is missing and the user may not load it");
    let Error::FunctionsNotInstalled { library, .. } = &err else {
        panic!("expected FunctionsNotInstalled, got {err:?}");
    };
    assert!(library.starts_with("es_append_"), "{library}");
    let shown = everything_shown(&err);
    assert!(!shown.contains("s3cret"), "the password is shown: {shown}");
    assert!(shown.contains("install_functions"), "{shown}");

    // The administrator installs it; the user's store works.
    RedisStore::builder(admin.as_str())
        .install_functions()
        .await
        .unwrap();
    let store = RedisStore::builder(url.as_str())
        .prefix("shop")
        .build()
        .await
        .expect("the library is installed");
    store.append(append_one("1")).await.unwrap();
    // The user cannot read the settings an administrator sees: they are reported as unknown.
    let settings = store.server_settings();
    assert!(settings.appendonly);
    assert_eq!(settings.appendfsync, None);

    // The library lost (FUNCTION FLUSH by the administrator): appends fail, typed, until it
    // is installed again; then they resume.
    let mut admin_conn = connect(&admin).await;
    let _: () = redis::cmd("FUNCTION")
        .arg("FLUSH")
        .query_async(&mut admin_conn)
        .await
        .unwrap();
    let err = store.append(append_one("2")).await.expect_err("no library");
    assert_no_permission(&err);
    RedisStore::builder(admin.as_str())
        .install_functions()
        .await
        .unwrap();
    store.append(append_one("2")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_missing_a_right_get_typed_errors() {
    let admin = es_test_support::redis_url();
    RedisStore::builder(admin.as_str())
        .install_functions()
        .await
        .unwrap();

    // Without INFO the store cannot check the server (nor can its function read the run_id):
    // `build` fails.
    let prefix = common::unique_prefix("acl-noinfo");
    let user = unique_name("t_acl_noinfo", '_');
    let rules = common::without(&common::documented_acl(&user, PASSWORD, &prefix), "+info");
    let url = user_with(&admin, &user, &rules).await;
    let err = RedisStore::builder(url.as_str())
        .prefix(prefix)
        .connect_timeout(Duration::from_secs(1))
        .build()
        .await
        .expect_err("no INFO");
    match &err {
        Error::NoPermission {
            url: Some(url),
            source,
        } => {
            assert!(url.contains(":***@"), "{url}");
            assert_eq!(source.code(), Some("NOPERM"));
        }
        other => panic!("expected NoPermission, got {other:?}"),
    }
    let shown = everything_shown(&err);
    assert!(!shown.contains("s3cret"), "the password is shown: {shown}");
    assert!(err.source().is_some());

    // Without XADD, which only the append function calls: the build works, appends fail typed
    // and write nothing.
    let prefix = common::unique_prefix("acl-noxadd");
    let user = unique_name("t_acl_noxadd", '_');
    let rules = common::without(&common::documented_acl(&user, PASSWORD, &prefix), "+xadd");
    let url = user_with(&admin, &user, &rules).await;
    let store = RedisStore::builder(url.as_str())
        .prefix(prefix.clone())
        .build()
        .await
        .expect("the build needs no XADD");
    let err = store.append(append_one("1")).await.expect_err("no XADD");
    assert_no_permission(&err);
    let stream = StreamId::new("account", "1").unwrap();
    assert_eq!(store.stream_version(&stream).await.unwrap(), 0);

    // Without SCAN, which only listing streams uses: everything else works, the listing is
    // refused typed.
    let prefix = common::unique_prefix("acl-noscan");
    let user = unique_name("t_acl_noscan", '_');
    let rules = common::without(&common::documented_acl(&user, PASSWORD, &prefix), "+scan");
    let url = user_with(&admin, &user, &rules).await;
    let store = RedisStore::builder(url.as_str())
        .prefix(prefix.clone())
        .build()
        .await
        .expect("the build needs no SCAN");
    store
        .append(append_one("1"))
        .await
        .expect("appends need no SCAN");
    let err = store
        .list_streams(es_core::ListStreams::all())
        .await
        .expect_err("no SCAN");
    assert_no_permission(&err);

    // Without the key pattern: the build (which checks the store's recorded key layout) and
    // every store operation are refused, typed. The store is built while the user still has
    // its keys, which are then taken away.
    let prefix = common::unique_prefix("acl-nokeys");
    let user = unique_name("t_acl_nokeys", '_');
    let documented = common::documented_acl(&user, PASSWORD, &prefix);
    let url = user_with(&admin, &user, &documented).await;
    let store = RedisStore::builder(url.as_str())
        .prefix(prefix.clone())
        .build()
        .await
        .expect("the documented user builds the store");
    let rules: Vec<String> = documented
        .into_iter()
        .map(|rule| {
            if rule.starts_with('~') {
                "~elsewhere:*".to_owned()
            } else {
                rule
            }
        })
        .collect();
    let url = user_with(&admin, &user, &rules).await;
    let err = RedisStore::builder(url.as_str())
        .prefix(prefix)
        .build()
        .await
        .expect_err("the build reads the meta key");
    match &err {
        Error::NoPermission {
            url: Some(url),
            source,
        } => {
            assert!(url.contains(":***@"), "{url}");
            assert_eq!(source.code(), Some("NOPERM"));
        }
        other => panic!("expected NoPermission, got {other:?}"),
    }
    assert!(!everything_shown(&err).contains("s3cret"));
    assert_no_permission(&store.append(append_one("1")).await.expect_err("no keys"));
    assert_no_permission(&store.stream_version(&stream).await.expect_err("no keys"));
    assert_no_permission(&store.head_position().await.expect_err("no keys"));
}
