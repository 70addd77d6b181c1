//! The leases of consumer groups ([`LeaseStore`]): each call one `FCALL` of a function of the
//! store's library ([`LEASE`](crate::script::LEASE)) on the group's keys
//! ([`GroupKeys`](crate::GroupKeys)), which share one hash slot. See the crate docs, section
//! "Leases and consumer groups".

use std::sync::Arc;
use std::time::Duration;

use es_core::contract::{check_lease, check_lease_name, HeldLease, LeaseStore, StoreFuture};
use es_core::StoreError;
use redis::Value;

use crate::error::store_error;
use crate::protocol::LeaseCode;
use crate::script::Function;
use crate::{Error, Inner, RedisStore};

/// The lease functions of the store's library.
#[derive(Debug)]
pub(crate) struct LeaseFunctions {
    pub(crate) acquire: Function,
    pub(crate) release: Function,
    pub(crate) held: Function,
}

fn group_location(group: &str) -> String {
    format!("the leases of group `{group}`")
}

/// The text of a reply element (a bulk string or a number).
fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(text) => Some(text.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

fn number(value: &Value) -> Option<u64> {
    match value {
        Value::Int(n) => u64::try_from(*n).ok(),
        other => text(other)?.parse().ok(),
    }
}

impl Inner {
    /// Calls lease function `function` on `group`'s keys with `args`; returns the reply's code
    /// and data, with a corrupt lease and an evicting server turned into errors.
    async fn lease_call(
        &self,
        function: &Function,
        group: &str,
        args: &[&[u8]],
    ) -> Result<(LeaseCode, Value), StoreError> {
        let keys = self.keys.lease_group(group);
        let mut cmd = function.fcall(2);
        cmd.arg(keys.leases()).arg(keys.held());
        for arg in args {
            cmd.arg(*arg);
        }
        let mut conn = self.conn.clone();
        let reply = function
            .invoke(&mut conn, &cmd)
            .await
            .map_err(|err| store_error(err, || group_location(group)))?;
        let unexpected = |reply: &dyn std::fmt::Debug| {
            StoreError::backend(format!(
                "unexpected reply from a lease function ({}): {reply:?}",
                group_location(group)
            ))
        };
        let Value::Array(parts) = reply else {
            return Err(unexpected(&reply));
        };
        let mut parts = parts.into_iter();
        let (code, data) = (parts.next(), parts.next().unwrap_or(Value::Nil));
        let Some(code) = code
            .as_ref()
            .and_then(number)
            .and_then(|c| i64::try_from(c).ok())
            .and_then(LeaseCode::from_code)
        else {
            return Err(unexpected(&code));
        };
        match code {
            LeaseCode::Corrupt => Err(StoreError::Corrupt {
                location: format!(
                    "lease `{}` of group `{group}`",
                    text(&data).unwrap_or_default()
                ),
                reason: "the stored lease is not `<generation> <expires> <owner>`; nothing was \
                         written"
                    .to_owned(),
            }),
            LeaseCode::Evicting => Err(StoreError::backend(Error::EvictionPolicy {
                policy: text(&data).unwrap_or_else(|| "unknown".to_owned()),
            })),
            LeaseCode::Ok | LeaseCode::Refused => Ok((code, data)),
        }
    }
}

impl LeaseStore for RedisStore {
    fn acquire_lease(
        &self,
        group: &str,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> impl StoreFuture<Option<u64>> {
        let checked = check_lease(group, name, owner, ttl);
        let inner = Arc::clone(&self.inner);
        let (group, name, owner) = (group.to_owned(), name.to_owned(), owner.to_owned());
        async move {
            let ms = checked?.to_string();
            let evict = if inner.allow_eviction { "1" } else { "0" };
            let args: [&[u8]; 4] = [
                name.as_bytes(),
                owner.as_bytes(),
                ms.as_bytes(),
                evict.as_bytes(),
            ];
            let (code, data) = inner
                .lease_call(&inner.leases.acquire, &group, &args)
                .await?;
            match code {
                LeaseCode::Ok => number(&data).map(Some).ok_or_else(|| {
                    StoreError::backend(format!(
                        "a lease function replied no generation for lease `{name}` of group \
                         `{group}`: {data:?}"
                    ))
                }),
                _ => Ok(None),
            }
        }
    }

    fn release_lease(
        &self,
        group: &str,
        name: &str,
        owner: &str,
        generation: u64,
    ) -> impl StoreFuture<()> {
        let checked = [("group", group), ("lease name", name), ("owner", owner)]
            .into_iter()
            .try_for_each(|(what, value)| check_lease_name(what, value));
        let inner = Arc::clone(&self.inner);
        let (group, name, owner) = (group.to_owned(), name.to_owned(), owner.to_owned());
        async move {
            checked?;
            let generation = generation.to_string();
            let args: [&[u8]; 3] = [name.as_bytes(), owner.as_bytes(), generation.as_bytes()];
            inner
                .lease_call(&inner.leases.release, &group, &args)
                .await?;
            Ok(())
        }
    }

    fn held_leases(&self, group: &str) -> impl StoreFuture<Vec<HeldLease>> {
        let checked = check_lease_name("group", group);
        let inner = Arc::clone(&self.inner);
        let group = group.to_owned();
        async move {
            checked?;
            let (_, data) = inner.lease_call(&inner.leases.held, &group, &[]).await?;
            let bad = || StoreError::Corrupt {
                location: group_location(&group),
                reason: "a lease function listed a lease it could not read".to_owned(),
            };
            let Value::Array(flat) = data else {
                return Err(bad());
            };
            let mut held = flat
                .chunks(3)
                .map(|lease| match lease {
                    [name, owner, generation] => Some(HeldLease {
                        name: text(name)?,
                        owner: text(owner)?,
                        generation: number(generation)?,
                    }),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()
                .ok_or_else(bad)?;
            // Name order: bytes, as `String`'s order is.
            held.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(held)
        }
    }
}
