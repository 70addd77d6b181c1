//! The leases of consumer groups on [`PgStore`] (migration 9): one row per lease in
//! `group_leases`, each call one statement on the database clock.

use std::time::Duration;

use es_core::contract::{check_lease, HeldLease, LeaseStore, StoreFuture};
use es_core::StoreError;

use crate::codec::{to_i64, to_u64};
use crate::error::{store_error, timed};
use crate::outbox::render;
use crate::PgStore;

/// Takes or renews a lease: `(group, name, owner, ttl in microseconds)`, returns the generation
/// or NULL.
const ACQUIRE: &str = "SELECT __S__.group_lease_acquire($1, $2, $3, $4)";

/// Releases a lease: `(group, name, owner, generation)`.
const RELEASE: &str = "SELECT __S__.group_lease_release($1, $2, $3, $4)";

/// The leases of group `$1` held now, in name order.
const HELD: &str = "SELECT held_name, held_owner, held_generation FROM __S__.group_leases_held($1)";

/// PostgreSQL `text` cannot hold NUL, so a name or owner with one is refused before it is sent.
fn check_text(what: &str, value: &str) -> Result<(), StoreError> {
    if value.contains('\0') {
        return Err(StoreError::InvalidLease {
            reason: format!("a {what} stored in PostgreSQL cannot hold a NUL character"),
        });
    }
    Ok(())
}

impl LeaseStore for PgStore {
    fn acquire_lease(
        &self,
        group: &str,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> impl StoreFuture<Option<u64>> {
        let checked = check_lease(group, name, owner, ttl).and_then(|_| {
            check_text("group", group)?;
            check_text("lease name", name)?;
            check_text("owner", owner)
        });
        let sql = render(&self.inner.schema, ACQUIRE);
        let pool = self.inner.pool.clone();
        let (group, name, owner) = (group.to_owned(), name.to_owned(), owner.to_owned());
        // At most a day (checked), so the microseconds fit.
        let ttl = i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX);
        timed(self.inner.query_timeout, async move {
            checked?;
            let generation: Option<i64> = sqlx::query_scalar(sql)
                .bind(&group)
                .bind(&name)
                .bind(&owner)
                .bind(ttl)
                .fetch_one(&pool)
                .await
                .map_err(store_error)?;
            generation
                .map(|g| to_u64(g, &format!("the generation of lease `{name}` of `{group}`")))
                .transpose()
        })
    }

    fn release_lease(
        &self,
        group: &str,
        name: &str,
        owner: &str,
        generation: u64,
    ) -> impl StoreFuture<()> {
        // A lease that cannot be stored (a NUL in a name) is not held by anyone: nothing to do.
        let storable = ![group, name, owner].iter().any(|s| s.contains('\0'));
        let sql = render(&self.inner.schema, RELEASE);
        let pool = self.inner.pool.clone();
        let (group, name, owner) = (group.to_owned(), name.to_owned(), owner.to_owned());
        timed(self.inner.query_timeout, async move {
            if storable {
                sqlx::query(sql)
                    .bind(group)
                    .bind(name)
                    .bind(owner)
                    .bind(to_i64(generation))
                    .execute(&pool)
                    .await
                    .map_err(store_error)?;
            }
            Ok(())
        })
    }

    fn held_leases(&self, group: &str) -> impl StoreFuture<Vec<HeldLease>> {
        let storable = !group.contains('\0');
        let sql = render(&self.inner.schema, HELD);
        let pool = self.inner.pool.clone();
        let group = group.to_owned();
        timed(self.inner.query_timeout, async move {
            if !storable {
                return Ok(Vec::new());
            }
            let rows: Vec<(String, String, i64)> = sqlx::query_as(sql)
                .bind(&group)
                .fetch_all(&pool)
                .await
                .map_err(store_error)?;
            rows.into_iter()
                .map(|(name, owner, generation)| {
                    let generation = to_u64(
                        generation,
                        &format!("the generation of lease `{name}` of `{group}`"),
                    )?;
                    Ok(HeldLease {
                        name,
                        owner,
                        generation,
                    })
                })
                .collect()
        })
    }
}
