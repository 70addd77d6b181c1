//! Run with `cargo xtask bench` (it starts PostgreSQL and Redis and sets `DATABASE_URL` /
//! `REDIS_URL`), or `cargo run --release -p es-bench -- [groups...]` against servers of your own.
//!
//! Every figure is reported as a ratio to the raw baseline doing the same work in the same run,
//! so the numbers mean something on any machine. Groups: `memory` (and, when built, `postgres`,
//! `redis`). With no arguments every group runs.

mod domain;
mod kafka;
mod memory;
mod postgres;
mod projection;
#[path = "redis.rs"]
mod redis_bench;
mod report;

use peak_alloc::PeakAlloc;
use report::Report;

/// Counts heap use so benchmarks can report peak memory.
#[global_allocator]
static PEAK: PeakAlloc = PeakAlloc;

fn wanted(args: &[String], group: &str) -> bool {
    args.is_empty() || args.iter().any(|a| a == group)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut report = Report::default();
    if wanted(&args, "memory") {
        runtime.block_on(memory::run(&mut report))?;
    }
    if wanted(&args, "postgres") {
        runtime.block_on(postgres::run(&mut report))?;
    }
    if wanted(&args, "redis") {
        runtime.block_on(redis_bench::run(&mut report))?;
    }
    if wanted(&args, "kafka") {
        runtime.block_on(kafka::run(&mut report))?;
    }
    println!("{}", report.markdown());
    if !report.all_targets_met() {
        eprintln!("some targets were not met (see the table)");
    }
    Ok(())
}
