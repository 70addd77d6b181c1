//! The leases of consumer groups (`LeaseStore`) and the checkpoint fence
//! (`CheckpointStore::fence_checkpoint`) on a standalone server (`REDIS_URL`, and servers of
//! their own where a test changes the server's settings or stops it): generations, expiry by the
//! server's clock, releases, the listing, argument checks, the keys and what the store refuses.
//! The consumer groups built on them are tested in `groups.rs`.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use es_core::contract::{Checkpoint, HeldLease, LeaseStore, MAX_LEASE_NAME, MAX_LEASE_TTL};
use es_core::{CheckpointStore, StoreError};
use es_redis::redis::{self, AsyncCommands};
use es_redis::{Error, RedisStore};
use es_test_support::{scratch_dir, RedisServer};

const LONG: Duration = Duration::from_secs(60);

fn held(name: &str, owner: &str, generation: u64) -> HeldLease {
    HeldLease {
        name: name.to_owned(),
        owner: owner.to_owned(),
        generation,
    }
}

fn raw(store: &RedisStore) -> redis::aio::ConnectionManager {
    store.connection()
}

/// The server's clock, in milliseconds.
async fn server_ms(store: &RedisStore) -> u64 {
    let (secs, micros): (u64, u64) = redis::cmd("TIME")
        .query_async(&mut raw(store))
        .await
        .unwrap();
    secs * 1000 + micros / 1000
}

/// The lease as stored: generation, expiry (ms, server clock) and owner.
async fn stored(store: &RedisStore, group: &str, name: &str) -> Option<(u64, u64, String)> {
    let keys = store.keys().lease_group(group);
    let value: Option<String> = raw(store).hget(keys.leases(), name).await.unwrap();
    let value = value?;
    let mut parts = value.splitn(3, ' ');
    Some((
        parts.next().unwrap().parse().unwrap(),
        parts.next().unwrap().parse().unwrap(),
        parts.next().unwrap().to_owned(),
    ))
}

fn invalid(result: Result<impl std::fmt::Debug, StoreError>, what: &str) {
    match result {
        Err(StoreError::InvalidLease { reason }) => assert!(!reason.is_empty(), "{what}"),
        other => panic!("{what}: expected InvalidLease, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_changes_hands_with_a_new_generation_and_is_renewed_in_its_own() {
    let store = common::store("lease-gen").await;
    let g = "projection:orders";
    let p = "partition:0";

    assert_eq!(store.acquire_lease(g, p, "a", LONG).await.unwrap(), Some(1));
    // Renewing keeps the generation; another owner is refused.
    assert_eq!(store.acquire_lease(g, p, "a", LONG).await.unwrap(), Some(1));
    assert_eq!(store.acquire_lease(g, p, "b", LONG).await.unwrap(), None);
    assert_eq!(store.held_leases(g).await.unwrap(), vec![held(p, "a", 1)]);

    // A release by another owner, or in another generation, does nothing.
    store.release_lease(g, p, "b", 1).await.unwrap();
    store.release_lease(g, p, "a", 2).await.unwrap();
    store.release_lease(g, p, "a", 0).await.unwrap();
    assert_eq!(store.acquire_lease(g, p, "b", LONG).await.unwrap(), None);
    assert_eq!(store.held_leases(g).await.unwrap(), vec![held(p, "a", 1)]);

    // Released by its owner in its generation: free, and the next taker gets generation 2.
    store.release_lease(g, p, "a", 1).await.unwrap();
    assert_eq!(store.held_leases(g).await.unwrap(), vec![]);
    assert_eq!(store.acquire_lease(g, p, "b", LONG).await.unwrap(), Some(2));
    assert_eq!(store.acquire_lease(g, p, "a", LONG).await.unwrap(), None);
    // Releasing again, or with the old generation, changes nothing.
    store.release_lease(g, p, "a", 1).await.unwrap();
    assert_eq!(store.held_leases(g).await.unwrap(), vec![held(p, "b", 2)]);

    // The former owner taking it back after a release gets a new generation too, as does an
    // owner retaking its own released lease: a taking is a new generation whoever takes.
    store.release_lease(g, p, "b", 2).await.unwrap();
    assert_eq!(store.acquire_lease(g, p, "a", LONG).await.unwrap(), Some(3));
    store.release_lease(g, p, "a", 3).await.unwrap();
    assert_eq!(store.acquire_lease(g, p, "a", LONG).await.unwrap(), Some(4));
    assert_eq!(stored(&store, g, p).await.unwrap().0, 4);

    // Leases are per name and per group.
    assert_eq!(
        store
            .acquire_lease(g, "partition:1", "b", LONG)
            .await
            .unwrap(),
        Some(1)
    );
    assert_eq!(
        store.acquire_lease("relay", p, "b", LONG).await.unwrap(),
        Some(1)
    );
    assert_eq!(
        store.held_leases(g).await.unwrap(),
        vec![held(p, "a", 4), held("partition:1", "b", 1)]
    );
    assert_eq!(
        store.held_leases("relay").await.unwrap(),
        vec![held(p, "b", 1)]
    );
    // A group nobody used holds nothing.
    assert_eq!(store.held_leases("nobody").await.unwrap(), vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_expire_by_the_server_clock() {
    let store = common::store("lease-expiry").await;
    let g = "group";
    let ttl = Duration::from_millis(200);

    let before = server_ms(&store).await;
    assert_eq!(
        store.acquire_lease(g, "x", "a", ttl).await.unwrap(),
        Some(1)
    );
    let after = server_ms(&store).await;
    // The expiry is the server's clock plus the ttl.
    let (generation, expires, owner) = stored(&store, g, "x").await.unwrap();
    assert_eq!((generation, owner.as_str()), (1, "a"));
    assert!(
        (before + 200..=after + 200).contains(&expires),
        "expires {expires} not within the server's clock {before}..={after} + 200 ms"
    );
    assert_eq!(store.acquire_lease(g, "x", "b", ttl).await.unwrap(), None);
    assert_eq!(store.held_leases(g).await.unwrap(), vec![held("x", "a", 1)]);

    // Renewing moves the expiry on from the server's clock now, keeping the generation.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = server_ms(&store).await;
    assert_eq!(
        store.acquire_lease(g, "x", "a", ttl).await.unwrap(),
        Some(1)
    );
    let (_, renewed, _) = stored(&store, g, "x").await.unwrap();
    assert!(
        renewed >= before + 200 && renewed > expires,
        "{renewed} {expires}"
    );

    // Expired: not listed, and free for anyone, in a new generation.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(server_ms(&store).await > renewed);
    assert_eq!(store.held_leases(g).await.unwrap(), vec![]);
    assert_eq!(
        store.acquire_lease(g, "x", "b", LONG).await.unwrap(),
        Some(2)
    );
    assert_eq!(store.acquire_lease(g, "x", "a", ttl).await.unwrap(), None);
    // The former owner's release of its old generation does nothing.
    store.release_lease(g, "x", "a", 1).await.unwrap();
    assert_eq!(store.held_leases(g).await.unwrap(), vec![held("x", "b", 2)]);

    // An owner retaking its own expired lease gets a new generation: someone else may have
    // held it in between.
    assert_eq!(
        store.acquire_lease(g, "y", "c", ttl).await.unwrap(),
        Some(1)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        store.acquire_lease(g, "y", "c", ttl).await.unwrap(),
        Some(2)
    );
    // A release after expiry keeps the generation: the next taking is 3.
    tokio::time::sleep(Duration::from_millis(300)).await;
    store.release_lease(g, "y", "c", 2).await.unwrap();
    assert_eq!(
        store.acquire_lease(g, "y", "d", ttl).await.unwrap(),
        Some(3)
    );

    // The shortest lease, 1 ms, runs out.
    assert_eq!(
        store
            .acquire_lease(g, "z", "a", Duration::from_millis(1))
            .await
            .unwrap(),
        Some(1)
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        store.acquire_lease(g, "z", "b", LONG).await.unwrap(),
        Some(2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_leases_are_listed_in_name_order_without_released_or_expired_ones() {
    let store = common::store("lease-list").await;
    let g = "projection:balances";
    let names = [
        "partition:2",
        "partition:10",
        "member:b~f00",
        "member:a~0ff",
        "Z",
        "é",
        "a b",
        "a",
        "{x}",
    ];
    for (i, name) in names.iter().enumerate() {
        let owner = format!("owner {i}");
        assert_eq!(
            store.acquire_lease(g, name, &owner, LONG).await.unwrap(),
            Some(1)
        );
    }
    // Renewed ones keep their generation; a lease retaken after release shows its new one.
    store.acquire_lease(g, "a", "owner 7", LONG).await.unwrap();
    store.release_lease(g, "Z", "owner 4", 1).await.unwrap();
    store.acquire_lease(g, "Z", "someone", LONG).await.unwrap();
    // Not listed: released, expired, and other groups' leases.
    store.acquire_lease(g, "released", "r", LONG).await.unwrap();
    store.release_lease(g, "released", "r", 1).await.unwrap();
    store
        .acquire_lease(g, "expired", "e", Duration::from_millis(1))
        .await
        .unwrap();
    store.acquire_lease("other", "a", "o", LONG).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;

    let listed = store.held_leases(g).await.unwrap();
    let mut expected: Vec<HeldLease> = names
        .iter()
        .enumerate()
        .map(|(i, name)| match *name {
            "Z" => held(name, "someone", 2),
            _ => held(name, &format!("owner {i}"), 1),
        })
        .collect();
    // Name order is byte order, as `String`'s (and es-memory's `BTreeMap`'s).
    expected.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    assert_eq!(listed, expected);
    assert_eq!(
        listed.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(),
        [
            "Z",
            "a",
            "a b",
            "member:a~0ff",
            "member:b~f00",
            "partition:10",
            "partition:2",
            "{x}",
            "é"
        ]
    );

    // The index of held leases drops what a later acquire finds expired, so that it holds no
    // more than the held leases and the ones whose time ran out since.
    store.acquire_lease(g, "a", "owner 7", LONG).await.unwrap();
    let index: Vec<String> = raw(&store)
        .zrange(store.keys().lease_group(g).held(), 0, -1)
        .await
        .unwrap();
    assert!(!index.iter().any(|n| n == "released"), "{index:?}");
    assert!(!index.iter().any(|n| n == "expired"), "{index:?}");
    assert_eq!(index.len(), names.len(), "{index:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_of_many_racing_owners_takes_a_free_lease() {
    let store = common::store("lease-race").await;
    // Every racer on a handle of its own, with its own connection.
    let url = es_test_support::redis_url();
    let prefix = store.keys().prefix().to_owned();
    let mut handles = Vec::new();
    for _ in 0..6 {
        handles.push(
            RedisStore::builder(url.as_str())
                .prefix(prefix.as_str())
                .build()
                .await
                .unwrap(),
        );
    }
    for round in 1..=5u64 {
        let mut racers = Vec::new();
        for (i, handle) in handles.iter().enumerate() {
            for j in 0..4 {
                let handle = handle.clone();
                racers.push(tokio::spawn(async move {
                    let owner = format!("w{i}-{j}");
                    let got = handle
                        .acquire_lease("race", "partition:0", &owner, LONG)
                        .await
                        .unwrap();
                    got.map(|generation| (owner, generation))
                }));
            }
        }
        let mut winners = Vec::new();
        for racer in racers {
            winners.extend(racer.await.unwrap());
        }
        assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
        let (owner, generation) = winners.pop().unwrap();
        assert_eq!(generation, round);
        assert_eq!(
            store.held_leases("race").await.unwrap(),
            vec![held("partition:0", &owner, round)]
        );
        store
            .release_lease("race", "partition:0", &owner, generation)
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_and_owners_of_any_characters_and_the_keys_they_use() {
    let store = common::store("lease-names").await;
    let group = "a}b{c d%ü\u{0}";
    let name = "{partition} 1\n";
    let owner = "host a:1 ~ pid\u{0}42 %s";
    let longest = "n".repeat(MAX_LEASE_NAME);
    assert_eq!(
        store.acquire_lease(group, name, owner, LONG).await.unwrap(),
        Some(1)
    );
    assert_eq!(
        store
            .acquire_lease(&longest, &longest, &longest, MAX_LEASE_TTL)
            .await
            .unwrap(),
        Some(1)
    );
    assert_eq!(
        store.held_leases(group).await.unwrap(),
        vec![held(name, owner, 1)]
    );
    assert_eq!(
        store.held_leases(&longest).await.unwrap(),
        vec![held(&longest, &longest, 1)]
    );
    assert_eq!(
        store
            .acquire_lease(group, name, "other", LONG)
            .await
            .unwrap(),
        None
    );
    // The group's keys: under the store's prefix, one hash tag (the group's, escaped), no
    // expiry (the lease's end is a value, on the server's clock), so that a `volatile-*`
    // eviction policy cannot drop them.
    let keys = store.keys().lease_group(group);
    let prefix = store.keys().prefix();
    assert_eq!(
        keys.tag(),
        format!("{prefix}:$group:a%7Db%7Bc%20d%25%C3%BC%00")
    );
    let mut conn = raw(&store);
    let found: BTreeSet<String> = conn
        .keys(format!("{prefix}:{{{}}}:*", keys.tag()))
        .await
        .unwrap();
    assert_eq!(
        found,
        BTreeSet::from([keys.leases().to_owned(), keys.held().to_owned()])
    );
    for key in &found {
        let ttl: i64 = conn.pttl(key).await.unwrap();
        assert_eq!(ttl, -1, "{key} has an expiry");
    }
    store.release_lease(group, name, owner, 1).await.unwrap();
    assert_eq!(store.held_leases(group).await.unwrap(), vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_arguments_are_refused_before_any_call() {
    let dir = scratch_dir("es-redis-lease-args");
    let mut server = RedisServer::start(&dir, &["--appendonly", "yes"]).unwrap();
    let store = RedisStore::builder(server.url())
        .prefix("args")
        .response_timeout(Duration::from_secs(2))
        .build()
        .await
        .unwrap();
    let long = "x".repeat(MAX_LEASE_NAME + 1);
    let checks = |store: RedisStore| {
        let long = long.clone();
        async move {
            for (group, name, owner) in [
                ("", "n", "o"),
                ("g", "", "o"),
                ("g", "n", ""),
                (long.as_str(), "n", "o"),
                ("g", long.as_str(), "o"),
                ("g", "n", long.as_str()),
            ] {
                let what = format!("{group:.8?}/{name:.8?}/{owner:.8?}");
                invalid(store.acquire_lease(group, name, owner, LONG).await, &what);
                invalid(store.release_lease(group, name, owner, 1).await, &what);
            }
            for ttl in [
                Duration::ZERO,
                Duration::from_micros(999),
                MAX_LEASE_TTL + Duration::from_millis(1),
                Duration::MAX,
            ] {
                invalid(
                    store.acquire_lease("g", "n", "o", ttl).await,
                    &format!("ttl {ttl:?}"),
                );
            }
            invalid(store.held_leases("").await, "empty group");
            invalid(store.held_leases(&long).await, "long group");
        }
    };
    checks(store.clone()).await;
    // Nothing was written.
    let mut conn = store.connection();
    let written: Vec<String> = conn.keys("args:*$group*").await.unwrap();
    assert_eq!(written, Vec::<String>::new());

    // With the server gone, the same calls are refused just as fast: they never reach it,
    // while a valid call fails as unavailable.
    server.kill9().unwrap();
    let started = std::time::Instant::now();
    checks(store.clone()).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    match store.acquire_lease("g", "n", "o", LONG).await {
        Err(StoreError::Unavailable { .. }) => {}
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_lease_is_reported_and_left_as_it_is() {
    let store = common::store("lease-corrupt").await;
    let g = "group";
    let keys = store.keys().lease_group(g);
    let mut conn = raw(&store);
    store.acquire_lease(g, "good", "a", LONG).await.unwrap();
    let _: () = conn
        .hset(keys.leases(), "bad", "not a lease")
        .await
        .unwrap();
    let _: () = conn.zadd(keys.held(), "bad", u64::MAX / 4).await.unwrap();
    for result in [
        store.acquire_lease(g, "bad", "a", LONG).await.map(|_| ()),
        store.release_lease(g, "bad", "a", 1).await,
        store.held_leases(g).await.map(|_| ()),
    ] {
        match result {
            Err(StoreError::Corrupt { location, .. }) => {
                assert!(
                    location.contains("bad") && location.contains(g),
                    "{location}"
                );
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }
    let value: String = conn.hget(keys.leases(), "bad").await.unwrap();
    assert_eq!(value, "not a lease");
    // A key of another type: corrupt too.
    let _: () = conn
        .set(store.keys().lease_group("typed").leases(), "x")
        .await
        .unwrap();
    match store.acquire_lease("typed", "n", "a", LONG).await {
        Err(StoreError::Corrupt { .. }) => {}
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // The other leases of the group are unharmed.
    let _: () = conn.zrem(keys.held(), "bad").await.unwrap();
    assert_eq!(
        store.held_leases(g).await.unwrap(),
        vec![held("good", "a", 1)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_can_evict_the_leases_refuses_to_grant_them() {
    let dir = scratch_dir("es-redis-lease-evict");
    let server = RedisServer::start(&dir, &["--appendonly", "yes"]).unwrap();
    let url = server.url();
    // A long check interval: the lease function checks the policy itself, on every call.
    let store = RedisStore::builder(url.as_str())
        .prefix("evict")
        .server_check_interval(Duration::from_secs(3600))
        .build()
        .await
        .unwrap();
    let allowing = RedisStore::builder(url.as_str())
        .prefix("evict")
        .allow_eviction(true)
        .build()
        .await
        .unwrap();
    assert_eq!(
        store.acquire_lease("g", "p", "a", LONG).await.unwrap(),
        Some(1)
    );
    let admin = store.connection();
    let set_policy = |policy: &'static str| {
        let mut admin = admin.clone();
        async move {
            let _: () = redis::cmd("CONFIG")
                .arg("SET")
                .arg("maxmemory-policy")
                .arg(policy)
                .query_async(&mut admin)
                .await
                .unwrap();
        }
    };
    set_policy("allkeys-lru").await;
    for owner in ["a", "b"] {
        let err = store
            .acquire_lease("g", "p", owner, LONG)
            .await
            .expect_err("an evicting server");
        let StoreError::Backend(source) = &err else {
            panic!("expected Backend, got {err:?}");
        };
        match source.downcast_ref::<Error>() {
            Some(Error::EvictionPolicy { policy }) => assert_eq!(policy, "allkeys-lru"),
            other => panic!("expected EvictionPolicy, got {other:?}"),
        }
    }
    // Nothing was written: the lease is as it was.
    assert_eq!(stored(&store, "g", "p").await.unwrap().0, 1);
    // Listing and releasing still work; a store that allows eviction takes leases.
    assert_eq!(
        store.held_leases("g").await.unwrap(),
        vec![held("p", "a", 1)]
    );
    store.release_lease("g", "p", "a", 1).await.unwrap();
    assert_eq!(
        allowing.acquire_lease("g", "p", "b", LONG).await.unwrap(),
        Some(2)
    );
    // `volatile-*` evicts only keys with an expiry, which the leases never have.
    set_policy("volatile-lru").await;
    assert_eq!(
        store.acquire_lease("g", "q", "a", LONG).await.unwrap(),
        Some(1)
    );
    set_policy("noeviction").await;
    assert_eq!(
        store.acquire_lease("g", "q", "a", LONG).await.unwrap(),
        Some(1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_a_checkpoint_raises_its_generation_and_keeps_its_position() {
    let store = common::store("fence").await;
    let name = "orders#3";
    let at = |position, generation| Checkpoint {
        position,
        generation,
    };
    // Missing: created at 0, in generation 1.
    assert_eq!(store.fence_checkpoint(name).await.unwrap(), at(0, 1));
    assert_eq!(store.load_checkpoint(name).await.unwrap(), at(0, 1));
    assert!(store.save_checkpoint(name, at(10, 1)).await.unwrap());

    // Fenced: the position kept, the generation raised; the earlier holder's saves refused.
    assert_eq!(store.fence_checkpoint(name).await.unwrap(), at(10, 2));
    match store.save_checkpoint(name, at(20, 1)).await {
        Err(StoreError::Fenced { .. }) => {}
        other => panic!("expected Fenced, got {other:?}"),
    }
    assert_eq!(store.load_checkpoint(name).await.unwrap(), at(10, 2));
    assert!(store.save_checkpoint(name, at(20, 2)).await.unwrap());
    assert_eq!(store.fence_checkpoint(name).await.unwrap(), at(20, 3));
    // A reset and a fence share the generation counter; a fence after a reset keeps 0.
    assert_eq!(store.reset_checkpoint(name).await.unwrap(), at(0, 4));
    assert_eq!(store.fence_checkpoint(name).await.unwrap(), at(0, 5));
    // Positions anywhere in the u64 range come back exactly.
    assert!(store
        .save_checkpoint(name, at(u64::MAX - 1, 5))
        .await
        .unwrap());
    assert_eq!(
        store.fence_checkpoint(name).await.unwrap(),
        at(u64::MAX - 1, 6)
    );

    // Concurrent fences each get a generation of their own.
    let mut racers = Vec::new();
    for _ in 0..16 {
        let store = store.clone();
        racers.push(tokio::spawn(
            async move { store.fence_checkpoint("race").await },
        ));
    }
    let mut generations = BTreeSet::new();
    for racer in racers {
        let taken = racer.await.unwrap().unwrap();
        assert_eq!(taken.position, 0);
        generations.insert(taken.generation);
    }
    assert_eq!(generations, (1..=16).collect());

    // A stored position or generation that is not a number: reported, nothing written.
    let mut conn = raw(&store);
    let keys = store.keys().clone();
    let _: () = conn.hset(keys.checkpoints(), "bad", "x").await.unwrap();
    let _: () = conn
        .hset(keys.checkpoint_generations(), "bad-gen", "y")
        .await
        .unwrap();
    for bad in ["bad", "bad-gen"] {
        match store.fence_checkpoint(bad).await {
            Err(StoreError::Corrupt { location, .. }) => assert!(location.contains(bad)),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }
    let generation: Option<String> = conn
        .hget(keys.checkpoint_generations(), "bad")
        .await
        .unwrap();
    assert_eq!(generation, None);
    let generation: String = conn
        .hget(keys.checkpoint_generations(), "bad-gen")
        .await
        .unwrap();
    assert_eq!(generation, "y");
    let position: Option<String> = conn.hget(keys.checkpoints(), "bad-gen").await.unwrap();
    assert_eq!(position, None);
}
