//! Archiving: moving the old events of a stream out of the store's hot storage.
//!
//! [`EventStore::archive_stream`](super::EventStore::archive_stream) moves the events of a stream
//! below a version into the archive the store owns, where every read still finds them: stream
//! reads in either direction, historical loads, the global feed and the subscriptions and
//! projection rebuilds that follow it return exactly the events they returned before, in the
//! same order, at the same versions and positions. Archiving changes where events are kept, never
//! what a reader sees.
//!
//! The last event of a stream always stays in hot storage: it carries the stream's version (and,
//! for a closed stream, its tombstone), so appends, version checks and the feed's head are
//! answered from hot storage alone.

use super::error::StoreError;
use crate::stream_id::StreamId;

/// What [`EventStore::archive_stream`](super::EventStore::archive_stream) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Archived {
    /// Events this call moved out of hot storage (0 when an earlier call had moved them).
    pub moved: u64,
    /// The lowest version still in hot storage: every version below it is in the archive.
    pub hot_from: u64,
}

/// Checks an archive request against the stream's version: `before` must leave the last event in
/// hot storage (`before <= version`). `before` 0 or 1 asks to move nothing, and reports where the
/// hot part begins. A stream without events has nothing to archive.
pub fn check_archive(stream: &StreamId, before: u64, version: u64) -> Result<(), StoreError> {
    let reason = if version == 0 {
        "the stream has no events".to_owned()
    } else if before > version {
        format!(
            "the last event of a stream stays in hot storage: `before` may be at most the \
             stream's version {version}, not {before}"
        )
    } else {
        return Ok(());
    };
    Err(StoreError::InvalidArchive {
        stream_id: stream.clone(),
        reason,
    })
}
