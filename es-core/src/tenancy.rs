//! Tenants: one application, many customers whose data never meet.
//!
//! A tenant gets a store of its own, built by the backend in a namespace derived from its
//! [`TenantId`]: a PostgreSQL schema (`es-postgres`'s `PgTenants`), a Redis key prefix
//! (`es-redis`'s `RedisTenants`), a separate in-memory store (`es-memory`'s `InMemoryTenants`).
//! Everything the store does then stays inside that namespace: streams and their versions, the
//! feed and its positions, subscriptions, snapshots, the outbox and its relay lease, projection
//! checkpoints, consumer-group leases and personal-data keys. There is no call that takes a
//! tenant and a stream: code holding one tenant's store cannot name another tenant's data.
//!
//! [`Tenants`] opens each tenant's store once, on first use, and hands out clones after that;
//! [`Tenants::repository`] builds a [`Repository`] on it.
//!
//! # Tenant ids
//!
//! A [`TenantId`] is 1 to [`TenantId::MAX_LEN`] bytes of lower-case ASCII letters, digits and
//! `_`, starting with a letter or a digit. Everything else is refused with
//! [`InvalidTenantId`] before any store is touched: upper case (so that `Acme` and `acme`
//! cannot name two tenants that a case-insensitive system would merge), separators of the
//! backends' namespaces (`:`, `.`, `-`, `/`), quotes, spaces and non-ASCII look-alikes. With
//! that alphabet the namespace is the id itself behind a fixed prefix, so two ids never share a
//! namespace.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;

use crate::contract::StreamingStore;
use crate::repository::{Repository, RepositoryBuilder};

/// A validated tenant id: see the [module docs](self#tenant-ids).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(Arc<str>);

/// A tenant id that was refused, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid tenant id {shown}: {reason}")]
pub struct InvalidTenantId {
    /// The id as given, escaped and cut to 40 characters.
    pub shown: String,
    /// Why it was refused.
    pub reason: &'static str,
}

impl TenantId {
    /// Longest tenant id, in bytes.
    pub const MAX_LEN: usize = 32;

    /// Checks `id`.
    pub fn new(id: &str) -> Result<Self, InvalidTenantId> {
        let reason = if id.is_empty() {
            Some("it is empty")
        } else if id.len() > Self::MAX_LEN {
            Some("it is longer than 32 bytes")
        } else if !id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            Some("only lower-case ASCII letters, digits and `_` are allowed")
        } else if id.starts_with('_') {
            Some("it starts with `_`")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(InvalidTenantId {
                shown: format!("{:?}", id.chars().take(40).collect::<String>()),
                reason,
            }),
            None => Ok(Self(id.into())),
        }
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for TenantId {
    type Err = InvalidTenantId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// Opens the store of a tenant: implemented by each backend's tenant factory.
pub trait TenantStores: Clone + Send + Sync + 'static {
    /// The store each tenant gets.
    type Store: StreamingStore;
    /// Why a tenant's store could not be opened.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The namespace `tenant`'s store lives in (a schema, a key prefix), for messages and tools.
    fn namespace(&self, tenant: &TenantId) -> String;

    /// Opens (creating it if needed) the store of `tenant`. Opening the same tenant again gives
    /// a store over the same data.
    fn open(
        &self,
        tenant: &TenantId,
    ) -> impl Future<Output = Result<Self::Store, Self::Error>> + Send;
}

/// Why [`Tenants`] gave no store.
#[derive(Debug, thiserror::Error)]
pub enum TenantError<E: std::error::Error + 'static> {
    /// The tenant id was refused.
    #[error(transparent)]
    InvalidTenant(#[from] InvalidTenantId),
    /// The backend could not open the tenant's store.
    #[error("cannot open the store of tenant `{tenant}`")]
    Open {
        /// The tenant.
        tenant: TenantId,
        /// What the backend said.
        #[source]
        source: E,
    },
    /// The repository could not be built on the tenant's store.
    #[error("cannot build the repository of tenant `{tenant}`")]
    Repository {
        /// The tenant.
        tenant: TenantId,
        /// What the builder said.
        #[source]
        source: crate::repository::BuildError,
    },
}

/// The stores of every tenant, each opened once. Cheap to clone (shared).
pub struct Tenants<F: TenantStores> {
    factory: F,
    open: Arc<tokio::sync::Mutex<HashMap<TenantId, F::Store>>>,
}

impl<F: TenantStores> Clone for Tenants<F> {
    fn clone(&self) -> Self {
        Self {
            factory: self.factory.clone(),
            open: Arc::clone(&self.open),
        }
    }
}

impl<F: TenantStores> fmt::Debug for Tenants<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tenants").finish_non_exhaustive()
    }
}

impl<F: TenantStores> Tenants<F> {
    /// Tenants whose stores `factory` opens.
    pub fn new(factory: F) -> Self {
        Self {
            factory,
            open: Arc::default(),
        }
    }

    /// The factory.
    pub fn factory(&self) -> &F {
        &self.factory
    }

    /// The store of `tenant` (a string is checked as a [`TenantId`] first), opened on first use.
    /// Calls for one tenant that come while its store is being opened wait for that opening.
    pub async fn store(&self, tenant: &str) -> Result<F::Store, TenantError<F::Error>> {
        let tenant = TenantId::new(tenant)?;
        let mut open = self.open.lock().await;
        if let Some(store) = open.get(&tenant) {
            return Ok(store.clone());
        }
        let store = self
            .factory
            .open(&tenant)
            .await
            .map_err(|source| TenantError::Open {
                tenant: tenant.clone(),
                source,
            })?;
        open.insert(tenant, store.clone());
        Ok(store)
    }

    /// A repository on `tenant`'s store, configured by `configure` (upcasters, translators,
    /// snapshot policies: the same for every tenant).
    pub async fn repository(
        &self,
        tenant: &str,
        configure: impl FnOnce(RepositoryBuilder<F::Store>) -> RepositoryBuilder<F::Store>,
    ) -> Result<Repository<F::Store>, TenantError<F::Error>> {
        let store = self.store(tenant).await?;
        let tenant = TenantId::new(tenant)?;
        configure(Repository::builder(store))
            .build()
            .map_err(|source| TenantError::Repository { tenant, source })
    }

    /// The tenants opened so far by this handle (and its clones), in id order.
    pub async fn opened(&self) -> Vec<TenantId> {
        let mut ids: Vec<TenantId> = self.open.lock().await.keys().cloned().collect();
        ids.sort();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::TenantId;

    #[test]
    fn tenant_ids_are_checked() {
        for good in ["a", "acme", "acme_eu", "0", "t1", &"x".repeat(32)] {
            assert_eq!(TenantId::new(good).unwrap().as_str(), good);
        }
        let long = "x".repeat(33);
        for bad in [
            "",
            "Acme",
            "acme-eu",
            "acme:eu",
            "acme.eu",
            "a/b",
            "../a",
            "a b",
            "a\"b",
            "a'b",
            "_a",
            "é",
            "a\u{0430}",
            "a\0",
            "a;drop",
            &long,
        ] {
            let err = TenantId::new(bad).unwrap_err();
            assert!(err.shown.chars().count() <= 44, "{err}");
        }
    }
}
