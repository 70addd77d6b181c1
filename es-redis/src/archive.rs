//! Archiving on Redis ([`EventStore::archive_stream`](es_core::EventStore::archive_stream)):
//! the events leave Redis for the store's [`EventArchive`], and reads merge the two. See the
//! crate docs, section "Archiving".

use std::sync::Arc;

use es_core::contract::{check_archive, EventArchive, HotFeed};
use es_core::{Archived, RecordedEvent, StoreError, StreamId};
use futures::future::BoxFuture;
use redis::Value;

use crate::decode::{self, Source};
use crate::error::store_error;
use crate::script::{query, Lua};
use crate::Inner;

/// The archive a store moves events to, and the script that deletes them from Redis.
pub(crate) struct ArchiveConfig {
    pub(crate) archive: Arc<dyn EventArchive>,
    pub(crate) delete: Lua,
}

/// What `archive_stream` answers on a store built without an archive.
fn not_configured(stream: &StreamId) -> StoreError {
    StoreError::InvalidArchive {
        stream_id: stream.clone(),
        reason: "this Redis store has no archive to move events to: build it with \
                 `RedisStoreBuilder::archive(Arc<dyn EventArchive>)`, for example an \
                 `es_postgres::PgEventArchive` on a schema of its own; nothing was moved"
            .to_owned(),
    }
}

/// Moves the hot events of `stream` below `before` to the archive, a page at a time: each page
/// is read from the stream key (`XRANGE`), stored in the archive (durable once that returns),
/// and only then deleted from Redis by one script ([`crate::script::ARCHIVE`]), which deletes
/// only what is still there and never the stream's last event. A failure anywhere leaves every
/// event in Redis, in the archive, or in both, never in neither; running the call again
/// completes it.
pub(crate) async fn archive_stream(
    inner: Arc<Inner>,
    stream: StreamId,
    before: u64,
) -> Result<Archived, StoreError> {
    let Some(config) = inner.archive.as_ref() else {
        return Err(not_configured(&stream));
    };
    let location = || format!("stream `{stream}`");
    let mut conn = inner.conn.clone();
    let events_key = inner.keys.events(&stream);
    let version_key = inner.keys.version(&stream);
    let version = script_query(&mut conn, redis::cmd("GET").arg(&version_key), location).await?;
    let version = decode::counter(version, &location())?;
    check_archive(&stream, before, version)?;
    let partition = inner.keys.partition_of(&stream);
    let part = inner.keys.partition_of_stream(&stream);
    let mut moved = 0;
    let mut from = 1_u64;
    while from < before {
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(&events_key)
            .arg(from)
            .arg(before - 1)
            .arg("COUNT")
            .arg(inner.page_size);
        let reply = script_query(&mut conn, &cmd, location).await?;
        let mut page = decode::page(reply, Source::Stream(&stream))?;
        let Some(last) = page.last().map(|e| e.stream_version) else {
            break;
        };
        for event in &mut page {
            event.partition = partition;
        }
        // Stored in the archive before anything leaves Redis: readers read Redis first and
        // the archive second, so they find every event in one or the other.
        config.archive.store(&page).await?;
        let mut delete =
            config
                .delete
                .command(&[&events_key, &version_key, part.feed(), part.index()]);
        for event in &page {
            delete
                .arg(event.stream_version)
                .arg(event.global_position)
                .arg(event.event_id.hyphenated().to_string());
        }
        let deleted = config
            .delete
            .invoke(&mut conn, &delete)
            .await
            .map_err(|e| store_error(e, location))?;
        moved += decode::counter(deleted, &location())?;
        if (page.len() as u64) < inner.page_size {
            break;
        }
        from = last + 1;
    }
    let mut first = redis::cmd("XRANGE");
    first.arg(&events_key).arg("-").arg("+").arg("COUNT").arg(1);
    let reply = script_query(&mut conn, &first, location).await?;
    let hot_from = decode::page(reply, Source::Stream(&stream))?
        .first()
        .map_or(version, |e| e.stream_version);
    Ok(Archived { moved, hot_from })
}

async fn script_query(
    conn: &mut crate::conn::Connection,
    cmd: &redis::Cmd,
    location: impl FnOnce() -> String,
) -> Result<Value, StoreError> {
    query(conn, cmd).await.map_err(|e| store_error(e, location))
}

/// One feed partition's hot storage, as es-core's feed merge reads it.
pub(crate) struct HotPartition {
    pub(crate) inner: Arc<Inner>,
    pub(crate) partition: u32,
    pub(crate) feed: Arc<str>,
}

impl HotFeed for HotPartition {
    fn head(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(self.inner.read_head(self.partition))
    }

    fn page(
        &self,
        after: u64,
        count: u64,
    ) -> BoxFuture<'_, Result<Vec<RecordedEvent>, StoreError>> {
        Box::pin(async move {
            let Some(from) = after.checked_add(1) else {
                return Ok(Vec::new());
            };
            let mut cmd = redis::cmd("XRANGE");
            cmd.arg(&*self.feed)
                .arg(from)
                .arg("+")
                .arg("COUNT")
                .arg(count);
            let mut conn = self.inner.conn.clone();
            let reply = script_query(&mut conn, &cmd, || {
                crate::partition_location("feed", self.partition)
            })
            .await?;
            let mut page = decode::page(reply, Source::Feed)?;
            for event in &mut page {
                event.partition = self.partition;
            }
            Ok(page)
        })
    }
}
