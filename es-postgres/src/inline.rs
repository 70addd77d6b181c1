//! Inline projections: read-model writes in the append's own transaction.

use std::sync::Arc;

use es_core::projection::HandlerError;
use es_core::RecordedEvent;
use futures::future::BoxFuture;
use sqlx::PgConnection;

/// The handler of an inline projection (see [`PgStoreBuilder::inline_projection`]).
///
/// It gets the append's transaction and the events the append wrote, and returns a boxed future
/// that borrows both.
///
/// [`PgStoreBuilder::inline_projection`]: crate::PgStoreBuilder::inline_projection
pub type InlineHandler = dyn for<'c> Fn(&'c mut PgConnection, &'c [RecordedEvent]) -> BoxFuture<'c, Result<(), HandlerError>>
    + Send
    + Sync;

/// A named inline projection.
#[derive(Clone)]
pub(crate) struct InlineProjection {
    pub(crate) name: String,
    pub(crate) handler: Arc<InlineHandler>,
}

impl std::fmt::Debug for InlineProjection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InlineProjection")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}
