//! Load shared by the database benchmarks: round lengths and repetitions, and concurrent
//! loops timed for one round.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::pick;

/// Length of one timed append round.
pub(crate) fn round() -> Duration {
    pick(Duration::from_secs(2), Duration::from_millis(500))
}

/// Pairs of rounds per append workload.
pub(crate) fn rounds() -> usize {
    pick(5, 1)
}

/// Pairs of runs per read workload.
pub(crate) fn read_repeats() -> usize {
    pick(7, 2)
}

/// Runs `tasks` concurrent loops of `op(task, iteration)` for one round; returns ops completed.
pub(crate) async fn timed<F, Fut>(tasks: usize, op: F) -> anyhow::Result<(u64, Duration)>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let op = Arc::new(op);
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + round();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let op = Arc::clone(&op);
        let done = Arc::clone(&done);
        handles.push(tokio::spawn(async move {
            let mut i = 0;
            while Instant::now() < deadline {
                op(t, i).await?;
                i += 1;
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    Ok((done.load(Ordering::Relaxed), start.elapsed()))
}
