//! A PostgreSQL schema per tenant.

use es_core::{TenantId, TenantStores};

use crate::{Error, PgStore, PgStoreBuilder, SchemaName};

/// The stores of every tenant, each in a schema of its own, `<base>_t_<tenant>`, built from one
/// [`PgStoreBuilder`] (its pool, partitioning, migrations setting and the rest are shared; only
/// the schema differs). See [`es_core::tenancy`].
///
/// Tenants share the builder's pool; each tenant's store has its own group-commit writers and,
/// once it waits for appends, its own listening connection. With `run_migrations(false)` each
/// tenant's schema must have been migrated beforehand (`es migrations sql --schema ...`).
#[derive(Clone, Debug)]
pub struct PgTenants {
    builder: PgStoreBuilder,
    base: String,
}

impl PgTenants {
    /// Tenants built by `builder` in schemas named `<base>_t_<tenant>`. `base` must leave room
    /// for the longest tenant id in a schema name: at most 13 bytes, of the characters a
    /// [`SchemaName`] allows.
    pub fn new(builder: PgStoreBuilder, base: &str) -> Result<Self, Error> {
        let longest = format!("{base}_t_{}", "x".repeat(TenantId::MAX_LEN));
        SchemaName::new(&longest)?;
        Ok(Self {
            builder,
            base: base.to_owned(),
        })
    }
}

impl TenantStores for PgTenants {
    type Store = PgStore;
    type Error = Error;

    fn namespace(&self, tenant: &TenantId) -> String {
        format!("{}_t_{tenant}", self.base)
    }

    async fn open(&self, tenant: &TenantId) -> Result<PgStore, Error> {
        self.builder
            .clone()
            .schema(self.namespace(tenant))
            .build()
            .await
    }
}
