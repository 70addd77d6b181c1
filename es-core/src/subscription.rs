//! Catch-up-then-live subscriptions over any [`EventStore`], built from `read_all`,
//! `head_position` and `wait_for_append`.
//!
//! The loop reads pages of the global feed after the last delivered position. When a page comes
//! back short the subscriber is caught up with everything visible when the page was read, and it
//! waits for the backend's wake-up (broadcast, LISTEN/NOTIFY, XREAD BLOCK) or its polling interval.
//! Correctness rests on the store's never-skip contract; the wake-up only affects latency.
//!
//! With a filter, the last delivered position can lag far behind the head; the loop then also
//! reads the head before each read and, once caught up, moves past it, so that it waits for
//! events after the head rather than rescanning.

use std::collections::VecDeque;
use std::time::Duration;

use futures::TryStreamExt;

use crate::event::RecordedEvent;
use crate::store::{EventFilter, EventStore, EventStream, ReadAll, StoreError};

/// Events fetched per page while catching up.
pub const PAGE_SIZE: u64 = 1000;

const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

struct State<S> {
    store: S,
    filter: EventFilter,
    /// Every event up to here has been delivered or filtered out.
    after: u64,
    buffer: VecDeque<RecordedEvent>,
    caught_up: bool,
    backoff: Duration,
    done: bool,
}

pub(crate) fn subscribe<S: EventStore>(store: S, after: u64, filter: EventFilter) -> EventStream {
    let state = State {
        store,
        filter,
        after,
        buffer: VecDeque::new(),
        caught_up: false,
        backoff: MIN_BACKOFF,
        done: false,
    };
    Box::pin(futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(event) = st.buffer.pop_front() {
                return Some((Ok(event), st));
            }
            if st.done {
                return None;
            }
            if st.caught_up {
                st.store.wait_for_append(st.after).await;
                st.caught_up = false;
            }
            match st.fetch().await {
                Ok(()) => st.backoff = MIN_BACKOFF,
                Err(err) if err.is_transient() => {
                    tracing::warn!(error = %err, after = st.after, "subscription read failed; retrying");
                    tokio::time::sleep(st.backoff).await;
                    st.backoff = (st.backoff * 2).min(MAX_BACKOFF);
                }
                Err(err) => {
                    st.done = true;
                    return Some((Err(err), st));
                }
            }
        }
    }))
}

impl<S: EventStore> State<S> {
    async fn fetch(&mut self) -> Result<(), StoreError> {
        let head_before = if self.filter.is_empty() {
            None
        } else {
            Some(self.store.head_position().await?)
        };
        let page: Vec<RecordedEvent> = self
            .store
            .read_all(
                ReadAll::after(self.after)
                    .limit(PAGE_SIZE)
                    .filter(self.filter.clone()),
            )
            .try_collect()
            .await?;
        let full = page.len() as u64 == PAGE_SIZE;
        for event in page {
            // The store never returns positions at or below `after`; this guard keeps the
            // subscription strictly increasing even if a backend re-delivers after a reconnect.
            if event.global_position > self.after {
                self.after = event.global_position;
                self.buffer.push_back(event);
            }
        }
        if !full {
            // Everything visible before the read was scanned, and nothing at or below a visible
            // position can appear later: events up to `head_before` that the filter let through
            // have all been delivered.
            self.after = self.after.max(head_before.unwrap_or(0));
            self.caught_up = true;
        }
        Ok(())
    }
}

/// Waits until `watch` holds a value above `after`, or `poll` elapses.
///
/// A helper for backends that keep the latest known head position in a
/// [`tokio::sync::watch`] channel.
pub async fn wait_on_watch(watch: &tokio::sync::watch::Receiver<u64>, after: u64, poll: Duration) {
    let mut rx = watch.clone();
    let _ = tokio::time::timeout(poll, rx.wait_for(|head| *head > after)).await;
}
