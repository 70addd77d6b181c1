//! Appends from several OS processes into one es-postgres schema with P feed partitions, against
//! raw single-row INSERTs from as many processes.
//!
//! Group commit shares a commit among the appends of one process; appends of different processes
//! each wait for the commit chain of their partition. This workload measures what partitions buy
//! there: the benchmark binary starts a number of children of itself (each with its own pool and
//! store, as separate application instances would have), which append 1-event batches to
//! distinct streams for one round, and report how many they had acknowledged. Two shapes:
//! [`BUSY`] (a few processes of many tasks each: group commit inside each process, the server's
//! CPU the limit on this machine) and [`SINGLE`] (many processes of one task each: no group
//! commit at all, every append its own commit, so the commit chain's latency is the limit). The
//! streams are either spread over every partition (each process writes to all of them), or, in
//! the rows "each process on its own partitions", only those of the child's partitions
//! (partition mod processes = the child's index), as writers routed by partition key (a tenant
//! per instance) would be. The raw side is the same number of children running autocommit
//! single-row INSERTs into a table of the same shape (bigserial position, no ordering
//! guarantee).
//!
//! While the framework rounds run, the parent follows every partition with a subscription; after
//! the last round it checks, per partition, that the subscription delivered exactly the
//! partition's feed in strictly increasing positions (nothing skipped, nothing twice) and that the
//! feeds hold exactly the events the children had acknowledged.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use es_core::contract::{FeedPosition, Partitioning};
use es_core::{
    AppendRequest, EventFilter, EventStore, ExpectedVersion, NewEvent, ReadAll, StreamId,
};
use es_postgres::PgStore;
use futures::{StreamExt, TryStreamExt};
use sqlx::postgres::PgPoolOptions;
use sqlx::AssertSqlSafe;
use tokio::io::AsyncReadExt;
use tokio::sync::Mutex;

use crate::load::{round, rounds};
use crate::report::{Report, Row as ReportRow, Samples};

/// The environment variable that makes the benchmark binary a child of this workload.
pub(crate) const CHILD_ENV: &str = "ES_BENCH_PG_CHILD";

/// Child processes and appending tasks per child.
#[derive(Debug, Clone, Copy)]
struct Shape {
    processes: usize,
    tasks: usize,
}

/// A few busy processes: group commit shares each process's commits.
const BUSY: Shape = Shape {
    processes: 4,
    tasks: 8,
};
/// Many processes of one task: every append commits alone.
const SINGLE: Shape = Shape {
    processes: 8,
    tasks: 1,
};
/// Streams each task cycles through (so every partition gets appends).
const STREAMS_PER_TASK: usize = 8;

const PAYLOAD: &str = r#"{"order_id": "ord_7f3c2a9e", "total_cents": 12999}"#;

/// What a child is told, as the value of [`CHILD_ENV`]: `ours|raw affine|spread processes tasks
/// url schema partitions index start_unix_ms round_ms`.
struct ChildSpec {
    raw: bool,
    /// Each child appends only to streams of its own partitions (partition mod processes = its
    /// index), as writers routed by partition key would.
    affine: bool,
    shape: Shape,
    url: String,
    schema: String,
    partitions: u32,
    index: usize,
    start_ms: u64,
    round_ms: u64,
}

impl ChildSpec {
    fn encode(&self) -> String {
        format!(
            "{} {} {} {} {} {} {} {} {} {}",
            if self.raw { "raw" } else { "ours" },
            if self.affine { "affine" } else { "spread" },
            self.shape.processes,
            self.shape.tasks,
            self.url,
            self.schema,
            self.partitions,
            self.index,
            self.start_ms,
            self.round_ms
        )
    }

    fn decode(text: &str) -> anyhow::Result<Self> {
        let parts: Vec<&str> = text.split(' ').collect();
        let [mode, spread, processes, tasks, url, schema, partitions, index, start_ms, round_ms] =
            parts[..]
        else {
            anyhow::bail!("bad {CHILD_ENV}: {text:?}");
        };
        Ok(Self {
            raw: mode == "raw",
            affine: spread == "affine",
            shape: Shape {
                processes: processes.parse()?,
                tasks: tasks.parse()?,
            },
            url: url.to_owned(),
            schema: schema.to_owned(),
            partitions: partitions.parse()?,
            index: index.parse()?,
            start_ms: start_ms.parse()?,
            round_ms: round_ms.parse()?,
        })
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs a child (the binary was started with [`CHILD_ENV`] set): appends until the round ends,
/// then prints the number of events acknowledged.
pub(crate) fn child(spec: &str) -> anyhow::Result<()> {
    let spec = ChildSpec::decode(spec)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let count = runtime.block_on(run_child(&spec))?;
    println!("{count}");
    Ok(())
}

async fn run_child(spec: &ChildSpec) -> anyhow::Result<u64> {
    let pool = PgPoolOptions::new()
        .max_connections(spec.shape.tasks as u32 + 4)
        .test_before_acquire(false)
        .connect_with(PgStore::connect_options(&spec.url)?)
        .await?;
    let store = if spec.raw {
        None
    } else {
        Some(
            PgStore::builder(pool.clone())
                .schema(&spec.schema)
                .partitioning(Partitioning::new(spec.partitions)?)
                .build()
                .await?,
        )
    };
    // Every connection open before the round starts.
    let warm: Vec<_> =
        futures::future::try_join_all((0..spec.shape.tasks).map(|_| pool.acquire())).await?;
    drop(warm);
    let start = spec.start_ms.saturating_sub(unix_ms());
    tokio::time::sleep(Duration::from_millis(start)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(spec.round_ms);
    let tag = format!("{}-{}", spec.index, unix_ms());
    let partitioning = Partitioning::new(spec.partitions)?;
    let processes = spec.shape.processes;
    let tasks = (0..spec.shape.tasks).map(|t| {
        let (store, pool) = (store.clone(), pool.clone());
        let table = format!("\"{}\".events", spec.schema);
        // The task's streams: with affinity, only streams of this child's partitions.
        let streams: Vec<String> = (0..STREAMS_PER_TASK)
            .map(|k| {
                (0..100_000)
                    .map(|j| format!("p{tag}t{t}s{k}x{j}"))
                    .find(|name| {
                        !spec.affine
                            || StreamId::new("order", name).is_ok_and(|id| {
                                partitioning.partition_of(&id) as usize % processes
                                    == spec.index % processes
                            })
                    })
                    .unwrap_or_default()
            })
            .collect();
        async move {
            let template = NewEvent::new("OrderPlaced", 1, PAYLOAD)?;
            let mut versions = [0_u64; STREAMS_PER_TASK];
            let mut n = 0_u64;
            while tokio::time::Instant::now() < deadline {
                let k = n as usize % STREAMS_PER_TASK;
                let stream = &streams[k];
                match &store {
                    Some(store) => {
                        store
                            .append(AppendRequest::new(
                                StreamId::new("order", stream)?,
                                ExpectedVersion::Exact(versions[k]),
                                vec![template.clone().with_id(uuid::Uuid::now_v7())],
                            ))
                            .await?;
                    }
                    None => {
                        sqlx::query(AssertSqlSafe(format!(
                            "INSERT INTO {table} (stream_id, category, stream_version, event_id, \
                             event_type, schema_version, payload, metadata) VALUES \
                             ($1, 'order', $2, $3, 'OrderPlaced', 1, $4::jsonb, '{{}}'::jsonb)"
                        )))
                        .bind(format!("order-{stream}"))
                        .bind(versions[k] as i64 + 1)
                        .bind(uuid::Uuid::now_v7())
                        .bind(PAYLOAD)
                        .execute(&pool)
                        .await?;
                    }
                }
                versions[k] += 1;
                n += 1;
            }
            anyhow::Ok(n)
        }
    });
    let counts = futures::future::try_join_all(tasks).await?;
    Ok(counts.iter().sum())
}

/// Runs one round of children; returns events/s and the events acknowledged.
async fn round_of_children(
    url: &str,
    schema: &str,
    layout: Layout,
    raw: bool,
) -> anyhow::Result<(f64, u64)> {
    let Layout {
        shape,
        partitions,
        affine,
    } = layout;
    let exe = std::env::current_exe()?;
    let round_ms = round().as_millis() as u64;
    // Time for the children to start, connect and warm up before the round begins together.
    let start_ms = unix_ms() + 1500;
    let mut children = Vec::new();
    for index in 0..shape.processes {
        let spec = ChildSpec {
            raw,
            affine,
            shape,
            url: url.to_owned(),
            schema: schema.to_owned(),
            partitions,
            index,
            start_ms,
            round_ms,
        };
        children.push(
            tokio::process::Command::new(&exe)
                .env(CHILD_ENV, spec.encode())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .context("cannot start a benchmark child process")?,
        );
    }
    let mut total = 0;
    for mut child in children {
        let mut out = String::new();
        if let Some(stdout) = child.stdout.as_mut() {
            stdout.read_to_string(&mut out).await?;
        }
        let status = child.wait().await?;
        anyhow::ensure!(status.success(), "a benchmark child failed: {status}");
        total += out.trim().parse::<u64>().context("a child's count")?;
    }
    let late = unix_ms().saturating_sub(start_ms + round_ms);
    anyhow::ensure!(
        late < 10_000,
        "the children ended {late} ms after their round"
    );
    Ok((total as f64 / round().as_secs_f64(), total))
}

/// One row's set-up: the children, the partitions and how the children's streams are chosen.
#[derive(Debug, Clone, Copy)]
struct Layout {
    shape: Shape,
    partitions: u32,
    affine: bool,
}

/// The rows, in order: [`BUSY`] at P = 1, 4 and 16 (spread, then each process on its own
/// partitions), then [`SINGLE`] at P = 1, 4 and 16.
const LAYOUTS: [Layout; 8] = [
    Layout {
        shape: BUSY,
        partitions: 1,
        affine: false,
    },
    Layout {
        shape: BUSY,
        partitions: 4,
        affine: false,
    },
    Layout {
        shape: BUSY,
        partitions: 16,
        affine: false,
    },
    Layout {
        shape: BUSY,
        partitions: 4,
        affine: true,
    },
    Layout {
        shape: BUSY,
        partitions: 16,
        affine: true,
    },
    Layout {
        shape: SINGLE,
        partitions: 1,
        affine: false,
    },
    Layout {
        shape: SINGLE,
        partitions: 4,
        affine: false,
    },
    Layout {
        shape: SINGLE,
        partitions: 16,
        affine: false,
    },
];

/// The workload: one report row per layout of [`LAYOUTS`].
pub(crate) async fn run(report: &mut Report, url: &str, tag: &str) -> anyhow::Result<()> {
    let admin = PgPoolOptions::new()
        .max_connections(4)
        .test_before_acquire(false)
        .connect(url)
        .await?;
    for (i, layout) in LAYOUTS.into_iter().enumerate() {
        let schema = format!("bench_proc{i}_{tag}");
        let raw_schema = format!("bench_proc_raw{i}_{tag}");
        let result = measure(report, url, &admin, &schema, &raw_schema, layout).await;
        for s in [&schema, &raw_schema] {
            let _ = sqlx::query(AssertSqlSafe(format!("DROP SCHEMA \"{s}\" CASCADE")))
                .execute(&admin)
                .await;
        }
        result?;
    }
    Ok(())
}

async fn measure(
    report: &mut Report,
    url: &str,
    admin: &sqlx::PgPool,
    schema: &str,
    raw_schema: &str,
    layout: Layout,
) -> anyhow::Result<()> {
    let partitioning = Partitioning::new(layout.partitions)?;
    let store = PgStore::builder(admin.clone())
        .schema(schema)
        .partitioning(partitioning)
        .poll_interval(Duration::from_millis(100))
        .build()
        .await?;
    crate::postgres::create_raw_table(admin, raw_schema).await?;
    // The parent's subscriber of every partition, for the whole run.
    let delivered: Arc<Mutex<HashMap<u32, Vec<u64>>>> = Arc::default();
    let follower = tokio::spawn({
        let delivered = Arc::clone(&delivered);
        let mut feed = store.subscribe_all(&FeedPosition::start(&partitioning), EventFilter::all());
        async move {
            while let Some(event) = feed.next().await {
                let event = event?;
                delivered
                    .lock()
                    .await
                    .entry(event.partition)
                    .or_default()
                    .push(event.global_position);
            }
            anyhow::Ok(())
        }
    });
    let mut samples = Samples::default();
    let mut acknowledged = 0;
    round_of_children(url, raw_schema, layout, true).await?;
    acknowledged += round_of_children(url, schema, layout, false).await?.1;
    for i in 0..rounds() {
        let (ours, raw) = if i % 2 == 0 {
            let raw = round_of_children(url, raw_schema, layout, true).await?;
            (round_of_children(url, schema, layout, false).await?, raw)
        } else {
            let ours = round_of_children(url, schema, layout, false).await?;
            (
                ours,
                round_of_children(url, raw_schema, layout, true).await?,
            )
        };
        acknowledged += ours.1;
        samples.push(ours.0, raw.0);
    }
    let checked = check_feeds(&store, &partitioning, &delivered, acknowledged).await;
    follower.abort();
    let checked = checked?;
    let Layout {
        shape,
        partitions,
        affine,
    } = layout;
    report.push(ReportRow::paired(
        "es-postgres",
        format!(
            "append 1-event batches, {} processes x {} task(s), {partitions} partition(s){}",
            shape.processes,
            shape.tasks,
            if affine {
                ", each process on its own partitions"
            } else {
                ""
            }
        ),
        &samples,
        "events/s",
        None,
        format!(
            "separate OS processes, a pool and store each; raw = single-row INSERT txns from as \
             many processes (bigserial, no ordering guarantee); {checked}; {:.1}s rounds, {}",
            round().as_secs_f64(),
            samples.describe()
        ),
    ));
    Ok(())
}

/// Checks that the subscriber delivered every partition's feed exactly, in strictly increasing
/// positions, and that the feeds hold `acknowledged` events; describes what it checked.
async fn check_feeds(
    store: &PgStore,
    partitioning: &Partitioning,
    delivered: &Mutex<HashMap<u32, Vec<u64>>>,
    acknowledged: u64,
) -> anyhow::Result<String> {
    let mut feeds: HashMap<u32, Vec<u64>> = HashMap::new();
    let mut total = 0;
    for p in partitioning.partitions() {
        let feed: Vec<u64> = store
            .read_all(ReadAll::after(0).partition(p))
            .map_ok(|e| e.global_position)
            .try_collect()
            .await?;
        total += feed.len() as u64;
        feeds.insert(p, feed);
    }
    anyhow::ensure!(
        total == acknowledged,
        "the feeds hold {total} events, the children acknowledged {acknowledged}"
    );
    // The subscriber catches up within its polling interval.
    let patience = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let got = delivered.lock().await.clone();
        let complete = partitioning
            .partitions()
            .all(|p| got.get(&p).map_or(0, Vec::len) == feeds.get(&p).map_or(0, Vec::len));
        if complete {
            for p in partitioning.partitions() {
                let positions = got.get(&p).cloned().unwrap_or_default();
                anyhow::ensure!(
                    positions.windows(2).all(|w| w[0] < w[1]),
                    "partition {p}: positions delivered out of order"
                );
                anyhow::ensure!(
                    Some(&positions) == feeds.get(&p).or(Some(&Vec::new())),
                    "partition {p}: the subscriber skipped or repeated events"
                );
            }
            return Ok(format!(
                "checked: {total} events, each of {} partition(s) delivered in strictly \
                 increasing positions with none skipped",
                partitioning.count()
            ));
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < patience,
            "the subscriber did not deliver every partition's feed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
