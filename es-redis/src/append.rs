//! Appends: the command for a group of appends, the interpretation of the script's replies, and
//! group commit (one writer task per store that gathers concurrent appends into one script call).
//!
//! See the crate docs, sections "The append script" and "Group commit".

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use es_core::contract::{classify_retry, classify_streams_retry, StoredEventRef};
use es_core::{AppendRequest, AppendResult, StoreError, StreamId};
use futures::stream::{FuturesUnordered, StreamExt};
use redis::{Cmd, Value};
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

use crate::conn::Connection;
use crate::error::store_error;
use crate::keys::{Keys, PartitionKeys};
use crate::protocol::{AppendCode, ExpectedArg};
use crate::script::Function;
use crate::server::Server;
use crate::watch::Head;
use crate::Error;

/// Event ids per `HMGET` of another partition's id index.
const ID_CHUNK: usize = 500;

/// How group commit gathers appends. See the crate docs, section "Group commit".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GroupLimits {
    /// Most appends in one script call.
    pub(crate) max_appends: usize,
    /// Most events in one script call; a larger append is always a call of its own.
    pub(crate) max_events: usize,
    /// Most script calls in flight at once (a call that goes out only because nothing else is in
    /// flight does not count against it).
    pub(crate) max_in_flight: usize,
    /// Events waiting that justify a call while another is in flight.
    pub(crate) eager_events: usize,
    /// How often the writer yields, after a call returns, to let the callers it answered append
    /// again before it sends the next group.
    pub(crate) linger_yields: usize,
}

impl GroupLimits {
    /// The defaults: groups of up to 128 appends and 1,000 events; small appends wait while a
    /// call is in flight, appends of 64 events or more are pipelined up to 4 calls deep.
    pub(crate) const DEFAULT: Self = Self {
        max_appends: 128,
        max_events: 1000,
        max_in_flight: 4,
        eager_events: 64,
        linger_yields: 4,
    };
}

/// What every append needs: the connection, the key names, the script, the heads to publish
/// (one per feed partition) and the server settings to watch.
pub(crate) struct Appender {
    pub(crate) conn: Connection,
    pub(crate) keys: Keys,
    pub(crate) script: Function,
    /// Per feed partition, its head (indexed by partition).
    pub(crate) heads: Arc<[Arc<Head>]>,
    pub(crate) server: Arc<Server>,
    /// Whether the store accepts a server that can evict its keys.
    pub(crate) allow_eviction: bool,
    /// How many replicas must acknowledge each script call, and how long to wait for them
    /// ([`RedisStoreBuilder::min_replicas_acked`](crate::RedisStoreBuilder::min_replicas_acked)).
    pub(crate) wait: Option<(usize, std::time::Duration)>,
}

impl Appender {
    /// Runs `group`, whose streams all belong to one feed partition, as one script call; one
    /// outcome per append, in order. On a store with several partitions, an append with an
    /// event id that another partition holds fails first, with [`StoreError::DuplicateEvent`],
    /// and the others go on (see [`Appender::stored_elsewhere`]).
    pub(crate) async fn execute(
        &self,
        group: &[&AppendRequest],
    ) -> Vec<Result<AppendResult, StoreError>> {
        if self.keys.partitions() == 1 {
            return unheld(self.execute_in_partition(group, false).await);
        }
        let partition = self.partition_of(group);
        let elsewhere = match self.stored_elsewhere(partition, group).await {
            Ok(elsewhere) => elsewhere,
            Err(err) => {
                return group
                    .iter()
                    .map(|request| Err(store_error(err.clone(), || stream_location(request))))
                    .collect()
            }
        };
        if elsewhere.is_empty() {
            return unheld(self.execute_in_partition(group, false).await);
        }
        let mut outcomes: Vec<Option<Result<AppendResult, StoreError>>> =
            group.iter().map(|_| None).collect();
        let mut sent = Vec::with_capacity(group.len());
        let mut sent_at = Vec::with_capacity(group.len());
        for (i, request) in group.iter().enumerate() {
            if let Some((event_id, (other, position))) = request
                .events
                .iter()
                .find_map(|e| elsewhere.get(&e.event_id).map(|at| (e.event_id, at)))
            {
                outcomes[i] = Some(Err(StoreError::DuplicateEvent {
                    stream_id: request.stream_id.clone(),
                    event_id,
                    reason: format!(
                        "it is stored in feed partition {other} at position {position}, in \
                         another stream than `{}` (whose partition is {partition})",
                        request.stream_id
                    ),
                }));
            } else {
                sent.push(*request);
                sent_at.push(i);
            }
        }
        if !sent.is_empty() {
            let results = unheld(self.execute_in_partition(&sent, false).await);
            for (i, result) in sent_at.into_iter().zip(results) {
                outcomes[i] = Some(result);
            }
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Err(StoreError::backend("an append got no outcome"))))
            .collect()
    }

    /// The event ids of `group` (appends to streams of `partition`) that another partition's
    /// id index holds, with that partition and the position: an append of such an id can only
    /// be a duplicate, since an exact retry finds its ids in its own stream's partition. One
    /// `HMGET` per other partition (on a cluster, to the primaries serving them, concurrently).
    ///
    /// Each partition's append function checks the ids against its own index atomically; this
    /// check precedes the call, so two appends of one event id to streams of different
    /// partitions that run at the same time can both be stored (an application that reuses an
    /// event id for another stream while the first append is in flight). See the crate docs,
    /// section "Redis Cluster".
    async fn stored_elsewhere(
        &self,
        partition: u32,
        group: &[&AppendRequest],
    ) -> redis::RedisResult<std::collections::HashMap<uuid::Uuid, (u32, u64)>> {
        let ids: Vec<uuid::Uuid> = group
            .iter()
            .flat_map(|request| request.events.iter().map(|e| e.event_id))
            .collect();
        let mut found = std::collections::HashMap::new();
        if ids.is_empty() {
            return Ok(found);
        }
        let lookups = (0u32..)
            .zip(self.keys.all_partitions())
            .filter(|(other, _)| *other != partition)
            .flat_map(|(other, part)| {
                ids.chunks(ID_CHUNK).map(move |chunk| {
                    let mut cmd = redis::cmd("HMGET");
                    cmd.arg(part.index());
                    let mut buf = uuid::Uuid::encode_buffer();
                    for id in chunk {
                        cmd.arg(&*id.hyphenated().encode_lower(&mut buf));
                    }
                    let mut conn = self.conn.clone();
                    async move {
                        let reply = crate::script::query(&mut conn, &cmd).await?;
                        Ok::<_, redis::RedisError>((other, chunk, reply))
                    }
                })
            });
        for lookup in futures::future::join_all(lookups).await {
            let (other, chunk, reply) = lookup?;
            let Value::Array(positions) = reply else {
                continue;
            };
            for (id, position) in chunk.iter().zip(positions) {
                if let Value::BulkString(position) = position {
                    let position = std::str::from_utf8(&position)
                        .ok()
                        .and_then(|p| p.parse().ok())
                        .unwrap_or(0);
                    found.insert(*id, (other, position));
                }
            }
        }
        Ok(found)
    }

    /// Runs the parts of a multi-stream append as one all-or-nothing call of the append
    /// function: every part is checked before the first write, and nothing is written unless all
    /// pass. The parts' streams must share one feed partition (in the tagged layout, one hash
    /// slot); a call that spans partitions is refused before anything is sent.
    pub(crate) async fn execute_streams(
        &self,
        requests: &[AppendRequest],
    ) -> Result<Vec<AppendResult>, StoreError> {
        let keys = &self.keys;
        let partition = requests
            .first()
            .map_or(0, |request| keys.partition_of(&request.stream_id));
        if let Some(other) = requests
            .iter()
            .find(|request| keys.partition_of(&request.stream_id) != partition)
        {
            return Err(StoreError::InvalidMultiAppend {
                reason: format!(
                    "the streams of one call must share a feed partition (one Redis Cluster hash \
                     slot), but `{}` is in partition {partition} and `{}` in partition {}: \
                     partition the store by category, or pick stream ids that share one \
                     (docs/15-multi-stream-appends.md)",
                    requests[0].stream_id,
                    other.stream_id,
                    keys.partition_of(&other.stream_id)
                ),
            });
        }
        let group: Vec<&AppendRequest> = requests.iter().collect();
        if self.keys.partitions() > 1 {
            let elsewhere = self
                .stored_elsewhere(partition, &group)
                .await
                .map_err(|err| store_error(err, || stream_location(&requests[0])))?;
            for request in requests {
                if let Some((event_id, (other, position))) = request
                    .events
                    .iter()
                    .find_map(|e| elsewhere.get(&e.event_id).map(|at| (e.event_id, at)))
                {
                    return Err(StoreError::DuplicateEvent {
                        stream_id: request.stream_id.clone(),
                        event_id,
                        reason: format!(
                            "it is stored in feed partition {other} at position {position}, in \
                             another stream; nothing of the multi-stream append was written"
                        ),
                    });
                }
            }
        }
        let outcomes = self.execute_in_partition(&group, true).await;
        all_or_nothing(requests, outcomes)
    }

    /// Runs `group` as one call of the append function in the partition of its streams
    /// (`atomic`: all or nothing). `Ok(None)` for an append of an all-or-nothing call that
    /// passed its checks but was not written because another did not.
    async fn execute_in_partition(
        &self,
        group: &[&AppendRequest],
        atomic: bool,
    ) -> Vec<Result<Option<AppendResult>, StoreError>> {
        let partition = self.partition_of(group);
        let head = self.head(partition);
        let cmd = self.command(partition, group, atomic);
        let mut conn = self.conn.clone();
        let (reply, acked) = match self.wait {
            None => (self.script.invoke(&mut conn, &cmd).await, None),
            Some((replicas, timeout)) => match self
                .script
                .invoke_then_wait(
                    &mut conn,
                    &cmd,
                    self.partition_keys(partition).replication_fence(),
                    replicas,
                    timeout,
                )
                .await
            {
                Ok((reply, acked)) => (Ok(reply), Some(acked)),
                Err(err) => (Err(err), None),
            },
        };
        let mut outcomes: Vec<Result<Option<AppendResult>, StoreError>> = match reply {
            Ok(Value::Array(items)) if items.len() == 3 * group.len() + 3 => {
                let mut items = items.into_iter();
                let outcomes = group
                    .iter()
                    .map(|request| {
                        let mut next = || items.next().unwrap_or(Value::Nil);
                        let (code, x, y) = (next(), next(), next());
                        append_reply(request, &code, x, &y)
                    })
                    .collect();
                if let (Some(Value::Int(epoch)), Some(Value::Int(previous_head)), cause) =
                    (items.next(), items.next(), items.next())
                {
                    if epoch > 0 {
                        let new = matches!(cause, Some(Value::BulkString(c)) if c == b"new");
                        self.epoch_started(partition, epoch, previous_head, new);
                    }
                }
                outcomes
            }
            Ok(other) => group
                .iter()
                .map(|request| {
                    Err(StoreError::backend(format!(
                        "unexpected reply from the append script for `{}`: {other:?}",
                        request.stream_id
                    )))
                })
                .collect(),
            Err(err) => group
                .iter()
                .map(|request| Err(store_error(err.clone(), || stream_location(request))))
                .collect(),
        };
        let head_now = outcomes
            .iter()
            .filter_map(|o| o.as_ref().ok()?.as_ref()?.positions.last().copied())
            .max();
        if let Some(position) = head_now {
            head.advance(position);
        }
        if let (Some((required, _)), Some(acked)) = (self.wait, acked) {
            if usize::try_from(acked).unwrap_or(0) < required {
                // Written on the primary, but a failover now could lose it: not acknowledged.
                // A retry is idempotent and waits again.
                for outcome in &mut outcomes {
                    if matches!(outcome, Ok(Some(_))) {
                        *outcome = Err(StoreError::unavailable(Error::ReplicasNotAcked {
                            required,
                            acked,
                        }));
                    }
                }
            }
        }
        outcomes
    }

    /// Logs the start of an epoch of `partition` (this call was the partition's first write
    /// on a new server incarnation, or its first write at all: `new`) and has the server's
    /// settings read again.
    fn epoch_started(&self, partition: u32, epoch: i64, previous_head: i64, new: bool) {
        let prefix = self.keys.prefix();
        if new {
            tracing::info!(
                prefix,
                partition,
                epoch,
                "the first write of partition {partition} began epoch {epoch}"
            );
        } else {
            tracing::warn!(
                prefix,
                partition,
                epoch,
                previous_head,
                "the Redis server of partition {partition} is a new incarnation (restart, \
                 failover, slot move or restore): epoch {epoch} began after position \
                 {previous_head}; readers of the partition past that position get LostTail"
            );
        }
        self.server.recheck();
    }

    /// Runs one append as a script call of its own.
    pub(crate) async fn execute_one(
        &self,
        request: &AppendRequest,
    ) -> Result<AppendResult, StoreError> {
        self.execute(&[request])
            .await
            .pop()
            .unwrap_or_else(|| Err(StoreError::backend("the append script returned nothing")))
    }

    /// The partition of `group`'s streams (group commit groups appends by partition, so they
    /// are all in one).
    fn partition_of(&self, group: &[&AppendRequest]) -> u32 {
        let keys = &self.keys;
        let partition = group
            .first()
            .map_or(0, |request| keys.partition_of(&request.stream_id));
        debug_assert!(group
            .iter()
            .all(|request| keys.partition_of(&request.stream_id) == partition));
        partition
    }

    /// The keys of `partition` (one of the store's, as [`Keys::partition_of`] returns).
    fn partition_keys(&self, partition: u32) -> &PartitionKeys {
        let keys = &self.keys;
        keys.partition(partition)
            .unwrap_or_else(|| &keys.all_partitions()[0])
    }

    /// The head of `partition`.
    pub(crate) fn head(&self, partition: u32) -> &Arc<Head> {
        let index = usize::try_from(partition).unwrap_or(0);
        &self.heads[index.min(self.heads.len() - 1)]
    }

    /// The `FCALL` of the append function for `group`, whose streams all belong to
    /// `partition`, against that partition's feed, index, outbox and epoch history: in the
    /// tagged layout every key of the call is in the partition's hash slot.
    fn command(&self, partition: u32, group: &[&AppendRequest], atomic: bool) -> Cmd {
        let keys = &self.keys;
        let part = self.partition_keys(partition);
        let mut cmd = self.script.fcall(4 + 3 * group.len());
        cmd.arg(part.feed())
            .arg(part.index())
            .arg(part.outbox())
            .arg(part.epochs());
        for request in group {
            cmd.arg(keys.events(&request.stream_id))
                .arg(keys.version(&request.stream_id))
                .arg(keys.closed(&request.stream_id));
        }
        cmd.arg(group.len()).arg(self.head(partition).floor()).arg(
            match (self.allow_eviction, atomic) {
                (false, false) => "0",
                (true, false) => "1",
                (false, true) => "2",
                (true, true) => "3",
            },
        );
        let mut buf = uuid::Uuid::encode_buffer();
        for request in group {
            match ExpectedArg::of(request.expected) {
                ExpectedArg::Mode(mode) => cmd.arg(mode.arg()),
                ExpectedArg::Exact(version) => cmd.arg(version),
            };
            cmd.arg(request.stream_id.as_str())
                .arg(request.events.len())
                .arg(request.outbox.len());
            for event in &request.events {
                cmd.arg(&*event.event_id.hyphenated().encode_lower(&mut buf))
                    .arg(event.event_type.as_str())
                    .arg(event.schema_version)
                    .arg(&event.payload[..])
                    .arg(event.metadata.to_json());
            }
            for message in &request.outbox {
                cmd.arg(&*message.message_id.hyphenated().encode_lower(&mut buf))
                    .arg(&*message.source_event_id.hyphenated().encode_lower(&mut buf))
                    .arg(message.topic.as_str())
                    .arg(message.key.as_str())
                    .arg(message.message_type.as_str())
                    .arg(message.schema_version)
                    .arg(&message.payload[..])
                    .arg(message.metadata.to_json());
            }
        }
        cmd
    }
}

fn stream_location(request: &AppendRequest) -> String {
    format!("stream `{}`", request.stream_id)
}

/// An append waiting for the writer task.
struct Pending {
    request: Arc<AppendRequest>,
    reply: oneshot::Sender<Result<AppendResult, StoreError>>,
}

/// What callers and the writer task share.
#[derive(Default)]
struct State {
    /// Appends waiting for the writer, in arrival order.
    queue: VecDeque<Pending>,
    /// Their events.
    queued_events: usize,
    /// The writer's groups in flight (a group's slot is held until the writer has let its callers
    /// come back).
    groups: usize,
    /// Callers' own calls in flight.
    direct: usize,
    /// The writer task, once started.
    writer: Option<JoinHandle<()>>,
}

impl State {
    fn in_flight(&self) -> usize {
        self.groups + self.direct
    }

    /// Whether the next call may go out now: always when nothing is in flight, and while others
    /// are in flight only for enough events.
    fn may_send(&self, events: usize, limits: &GroupLimits) -> bool {
        self.in_flight() == 0
            || (events >= limits.eager_events && self.in_flight() < limits.max_in_flight)
    }

    /// The next group to send, if the limits allow one now; counts it as in flight. Appends
    /// whose caller has given up are dropped unsent.
    fn next_group(&mut self, limits: &GroupLimits) -> Option<Vec<Pending>> {
        while let Some(gone) = self.queue.front().filter(|p| p.reply.is_closed()) {
            self.queued_events -= gone.request.events.len();
            self.queue.pop_front();
        }
        if self.queue.is_empty() || !self.may_send(self.queued_events, limits) {
            return None;
        }
        let mut group = Vec::new();
        let mut events = 0;
        while let Some(next) = self.queue.front() {
            let n = next.request.events.len();
            let full = group.len() == limits.max_appends || events + n > limits.max_events;
            if !group.is_empty() && full {
                break;
            }
            events += n;
            group.extend(self.queue.pop_front());
        }
        self.queued_events -= events;
        self.groups += 1;
        Some(group)
    }
}

struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Group commit. An append goes out at once, as a call of its own, when nothing is in flight and
/// nothing waits (so a lone writer pays no hand-off to another task); otherwise it waits in a
/// queue, and a writer task sends what waits as one group when the call in flight returns. See
/// the crate docs, section "Group commit".
pub(crate) struct GroupCommit {
    appender: Arc<Appender>,
    limits: GroupLimits,
    shared: Arc<Shared>,
    wake: Arc<Notify>,
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        // The writer holds the shared state weakly: wake it so that it notices and ends.
        self.wake.notify_one();
    }
}

/// Where an append goes.
enum Route {
    /// A call of the caller's own.
    Direct(AppendRequest),
    /// The writer's queue.
    Queued(Arc<AppendRequest>),
}

/// Counts a caller's own call as in flight until dropped (also when the caller gives up).
struct Direct<'a>(&'a GroupCommit);

impl Drop for Direct<'_> {
    fn drop(&mut self) {
        let waiting = {
            let mut state = self.0.shared.lock();
            state.direct -= 1;
            !state.queue.is_empty()
        };
        if waiting {
            self.0.wake.notify_one();
        }
    }
}

impl GroupCommit {
    pub(crate) fn new(appender: Arc<Appender>, limits: GroupLimits) -> Self {
        Self {
            appender,
            limits,
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
            }),
            wake: Arc::new(Notify::new()),
        }
    }

    /// Appends `request`, alone or in a group.
    ///
    /// Outside a Tokio runtime, and for appends of more than [`GroupLimits::max_events`] events,
    /// the call is always the caller's own. If the writer task stops before answering (its
    /// runtime shut down), the append is sent again as a call of its own: it is idempotent by
    /// event id, so this is safe, and reports `duplicate` if the first send was committed.
    pub(crate) async fn append(&self, request: AppendRequest) -> Result<AppendResult, StoreError> {
        let n = request.events.len();
        let runtime = tokio::runtime::Handle::try_current().ok();
        let (reply, outcome) = oneshot::channel();
        let route = {
            let mut state = self.shared.lock();
            let direct = n > self.limits.max_events
                || (state.queue.is_empty() && state.may_send(n, &self.limits));
            match runtime {
                Some(runtime) if !direct => {
                    if state.writer.as_ref().is_none_or(JoinHandle::is_finished) {
                        // A writer that stopped (its runtime shut down) took its groups with it.
                        state.groups = 0;
                        state.writer = Some(runtime.spawn(writer(
                            Arc::downgrade(&self.shared),
                            Arc::clone(&self.wake),
                            Arc::clone(&self.appender),
                            self.limits,
                        )));
                    }
                    let request = Arc::new(request);
                    state.queued_events += n;
                    state.queue.push_back(Pending {
                        request: Arc::clone(&request),
                        reply,
                    });
                    Route::Queued(request)
                }
                _ => {
                    state.direct += 1;
                    Route::Direct(request)
                }
            }
        };
        match route {
            Route::Direct(request) => {
                let _direct = Direct(self);
                self.appender.execute_one(&request).await
            }
            Route::Queued(request) => {
                self.wake.notify_one();
                match outcome.await {
                    Ok(result) => result,
                    Err(_) => self.appender.execute_one(&request).await,
                }
            }
        }
    }
}

/// The writer task: sends the waiting appends in groups as the limits allow, and hands each
/// caller its outcome. Ends once the store is gone and its groups in flight are done.
async fn writer(
    shared: Weak<Shared>,
    wake: Arc<Notify>,
    appender: Arc<Appender>,
    limits: GroupLimits,
) {
    // If the task is dropped (its runtime shuts down), the appends still queued are dropped
    // with it: their callers then send them themselves.
    let _drain = Drain(Weak::clone(&shared));
    let mut in_flight = FuturesUnordered::new();
    loop {
        let notified = wake.notified();
        tokio::pin!(notified);
        // Registered before the queue is looked at, so that no wake-up in between is lost.
        notified.as_mut().enable();
        {
            let Some(shared) = shared.upgrade() else {
                break;
            };
            let mut state = shared.lock();
            while let Some(group) = state.next_group(&limits) {
                in_flight.push(commit(Arc::clone(&appender), group));
            }
        }
        tokio::select! {
            Some(()) = in_flight.next(), if !in_flight.is_empty() => {
                // The callers just answered are about to append again: let them, so that their
                // appends go out together rather than the first alone. The group's slot stays
                // taken meanwhile, so they queue rather than send on their own.
                let queued = || shared.upgrade().map_or(0, |s| s.lock().queue.len());
                let mut seen = queued();
                for _ in 0..limits.linger_yields {
                    tokio::task::yield_now().await;
                    let now = queued();
                    if now == seen {
                        break;
                    }
                    seen = now;
                }
                if let Some(shared) = shared.upgrade() {
                    shared.lock().groups -= 1;
                }
            }
            () = &mut notified => {}
        }
    }
    while in_flight.next().await.is_some() {}
}

/// Empties the queue when the writer task ends or is dropped.
struct Drain(Weak<Shared>);

impl Drop for Drain {
    fn drop(&mut self) {
        if let Some(shared) = self.0.upgrade() {
            let mut state = shared.lock();
            state.queue.clear();
            state.queued_events = 0;
        }
    }
}

async fn commit(appender: Arc<Appender>, group: Vec<Pending>) {
    let requests: Vec<&AppendRequest> = group.iter().map(|p| &*p.request).collect();
    let outcomes = appender.execute(&requests).await;
    for (pending, outcome) in group.into_iter().zip(outcomes) {
        // A caller that gave up waiting finds its append committed all the same.
        let _ = pending.reply.send(outcome);
    }
}

/// Interprets the script's reply for one append: `code, x, y` (see [`crate::script::APPEND`]).
fn append_reply(
    request: &AppendRequest,
    code: &Value,
    x: Value,
    y: &Value,
) -> Result<Option<AppendResult>, StoreError> {
    let stream = &request.stream_id;
    let bad = |what: &str| {
        StoreError::backend(format!(
            "unexpected reply from the append script for `{stream}`: {what}"
        ))
    };
    let int = |v: &Value| match v {
        Value::Int(n) => u64::try_from(*n).ok(),
        _ => None,
    };
    let code = match code {
        Value::Int(n) => AppendCode::from_code(*n),
        _ => None,
    };
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        _ => "unknown".to_owned(),
    };
    match code {
        Some(AppendCode::Appended) => {
            let version = int(&x).ok_or_else(|| bad("no version"))?;
            let n = request.events.len() as u64;
            let positions = if n == 0 {
                Vec::new()
            } else {
                let first = int(y).ok_or_else(|| bad("no position"))?;
                (first..first + n).collect()
            };
            Ok(Some(AppendResult {
                stream_version: version,
                positions,
                duplicate: false,
            }))
        }
        Some(AppendCode::Held) => Ok(None),
        Some(AppendCode::Duplicate) => {
            let Value::Array(refs) = x else {
                return Err(bad("no id lookups"));
            };
            let found = request
                .events
                .iter()
                .enumerate()
                .map(|(i, event)| match refs.get(i) {
                    Some(Value::Nil) => Ok(None),
                    Some(Value::BulkString(entry)) => stored_ref(event.event_id, entry)
                        .map(Some)
                        .ok_or_else(|| StoreError::Corrupt {
                            location: format!("the event id index, event {}", event.event_id),
                            reason: format!(
                                "entry {:?} does not name a position held by the feed (was the \
                                 feed trimmed?)",
                                String::from_utf8_lossy(entry)
                            ),
                        }),
                    _ => Err(bad("missing id lookup")),
                })
                .collect::<Result<Vec<_>, _>>()?;
            classify_retry(request, &found)?
                .map(Some)
                .ok_or_else(|| bad("ids reported stored, but none was found"))
        }
        Some(AppendCode::Conflict) => {
            let actual = int(&x).ok_or_else(|| bad("no actual version"))?;
            Err(StoreError::Conflict {
                stream_id: stream.clone(),
                expected: request.expected,
                actual,
            })
        }
        Some(AppendCode::Closed) => {
            let version = int(&x).ok_or_else(|| bad("no tombstone version"))?;
            Err(StoreError::StreamClosed {
                stream_id: stream.clone(),
                version,
            })
        }
        Some(AppendCode::Corrupt) => Err(StoreError::Corrupt {
            location: stream_location(request),
            reason: format!("{}; nothing was written", corrupt_reason(&text(&x))),
        }),
        Some(AppendCode::Refused) => Err(refused(stream, &text(&x))),
        Some(AppendCode::Evicting) => Err(StoreError::backend(Error::EvictionPolicy {
            policy: text(&x),
        })),
        Some(AppendCode::Exhausted) => Err(StoreError::backend(format!(
            "the append to `{stream}` would take {} above 2^53 - 1, the most the store can hand \
             out (epochs up to 2^31 - 1 of 2^22 positions each); nothing was written",
            text(&x)
        ))),
        None => Err(bad("unknown reply code")),
    }
}

/// What the append script's `CORRUPT, what` means.
fn corrupt_reason(what: &str) -> String {
    match what {
        "version" => "the version key does not hold a number".to_owned(),
        "events" => "the stream holds entries beyond its version".to_owned(),
        "events-type" => "the stream's events key is not a Redis stream".to_owned(),
        "closed" => "the stream's closed key does not hold a version".to_owned(),
        "head" => "the global head does not hold numbers".to_owned(),
        "feed" => "the global feed holds entries beyond the head position".to_owned(),
        "outbox" => {
            "the outbox holds entries beyond its counter, or is not a Redis stream".to_owned()
        }
        other => format!("inconsistent `{other}`"),
    }
}

/// The outcomes of a call that was not all-or-nothing, where no append is held back.
fn unheld(
    outcomes: Vec<Result<Option<AppendResult>, StoreError>>,
) -> Vec<Result<AppendResult, StoreError>> {
    outcomes
        .into_iter()
        .map(|o| {
            o?.ok_or_else(|| {
                StoreError::backend("the append script held back an append of a plain group")
            })
        })
        .collect()
}

/// The outcome of an all-or-nothing call from its appends' outcomes: every part written; or,
/// when some parts found their events stored, the rule of
/// [`classify_streams_retry`](es_core::contract::classify_streams_retry) (all parts stored: the
/// first results; some: refused); or else the first part's error, in the call's order.
fn all_or_nothing(
    requests: &[AppendRequest],
    outcomes: Vec<Result<Option<AppendResult>, StoreError>>,
) -> Result<Vec<AppendResult>, StoreError> {
    if outcomes.len() != requests.len() {
        return Err(StoreError::backend(
            "the append script returned a wrong number of outcomes",
        ));
    }
    let stored = |o: &Result<Option<AppendResult>, StoreError>| {
        matches!(o, Ok(Some(r)) if r.duplicate)
            || matches!(o, Err(StoreError::DuplicateEvent { .. }))
    };
    if outcomes.iter().any(stored) {
        let mut found = Vec::with_capacity(requests.len());
        for (request, outcome) in requests.iter().zip(outcomes) {
            found.push(match outcome {
                Ok(Some(result)) if result.duplicate => {
                    let first = result.first_version().unwrap_or(1);
                    request
                        .events
                        .iter()
                        .zip(result.positions)
                        .zip(first..)
                        .map(|((event, global_position), stream_version)| {
                            Some(StoredEventRef {
                                event_id: event.event_id,
                                stream_id: request.stream_id.clone(),
                                stream_version,
                                global_position,
                            })
                        })
                        .collect()
                }
                Err(err @ StoreError::DuplicateEvent { .. }) => return Err(err),
                _ => vec![None; request.events.len()],
            });
        }
        return classify_streams_retry(requests, &found)?
            .ok_or_else(|| StoreError::backend("parts reported stored, but none was found"));
    }
    let mut results = Vec::with_capacity(requests.len());
    let mut held = false;
    for outcome in outcomes {
        match outcome? {
            Some(result) => results.push(result),
            None => held = true,
        }
    }
    if held {
        return Err(StoreError::backend(
            "the append script held the call back without naming the part that failed",
        ));
    }
    Ok(results)
}

/// Parses where the script found a stored event id: `"<position> <version> <stream>"` (the
/// position from the id index, the stream and version from its feed entry).
fn stored_ref(event_id: uuid::Uuid, entry: &[u8]) -> Option<StoredEventRef> {
    let text = std::str::from_utf8(entry).ok()?;
    let mut parts = text.splitn(3, ' ');
    let global_position = parts.next()?.parse().ok()?;
    let stream_version = parts.next()?.parse().ok()?;
    let stream = StreamId::parse(parts.next()?).ok()?;
    Some(StoredEventRef {
        event_id,
        stream_id: stream,
        stream_version,
        global_position,
    })
}

#[cfg(test)]
mod tests;

/// The error for an append whose first write the server refused (`refusal`, its error text):
/// [`Error::NoPermission`] for a command the user may not run, else the text.
fn refused(stream: &StreamId, refusal: &str) -> StoreError {
    match crate::error::refused_in_script(refusal) {
        Some(err) => StoreError::backend(err),
        None => StoreError::backend(format!(
            "Redis refused the append to `{stream}` (nothing was written): {refusal}"
        )),
    }
}
