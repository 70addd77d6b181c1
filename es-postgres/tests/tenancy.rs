//! The tenancy suite on PostgreSQL: a schema per tenant, under a base no other run uses.

mod common;

use std::time::Duration;

use es_postgres::{PgStore, PgTenants};

/// A base of 13 bytes no other test uses: the longest a tenant's schema name leaves room for.
fn unique_base() -> String {
    format!("b{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

async fn tenants() -> PgTenants {
    let pool = common::pool(&es_test_support::database_url(), 24).await;
    let builder = PgStore::builder(pool).poll_interval(Duration::from_millis(200));
    PgTenants::new(builder, &unique_base()).unwrap_or_else(|e| panic!("{e}"))
}

es_testkit::tenancy_conformance_tests!(tenants);

/// A base too long for the longest tenant id is refused when the factory is made, not when a
/// tenant's store is first opened.
#[tokio::test]
async fn a_base_with_no_room_for_tenant_ids_is_refused() {
    let pool = common::pool(&es_test_support::database_url(), 1).await;
    let err = PgTenants::new(PgStore::builder(pool), "fourteen_bytes").unwrap_err();
    assert!(
        matches!(err, es_postgres::Error::InvalidSchemaName { .. }),
        "{err}"
    );
}

/// What `psql` sees: each tenant's rows in its own schema, and the other schemas without them.
#[tokio::test]
async fn each_tenant_has_a_schema_of_its_own() {
    use es_core::{
        AppendRequest, EventStore, ExpectedVersion, NewEvent, StreamId, TenantStores, Tenants,
    };
    let factory = tenants().await;
    let tenants = Tenants::new(factory.clone());
    for tenant in ["acme", "globex"] {
        let store = tenants
            .store(tenant)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let event = NewEvent::new("Noted", 1, format!("{{\"by\":\"{tenant}\"}}"))
            .unwrap_or_else(|e| panic!("{e}"));
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
    let pool = common::pool(&es_test_support::database_url(), 1).await;
    for tenant in ["acme", "globex"] {
        let schema = factory.namespace(&tenant.parse().unwrap_or_else(|e| panic!("{e}")));
        let sql = format!("SELECT payload->>'by' FROM \"{schema}\".events");
        let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_all(&pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(rows, [tenant], "schema {schema}");
    }
}
