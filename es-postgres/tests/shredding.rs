//! Crypto-shredding on PostgreSQL: the suite on a fresh schema (and under the least-privilege
//! application role), and what a plain SQL client sees in the tables.

mod common;

use es_core::personal::{Encrypted, KeyStore, Personal};
use es_core::{Aggregate, Repository, SnapshotPolicy};
use es_testkit::shredding::{Customer, CustomerCommand, Mailer};
use sqlx::{AssertSqlSafe, Row};

es_testkit::shredding_conformance_tests!(|| async {
    let store = common::fresh_store().await;
    let keys = store.key_store();
    (store, keys)
});

/// The suite run by a role with only the grants of `es_postgres::grants_script`: it creates,
/// reads and destroys keys through the schema's functions.
mod least_privilege {
    use super::common;

    es_testkit::shredding_conformance_tests!(|| async {
        let store = common::restricted_store().await;
        let keys = store.key_store();
        (store, keys)
    });
}

/// What `psql` sees: the events, snapshot and outbox rows hold the sealed form and never the
/// plaintext; after `forget`, the key row holds no key material, and the stored rows are
/// unchanged (byte for byte).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_sql_sees_only_ciphertext_and_no_key_after_forget() {
    let store = common::fresh_store().await;
    let schema = store.schema().as_str().to_owned();
    let pool = store.pool().clone();
    let encrypted = Encrypted::new(store.clone(), store.key_store());
    let repo = Repository::builder(encrypted.clone())
        .translator::<Customer, _>(Mailer)
        .default_snapshot_policy(SnapshotPolicy::EveryNEvents(1))
        .build()
        .unwrap();
    repo.execute::<Customer>(
        "c-psql",
        &CustomerCommand::Register("c-psql:Grace Hopper".into(), "grace@navy.example".into()),
    )
    .await
    .unwrap();

    let dump = |table: &str| {
        let sql = format!(
            "SELECT coalesce(string_agg(payload::text, ' '), '') FROM \"{schema}\".{table}"
        );
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(AssertSqlSafe(sql))
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let mut seen = Vec::new();
    for table in ["events", "snapshots", "outbox"] {
        let text = dump(table).await;
        assert!(text.contains("$sealed"), "{table}: {text}");
        for secret in ["Grace Hopper", "grace@navy.example"] {
            assert!(
                !text.contains(secret),
                "{table} holds `{secret}` in clear: {text}"
            );
        }
        seen.push(text);
    }
    let key = sqlx::query(AssertSqlSafe(format!(
        "SELECT material, forgotten_at IS NULL FROM \"{schema}\".subject_keys WHERE subject = 'c-psql'"
    )))
    .fetch_one(&pool)
    .await
    .unwrap();
    let material: Option<Vec<u8>> = key.get(0);
    assert_eq!(material.map(|m| m.len()), Some(32));

    assert!(encrypted.forget("c-psql").await.unwrap());
    let key = sqlx::query(AssertSqlSafe(format!(
        "SELECT material IS NULL, key_version IS NULL, forgotten_at IS NOT NULL \
         FROM \"{schema}\".subject_keys WHERE subject = 'c-psql'"
    )))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (
            key.get::<bool, _>(0),
            key.get::<bool, _>(1),
            key.get::<bool, _>(2)
        ),
        (true, true, true)
    );
    for (table, before) in ["events", "snapshots", "outbox"].into_iter().zip(seen) {
        assert_eq!(dump(table).await, before, "{table} changed on forget");
    }
    let loaded = repo.load::<Customer>("c-psql").await.unwrap();
    assert!(loaded
        .aggregate
        .name
        .as_ref()
        .is_some_and(Personal::is_erased));
    assert_eq!(
        encrypted
            .key_store()
            .load_keys(&["c-psql".to_owned()])
            .await
            .unwrap()["c-psql"],
        es_core::personal::StoredKey::Forgotten
    );
    let _ = Customer::stream_id("c-psql").unwrap();
}

/// `forget` racing first writes of the subject from many connections: whatever the interleaving,
/// after `forget` returned no read yields a value, the subject has one row, a tombstone, and a
/// write after it is stored erased.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_racing_first_writes_leaves_nothing_readable() {
    use es_core::{AppendRequest, EventStore, ExpectedVersion, NewEvent, ReadStream, StreamId};
    use futures::TryStreamExt;

    let store = common::fresh_store().await;
    let schema = store.schema().as_str().to_owned();
    let encrypted = Encrypted::new(store.clone(), store.key_store());
    let write = |i: usize| {
        let encrypted = encrypted.clone();
        async move {
            let payload =
                serde_json::to_vec(&Personal::new("racer", format!("secret-{i}"))).unwrap();
            encrypted
                .append(AppendRequest::new(
                    StreamId::new("racer", &i.to_string()).unwrap(),
                    ExpectedVersion::NoStream,
                    vec![NewEvent::new("Written", 1, payload).unwrap()],
                ))
                .await
                .unwrap();
        }
    };
    let writers: Vec<_> = (0..16).map(|i| tokio::spawn(write(i))).collect();
    tokio::task::yield_now().await;
    encrypted.forget("racer").await.unwrap();
    for w in writers {
        w.await.unwrap();
    }
    tokio::spawn(write(16)).await.unwrap();
    for i in 0..17 {
        let events: Vec<_> = encrypted
            .read_stream(
                &StreamId::new("racer", &i.to_string()).unwrap(),
                ReadStream::forward(),
            )
            .try_collect()
            .await
            .unwrap();
        let email: Personal<String> = serde_json::from_slice(&events[0].payload).unwrap();
        assert!(email.is_erased(), "stream {i} still reads its value");
    }
    let sql = format!(
        "SELECT count(*), count(material), count(forgotten_at) FROM \"{schema}\".subject_keys \
         WHERE subject = 'racer'"
    );
    let (rows, keys, tombstones): (i64, i64, i64) = sqlx::query_as(AssertSqlSafe(sql))
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!((rows, keys, tombstones), (1, 0, 1));
}
