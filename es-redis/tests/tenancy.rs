//! The tenancy suite on Redis: a key prefix per tenant, under a base no other run uses.

use es_redis::{RedisStore, RedisTenants};

/// Tenants under a base of 17 bytes no other test uses.
fn tenants() -> RedisTenants {
    let base = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
    let builder = RedisStore::builder(es_test_support::redis_url());
    RedisTenants::new(builder, &base).unwrap_or_else(|e| panic!("{e}"))
}

es_testkit::tenancy_conformance_tests!(|| async { tenants() });

/// What `redis-cli` sees: every key a tenant's store wrote starts with that tenant's prefix and
/// a `:`, so a `SCAN` of one tenant's prefix finds none of another's.
#[tokio::test]
async fn every_key_of_a_tenant_is_under_its_prefix() {
    use es_core::{
        AppendRequest, EventStore, ExpectedVersion, NewEvent, StreamId, TenantStores, Tenants,
    };
    use es_redis::redis;
    let factory = tenants();
    let tenants = Tenants::new(factory.clone());
    for tenant in ["a", "a_b"] {
        let store = tenants
            .store(tenant)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let event = NewEvent::new("Noted", 1, "{}").unwrap_or_else(|e| panic!("{e}"));
        let stream = StreamId::new("doc", "same").unwrap_or_else(|e| panic!("{e}"));
        store
            .append(AppendRequest::new(
                stream,
                ExpectedVersion::NoStream,
                vec![event],
            ))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let store = tenants.store("a").await.unwrap_or_else(|e| panic!("{e}"));
    let mut conn = store.connection();
    let prefix_a = factory.namespace(&"a".parse().unwrap_or_else(|e| panic!("{e}")));
    let prefix_ab = factory.namespace(&"a_b".parse().unwrap_or_else(|e| panic!("{e}")));
    let keys = |pattern: String| {
        let mut conn = conn.clone();
        async move {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(pattern)
                .query_async(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            keys
        }
    };
    let of_a = keys(format!("{prefix_a}:*")).await;
    let of_ab = keys(format!("{prefix_ab}:*")).await;
    assert!(!of_a.is_empty() && !of_ab.is_empty());
    assert!(
        of_a.iter()
            .all(|k| !k.starts_with(&format!("{prefix_ab}:"))),
        "{of_a:?}"
    );
    assert!(
        of_ab
            .iter()
            .all(|k| !k.starts_with(&format!("{prefix_a}:"))),
        "{of_ab:?}"
    );
    let _: () = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}
