//! Reads: which part of a stream or of the global feed, and the lazy stream they return.

use std::pin::Pin;

use futures::Stream;

use super::error::StoreError;
use crate::event::RecordedEvent;

/// Direction of a stream read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Ascending versions.
    Forward,
    /// Descending versions.
    Backward,
}

/// Which part of a stream to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadStream {
    /// Read direction.
    pub direction: Direction,
    /// First version to return (inclusive). Backward reads from `u64::MAX` start at the end.
    pub from: u64,
    /// Most events to return; `None` for all.
    pub limit: Option<u64>,
}

impl ReadStream {
    /// The whole stream, oldest first.
    pub fn forward() -> Self {
        Self {
            direction: Direction::Forward,
            from: 1,
            limit: None,
        }
    }

    /// The whole stream, newest first.
    pub fn backward() -> Self {
        Self {
            direction: Direction::Backward,
            from: u64::MAX,
            limit: None,
        }
    }

    /// Starts at version `from` (inclusive).
    pub fn from(mut self, from: u64) -> Self {
        self.from = from;
        self
    }

    /// Returns at most `limit` events.
    pub fn limit(mut self, limit: u64) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Whether `version` lies in the requested direction from `from`.
    pub fn includes(&self, version: u64) -> bool {
        match self.direction {
            Direction::Forward => version >= self.from,
            Direction::Backward => version <= self.from,
        }
    }
}

/// Which events of the global feed to return.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct EventFilter {
    /// Only events of these stream categories; empty means every category.
    pub categories: Vec<String>,
    /// Only events of these types; empty means every type.
    pub event_types: Vec<String>,
}

impl EventFilter {
    /// Every event.
    pub fn all() -> Self {
        Self::default()
    }

    /// Only events of streams in `category` (can be chained to allow several).
    pub fn category(mut self, category: impl Into<String>) -> Self {
        self.categories.push(category.into());
        self
    }

    /// Only events of type `event_type` (can be chained to allow several).
    pub fn event_type(mut self, event_type: impl Into<String>) -> Self {
        self.event_types.push(event_type.into());
        self
    }

    /// Whether the filter lets everything through.
    pub fn is_empty(&self) -> bool {
        self.categories.is_empty() && self.event_types.is_empty()
    }

    /// Whether `event` passes the filter.
    pub fn matches(&self, event: &RecordedEvent) -> bool {
        (self.categories.is_empty() || self.categories.iter().any(|c| c == event.category()))
            && (self.event_types.is_empty() || self.event_types.contains(&event.event_type))
    }
}

/// Which part of the global feed to read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadAll {
    /// Return events with a global position strictly greater than this (0 reads from the start).
    pub after: u64,
    /// Most events to return; `None` for all.
    pub limit: Option<u64>,
    /// Which events to return.
    pub filter: EventFilter,
}

impl ReadAll {
    /// Every event after `after`.
    pub fn after(after: u64) -> Self {
        Self {
            after,
            ..Self::default()
        }
    }

    /// Returns at most `limit` events.
    pub fn limit(mut self, limit: u64) -> Self {
        self.limit = Some(limit);
        self
    }

    /// Returns only events that pass `filter`.
    pub fn filter(mut self, filter: EventFilter) -> Self {
        self.filter = filter;
        self
    }
}

/// A lazy stream of recorded events. It owns what it needs, so it can outlive the store handle.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<RecordedEvent, StoreError>> + Send>>;
