//! es-chaos: a fault-injecting checker for the PostgreSQL and Redis stores. Run it with
//! `cargo xtask chaos [--store postgres|redis|all] [--minutes N | --seconds N] [--writers K]
//! [--seed S] [--partitions P]`; `cargo xtask test` runs short ones.
//!
//! For each store, the orchestrator (`es-chaos run`, [`orchestrate`]) starts a server of its
//! own (PostgreSQL with its durable defaults; Redis with `appendonly yes`, `appendfsync always`)
//! and these processes, all this same binary:
//!
//! - K **writers** ([`writer`]), each with several tasks appending random requests of 1 to 50
//!   events to a bounded set of streams with every `ExpectedVersion` mode, outbox messages on
//!   about a third of them, idempotent retries of the exact same request after an error and
//!   sometimes after success; on PostgreSQL half of them run an inline projection that fails or
//!   stalls at random. Each logs every request and every acknowledged result before going on.
//! - two **subscribers** (one for every event, one filtered by category) from position 0,
//!   resuming after their last logged position when restarted ([`consumer`]);
//! - a **projection**: exactly once into a table on PostgreSQL, at least once into a hash on
//!   Redis;
//! - two **outbox relays** sharing the lease, publishing to a file.
//!
//! With `--partitions P` (default 1) every process builds the store with P feed partitions
//! (`Partitioning::new(P)`). The subscribers then follow every partition from a per-partition
//! position and resume from each partition's last logged position; the projection is a
//! **consumer group of two processes** (`ProjectionRunner::spawn_group`, a 2 s lease, one fenced
//! checkpoint per partition: exactly once on PostgreSQL, at least once on Redis), which the
//! consumer kills hit like any other consumer, so partitions change hands under faults; on Redis
//! each partition has its own outbox and the two relays are a **relay group** over them
//! (`Relay::spawn_group`), while PostgreSQL keeps one outbox and one relay at a time. The end
//! marker is appended to every partition.
//!
//! Meanwhile it injects the faults of a schedule drawn from the seed ([`schedule`]): statement
//! time-outs, terminated backends, inline stalls longer than the append time-out, SIGSTOP and
//! kill -9 of writers, SIGSTOP (often past the group and relay leases) and kill -9 of consumers,
//! kill -9 and restart of the server, clean Redis restarts, dropped Redis connections and paused
//! Redis writes. Then it stops the faults, lets the
//! writers finish, appends an end marker, waits for every consumer to reach it, and checks the
//! history ([`check`]): every acknowledged append stored exactly once with the versions and
//! positions it was acknowledged with, refused ones absent, none half-stored; the feed strictly
//! increasing with each stream's versions contiguous; every subscriber delivered exactly the feed
//! (of its category), once, in increasing positions; the read models equal a replay of the feed;
//! every outbox message of a stored append published (duplicates allowed, losses not), in
//! per-stream order; no epoch began below an acknowledged position. With several partitions each of
//! these feed checks holds per partition (positions are a partition's, epochs are a partition's),
//! every event must be in the partition its stream hashes to, and no partition's projection
//! checkpoint may go back when a group worker claims it. It prints the counts (per partition too,
//! and the consumer groups' claims and hand-overs) and the violations by kind, each with the
//! stream, versions, positions and process involved, and exits with 1 if there is any.
//!
//! Given the seed, the fault schedule is fixed (what, when, on which process, for how long), and
//! so are each writer's draws and its inline projection's failures (keyed by request and
//! attempt); what the processes do between faults depends on timing, so two runs of one seed
//! inject the same faults into different histories. A run that finds a violation keeps its logs
//! (`faults.log` lists every fault as injected) and prints the command that repeats its schedule.
//!
//! What it does not try: several machines (network partitions, clock skew), a full disk,
//! replicas and failover, or a server that loses acknowledged data (both servers run with
//! durable settings, so every acknowledged append must survive; the stores' lost-tail detection
//! is tested by their own suites).

mod check;
mod cli;
mod consumer;
mod ids;
mod logs;
mod orchestrate;
mod schedule;
mod stores;
mod writer;

use std::process::ExitCode;

const USAGE: &str = "\
usage: es-chaos run --dir D [--store postgres|redis|all] [--seconds N | --minutes N]
                    [--writers K] [--tasks T] [--seed S] [--append-timeout-ms N] [--pace-ms A..B]
                    [--partitions P] [--keep]
       es-chaos writer|subscriber|projection|relay ...   (started by `run`)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((command, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let result = match command.as_str() {
        "run" => orchestrate::main(rest),
        "writer" => writer::main(rest).map(|()| ExitCode::SUCCESS),
        "subscriber" => consumer::subscriber(rest).map(|()| ExitCode::SUCCESS),
        "projection" => consumer::projection(rest).map(|()| ExitCode::SUCCESS),
        "relay" => consumer::relay(rest).map(|()| ExitCode::SUCCESS),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        other => Err(anyhow::anyhow!("unknown command {other:?}\n{USAGE}")),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("es-chaos {command}: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
