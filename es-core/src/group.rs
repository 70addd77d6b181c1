//! Consumer groups: one projection or relay run by N workers, in one process or many, each
//! working on its share of the store's feed partitions.
//!
//! # How a group divides the partitions
//!
//! Every worker of a group (a [`spawn_group`] call, with its own [`GroupConfig::member`]) runs
//! the same loop every quarter of the lease time, against leases kept in the store
//! ([`LeaseStore`]), on the store's clock:
//!
//! 1. It renews its **membership lease** (`member:<member>~<random suffix>`).
//! 2. It lists the group's held leases. The live members, in name order, divide the partitions
//!    round-robin: partition `p` goes to member `p mod n`. Every worker computes the same
//!    division from the same list.
//! 3. It stops the work of every partition it holds that is no longer its share, and releases
//!    those partitions' leases, so that their new owner can take them at once.
//! 4. It takes or renews the **partition lease** (`partition:<p>`) of each partition of its
//!    share. A partition whose lease another worker still holds (it has not seen the change
//!    yet, or it died and its lease has not run out) is retried on the next round.
//! 5. It starts the work of each partition it took (the closure given to [`spawn_group`], with a
//!    [`Claim`]), and restarts it if the lease's generation changed since (someone else may have
//!    held the partition in between) or if the work ended on its own.
//!
//! So a worker that joins gets its share within about two rounds; a worker that dies (its
//! leases stop being renewed) loses its partitions to the others within the lease time plus one
//! round; a worker that cannot reach the store (its calls fail, or hang: a round is cut off
//! when a lease it covers may run out) stops its partitions' work once its leases may have run
//! out (by its own clock, counted from when it sent the last successful renewal, with a tenth of
//! the lease kept as a guard).
//!
//! # Pausing the whole group
//!
//! [`GroupHandle::pause`] stops the group's work everywhere, for a rebuild
//! ([`ProjectionGroup::rebuild`](crate::ProjectionGroup::rebuild)): the worker takes the
//! group's **pause lease** (`pause`) and renews it while paused; every worker that sees it held
//! in a round takes no partition and stops and releases those it runs; the call returns once no
//! partition lease of the group is held (a dead or frozen worker's run out, after which its work
//! has stopped by its own clock). Dropping the returned guard releases the pause lease, and the
//! workers take their shares again on their next round.
//!
//! # Fencing: a worker that comes back never writes with a stale lease
//!
//! A lease alone cannot stop a worker that was paused (a long GC-like stall, a frozen VM, a
//! network partition) from waking up after its lease ran out and writing. So a partition's work
//! starts by fencing the partition's checkpoint
//! ([`CheckpointStore::fence_checkpoint`](crate::contract::CheckpointStore::fence_checkpoint)):
//! it raises the checkpoint's generation and reads its position, atomically, and every later
//! checkpoint write of an earlier holder is refused with [`StoreError::Fenced`]. For an
//! exactly-once sink (PostgreSQL) the read-model writes commit in the same transaction as the
//! checkpoint, so a paused worker's writes are refused too, and every event is applied once
//! across any number of rebalances. For an at-least-once sink the paused worker's handler may
//! still run on events the new owner also handles (at least once, as always), but it never moves
//! the checkpoint. A relay's writes are fenced by its relay lease in the same way
//! ([`crate::outbox`]).
//!
//! Per-stream order holds across rebalances: a stream lives in one partition, and the new owner
//! of a partition continues from the fenced checkpoint, in feed order.
//!
//! A partition's work is told to stop by the worker's clock and ends once its batch in hand is
//! done (a projection stops retrying a failing batch then too). So the one window left is a
//! store call of that batch that hangs past the lease (one that fails does not keep the work
//! going): fencing still refuses that worker's checkpoint, and on PostgreSQL its writes.
//!
//! Tested by the streaming conformance cases `group_worker_killed_hands_its_partitions_over`,
//! `group_worker_added_takes_its_share`, `group_stale_worker_never_records`,
//! `group_worker_cut_off_stops_by_its_own_clock`,
//! `group_worker_refused_by_its_store_stops_retrying_by_its_own_clock`,
//! `group_workers_sharing_a_name_divide_the_partitions`, and for the pause
//! `group_rebuild_pauses_every_worker_and_replays`,
//! `group_pause_holds_back_a_worker_that_took_partitions_late`,
//! `group_rebuild_dropped_midway_lets_the_group_resume`, `group_two_rebuilds_at_once_take_turns`
//! and `group_rebuild_slower_than_the_lease_keeps_the_group_paused`, on every store; and exactly
//! once on PostgreSQL by `es-postgres`'s group tests.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;

use crate::contract::{LeaseStore, StoreError};

/// The prefix of membership leases in a group.
const MEMBER: &str = "member:";
/// The prefix of partition leases in a group.
const PARTITION: &str = "partition:";
/// The lease a worker holds while the whole group is paused (see [`GroupHandle::pause`]).
const PAUSE: &str = "pause";

/// One worker's settings in a consumer group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    /// This worker's name in the group (a host and process id, a pod name), 1 to 150 bytes. Each
    /// worker also draws a random suffix when it starts, so two workers given the same name by
    /// mistake still never share a lease.
    pub member: String,
    /// How long the store keeps a worker's leases without renewal: a worker that dies loses its
    /// partitions after this. Renewed every quarter of it.
    pub lease_ttl: Duration,
}

impl GroupConfig {
    /// A worker named `member`, with a 10 s lease.
    pub fn new(member: impl Into<String>) -> Self {
        Self {
            member: member.into(),
            lease_ttl: Duration::from_secs(10),
        }
    }

    /// Sets the lease time.
    #[must_use]
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// How often the worker renews its leases and rebalances: a quarter of the lease.
    pub fn round(&self) -> Duration {
        self.lease_ttl / 4
    }

    /// The part of the lease a worker keeps clear at its end: a tenth.
    pub fn guard(&self) -> Duration {
        self.lease_ttl / 10
    }
}

/// A partition handed to a worker's work: its number, the partition lease's generation, and the
/// signal to stop.
#[derive(Debug)]
pub struct Claim {
    /// The partition.
    pub partition: u32,
    /// The generation of the partition lease this claim holds.
    pub generation: u64,
    stop: watch::Receiver<bool>,
}

impl Claim {
    /// Resolves when the work must stop: the partition moved to another worker, its lease may
    /// have run out, or the group is shutting down. Finish the batch in hand, then return.
    pub async fn stopped(&mut self) {
        let _ = self.stop.wait_for(|stop| *stop).await;
    }

    /// Whether the work was told to stop.
    pub fn is_stopped(&self) -> bool {
        *self.stop.borrow()
    }
}

/// Controls one worker of a consumer group.
#[derive(Debug)]
pub struct GroupHandle {
    owned: watch::Receiver<Vec<u32>>,
    stop: watch::Sender<bool>,
    pauses: mpsc::UnboundedSender<PauseRequest>,
    task: tokio::task::JoinHandle<()>,
}

/// A request to the worker's loop about the group-wide pause.
#[derive(Debug)]
enum PauseRequest {
    Pause(oneshot::Sender<Result<(), StoreError>>),
    Resume,
}

/// The group is paused while this lives (see [`GroupHandle::pause`]); dropping it lets every
/// worker take its partitions again.
#[derive(Debug)]
pub struct Paused {
    pauses: mpsc::UnboundedSender<PauseRequest>,
}

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = self.pauses.send(PauseRequest::Resume);
    }
}

impl GroupHandle {
    /// The partitions this worker runs now, in order.
    pub fn owned(&self) -> Vec<u32> {
        self.owned.borrow().clone()
    }

    /// Waits until the set of partitions this worker runs satisfies `done`.
    pub async fn wait_owned(&self, mut done: impl FnMut(&[u32]) -> bool) -> Vec<u32> {
        let mut owned = self.owned.clone();
        let result = owned.wait_for(|o| done(o)).await.map(|o| o.clone());
        result.unwrap_or_else(|_| self.owned())
    }

    /// Stops the work of every partition (each finishes its batch in hand), releases the leases
    /// so that the other workers take the partitions over at once, and ends.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Ends the worker at once, with no release: what a crash does. Its partitions go to the
    /// other workers when its leases run out.
    pub fn kill(self) {
        self.task.abort();
    }

    /// Pauses the whole group, every worker in every process: this worker takes the group's
    /// pause lease (renewed while paused), every worker stops its partitions' work at its next
    /// round and releases them, and none takes a partition while the lease is held. Returns once
    /// no partition lease of the group is held any more: every live worker has stopped, and the
    /// leases of dead or frozen ones have run out (so their work has stopped by their own clock).
    /// The group resumes when the returned guard is dropped, or when this worker ends (a crash:
    /// when the pause lease runs out).
    ///
    /// Fails with [`StoreError::Unavailable`] if another worker's pause or a partition lease
    /// is still held after twice the lease time and a round.
    pub async fn pause(&self) -> Result<Paused, StoreError> {
        let (reply, answer) = oneshot::channel();
        let stopped = || StoreError::unavailable("the consumer group's worker has stopped");
        self.pauses
            .send(PauseRequest::Pause(reply))
            .map_err(|_| stopped())?;
        let paused = Paused {
            pauses: self.pauses.clone(),
        };
        answer.await.map_err(|_| stopped())??;
        Ok(paused)
    }
}

/// Starts a worker of consumer group `group` over `partitions` partitions (a store's
/// [`Partitioning::partitions`](crate::contract::Partitioning::partitions)), with its leases in
/// `leases`. For each partition it takes, it runs `work(claim)` in a task of its own; that work
/// must end soon after [`Claim::stopped`] resolves. See the [module docs](self).
pub fn spawn_group<L, F, W>(
    leases: L,
    group: impl Into<String>,
    partitions: u32,
    config: GroupConfig,
    work: F,
) -> GroupHandle
where
    L: LeaseStore,
    F: FnMut(Claim) -> W + Send + 'static,
    W: Future<Output = ()> + Send + 'static,
{
    let (stop, stop_rx) = watch::channel(false);
    let (published, held) = watch::channel(Vec::new());
    let (pauses, pause_rx) = mpsc::unbounded_channel();
    // One owner per incarnation: two workers started under the same name by mistake still
    // never hold one lease together.
    let owner = format!(
        "{}~{}",
        config.member,
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let member = Member {
        leases,
        owner,
        membership: None,
        group: group.into(),
        partitions: partitions.max(1),
        config,
        work,
        running: BTreeMap::new(),
        tasks: JoinSet::new(),
        owned: published,
        pausing: None,
    };
    let span =
        tracing::info_span!("es.group", group = %member.group, member = %member.config.member);
    let task = tokio::spawn(tracing::Instrument::instrument(
        member.run(stop_rx, pause_rx),
        span,
    ));
    GroupHandle {
        owned: held,
        stop,
        pauses,
        task,
    }
}

/// A partition's work, as the worker runs it.
struct Running {
    generation: u64,
    /// When the lease may run out, by this worker's clock.
    deadline: Instant,
    stop: watch::Sender<bool>,
    task: AbortHandle,
}

struct Member<L, F> {
    leases: L,
    /// This incarnation's owner name in the leases: the member's name and a random suffix.
    owner: String,
    /// The generation of the membership lease, once taken.
    membership: Option<u64>,
    group: String,
    partitions: u32,
    config: GroupConfig,
    work: F,
    running: BTreeMap<u32, Running>,
    /// Every partition's task: dropped (aborted) with the worker.
    tasks: JoinSet<()>,
    owned: watch::Sender<Vec<u32>>,
    /// The generation of the group's pause lease while this worker holds it.
    pausing: Option<u64>,
}

impl<L, F, W> Member<L, F>
where
    L: LeaseStore,
    F: FnMut(Claim) -> W + Send + 'static,
    W: Future<Output = ()> + Send + 'static,
{
    async fn run(
        mut self,
        mut stop: watch::Receiver<bool>,
        mut pauses: mpsc::UnboundedReceiver<PauseRequest>,
    ) {
        let mut rounds = tokio::time::interval(self.config.round());
        rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let request = tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                _ = rounds.tick() => None,
                Some(request) = pauses.recv() => Some(request),
            };
            if let Some(request) = request {
                match request {
                    PauseRequest::Pause(reply) => {
                        let answer = self.pause().await;
                        // Published before the answer: once `pause` returns, `owned` is empty.
                        self.publish();
                        let _ = reply.send(answer);
                    }
                    PauseRequest::Resume => self.resume().await,
                }
                self.publish();
                continue;
            }
            // A store that does not answer must not hold the round past the moment a lease may
            // run out: the round is cut off then, and the partitions it covers are stopped.
            let cutoff = self
                .running
                .values()
                .map(|r| r.deadline)
                .min()
                .unwrap_or_else(|| Instant::now() + self.config.lease_ttl);
            match tokio::time::timeout_at(cutoff, self.round()).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    tracing::warn!(error = %err, "consumer group round failed; retrying");
                }
                Err(_) => tracing::warn!("consumer group round cut off: the store did not answer"),
            }
            self.expire();
            self.publish();
        }
        let all: Vec<u32> = self.running.keys().copied().collect();
        self.stop_partitions(&all, true).await;
        self.resume().await;
        if let Some(generation) = self.membership {
            let name = format!("{MEMBER}{}", self.owner);
            let _ = self
                .leases
                .release_lease(&self.group, &name, &self.owner, generation)
                .await;
        }
        self.publish();
    }

    /// Takes the group's pause lease, stops this worker's partitions, and waits until no
    /// partition lease of the group is held (see [`GroupHandle::pause`]).
    async fn pause(&mut self) -> Result<(), StoreError> {
        let ttl = self.config.lease_ttl;
        let give_up = Instant::now() + ttl * 2 + self.config.round();
        let all: Vec<u32> = self.running.keys().copied().collect();
        self.stop_partitions(&all, true).await;
        loop {
            // Renewed on every pass, and the membership with it.
            self.membership = self
                .acquire(&format!("{MEMBER}{}", self.owner), ttl)
                .await?;
            self.pausing = self.acquire(PAUSE, ttl).await?;
            if self.pausing.is_some() {
                let held = self.leases.held_leases(&self.group).await?;
                if !held.iter().any(|l| l.name.starts_with(PARTITION)) {
                    tracing::info!("the consumer group is paused");
                    return Ok(());
                }
            }
            if Instant::now() >= give_up {
                self.resume().await;
                return Err(StoreError::unavailable(format!(
                    "consumer group `{}` could not be paused within {:?}: a pause or a \
                     partition lease is still held",
                    self.group,
                    ttl * 2 + self.config.round()
                )));
            }
            tokio::time::sleep(self.config.round() / 4).await;
        }
    }

    /// Releases the group's pause lease, if this worker holds it.
    async fn resume(&mut self) {
        if let Some(generation) = self.pausing.take() {
            if let Err(err) = self
                .leases
                .release_lease(&self.group, PAUSE, &self.owner, generation)
                .await
            {
                tracing::warn!(error = %err, "releasing the pause lease failed; it runs out");
            }
            tracing::info!("the consumer group resumes");
        }
    }

    /// Takes or renews lease `name` (borrowing only what it needs, so that the future stays
    /// `Send` whatever the work closure is).
    fn acquire(
        &mut self,
        name: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<Option<u64>, StoreError>> + Send + '_ {
        let (leases, group, owner) = (&self.leases, &self.group, &self.owner);
        let name = name.to_owned();
        async move { leases.acquire_lease(group, &name, owner, ttl).await }
    }

    /// One round: membership, the division, releases, takes and starts.
    async fn round(&mut self) -> Result<(), StoreError> {
        while self.tasks.try_join_next().is_some() {}
        let ttl = self.config.lease_ttl;
        self.membership = self
            .acquire(&format!("{MEMBER}{}", self.owner), ttl)
            .await?;
        if self.pausing.is_some() {
            self.pausing = self.acquire(PAUSE, ttl).await?;
        }
        let held = self.leases.held_leases(&self.group).await?;
        let members: Vec<&str> = held
            .iter()
            .filter_map(|l| l.name.strip_prefix(MEMBER))
            .collect();
        let paused = held.iter().any(|l| l.name == PAUSE);
        let share: Vec<u32> = match members.iter().position(|m| *m == self.owner) {
            Some(index) if !paused => (0..self.partitions)
                .filter(|p| *p as usize % members.len() == index)
                .collect(),
            _ => Vec::new(),
        };
        let leaving: Vec<u32> = self
            .running
            .keys()
            .copied()
            .filter(|p| !share.contains(p))
            .collect();
        self.stop_partitions(&leaving, true).await;
        let mut acquired = Vec::new();
        for partition in share {
            let sent = Instant::now();
            match self.acquire(&format!("{PARTITION}{partition}"), ttl).await {
                Ok(Some(generation)) => {
                    acquired.push((partition, generation, sent + ttl - self.config.guard()));
                }
                Ok(None) => self.stop_partitions(&[partition], false).await,
                Err(err) => {
                    tracing::warn!(partition, error = %err, "renewing a partition lease failed");
                }
            }
        }
        // Work starts only if no pause began since the leases were listed: a pause that checks
        // for partition leases before this worker took one finds this listing's pause instead.
        let starts = acquired.iter().any(|&(p, g, _)| !self.runs(p, g));
        if starts
            && self
                .leases
                .held_leases(&self.group)
                .await?
                .iter()
                .any(|l| l.name == PAUSE)
        {
            for (partition, generation, deadline) in acquired {
                if self.runs(partition, generation) {
                    self.take(partition, generation, deadline);
                } else {
                    let name = format!("{PARTITION}{partition}");
                    self.leases
                        .release_lease(&self.group, &name, &self.owner, generation)
                        .await?;
                }
            }
            return Ok(());
        }
        for (partition, generation, deadline) in acquired {
            self.take(partition, generation, deadline);
        }
        Ok(())
    }

    /// Whether this worker runs `partition`'s work under the lease of `generation`.
    fn runs(&self, partition: u32, generation: u64) -> bool {
        self.running
            .get(&partition)
            .is_some_and(|r| r.generation == generation && !r.task.is_finished())
    }

    /// Runs `partition` under the lease of `generation`: keeps its work if it runs in that
    /// generation, (re)starts it otherwise.
    fn take(&mut self, partition: u32, generation: u64, deadline: Instant) {
        if self.runs(partition, generation) {
            if let Some(running) = self.running.get_mut(&partition) {
                running.deadline = deadline;
            }
            return;
        }
        if let Some(running) = self.running.get_mut(&partition) {
            let _ = running.stop.send(true);
            running.task.abort();
        }
        let (stop, stop_rx) = watch::channel(false);
        let claim = Claim {
            partition,
            generation,
            stop: stop_rx,
        };
        tracing::info!(partition, generation, "took a partition");
        let task = self.tasks.spawn((self.work)(claim));
        self.running.insert(
            partition,
            Running {
                generation,
                deadline,
                stop,
                task,
            },
        );
    }

    /// Stops the work of `partitions` and waits for it to end; releases their leases if
    /// `release`.
    async fn stop_partitions(&mut self, partitions: &[u32], release: bool) {
        let stopping: Vec<(u32, Running)> = partitions
            .iter()
            .filter_map(|p| self.running.remove(p).map(|r| (*p, r)))
            .collect();
        if stopping.is_empty() {
            return;
        }
        for (_, running) in &stopping {
            let _ = running.stop.send(true);
        }
        // Wait for those tasks to end (tasks of partitions kept run on meanwhile), for a round
        // at most: then cut them off.
        let patience = tokio::time::sleep(self.config.round());
        tokio::pin!(patience);
        while stopping.iter().any(|(_, r)| !r.task.is_finished()) {
            tokio::select! {
                joined = self.tasks.join_next() => if joined.is_none() { break },
                () = &mut patience => {
                    tracing::warn!("partition work did not stop within a round; aborting it");
                    for (_, running) in &stopping {
                        running.task.abort();
                    }
                    break;
                }
            }
        }
        for (partition, running) in stopping {
            tracing::info!(partition, "gave a partition up");
            if release {
                let name = format!("{PARTITION}{partition}");
                if let Err(err) = self
                    .leases
                    .release_lease(&self.group, &name, &self.owner, running.generation)
                    .await
                {
                    tracing::warn!(partition, error = %err, "releasing a partition lease failed");
                }
            }
        }
    }

    /// Stops the work of partitions whose lease may have run out (renewals failed).
    fn expire(&mut self) {
        let now = Instant::now();
        let expired: Vec<u32> = self
            .running
            .iter()
            .filter(|(_, r)| r.deadline <= now)
            .map(|(p, _)| *p)
            .collect();
        for partition in expired {
            if let Some(running) = self.running.remove(&partition) {
                tracing::warn!(partition, "the partition lease may have run out; stopping");
                let _ = running.stop.send(true);
            }
        }
    }

    fn publish(&self) {
        let owned: Vec<u32> = self.running.keys().copied().collect();
        self.owned.send_if_modified(|o| {
            let changed = *o != owned;
            *o = owned;
            changed
        });
    }
}
