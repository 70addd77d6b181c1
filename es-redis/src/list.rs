//! [`EventStore::list_streams`](es_core::EventStore::list_streams): the stream ids found by
//! `SCAN`ning for the streams' version keys.
//!
//! Redis keeps no ordered index of stream ids (an append would have to maintain one), so a page
//! is found by walking the keyspace with `SCAN ... MATCH <version-key pattern> COUNT 1000`,
//! keeping the smallest ids after the page's start (memory bounded by the page size), then
//! reading their versions. Every page therefore costs a walk of the whole keyspace of the server
//! (or, on a cluster, of the primary serving each partition's slot, once per partition): about
//! one round trip per 1000 keys. Fine for an operator's listing, not for a request path.
//!
//! `SCAN` returns every key that exists for the whole walk; a key created or deleted meanwhile
//! may or may not be seen, so a stream that gets its first event during a listing may be missed.
//! On a cluster, a slot that moves to another primary during the walk can make it miss streams
//! too (the walk follows the slot, whose new primary's cursor is another).

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use es_core::{ListStreams, StoreError, StreamId, StreamPage, StreamSummary};
use futures::{StreamExt, TryStreamExt};
use redis::Value;

use crate::error::store_error;
use crate::keys::KeyLayout;
use crate::{decode, script, Inner};

/// Keys a `SCAN` step looks at.
const SCAN_COUNT: u64 = 1000;

/// Version reads in flight at once.
const CONCURRENT_READS: usize = 32;

/// One page of the listing.
pub(crate) async fn list(inner: Arc<Inner>, list: ListStreams) -> Result<StreamPage, StoreError> {
    list.validate()?;
    let limit = list.page_size();
    let keep = usize::try_from(limit + 1).unwrap_or(usize::MAX);
    let mut found = Found {
        ids: BTreeSet::new(),
        keep,
        truncated: false,
    };
    let keys = &inner.keys;
    let prefix = keys.prefix();
    match keys.layout() {
        KeyLayout::Classic => {
            let pattern = format!("{prefix}:{{{}*}}:version", list.prefix);
            let head = format!("{prefix}:{{");
            let parse = key_parser(|key| key.strip_prefix(&head)?.strip_suffix("}:version"));
            scan(&inner, &pattern, None, &mut found, &list, parse).await?;
        }
        KeyLayout::Tagged => {
            let tags: HashSet<&str> = keys
                .all_partitions()
                .iter()
                .map(crate::keys::PartitionKeys::tag)
                .collect();
            let parse = key_parser(|key| {
                let rest = key.strip_prefix(prefix)?.strip_prefix(":{")?;
                let (tag, rest) = rest.split_once('}')?;
                if !tags.contains(tag) {
                    return None;
                }
                rest.strip_prefix(":s:")?.strip_suffix(":version")
            });
            if inner.conn.is_cluster() {
                // Each partition's keys live on the primary of its slot: one walk there each.
                for part in keys.all_partitions() {
                    let pattern = format!("{prefix}:{{{}}}:s:{}*:version", part.tag(), list.prefix);
                    scan(
                        &inner,
                        &pattern,
                        Some(part.slot()),
                        &mut found,
                        &list,
                        &parse,
                    )
                    .await?;
                }
            } else {
                let pattern = format!("{prefix}:{{*}}:s:{}*:version", list.prefix);
                scan(&inner, &pattern, None, &mut found, &list, parse).await?;
            }
        }
    }
    let Found { ids, truncated, .. } = found;
    let last_examined = ids.last().cloned();
    let versions: Vec<(StreamId, u64)> = futures::stream::iter(ids)
        .map(|stream| {
            let mut conn = inner.conn.clone();
            let key = inner.keys.version(&stream);
            async move {
                let location = || format!("stream `{stream}` version key");
                let value = script::query(&mut conn, redis::cmd("GET").arg(&key))
                    .await
                    .map_err(|e| store_error(e, location))?;
                let version = decode::counter(value, &location())?;
                Ok::<_, StoreError>((stream, version))
            }
        })
        .buffered(CONCURRENT_READS)
        .try_collect()
        .await?;
    let streams: Vec<StreamSummary> = versions
        .into_iter()
        .filter(|(_, version)| *version > 0)
        .map(|(stream_id, version)| StreamSummary { stream_id, version })
        .collect();
    let mut page = StreamPage::cut(streams, limit);
    if page.next.is_none() && truncated {
        // Streams beyond the ids kept exist; the kept ones without events were dropped, so
        // the next page starts after the last id looked at.
        page.next = last_examined;
    }
    Ok(page)
}

/// Gives a closure the signature of a key parser: the stream id is a slice of the key.
fn key_parser<F: for<'a> Fn(&'a str) -> Option<&'a str>>(parse: F) -> F {
    parse
}

/// The smallest matching stream ids seen so far.
struct Found {
    ids: BTreeSet<StreamId>,
    /// How many to keep.
    keep: usize,
    /// Whether a larger id was dropped.
    truncated: bool,
}

impl Found {
    fn add(&mut self, stream: StreamId) {
        self.ids.insert(stream);
        if self.ids.len() > self.keep {
            self.ids.pop_last();
            self.truncated = true;
        }
    }
}

/// Walks the keys matching `pattern` (on the primary of `slot`, on a cluster), adding the stream
/// ids `parse` finds in them that belong in `list`.
async fn scan(
    inner: &Inner,
    pattern: &str,
    slot: Option<u16>,
    found: &mut Found,
    list: &ListStreams,
    parse: impl for<'a> Fn(&'a str) -> Option<&'a str>,
) -> Result<(), StoreError> {
    let mut conn = inner.conn.clone();
    let mut cursor: u64 = 0;
    loop {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT);
        let location = || format!("keys matching `{pattern}`");
        let reply = match slot {
            Some(slot) => conn.query_at_slot(&cmd, slot).await,
            None => script::query(&mut conn, &cmd).await,
        }
        .map_err(|e| store_error(e, location))?;
        let (next, keys) = scan_reply(reply).ok_or_else(|| StoreError::Corrupt {
            location: location(),
            reason: "SCAN answered something other than a cursor and keys".to_owned(),
        })?;
        for key in keys {
            let Some(stream) = parse(&key).and_then(|id| StreamId::parse(id).ok()) else {
                continue;
            };
            if list.matches(&stream) {
                found.add(stream);
            }
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// The next cursor and the keys of a `SCAN` reply.
fn scan_reply(reply: Value) -> Option<(u64, Vec<String>)> {
    let Value::Array(mut parts) = reply else {
        return None;
    };
    if parts.len() != 2 {
        return None;
    }
    let keys = parts.pop()?;
    let cursor = parts.pop()?;
    let cursor = match cursor {
        Value::BulkString(bytes) => std::str::from_utf8(&bytes).ok()?.parse().ok()?,
        Value::Int(n) => u64::try_from(n).ok()?,
        _ => return None,
    };
    let Value::Array(keys) = keys else {
        return None;
    };
    let keys = keys
        .into_iter()
        .filter_map(|key| match key {
            Value::BulkString(bytes) => String::from_utf8(bytes).ok(),
            Value::SimpleString(text) => Some(text),
            _ => None,
        })
        .collect();
    Some((cursor, keys))
}
