//! A separate in-memory store per tenant.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};

use es_core::{TenantId, TenantStores};

use crate::InMemoryStore;

/// Builds a store for a tenant.
type MakeStore = dyn Fn() -> InMemoryStore + Send + Sync;

/// The in-memory stores of every tenant: one [`InMemoryStore`] each, made on first use and kept
/// (see [`es_core::tenancy`]). Clones share the stores.
#[derive(Clone)]
pub struct InMemoryTenants {
    stores: Arc<Mutex<HashMap<TenantId, InMemoryStore>>>,
    make: Arc<MakeStore>,
}

impl std::fmt::Debug for InMemoryTenants {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryTenants").finish_non_exhaustive()
    }
}

impl Default for InMemoryTenants {
    fn default() -> Self {
        Self::new()
    }
}

impl InMemoryTenants {
    /// Tenants whose stores have the default settings.
    pub fn new() -> Self {
        Self::with(InMemoryStore::new)
    }

    /// Tenants whose stores `make` builds (limits, partitioning, inline projections).
    pub fn with(make: impl Fn() -> InMemoryStore + Send + Sync + 'static) -> Self {
        Self {
            stores: Arc::default(),
            make: Arc::new(make),
        }
    }
}

impl TenantStores for InMemoryTenants {
    type Store = InMemoryStore;
    type Error = Infallible;

    fn namespace(&self, tenant: &TenantId) -> String {
        format!("memory:{tenant}")
    }

    async fn open(&self, tenant: &TenantId) -> Result<InMemoryStore, Infallible> {
        let mut stores = self.stores.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(stores
            .entry(tenant.clone())
            .or_insert_with(|| (self.make)())
            .clone())
    }
}
