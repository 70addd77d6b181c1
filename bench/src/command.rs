//! Commands through the repository, the way a user sends them: `Repository::execute_with` loads
//! the aggregate, decides, and appends with the loaded version as the expected version. The
//! repository is built with its default settings (retry policy, snapshot policy, and whatever else
//! the builder defaults to): those are what users get, and what these rows measure.
//!
//! Each store's module calls [`run`] with its raw baseline (a [`Baseline`]): the throughput rows
//! compare commands with the raw database writing the same rows in transactions of the same size,
//! in alternating rounds (ABBA) after a warm-up, like the append benchmarks. The other rows have
//! no raw side: a latency against the same aggregate's earlier latency, a commit rate under
//! contention, and the outcome of a race for the last units of stock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use es_core::{Repository, RepositoryError, Store};
use tokio::sync::Barrier;

use crate::config::pick;
use crate::domain::{self, Item, ItemCommand, Order, OrderEvent};
use crate::load::{round, rounds, timed};
use crate::report::{human, median, rate, Report, Row, Samples, Target};

/// Tasks of the throughput rows, each on its own aggregate or all on one.
const TASKS: usize = 16;
/// Events the latency row's aggregate grows to, one command at a time.
const GROWTH: u64 = 2_000;
/// Commands averaged at each end of the growth.
const WINDOW: usize = 100;
/// Target of the latency row: the last commands at most this much slower than the first.
const GROWTH_TARGET: f64 = 1.5;
/// Units on the shelf before a race.
const STOCK: u64 = 20;
/// Tasks racing for them, one unit each.
const RACERS: u64 = 32;
/// Distinct events the order commands cycle through.
const EVENT_POOL: u64 = 64;

/// A store's raw baseline for the throughput rows.
pub(crate) trait Baseline {
    /// What the raw side does for one `batch`-event command, for the notes.
    fn describe(&self, batch: usize) -> String;

    /// One timed round (of [`round`] length) of `tasks` tasks, each writing `batch`-row
    /// transactions to a stream of its own; returns rows/s.
    async fn round(&self, tasks: usize, batch: usize) -> anyhow::Result<f64>;

    /// Readies the server before a timed framework round, as the raw round readies it for itself
    /// (PostgreSQL: a CHECKPOINT). Nothing by default.
    async fn settle(&self) {}
}

/// The targets the issue sets on one store; the latency and race targets hold on every store.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Targets {
    /// Lowest ratio of 1-event commands x16 to the raw single-row transactions x16.
    pub(crate) distinct: Option<f64>,
    /// Lowest rate of committed commands on one aggregate shared by 16 tasks.
    pub(crate) contended: Option<f64>,
}

/// Runs every command workload on `store`, through one repository with default settings.
pub(crate) async fn run<S: Store>(
    report: &mut Report,
    group: &'static str,
    store: S,
    baseline: &impl Baseline,
    targets: Targets,
) -> anyhow::Result<()> {
    let repo = Repository::builder(store).build()?;
    let events: Arc<[OrderEvent]> = (0..EVENT_POOL).map(domain::order_event).collect();
    distinct(report, group, &repo, baseline, &events, 1, targets.distinct).await?;
    distinct(report, group, &repo, baseline, &events, 10, None).await?;
    growth(report, group, &repo, &events).await?;
    contended(report, group, &repo, &events, targets.contended).await?;
    races(report, group, &repo).await?;
    Ok(())
}

/// Numbers the aggregates of a run, so no two rounds share one.
static RUN: AtomicU64 = AtomicU64::new(0);

/// A fresh aggregate id starting with `what`.
fn fresh_id(what: &str) -> String {
    format!("{what}{}", RUN.fetch_add(1, Ordering::Relaxed))
}

/// The `i`-th command of an order's life: `batch` events taken in turn from the pool.
fn order_command(events: &[OrderEvent], i: u64, batch: usize) -> Vec<OrderEvent> {
    let first = i * batch as u64;
    (first..first + batch as u64)
        .map(|n| events[(n % events.len() as u64) as usize].clone())
        .collect()
}

/// Commands on distinct aggregates: [`TASKS`] tasks, each sending `batch`-event commands to an
/// aggregate of its own, whose history grows through the round. The raw side writes the same
/// number of rows per transaction with as many tasks; the ratio is commands/s over raw
/// transactions/s, i.e. events/s over rows/s.
async fn distinct<S: Store>(
    report: &mut Report,
    group: &'static str,
    repo: &Repository<S>,
    baseline: &impl Baseline,
    events: &Arc<[OrderEvent]>,
    batch: usize,
    target: Option<f64>,
) -> anyhow::Result<()> {
    let ours = || async {
        baseline.settle().await;
        command_round(repo, events, TASKS, batch).await
    };
    let raw = || baseline.round(TASKS, batch);
    ours().await?;
    raw().await?;
    let mut samples = Samples::default();
    for i in 0..rounds() {
        let (ours, raw) = if i % 2 == 0 {
            let raw = raw().await?;
            (ours().await?, raw)
        } else {
            let ours = ours().await?;
            (ours, raw().await?)
        };
        samples.push(ours, raw);
    }
    report.push(Row::paired(
        group,
        format!(
            "commands of {batch} event(s), {TASKS} tasks, each on its own aggregate \
             (load + decide + append, default repository)"
        ),
        &samples,
        "events/s",
        target,
        format!(
            "{} commands/s; each aggregate's history grows through the round; raw = {}; \
             {:.1}s rounds, {}",
            human(samples.ours() / batch as f64),
            baseline.describe(batch),
            round().as_secs_f64(),
            samples.describe()
        ),
    ));
    Ok(())
}

/// One timed round of `tasks` tasks sending `batch`-event commands to fresh aggregates of their
/// own; returns events/s.
pub(crate) async fn command_round<S: Store>(
    repo: &Repository<S>,
    events: &Arc<[OrderEvent]>,
    tasks: usize,
    batch: usize,
) -> anyhow::Result<f64> {
    let ids: Arc<[String]> = (0..tasks).map(|_| fresh_id("cmd")).collect();
    let (repo, events) = (repo.clone(), Arc::clone(events));
    let (commands, took) = timed(tasks, move |t, i| {
        let (repo, ids) = (repo.clone(), Arc::clone(&ids));
        let command = order_command(&events, i, batch);
        async move {
            let done = repo
                .execute_with::<Order>(&ids[t], &command, &domain::metadata())
                .await?;
            anyhow::ensure!(
                done.version == (i + 1) * batch as u64,
                "command {i} of `{}` ended at version {}",
                ids[t],
                done.version
            );
            Ok(())
        }
    })
    .await?;
    Ok(rate(commands * batch as u64, took))
}

/// Latency as an aggregate grows: one task sends 1-event commands to one aggregate from 0 to
/// [`GROWTH`] events; the mean latency of the last [`WINDOW`] commands against that of the first.
/// No raw side: the baseline is the same aggregate while it was young.
async fn growth<S: Store>(
    report: &mut Report,
    group: &'static str,
    repo: &Repository<S>,
    events: &[OrderEvent],
) -> anyhow::Result<()> {
    let runs = pick(3, 1);
    let mut samples = Samples::default();
    for _ in 0..runs {
        let (first, last) = grow(repo, events).await?;
        samples.push(last, first);
    }
    report.push(
        Row::paired(
            group,
            format!(
                "1 task, 1-event commands to one aggregate growing 0 → {} events: mean latency \
                 of the last {WINDOW} vs the first {WINDOW}",
                human(GROWTH as f64)
            ),
            &samples,
            "µs",
            None,
            format!(
                "framework column = commands {}–{}, raw column = commands 1–{WINDOW} of the same \
                 aggregate (no raw database); ratio = last/first, median of {runs} run(s) \
                 (ratios {})",
                human((GROWTH - WINDOW as u64 + 1) as f64),
                human(GROWTH as f64),
                samples.spread()
            ),
        )
        .with_target(Target::RatioAtMost(GROWTH_TARGET)),
    );
    Ok(())
}

/// Grows a fresh aggregate to [`GROWTH`] events; returns the mean latencies in µs of the first
/// and the last [`WINDOW`] commands.
async fn grow<S: Store>(repo: &Repository<S>, events: &[OrderEvent]) -> anyhow::Result<(f64, f64)> {
    let id = fresh_id("grow");
    let mut latencies = Vec::with_capacity(GROWTH as usize);
    for i in 0..GROWTH {
        let command = order_command(events, i, 1);
        let start = Instant::now();
        repo.execute_with::<Order>(&id, &command, &domain::metadata())
            .await?;
        latencies.push(start.elapsed());
    }
    let mean_us = |window: &[Duration]| {
        window.iter().map(Duration::as_secs_f64).sum::<f64>() / window.len() as f64 * 1e6
    };
    Ok((
        mean_us(&latencies[..WINDOW]),
        mean_us(&latencies[latencies.len() - WINDOW..]),
    ))
}

/// What became of the commands of contended rounds.
#[derive(Debug, Default, Clone, Copy)]
struct Contention {
    committed: u64,
    /// Attempts beyond the first of committed commands.
    retries: u64,
    /// Commands that ran out of attempts (`RepositoryError::Conflict`).
    failed: u64,
    /// Their attempts, all lost.
    failed_attempts: u64,
}

impl Contention {
    fn add(self, other: Self) -> Self {
        Self {
            committed: self.committed + other.committed,
            retries: self.retries + other.retries,
            failed: self.failed + other.failed,
            failed_attempts: self.failed_attempts + other.failed_attempts,
        }
    }

    /// Attempts lost per committed command.
    fn lost_per_commit(self) -> f64 {
        (self.retries + self.failed_attempts) as f64 / self.committed.max(1) as f64
    }
}

/// [`Contention`] counted by concurrent tasks.
#[derive(Debug, Default)]
struct Tally {
    committed: AtomicU64,
    retries: AtomicU64,
    failed: AtomicU64,
    failed_attempts: AtomicU64,
}

impl Tally {
    fn get(&self) -> Contention {
        Contention {
            committed: self.committed.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            failed_attempts: self.failed_attempts.load(Ordering::Relaxed),
        }
    }
}

/// One contended aggregate: [`TASKS`] tasks all sending 1-event commands to ONE aggregate for a
/// round: commands committed per second, and the attempts lost per committed command (the retries
/// of committed commands plus every attempt of the commands that gave up with a conflict, over
/// the commands committed). No raw side.
async fn contended<S: Store>(
    report: &mut Report,
    group: &'static str,
    repo: &Repository<S>,
    events: &Arc<[OrderEvent]>,
    target: Option<f64>,
) -> anyhow::Result<()> {
    contended_round(repo, events).await?;
    let mut rates = Vec::new();
    let mut total = Contention::default();
    for _ in 0..rounds() {
        let (commit_rate, outcome) = contended_round(repo, events).await?;
        rates.push(commit_rate);
        total = total.add(outcome);
    }
    let (lo, hi) = rates
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
    let mut row = Row::alone(
        group,
        format!(
            "{TASKS} tasks, 1-event commands all to ONE aggregate: commands committed \
             (default retry policy)"
        ),
        median(&rates),
        "commands/s",
        format!(
            "{:.2} attempts lost per commit ({} retries of {} committed commands, {} \
             command(s) out of attempts with a conflict, {} attempts); the aggregate grows \
             through each round; {:.1}s rounds, median of {} (rates {}–{})",
            total.lost_per_commit(),
            total.retries,
            total.committed,
            total.failed,
            total.failed_attempts,
            round().as_secs_f64(),
            rates.len(),
            human(lo),
            human(hi)
        ),
    );
    if let Some(target) = target {
        row = row.with_target(Target::AtLeast(target));
    }
    report.push(row);
    Ok(())
}

/// One timed round of [`TASKS`] tasks sending 1-event commands to one fresh aggregate; returns
/// the committed commands/s and the outcomes.
async fn contended_round<S: Store>(
    repo: &Repository<S>,
    events: &Arc<[OrderEvent]>,
) -> anyhow::Result<(f64, Contention)> {
    let id: Arc<str> = fresh_id("hot").into();
    let tally = Arc::new(Tally::default());
    let (repo2, events, id2, tally2) = (
        repo.clone(),
        Arc::clone(events),
        Arc::clone(&id),
        Arc::clone(&tally),
    );
    let (_, took) = timed(TASKS, move |_, i| {
        let (repo, id, tally) = (repo2.clone(), Arc::clone(&id2), Arc::clone(&tally2));
        let command = order_command(&events, i, 1);
        async move {
            match repo
                .execute_with::<Order>(&id, &command, &domain::metadata())
                .await
            {
                Ok(done) => {
                    tally.committed.fetch_add(1, Ordering::Relaxed);
                    let retries = u64::from(done.attempts - 1);
                    tally.retries.fetch_add(retries, Ordering::Relaxed);
                }
                Err(RepositoryError::Conflict { attempts, .. }) => {
                    tally.failed.fetch_add(1, Ordering::Relaxed);
                    let lost = u64::from(attempts);
                    tally.failed_attempts.fetch_add(lost, Ordering::Relaxed);
                }
                Err(e) => return Err(e.into()),
            }
            Ok(())
        }
    })
    .await?;
    let outcome = tally.get();
    let version = repo.load::<Order>(&id).await?.version;
    anyhow::ensure!(
        version == outcome.committed,
        "`{id}` holds {version} events after {} committed 1-event commands",
        outcome.committed
    );
    Ok((rate(outcome.committed, took), outcome))
}

/// How each command of a race ended.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Race {
    reserved: u64,
    out_of_stock: u64,
    conflicts: u64,
}

impl Race {
    /// Every race should end so: all the stock reserved, every other command told it is out of
    /// stock, none giving up on a conflict.
    const EXPECTED: Self = Self {
        reserved: STOCK,
        out_of_stock: RACERS - STOCK,
        conflicts: 0,
    };

    fn add(self, other: Self) -> Self {
        Self {
            reserved: self.reserved + other.reserved,
            out_of_stock: self.out_of_stock + other.out_of_stock,
            conflicts: self.conflicts + other.conflicts,
        }
    }

    fn times(self, n: u64) -> Self {
        Self {
            reserved: self.reserved * n,
            out_of_stock: self.out_of_stock * n,
            conflicts: self.conflicts * n,
        }
    }

    fn show(self) -> String {
        format!(
            "{} / {} / {}",
            self.reserved, self.out_of_stock, self.conflicts
        )
    }
}

/// The warehouse race: an item holds [`STOCK`] units and [`RACERS`] tasks, released together,
/// each send one command reserving one unit. Every command must end reserved or rejected by the
/// domain as out of stock, none with `RepositoryError::Conflict`. Repeated a few times; the row
/// shows the totals.
async fn races<S: Store>(
    report: &mut Report,
    group: &'static str,
    repo: &Repository<S>,
) -> anyhow::Result<()> {
    let runs = pick(5, 2);
    let mut total = Race::default();
    let mut each = Vec::new();
    let slowest = Arc::new(AtomicU64::new(0));
    for _ in 0..runs {
        let race = race(repo, &slowest).await?;
        total = total.add(race);
        each.push(race.show());
    }
    let expected = Race::EXPECTED.times(runs);
    report.push(
        Row::alone(
            group,
            format!(
                "warehouse race: {RACERS} tasks each reserve 1 unit of one item holding {STOCK}, \
                 {runs} races: reserved / out of stock / conflicts"
            ),
            total.reserved as f64,
            "reserved",
            format!(
                "totals; wanted {} per race, got {}; the slowest reservation took {} attempt(s) \
                 (default retry policy)",
                Race::EXPECTED.show(),
                each.join(", "),
                slowest.load(Ordering::Relaxed)
            ),
        )
        .showing(total.show())
        .with_target(Target::Exactly {
            expected: expected.show(),
            met: total == expected,
        }),
    );
    Ok(())
}

/// One race on a fresh item; checks that what was reserved is what the item says.
async fn race<S: Store>(repo: &Repository<S>, slowest: &Arc<AtomicU64>) -> anyhow::Result<Race> {
    let id: Arc<str> = fresh_id("race").into();
    repo.execute::<Item>(&id, &ItemCommand::Stock(STOCK))
        .await?;
    let start = Arc::new(Barrier::new(RACERS as usize));
    let mut racers = Vec::new();
    for _ in 0..RACERS {
        let (repo, id, start, slowest) = (
            repo.clone(),
            Arc::clone(&id),
            Arc::clone(&start),
            Arc::clone(slowest),
        );
        racers.push(tokio::spawn(async move {
            start.wait().await;
            let mut race = Race::default();
            match repo.execute::<Item>(&id, &ItemCommand::Reserve(1)).await {
                Ok(done) => {
                    slowest.fetch_max(u64::from(done.attempts), Ordering::Relaxed);
                    race.reserved = 1;
                }
                Err(RepositoryError::Domain { .. }) => race.out_of_stock = 1,
                Err(RepositoryError::Conflict { .. }) => race.conflicts = 1,
                Err(e) => return Err(anyhow::Error::from(e)),
            }
            Ok(race)
        }));
    }
    let mut race = Race::default();
    for racer in racers {
        race = race.add(racer.await??);
    }
    let item = repo.load::<Item>(&id).await?.aggregate;
    anyhow::ensure!(
        item.reserved == race.reserved && item.available + item.reserved == STOCK,
        "`{id}` says {item:?} after {} successful reservations",
        race.reserved
    );
    Ok(race)
}
