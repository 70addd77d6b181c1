//! Projection checkpoints: the global position each projection has handled up to, within a
//! generation that a rebuild raises.

use super::error::StoreFuture;

/// A projection's stored progress: the global position handled up to, within a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Checkpoint {
    /// The global position handled up to (0: nothing yet).
    pub position: u64,
    /// The generation: 0 until the first reset, then raised by every
    /// [`reset_checkpoint`](CheckpointStore::reset_checkpoint) (a rebuild). A save that names an
    /// older generation is refused, so a runner that was busy while the projection was rebuilt
    /// cannot move the new generation's checkpoint.
    pub generation: u64,
}

/// Stores projection checkpoints: the global position each projection has handled up to, and the
/// generation it belongs to.
///
/// Its errors are [`StoreError`](super::StoreError)s; a save naming an older generation is
/// [`StoreError::Fenced`](super::StoreError::Fenced).
pub trait CheckpointStore: Clone + Send + Sync + 'static {
    /// The checkpoint of `name` (position 0 in generation 0 if it has none), position and
    /// generation read together.
    fn load_checkpoint(&self, name: &str) -> impl StoreFuture<Checkpoint>;

    /// Raises the checkpoint of `name` to `checkpoint.position`, if `checkpoint.generation` is
    /// the stored generation; otherwise fails with [`StoreError::Fenced`](super::StoreError::Fenced) and writes nothing. A
    /// lower or equal position is ignored, so a slow runner can never move a checkpoint back.
    /// Returns whether it was written.
    fn save_checkpoint(&self, name: &str, checkpoint: Checkpoint) -> impl StoreFuture<bool>;

    /// Starts a new generation of `name` at position 0 (for a rebuild from position 0) and
    /// returns it. Every later save naming an older generation fails with
    /// [`StoreError::Fenced`](super::StoreError::Fenced).
    fn reset_checkpoint(&self, name: &str) -> impl StoreFuture<Checkpoint>;

    /// Starts a new generation of `name` at its current position and returns it: position and
    /// generation read and raised together, atomically. Every later save naming an older
    /// generation fails with [`StoreError::Fenced`](super::StoreError::Fenced), so the
    /// position returned is exactly what every earlier holder managed to record. A
    /// consumer-group worker fences a partition's checkpoint this way when it takes the
    /// partition over.
    fn fence_checkpoint(&self, name: &str) -> impl StoreFuture<Checkpoint>;
}
