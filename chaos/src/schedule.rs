//! The fault schedule: which fault, when, on what, decided up front from the seed alone.
//!
//! Faults come in rounds: each round is a seeded shuffle of every fault kind of the store, so in
//! any stretch of time the kinds are injected about equally often (a 10-minute run injects each
//! kind 30 to 45 times). Between two faults lies a gap of 1.2 to 2.8 s; faults with a duration
//! (a stopped process, a server kept down, a time-out window) overlap the ones that follow.

use std::time::Duration;

use crate::cli::StoreKind;
use crate::writer::mix;

/// A kind of fault the orchestrator injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum FaultKind {
    /// PostgreSQL: a short `statement_timeout`, server-wide for a window (`ALTER SYSTEM` and a
    /// reload: it reaches the writers' sessions, which set none of their own) or inside one
    /// append's transaction of an inline-projection writer (on command).
    StatementTimeout,
    /// PostgreSQL: `pg_terminate_backend` of a writer's connection, preferably one in a
    /// transaction or running a statement.
    TerminateBackend,
    /// PostgreSQL: an inline projection that stalls an append's transaction (a long `pg_sleep`
    /// or an idle client), usually for longer than the append time-out.
    InlineStall,
    /// SIGSTOP of a writer process, SIGCONT after a while (sometimes longer than the append
    /// time-out).
    WriterStop,
    /// kill -9 of a writer process, restarted at once.
    WriterKill,
    /// kill -9 of a subscriber, the projection or a relay, restarted at once.
    ConsumerKill,
    /// SIGSTOP of a subscriber, the projection (a worker of its group) or a relay, SIGCONT after
    /// a while (usually longer than the group and relay leases, so that the paused process's
    /// work moves to another while it sleeps, and it wakes up holding a stale lease).
    ConsumerStop,
    /// kill -9 of the server, restarted after a pause.
    ServerKill,
    /// Redis: a clean shutdown (SIGTERM) and restart.
    ServerRestart,
    /// Redis: `CLIENT KILL TYPE normal`: every client connection dropped.
    ClientKill,
    /// Redis: `CLIENT PAUSE <ms> WRITE`: writes held back, sometimes longer than the clients'
    /// response time-out.
    ClientPause,
}

impl FaultKind {
    /// Its name in reports.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::StatementTimeout => "statement_timeout",
            Self::TerminateBackend => "terminate_backend",
            Self::InlineStall => "inline_stall",
            Self::WriterStop => "writer_sigstop",
            Self::WriterKill => "writer_kill9",
            Self::ConsumerKill => "consumer_kill9",
            Self::ConsumerStop => "consumer_sigstop",
            Self::ServerKill => "server_kill9",
            Self::ServerRestart => "server_restart",
            Self::ClientKill => "client_kill",
            Self::ClientPause => "client_pause",
        }
    }

    /// The kinds injected on `store`.
    pub(crate) fn for_store(store: StoreKind) -> &'static [FaultKind] {
        match store {
            StoreKind::Postgres => &[
                Self::StatementTimeout,
                Self::TerminateBackend,
                Self::InlineStall,
                Self::WriterStop,
                Self::WriterKill,
                Self::ConsumerKill,
                Self::ConsumerStop,
                Self::ServerKill,
            ],
            StoreKind::Redis => &[
                Self::ServerKill,
                Self::ServerRestart,
                Self::ClientKill,
                Self::ClientPause,
                Self::WriterStop,
                Self::WriterKill,
                Self::ConsumerKill,
                Self::ConsumerStop,
            ],
        }
    }
}

/// One scheduled fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fault {
    /// When, from the start of the fault phase.
    pub(crate) at: Duration,
    /// What.
    pub(crate) kind: FaultKind,
    /// The writer it hits (for writer faults, terminations and inline faults).
    pub(crate) writer: u16,
    /// The consumer it hits (for consumer kills and stops): each of the two kinds takes the
    /// consumers in turn, in the orchestrator's order (the projection and the relays first).
    pub(crate) consumer: usize,
    /// Its duration or size in milliseconds: how long a process stays stopped, a server stays
    /// down, a pause or a time-out window lasts, or the time-out itself.
    pub(crate) ms: u64,
    /// A second measure: the statement time-out of a server-wide window.
    pub(crate) window_ms: u64,
    /// The variant: a server-wide time-out (vs one transaction), an idle stall (vs `pg_sleep`).
    pub(crate) wide: bool,
}

/// What the schedule is made for.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// The run's seed.
    pub(crate) seed: u64,
    /// The store.
    pub(crate) store: StoreKind,
    /// Length of the fault phase.
    pub(crate) duration: Duration,
    /// Number of writer processes.
    pub(crate) writers: u16,
    /// The writers with an inline projection (PostgreSQL).
    pub(crate) inline_writers: Vec<u16>,
    /// Number of consumer processes.
    pub(crate) consumers: usize,
    /// The writers' append time-out.
    pub(crate) append_timeout: Duration,
}

/// No fault in the first seconds (the processes start) or the last second.
const QUIET_START: Duration = Duration::from_secs(2);

/// The schedule of `plan`: the same for the same plan, whatever happens during the run.
pub(crate) fn schedule(plan: &Plan) -> Vec<Fault> {
    let salt = match plan.store {
        StoreKind::Postgres => 1,
        StoreKind::Redis => 2,
    };
    let mut rng = fastrand::Rng::with_seed(mix(plan.seed ^ mix(salt)));
    let timeout = u64::try_from(plan.append_timeout.as_millis()).unwrap_or(u64::MAX / 4);
    let end = plan.duration.saturating_sub(Duration::from_secs(1));
    let mut at = QUIET_START;
    let mut faults = Vec::new();
    let writers = plan.writers.max(1);
    let consumers = plan.consumers.max(1);
    let (mut kills, mut stops) = (0, 0);
    'rounds: loop {
        let mut kinds = FaultKind::for_store(plan.store).to_vec();
        rng.shuffle(&mut kinds);
        for kind in kinds {
            at += Duration::from_millis(rng.u64(1200..=2800));
            if at >= end {
                break 'rounds;
            }
            let inline = if plan.inline_writers.is_empty() {
                0
            } else {
                plan.inline_writers[rng.usize(0..plan.inline_writers.len())]
            };
            let mut fault = Fault {
                at,
                kind,
                writer: rng.u16(0..writers),
                consumer: 0,
                ms: 0,
                window_ms: 0,
                wide: false,
            };
            match kind {
                FaultKind::StatementTimeout => {
                    fault.wide = rng.bool();
                    if fault.wide {
                        fault.ms = rng.u64(5..=80);
                        fault.window_ms = rng.u64(800..=3000);
                    } else {
                        fault.writer = inline;
                        fault.ms = rng.u64(1..=20);
                    }
                }
                FaultKind::InlineStall => {
                    fault.writer = inline;
                    fault.wide = rng.bool();
                    fault.ms = if rng.u8(0..100) < 75 {
                        timeout + rng.u64(300..=1500)
                    } else {
                        rng.u64(100..=800)
                    };
                }
                FaultKind::WriterStop => {
                    fault.ms = if rng.u8(0..100) < 40 {
                        timeout + rng.u64(500..=2500)
                    } else {
                        rng.u64(100..=700)
                    };
                }
                FaultKind::ConsumerKill => {
                    fault.consumer = kills % consumers;
                    kills += 1;
                }
                FaultKind::ConsumerStop => {
                    // Past the leases every other time, the first time included.
                    let lease = u64::try_from(crate::stores::GROUP_LEASE.as_millis()).unwrap_or(0);
                    fault.ms = if stops % 2 == 0 {
                        lease + rng.u64(500..=3000)
                    } else {
                        rng.u64(100..=1500)
                    };
                    fault.consumer = stops % consumers;
                    stops += 1;
                }
                FaultKind::ServerKill | FaultKind::ServerRestart => {
                    fault.ms = rng.u64(100..=1500);
                }
                FaultKind::ClientPause => fault.ms = rng.u64(300..=3000),
                FaultKind::TerminateBackend | FaultKind::WriterKill | FaultKind::ClientKill => {}
            }
            faults.push(fault);
        }
    }
    faults
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(seed: u64, store: StoreKind, seconds: u64) -> Plan {
        Plan {
            seed,
            store,
            duration: Duration::from_secs(seconds),
            writers: 4,
            inline_writers: vec![1, 3],
            consumers: 5,
            append_timeout: Duration::from_secs(2),
        }
    }

    #[test]
    fn the_schedule_depends_on_the_seed_only() {
        let a = schedule(&plan(7, StoreKind::Postgres, 120));
        assert_eq!(a, schedule(&plan(7, StoreKind::Postgres, 120)));
        assert_ne!(a, schedule(&plan(8, StoreKind::Postgres, 120)));
        assert_ne!(
            a.iter().map(|f| f.kind).collect::<Vec<_>>(),
            schedule(&plan(7, StoreKind::Redis, 120))
                .iter()
                .map(|f| f.kind)
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn ten_minutes_inject_every_kind_at_least_twenty_five_times() {
        for store in [StoreKind::Postgres, StoreKind::Redis] {
            for seed in 0..20 {
                let faults = schedule(&plan(seed, store, 600));
                for &kind in FaultKind::for_store(store) {
                    let n = faults.iter().filter(|f| f.kind == kind).count();
                    assert!(
                        n >= 25,
                        "{store:?} seed {seed}: {} only {n} times",
                        kind.name()
                    );
                }
                assert!(faults.windows(2).all(|w| w[0].at < w[1].at));
                assert!(faults
                    .iter()
                    .filter(|f| matches!(f.kind, FaultKind::InlineStall))
                    .all(|f| f.writer % 2 == 1));
            }
        }
    }

    #[test]
    fn consumer_faults_take_the_consumers_in_turn() {
        let lease = crate::stores::GROUP_LEASE;
        for store in [StoreKind::Postgres, StoreKind::Redis] {
            for seed in 0..20 {
                let faults = schedule(&plan(seed, store, 35));
                for kind in [FaultKind::ConsumerKill, FaultKind::ConsumerStop] {
                    let targets: Vec<usize> = faults
                        .iter()
                        .filter(|f| f.kind == kind)
                        .map(|f| f.consumer)
                        .collect();
                    assert!(!targets.is_empty(), "{store:?} seed {seed}: no {kind:?}");
                    assert!(targets.iter().enumerate().all(|(i, &c)| c == i % 5));
                }
                let first_stop = faults.iter().find(|f| f.kind == FaultKind::ConsumerStop);
                assert!(first_stop.is_some_and(|f| Duration::from_millis(f.ms) > lease));
            }
        }
    }
}
