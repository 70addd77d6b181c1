//! Catch-up-then-live subscriptions over any [`EventStore`], built from `read_all`,
//! `head_position` and `wait_for_append`.
//!
//! The loop reads the global feed after the last delivered position with one `read_all` that
//! runs to the end of what is visible, yielding events as the backend streams them (so catching
//! up runs at the backend's read-all speed, with its own paging and prefetching). When that read
//! ends, the subscriber is caught up with everything visible when it started, and it waits for
//! the backend's wake-up (broadcast, LISTEN/NOTIFY, XREAD BLOCK) or its polling interval, then
//! reads again. Correctness rests on the store's never-skip contract; the wake-up only affects
//! latency.
//!
//! With a filter, the last delivered position can lag far behind the head; the loop then also
//! reads the head before each read and, once caught up, moves past it, so that it waits for
//! events after the head rather than rescanning.
//!
//! Before moving from one epoch into a later one (see [`crate::position`]), the loop asks the
//! store whether the events after its position survived; if they did not, it yields
//! [`StoreError::LostTail`] and ends, instead of going on past the loss.

use std::time::Duration;

use futures::StreamExt;

use crate::position::verify_resume;
use crate::store::{EventFilter, EventStore, EventStream, ReadAll, StoreError};

const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

struct State<S> {
    store: S,
    filter: EventFilter,
    /// Every event up to here has been delivered or filtered out.
    after: u64,
    /// The read in progress, if any.
    reading: Option<Reading>,
    caught_up: bool,
    backoff: Duration,
    done: bool,
}

/// One `read_all` to the end of the visible feed.
struct Reading {
    events: EventStream,
    /// The head read just before it started (filtered reads only): once the read ends, every
    /// event up to here that the filter lets through has been delivered.
    head_before: Option<u64>,
}

pub(crate) fn subscribe<S: EventStore>(store: S, after: u64, filter: EventFilter) -> EventStream {
    let state = State {
        store,
        filter,
        after,
        reading: None,
        caught_up: false,
        backoff: MIN_BACKOFF,
        done: false,
    };
    Box::pin(futures::stream::unfold(state, |mut st| async move {
        loop {
            if st.done {
                return None;
            }
            let failure = if let Some(reading) = st.reading.as_mut() {
                match reading.events.next().await {
                    Some(Ok(event)) => {
                        st.backoff = MIN_BACKOFF;
                        // The store never returns positions at or below `after`; this guard
                        // keeps the subscription strictly increasing even if a backend
                        // re-delivers after a reconnect.
                        if event.global_position <= st.after {
                            continue;
                        }
                        // Into a later epoch only if nothing after `after` was lost.
                        match verify_resume(&st.store, st.after, event.global_position).await {
                            Ok(()) => {
                                st.after = event.global_position;
                                return Some((Ok(event), st));
                            }
                            Err(err) => err,
                        }
                    }
                    Some(Err(err)) => err,
                    None => {
                        // Everything visible before the read was scanned, and nothing at or
                        // below a visible position can appear later.
                        let head = reading.head_before.unwrap_or(0);
                        let checked = if head > st.after {
                            verify_resume(&st.store, st.after, head).await
                        } else {
                            Ok(())
                        };
                        match checked {
                            Ok(()) => {
                                st.reading = None;
                                st.after = st.after.max(head);
                                st.caught_up = true;
                                continue;
                            }
                            Err(err) => err,
                        }
                    }
                }
            } else {
                if st.caught_up {
                    st.store.wait_for_append(st.after).await;
                    st.caught_up = false;
                }
                match st.start_reading().await {
                    Ok(()) => continue,
                    Err(err) => err,
                }
            };
            st.reading = None;
            if failure.is_transient() {
                tracing::warn!(error = %failure, after = st.after, "subscription read failed; retrying");
                tokio::time::sleep(st.backoff).await;
                st.backoff = (st.backoff * 2).min(MAX_BACKOFF);
            } else {
                st.done = true;
                return Some((Err(failure), st));
            }
        }
    }))
}

impl<S: EventStore> State<S> {
    async fn start_reading(&mut self) -> Result<(), StoreError> {
        let head_before = if self.filter.is_empty() {
            None
        } else {
            Some(self.store.head_position().await?)
        };
        let events = self
            .store
            .read_all(ReadAll::after(self.after).filter(self.filter.clone()));
        self.reading = Some(Reading {
            events,
            head_before,
        });
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
