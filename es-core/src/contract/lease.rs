//! Named leases in groups: how the workers of a consumer group find each other and divide the
//! partitions (see `es_core::group`).

use std::time::Duration;

use super::error::{StoreError, StoreFuture};

/// The longest group, lease or owner name a store accepts, in bytes.
pub const MAX_LEASE_NAME: usize = 200;

/// The longest lease a store grants.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// A lease held now, as [`LeaseStore::held_leases`] lists it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HeldLease {
    /// The lease's name within its group.
    pub name: String,
    /// Who holds it.
    pub owner: String,
    /// The generation it was taken in.
    pub generation: u64,
}

/// Leases with generations, kept in groups, on the store's clock.
///
/// A lease is taken by one owner at a time, for a time-to-live counted by the store's clock; an
/// owner that stops renewing it loses it when the time is up. Each time a lease changes hands (a
/// free, released or expired lease is taken, by anyone, its last owner included) its generation
/// goes up; renewing a lease still held keeps the generation. Generations never go down, across
/// releases too. A lease's generation tells a worker whether it held the lease without a break:
/// when [`acquire_lease`](Self::acquire_lease) answers another generation than the one it
/// started with, someone else may have held the lease in between.
///
/// Leases alone do not fence writes: a worker paused past its lease can wake up and write. The
/// consumer groups pair each partition's lease with a fenced checkpoint
/// ([`CheckpointStore::fence_checkpoint`](super::CheckpointStore::fence_checkpoint)), which
/// refuses the paused worker's writes.
pub trait LeaseStore: Clone + Send + Sync + 'static {
    /// Takes or renews lease `name` of `group` for `owner` until `ttl` from now (store clock).
    /// Returns the lease's generation if `owner` holds it now, `None` if another owner does.
    /// Names and owners are 1 to [`MAX_LEASE_NAME`] bytes and `ttl` is 1 ms to
    /// [`MAX_LEASE_TTL`]; anything else is [`StoreError::InvalidLease`].
    fn acquire_lease(
        &self,
        group: &str,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> impl StoreFuture<Option<u64>>;

    /// Gives lease `name` of `group` up if `owner` holds it in `generation`; otherwise does
    /// nothing. Keeps the generation counter.
    fn release_lease(
        &self,
        group: &str,
        name: &str,
        owner: &str,
        generation: u64,
    ) -> impl StoreFuture<()>;

    /// The leases of `group` held now (neither released nor expired, by the store's clock), in
    /// name order.
    fn held_leases(&self, group: &str) -> impl StoreFuture<Vec<HeldLease>>;
}

/// Checks the arguments of a lease call the way every store does: names and owner 1 to
/// [`MAX_LEASE_NAME`] bytes, `ttl` 1 ms to [`MAX_LEASE_TTL`]. Returns the ttl in whole
/// milliseconds.
pub fn check_lease(group: &str, name: &str, owner: &str, ttl: Duration) -> Result<u64, StoreError> {
    for (what, value) in [("group", group), ("lease name", name), ("owner", owner)] {
        check_lease_name(what, value)?;
    }
    if ttl < Duration::from_millis(1) || ttl > MAX_LEASE_TTL {
        return Err(StoreError::InvalidLease {
            reason: format!("a lease lasts 1 ms to {MAX_LEASE_TTL:?}, not {ttl:?}"),
        });
    }
    Ok(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
}

/// Checks one group, lease or owner name: 1 to [`MAX_LEASE_NAME`] bytes.
pub fn check_lease_name(what: &str, value: &str) -> Result<(), StoreError> {
    if value.is_empty() || value.len() > MAX_LEASE_NAME {
        return Err(StoreError::InvalidLease {
            reason: format!(
                "a {what} is 1 to {MAX_LEASE_NAME} bytes, not {} (`{}`)",
                value.len(),
                value.chars().take(40).collect::<String>()
            ),
        });
    }
    Ok(())
}
