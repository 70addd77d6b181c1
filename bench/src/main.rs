//! Run with `cargo xtask bench [--quick]` (it starts PostgreSQL, Redis and a Kafka broker and sets
//! `DATABASE_URL` / `REDIS_URL` / `KAFKA_BROKERS`), or
//! `cargo run --release -p es-bench -- [--quick] [groups...]` against servers of your own.
//!
//! Every figure is reported as a ratio to the raw baseline doing the same work in the same run,
//! so the numbers mean something on any machine. Groups: `memory`, `postgres`, `redis`, `kafka`;
//! with none given every group runs. The table goes to stdout, progress to stderr.

// Counts become rates (f64) and SQL bigints (i64); every value here is far below 2^52.
#![allow(
    clippy::cast_precision_loss,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]

mod archive;
mod command;
mod config;
mod domain;
mod kafka;
mod load;
mod memory;
mod personal;
mod pg_processes;
mod postgres;
mod projection;
#[path = "redis.rs"]
mod redis_bench;
mod redis_cluster;
mod report;
mod telemetry;

use std::process::ExitCode;

use peak_alloc::PeakAlloc;
use report::Report;

/// Counts heap use so benchmarks can report peak memory.
#[global_allocator]
static PEAK: PeakAlloc = PeakAlloc;

fn main() -> ExitCode {
    // A child process of the multi-process PostgreSQL workload.
    if let Ok(spec) = std::env::var(pg_processes::CHILD_ENV) {
        return match pg_processes::child(&spec) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("es-bench child: error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let args = match config::Args::parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(message) => {
            eprint!("{message}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("es-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &config::Args) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut report = Report::default();
    let started = std::time::Instant::now();
    if args.group("memory") {
        runtime.block_on(memory::run(&mut report, args))?;
    }
    if args.group("postgres") {
        runtime.block_on(postgres::run(&mut report, args))?;
    }
    if args.group("redis") {
        runtime.block_on(redis_bench::run(&mut report, args))?;
    }
    if args.group("kafka") {
        runtime.block_on(kafka::run(&mut report))?;
    }
    println!("{}", report.markdown(config::quick()));
    eprintln!("es-bench: done in {:.0}s", started.elapsed().as_secs_f64());
    for row in report.missed() {
        eprintln!(
            "es-bench: target not met: [{}] {} ({})",
            row.group,
            row.workload,
            row.against_target()
        );
    }
    if !report.all_targets_met() {
        eprintln!("es-bench: some targets were not met (see the table)");
    }
    Ok(())
}
