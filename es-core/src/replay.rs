//! Replay to fix a bug: rebuild a projection with the fixed code into a shadow read model beside
//! the live one, compare the two, then switch over or discard the shadow.
//!
//! The application says where its read models live by implementing [`ReplayTarget`]: the fixed
//! projection writing into the shadow, every row of either side (for the diff), and how to make
//! the shadow the live read model in one step. [`Replay`] does the rest with the store's public
//! API:
//!
//! 1. [`Replay::build`] drops the shadow, then feeds it every event of the feed from position 0
//!    up to the head read when it started, recording its progress in a checkpoint of its own
//!    (`<name>~shadow`), so that an interrupted build goes on from there
//!    ([`Replay::resume`]). The live projection keeps running meanwhile.
//! 2. [`Replay::diff`] reads both sides and lists the rows added, changed and removed.
//! 3. [`Replay::switch`] checks the shadow exists, starts a new generation of the live
//!    checkpoint (every save of a live worker still running is refused from then on) at the
//!    shadow's position, then promotes the shadow: the projection goes on from where the shadow
//!    stopped. Or [`Replay::discard`] drops the shadow and leaves the live side as it was.
//!
//! The live workers must run the fixed code once switched: stop them before the switch, or
//! restart them with the fixed code after it. A worker still running the old code reloads the
//! checkpoint once fenced and goes on writing with that code. The checkpoint moves before the
//! read model does, so a crash or a failed promotion between the two leaves the live checkpoint
//! at the shadow's position over the old read model, which may already hold later events: the
//! projection handles them again, as projections are idempotent by position (see
//! [`Projection::handle`]); never a read model that lacks events its checkpoint claims.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::ops::ControlFlow;

use futures::TryStreamExt;
use serde_json::Value;

use crate::contract::{Checkpoint, CheckpointStore, EventStore, ReadAll, StoreError};
use crate::projection::{HandlerError, Projection};

/// Which read model: the one in use, or the one being rebuilt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The read model readers use.
    Live,
    /// The read model the fixed code is rebuilding.
    Shadow,
}

/// Where a projection's live and shadow read models are, and how to switch them.
pub trait ReplayTarget: Send + Sync + 'static {
    /// The projection with the fixed code.
    type Projection: Projection;

    /// The fixed projection, writing into the shadow read model: its
    /// [`reset`](Projection::reset) drops the shadow (never the live one). Its
    /// [`name`](Projection::name) is the live projection's.
    fn shadow(&self) -> Self::Projection;

    /// Every row of `side`'s read model, by key, as JSON: what [`Replay::diff`] compares.
    fn rows(
        &self,
        side: Side,
    ) -> impl Future<Output = Result<BTreeMap<String, Value>, HandlerError>> + Send;

    /// Whether the shadow read model exists (built, and neither promoted nor discarded since).
    fn has_shadow(&self) -> impl Future<Output = Result<bool, HandlerError>> + Send;

    /// Makes the shadow the live read model in one atomic step (a reader sees the old one or the
    /// new one, whole) and drops the old one. Fails, changing nothing, when there is no shadow.
    fn promote(&self) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// Drops the shadow read model.
    fn discard(&self) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// Why a replay step failed; the step names where.
#[derive(Debug, thiserror::Error)]
#[error("replaying `{projection}`: {step} failed: {source}")]
pub struct ReplayError {
    /// The projection.
    pub projection: String,
    /// What was being done: "dropping the shadow", "reading the feed", ...
    pub step: &'static str,
    /// The cause.
    #[source]
    pub source: HandlerError,
}

/// How the shadow stands after [`Replay::build`] or [`Replay::resume`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Built {
    /// Every event up to `position` (the head when the build began) is in the shadow.
    Complete {
        /// The position the shadow is built to.
        position: u64,
    },
    /// Stopped by the caller at `position`; [`Replay::resume`] goes on from there.
    Interrupted {
        /// The position the shadow is built to.
        position: u64,
        /// Where the build was heading.
        head: u64,
    },
}

/// The rows that differ between the live read model and the shadow.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Diff {
    /// Rows only the shadow has.
    pub added: Vec<(String, Value)>,
    /// Rows both have, with different values: (key, live, shadow).
    pub changed: Vec<(String, Value, Value)>,
    /// Rows only the live read model has.
    pub removed: Vec<(String, Value)>,
    /// Rows equal on both sides.
    pub unchanged: usize,
}

impl Diff {
    /// Compares two sets of rows.
    pub fn between(live: &BTreeMap<String, Value>, shadow: &BTreeMap<String, Value>) -> Self {
        let mut diff = Self::default();
        for (key, value) in shadow {
            match live.get(key) {
                None => diff.added.push((key.clone(), value.clone())),
                Some(old) if old != value => {
                    diff.changed.push((key.clone(), old.clone(), value.clone()));
                }
                Some(_) => diff.unchanged += 1,
            }
        }
        for (key, value) in live {
            if !shadow.contains_key(key) {
                diff.removed.push((key.clone(), value.clone()));
            }
        }
        diff
    }

    /// Whether the two sides hold the same rows.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }

    /// The diff as text: the counts, then up to `sample` rows of each kind.
    pub fn report(&self, sample: usize) -> String {
        DiffReport { diff: self, sample }.to_string()
    }
}

struct DiffReport<'a> {
    diff: &'a Diff,
    sample: usize,
}

impl fmt::Display for DiffReport<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.diff;
        writeln!(
            f,
            "{} added, {} changed, {} removed, {} unchanged",
            d.added.len(),
            d.changed.len(),
            d.removed.len(),
            d.unchanged
        )?;
        for (key, value) in d.added.iter().take(self.sample) {
            writeln!(f, "+ {key}: {value}")?;
        }
        for (key, old, new) in d.changed.iter().take(self.sample) {
            writeln!(f, "~ {key}: {old} -> {new}")?;
        }
        for (key, value) in d.removed.iter().take(self.sample) {
            writeln!(f, "- {key}: {value}")?;
        }
        let shown = d.added.len().min(self.sample)
            + d.changed.len().min(self.sample)
            + d.removed.len().min(self.sample);
        let total = d.added.len() + d.changed.len() + d.removed.len();
        if shown < total {
            writeln!(f, "({} more not shown)", total - shown)?;
        }
        Ok(())
    }
}

/// Events handled between two checkpoints of the shadow.
const BATCH: u64 = 500;

/// A replay of one projection on one store (see the [module docs](self)).
pub struct Replay<S, T> {
    store: S,
    target: T,
    name: String,
}

impl<S: EventStore + CheckpointStore, T: ReplayTarget> Replay<S, T> {
    /// A replay of `target`'s projection over `store`'s feed.
    pub fn new(store: S, target: T) -> Self {
        let name = target.shadow().name().to_owned();
        Self {
            store,
            target,
            name,
        }
    }

    /// The projection's name (its live checkpoint's).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name of the shadow's checkpoint: `<name>~shadow`.
    pub fn shadow_checkpoint(&self) -> String {
        format!("{}~shadow", self.name)
    }

    fn failed(&self, step: &'static str) -> impl Fn(HandlerError) -> ReplayError + '_ {
        move |source| ReplayError {
            projection: self.name.clone(),
            step,
            source,
        }
    }

    fn store_failed(&self, step: &'static str) -> impl Fn(StoreError) -> ReplayError + '_ {
        move |source| ReplayError {
            projection: self.name.clone(),
            step,
            source: source.into(),
        }
    }

    /// Drops the shadow and rebuilds it from position 0 up to the head of the feed as read now.
    /// `progress` sees (position reached, head) after every batch and may stop the build
    /// ([`ControlFlow::Break`]), which records how far it got first. A store with several feed
    /// partitions is [`StoreError::Partitioned`].
    pub async fn build(
        &self,
        progress: impl FnMut(u64, u64) -> ControlFlow<()>,
    ) -> Result<Built, ReplayError> {
        let mut shadow = self.target.shadow();
        shadow
            .reset()
            .await
            .map_err(self.failed("dropping the shadow"))?;
        let fresh = self
            .store
            .reset_checkpoint(&self.shadow_checkpoint())
            .await
            .map_err(self.store_failed("starting the shadow's checkpoint"))?;
        self.feed(shadow, fresh, progress).await
    }

    /// Goes on with an interrupted [`build`](Self::build) from the shadow's checkpoint, up to the
    /// head of the feed as read now.
    pub async fn resume(
        &self,
        progress: impl FnMut(u64, u64) -> ControlFlow<()>,
    ) -> Result<Built, ReplayError> {
        let stored = self
            .store
            .load_checkpoint(&self.shadow_checkpoint())
            .await
            .map_err(self.store_failed("loading the shadow's checkpoint"))?;
        self.feed(self.target.shadow(), stored, progress).await
    }

    async fn feed(
        &self,
        mut shadow: T::Projection,
        from: Checkpoint,
        mut progress: impl FnMut(u64, u64) -> ControlFlow<()>,
    ) -> Result<Built, ReplayError> {
        let head = self
            .store
            .head_position()
            .await
            .map_err(self.store_failed("reading the head of the feed"))?;
        let name = self.shadow_checkpoint();
        let save = |position: u64| {
            let checkpoint = Checkpoint {
                position,
                generation: from.generation,
            };
            self.store.save_checkpoint(&name, checkpoint)
        };
        let mut at = from.position;
        let mut events = self
            .store
            .read_all(ReadAll::after(at).filter(shadow.filter()));
        let mut since_saved = 0;
        while at < head {
            let Some(event) = events
                .try_next()
                .await
                .map_err(self.store_failed("reading the feed"))?
            else {
                break;
            };
            if event.global_position > head {
                break;
            }
            shadow
                .handle(&event)
                .await
                .map_err(self.failed("handling an event in the shadow"))?;
            at = event.global_position;
            since_saved += 1;
            if since_saved == BATCH {
                since_saved = 0;
                save(at)
                    .await
                    .map_err(self.store_failed("recording the shadow's checkpoint"))?;
                if progress(at, head).is_break() {
                    return Ok(Built::Interrupted { position: at, head });
                }
            }
        }
        // Everything up to the head is handled (a filter may have skipped the last events).
        save(head)
            .await
            .map_err(self.store_failed("recording the shadow's checkpoint"))?;
        let _ = progress(head, head);
        Ok(Built::Complete { position: head })
    }

    /// The rows that differ between the live read model and the shadow.
    pub async fn diff(&self) -> Result<Diff, ReplayError> {
        let live = self
            .target
            .rows(Side::Live)
            .await
            .map_err(self.failed("reading the live rows"))?;
        let shadow = self
            .target
            .rows(Side::Shadow)
            .await
            .map_err(self.failed("reading the shadow's rows"))?;
        Ok(Diff::between(&live, &shadow))
    }

    /// Makes the shadow the live read model and moves the live checkpoint to the shadow's
    /// position (see the [module docs](self) for the order and what a crash leaves), so the
    /// projection goes on from where the shadow stopped (a shadow built part way is switched
    /// correctly too). Returns that position. Refused, changing nothing, when there is no
    /// shadow ([`ReplayTarget::has_shadow`]).
    pub async fn switch(&self) -> Result<u64, ReplayError> {
        let shadow = self
            .store
            .load_checkpoint(&self.shadow_checkpoint())
            .await
            .map_err(self.store_failed("loading the shadow's checkpoint"))?;
        let exists = self
            .target
            .has_shadow()
            .await
            .map_err(self.failed("looking for the shadow"))?;
        if shadow.generation == 0 || !exists {
            return Err(self.failed("switching")(
                format!(
                    "there is no shadow of `{}`: build one first (it was never built, or was \
                     switched or discarded since)",
                    self.name
                )
                .into(),
            ));
        }
        let live = self
            .store
            .reset_checkpoint(&self.name)
            .await
            .map_err(self.store_failed("fencing the live checkpoint"))?;
        let moved = Checkpoint {
            position: shadow.position,
            generation: live.generation,
        };
        self.store
            .save_checkpoint(&self.name, moved)
            .await
            .map_err(self.store_failed("moving the live checkpoint"))?;
        self.target
            .promote()
            .await
            .map_err(self.failed("promoting the shadow"))?;
        self.store
            .reset_checkpoint(&self.shadow_checkpoint())
            .await
            .map_err(self.store_failed("closing the shadow's checkpoint"))?;
        Ok(shadow.position)
    }

    /// Drops the shadow and its checkpoint; the live side is left as it was.
    pub async fn discard(&self) -> Result<(), ReplayError> {
        self.target
            .discard()
            .await
            .map_err(self.failed("dropping the shadow"))?;
        self.store
            .reset_checkpoint(&self.shadow_checkpoint())
            .await
            .map_err(self.store_failed("closing the shadow's checkpoint"))?;
        Ok(())
    }
}
