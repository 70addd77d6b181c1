//! Snapshots: stored apart from events, upsert-if-newer, an optimisation only.

use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::error::{StoreError, StoreFuture};
use crate::stream_id::StreamId;

/// A stored snapshot of an aggregate's state.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotRecord {
    /// The aggregate's stream.
    pub stream_id: StreamId,
    /// The stream version the snapshot was taken at.
    pub version: u64,
    /// The aggregate's snapshot schema version.
    pub schema_version: u32,
    /// The serialized state (JSON).
    pub payload: Bytes,
    /// When the snapshot was taken.
    pub recorded_at: DateTime<Utc>,
    /// The id of the stream's event at `version`, if known: a snapshot is used only while the
    /// stream still holds that event there (the repository checks).
    pub event_id: Option<Uuid>,
}

impl SnapshotRecord {
    /// Checks the payload against the JSON rule of [`crate::json`], so that every store keeps
    /// the same snapshots. Backends call this before writing one.
    pub fn validate(&self) -> Result<(), StoreError> {
        let invalid = |problem: &dyn std::fmt::Display| StoreError::InvalidRequest {
            stream_id: self.stream_id.clone(),
            reason: format!("the snapshot at version {} {problem}", self.version),
        };
        crate::json::check(&self.payload, crate::json::MAX_DEPTH).map_err(|p| invalid(&p))?;
        if crate::personal::holds_readable_values(&self.payload) {
            return Err(invalid(&crate::personal::READABLE_REFUSED));
        }
        crate::personal::check_sealed_forms(&self.payload).map_err(|p| invalid(&p))?;
        Ok(())
    }
}
/// Stores aggregate snapshots apart from events.
pub trait SnapshotStore: Clone + Send + Sync + 'static {
    /// The latest snapshot of `stream`, if any.
    fn load_snapshot(&self, stream: &StreamId) -> impl StoreFuture<Option<SnapshotRecord>>;

    /// Stores `snapshot` unless one at the same or a newer version is stored (upsert-if-newer).
    /// Returns whether it was written. A payload that breaks the JSON rule of [`crate::json`] is
    /// [`StoreError::InvalidRequest`] ([`SnapshotRecord::validate`]).
    fn save_snapshot(&self, snapshot: SnapshotRecord) -> impl StoreFuture<bool>;

    /// Deletes the snapshot of `stream` if it is the one at `version` (so a newer one saved in
    /// the meantime stays). Returns whether one was deleted. The repository calls it for a
    /// snapshot that does not match its stream, which upsert-if-newer could never replace.
    fn delete_snapshot(&self, stream: &StreamId, version: u64) -> impl StoreFuture<bool>;
}

impl<T: SnapshotStore> SnapshotStore for Arc<T> {
    fn load_snapshot(&self, stream: &StreamId) -> impl StoreFuture<Option<SnapshotRecord>> {
        (**self).load_snapshot(stream)
    }
    fn save_snapshot(&self, snapshot: SnapshotRecord) -> impl StoreFuture<bool> {
        (**self).save_snapshot(snapshot)
    }
    fn delete_snapshot(&self, stream: &StreamId, version: u64) -> impl StoreFuture<bool> {
        (**self).delete_snapshot(stream, version)
    }
}
