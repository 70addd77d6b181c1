//! A Redis key prefix per tenant.

use es_core::{TenantId, TenantStores};

use crate::{Error, Keys, RedisStore, RedisStoreBuilder};

/// The stores of every tenant, each under a key prefix of its own, `<base>:t:<tenant>`, built
/// from one [`RedisStoreBuilder`] (server, layout, partitioning and the rest are shared; only
/// the prefix differs). See [`es_core::tenancy`].
///
/// A tenant id holds no `:`, so no key of one tenant starts with another tenant's prefix, and
/// none of the base prefix's own keys start with `<base>:t:`. Each tenant's store opens its own
/// connection to the server. On a Cluster, each tenant's keys spread over the slots of its own
/// hash tags.
#[derive(Clone, Debug)]
pub struct RedisTenants {
    builder: RedisStoreBuilder,
    base: String,
}

impl RedisTenants {
    /// Tenants built by `builder` under prefixes `<base>:t:<tenant>`. `base` must be a valid
    /// prefix that leaves room for the longest tenant id: at most 29 bytes.
    pub fn new(builder: RedisStoreBuilder, base: &str) -> Result<Self, Error> {
        let longest = format!("{base}:t:{}", "x".repeat(TenantId::MAX_LEN));
        Keys::new(&longest)?;
        Ok(Self {
            builder,
            base: base.to_owned(),
        })
    }
}

impl TenantStores for RedisTenants {
    type Store = RedisStore;
    type Error = Error;

    fn namespace(&self, tenant: &TenantId) -> String {
        format!("{}:t:{tenant}", self.base)
    }

    async fn open(&self, tenant: &TenantId) -> Result<RedisStore, Error> {
        self.builder
            .clone()
            .prefix(self.namespace(tenant))
            .build()
            .await
    }
}
