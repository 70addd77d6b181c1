//! Crypto-shredding on Redis: the suite under a fresh prefix (and under the documented ACL
//! user), and what `redis-cli` sees in the keys.

mod common;

use es_core::personal::{Encrypted, Personal};
use es_core::{Repository, SnapshotPolicy};
use es_redis::redis;
use es_testkit::shredding::{Customer, CustomerCommand, Mailer};

es_testkit::shredding_conformance_tests!(|| async {
    let store = common::store("shred").await;
    let keys = store.key_store();
    (store, keys)
});

/// Every key of the store's prefix with its raw contents, as `redis-cli` would print them: the
/// strings, hashes and streams, byte for byte.
async fn dump(store: &es_redis::RedisStore) -> Vec<(String, String)> {
    let mut conn = store.connection();
    let pattern = format!("{}:*", store.keys().prefix());
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(&pattern)
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut out = Vec::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let value: redis::Value = match kind.as_str() {
            "string" => redis::cmd("GET")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap(),
            "hash" => redis::cmd("HGETALL")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap(),
            "stream" => redis::cmd("XRANGE")
                .arg(&key)
                .arg("-")
                .arg("+")
                .query_async(&mut conn)
                .await
                .unwrap(),
            "zset" => redis::cmd("ZRANGE")
                .arg(&key)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .query_async(&mut conn)
                .await
                .unwrap(),
            other => panic!("unexpected key type {other} of {key}"),
        };
        out.push((key, text_of(&value)));
    }
    out.sort();
    out
}

fn text_of(value: &redis::Value) -> String {
    match value {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        redis::Value::SimpleString(s) => s.clone(),
        redis::Value::Array(items) | redis::Value::Set(items) => {
            items.iter().map(text_of).collect::<Vec<_>>().join(" ")
        }
        redis::Value::Map(pairs) => pairs
            .iter()
            .map(|(k, v)| format!("{} {}", text_of(k), text_of(v)))
            .collect::<Vec<_>>()
            .join(" "),
        other => format!("{other:?}"),
    }
}

/// What `redis-cli` sees: every key of the prefix (event streams, snapshot hash, outbox) holds
/// the sealed form and never the plaintext; after `forget`, the subject's key holds the
/// tombstone and no key bytes, and every other key is unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_redis_sees_only_ciphertext_and_no_key_after_forget() {
    let store = common::store("shredraw").await;
    let keys = store.key_store();
    let encrypted = Encrypted::new(store.clone(), keys.clone());
    let repo = Repository::builder(encrypted.clone())
        .translator::<Customer, _>(Mailer)
        .default_snapshot_policy(SnapshotPolicy::EveryNEvents(1))
        .build()
        .unwrap();
    repo.execute::<Customer>(
        "c-cli",
        &CustomerCommand::Register("c-cli:Grace Hopper".into(), "grace@navy.example".into()),
    )
    .await
    .unwrap();

    let before = dump(&store).await;
    let all = before
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(all.contains("$sealed"), "{all}");
    for secret in ["Grace Hopper", "grace@navy.example"] {
        assert!(!all.contains(secret), "`{secret}` in clear: {all}");
    }
    let key_name = keys.key_of("c-cli");
    assert!(
        before.iter().any(|(k, _)| *k == key_name),
        "the key is under the prefix"
    );

    assert!(encrypted.forget("c-cli").await.unwrap());
    let mut conn = store.connection();
    let raw: Vec<u8> = redis::cmd("GET")
        .arg(&key_name)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(raw, b"forgotten");
    let after = dump(&store).await;
    let changed: Vec<_> = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| b != a)
        .map(|(b, _)| b.0.clone())
        .collect();
    assert_eq!(changed, vec![key_name], "only the subject's key changed");
    let loaded = repo.load::<Customer>("c-cli").await.unwrap();
    assert!(loaded
        .aggregate
        .email
        .as_ref()
        .is_some_and(Personal::is_erased));
}
