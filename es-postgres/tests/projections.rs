//! Exactly-once projections: the ledger's balances in a PostgreSQL table, written in the same
//! transaction as the projection's checkpoint.
//!
//! Every handled event is also counted in `handled` (one row per global position), so a test
//! can prove that each event was applied exactly once, whatever crashed in between.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use es_core::projection::{HandlerError, RunnerConfig};
use es_core::{
    AppendRequest, CheckpointStore, EventFilter, EventStore, ExpectedVersion, NewEvent,
    ProjectionRunner, ProjectionStatus, RecordedEvent, Repository, StreamId,
};
use es_postgres::{ExactlyOnce, PgProjection, PgStore};
use es_testkit::domain::{Ledger, LedgerCommand, LedgerEvent};
use es_testkit::streaming::GatedSink;
use serde_json::json;
use sqlx::{AssertSqlSafe, PgConnection, PgPool};

const PATIENCE: Duration = Duration::from_secs(60);

/// The balance read model: `balances` (per ledger stream) and `handled` (times each global
/// position was applied), in the store's schema.
struct Balances {
    schema: String,
    repo: Repository<PgStore>,
    /// An event position that always fails.
    poison: Option<u64>,
    /// Panics (a crash of the runner task, mid-transaction) at this position, once.
    crash_at: Option<(u64, Arc<AtomicBool>)>,
    /// At this position, once, writes a row that makes COMMIT fail (a deferred constraint).
    fail_commit_at: Option<(u64, Arc<AtomicBool>)>,
    /// Pause per event, to make batches overlap with other runners.
    delay: Duration,
}

impl Balances {
    fn new(store: &PgStore) -> Self {
        Self {
            schema: store.schema().as_str().to_owned(),
            repo: Repository::new(store.clone()),
            poison: None,
            crash_at: None,
            fail_commit_at: None,
            delay: Duration::ZERO,
        }
    }
}

fn once(flag: Option<&(u64, Arc<AtomicBool>)>, position: u64) -> bool {
    flag.is_some_and(|(at, done)| *at == position && !done.swap(true, Ordering::SeqCst))
}

impl PgProjection for Balances {
    fn name(&self) -> &'static str {
        "balances"
    }

    fn filter(&self) -> EventFilter {
        EventFilter::all().category("ledger")
    }

    async fn handle(
        &mut self,
        tx: &mut PgConnection,
        event: &RecordedEvent,
    ) -> Result<(), HandlerError> {
        if self.poison == Some(event.global_position) {
            return Err(format!("cannot handle the event at {}", event.global_position).into());
        }
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let s = &self.schema;
        let delta: i64 = self
            .repo
            .decode::<Ledger>(event)?
            .iter()
            .map(|e| match e {
                LedgerEvent::Credited(c) => c.amount,
                LedgerEvent::Debited(d) => -d.amount,
                LedgerEvent::Opened(_) => 0,
            })
            .sum();
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO \"{s}\".balances AS b (stream_id, balance, entries) VALUES ($1, $2, 1) \
             ON CONFLICT (stream_id) DO UPDATE SET balance = b.balance + excluded.balance, \
             entries = b.entries + 1"
        )))
        .bind(event.stream_id.as_str())
        .bind(delta)
        .execute(&mut *tx)
        .await?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO \"{s}\".handled AS h (position, times) VALUES ($1, 1) \
             ON CONFLICT (position) DO UPDATE SET times = h.times + 1"
        )))
        .bind(i64::try_from(event.global_position)?)
        .execute(&mut *tx)
        .await?;
        if once(self.fail_commit_at.as_ref(), event.global_position) {
            // Violates a deferred foreign key: checked, and failed, at COMMIT.
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO \"{s}\".audit (stream_id) VALUES ('no such ledger')"
            )))
            .execute(&mut *tx)
            .await?;
        }
        assert!(
            !once(self.crash_at.as_ref(), event.global_position),
            "simulated crash of the projection runner at {}",
            event.global_position
        );
        Ok(())
    }

    async fn reset(&mut self, tx: &mut PgConnection) -> Result<(), HandlerError> {
        let s = &self.schema;
        sqlx::query(AssertSqlSafe(format!(
            "TRUNCATE \"{s}\".balances, \"{s}\".handled, \"{s}\".audit"
        )))
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
}

/// A store on a fresh schema with the read model's tables.
async fn store_with_read_model() -> (PgStore, PgPool) {
    let url = es_test_support::database_url();
    let schema = common::unique_schema("proj");
    let store = common::store_on(&url, &schema).await;
    let pool = common::pool(&url, 4).await;
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE TABLE \"{schema}\".balances (stream_id text PRIMARY KEY, balance bigint NOT NULL, \
             entries bigint NOT NULL);
         CREATE TABLE \"{schema}\".handled (position bigint PRIMARY KEY, times int NOT NULL);
         CREATE TABLE \"{schema}\".audit (stream_id text NOT NULL REFERENCES \
             \"{schema}\".balances (stream_id) DEFERRABLE INITIALLY DEFERRED);"
    )))
    .execute(&pool)
    .await
    .unwrap();
    (store, pool)
}

/// Opens the ledgers and runs `rounds` of credits (and a debit every third round); returns the
/// position of the last event.
async fn activity(repo: &Repository<PgStore>, ids: &[&str], rounds: i64) -> u64 {
    let mut last = 0;
    for id in ids {
        last = repo
            .execute::<Ledger>(id, &LedgerCommand::Open)
            .await
            .unwrap()
            .positions[0];
    }
    for round in 1..=rounds {
        for id in ids {
            last = repo
                .execute::<Ledger>(id, &LedgerCommand::Credit(round * 10))
                .await
                .unwrap()
                .positions[0];
            if round % 3 == 0 {
                last = repo
                    .execute::<Ledger>(id, &LedgerCommand::Debit(round))
                    .await
                    .unwrap()
                    .positions[0];
            }
        }
    }
    last
}

fn expected_balance(rounds: i64) -> i64 {
    (1..=rounds)
        .map(|r| r * 10 - if r % 3 == 0 { r } else { 0 })
        .sum()
}

/// `(stream, balance, entries)` rows, ordered.
async fn balances(pool: &PgPool, store: &PgStore) -> Vec<(String, i64, i64)> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT stream_id, balance, entries FROM \"{}\".balances ORDER BY stream_id",
        store.schema()
    )))
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn balance_of(pool: &PgPool, store: &PgStore, stream: &str) -> i64 {
    balances(pool, store)
        .await
        .into_iter()
        .find(|(s, _, _)| s == stream)
        .map_or(0, |(_, b, _)| b)
}

/// `(position, times)` rows, ordered.
async fn handled(pool: &PgPool, store: &PgStore) -> Vec<(i64, i32)> {
    sqlx::query_as(AssertSqlSafe(format!(
        "SELECT position, times FROM \"{}\".handled ORDER BY position",
        store.schema()
    )))
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Positions of every ledger event in the store.
async fn ledger_positions(pool: &PgPool, store: &PgStore) -> Vec<i64> {
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT global_position FROM \"{}\".events WHERE category = 'ledger' \
         ORDER BY global_position",
        store.schema()
    )))
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Every ledger event is in `handled` exactly once.
async fn assert_exactly_once(pool: &PgPool, store: &PgStore) {
    let handled = handled(pool, store).await;
    let twice: Vec<_> = handled.iter().filter(|(_, n)| *n != 1).collect();
    assert!(twice.is_empty(), "applied more than once: {twice:?}");
    let positions: Vec<i64> = handled.iter().map(|(p, _)| *p).collect();
    assert_eq!(positions, ledger_positions(pool, store).await);
}

fn runner(store: &PgStore, batch_size: usize) -> ProjectionRunner<PgStore> {
    ProjectionRunner::with_config(
        store.clone(),
        RunnerConfig {
            max_attempts: 3,
            backoff: es_core::Backoff::new(Duration::from_millis(5), Duration::from_millis(50)),
            batch_size,
            ..RunnerConfig::default()
        },
    )
}

async fn patiently<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// Catches up, follows live appends, skips other categories, and checkpoints in the store's
/// `checkpoints` table; a restart resumes without applying anything twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn catches_up_then_follows_live_appends() {
    let (store, pool) = store_with_read_model().await;
    let repo = Repository::new(store.clone());
    let last = activity(&repo, &["a", "b"], 6).await;
    store
        .append(AppendRequest::new(
            StreamId::new("order", "1").unwrap(),
            ExpectedVersion::Any,
            vec![NewEvent::from_value("Placed", 1, &json!({}))],
        ))
        .await
        .unwrap();

    let handle = runner(&store, 1000).spawn(ExactlyOnce::new(&store, Balances::new(&store)));
    let status = patiently("catch up", handle.wait_for(last)).await;
    assert!(
        matches!(status, ProjectionStatus::Running { .. }),
        "{status:?}"
    );
    assert_eq!(
        balance_of(&pool, &store, "ledger-a").await,
        expected_balance(6)
    );
    assert_eq!(
        balance_of(&pool, &store, "ledger-b").await,
        expected_balance(6)
    );

    let live = activity(&repo, &["c"], 4).await;
    patiently("live", handle.wait_for(live)).await;
    assert_eq!(
        balance_of(&pool, &store, "ledger-c").await,
        expected_balance(4)
    );
    assert!(handle.lag().await.unwrap() <= 1);
    let stopped = handle.shutdown().await;
    assert!(
        matches!(stopped, ProjectionStatus::Stopped { position } if position >= live),
        "{stopped:?}"
    );
    assert!(store.load_checkpoint("balances").await.unwrap().position >= live);

    let later = activity(&repo, &["d"], 2).await;
    let handle = runner(&store, 1000).spawn(ExactlyOnce::new(&store, Balances::new(&store)));
    patiently("resume", handle.wait_for(later)).await;
    assert_eq!(
        balance_of(&pool, &store, "ledger-d").await,
        expected_balance(2)
    );
    handle.shutdown().await;
    assert_exactly_once(&pool, &store).await;
}

/// The runner task dies in the middle of a batch (its transaction is never committed); a new
/// runner resumes from the committed checkpoint. Every event is applied exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_once_across_a_runner_crash() {
    let (store, pool) = store_with_read_model().await;
    let repo = Repository::new(store.clone());
    let last = activity(&repo, &["a", "b", "c"], 10).await;
    let positions = ledger_positions(&pool, &store).await;
    let crash_at = u64::try_from(positions[positions.len() / 2]).unwrap();

    let crashed = Arc::new(AtomicBool::new(false));
    let mut crashing = Balances::new(&store);
    crashing.crash_at = Some((crash_at, Arc::clone(&crashed)));
    let handle = runner(&store, 7).spawn(ExactlyOnce::new(&store, crashing));
    patiently("the crash", async {
        while !crashed.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    // The task panicked mid-transaction; shutting down joins it.
    let status = handle.shutdown().await;
    assert!(
        matches!(status, ProjectionStatus::Running { .. }),
        "{status:?}"
    );
    let committed = store.load_checkpoint("balances").await.unwrap().position;
    assert!(
        committed > 0 && committed < crash_at,
        "checkpoint {committed}"
    );
    // What is committed is exactly what the checkpoint covers.
    let applied = handled(&pool, &store).await;
    assert!(applied
        .iter()
        .all(|(p, n)| *n == 1 && u64::try_from(*p).unwrap() <= committed));

    let handle = runner(&store, 7).spawn(ExactlyOnce::new(&store, Balances::new(&store)));
    patiently("resume after the crash", handle.wait_for(last)).await;
    handle.shutdown().await;
    assert_exactly_once(&pool, &store).await;
    for id in ["ledger-a", "ledger-b", "ledger-c"] {
        assert_eq!(balance_of(&pool, &store, id).await, expected_balance(10));
    }
}

/// COMMIT fails (a deferred constraint of the read model): the batch rolls back, its checkpoint
/// with it, and the retry applies it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_commit_is_retried_without_double_counting() {
    let (store, pool) = store_with_read_model().await;
    let repo = Repository::new(store.clone());
    let last = activity(&repo, &["a", "b"], 8).await;
    let positions = ledger_positions(&pool, &store).await;
    let fail_at = u64::try_from(positions[positions.len() / 3]).unwrap();
    let tripped = Arc::new(AtomicBool::new(false));
    let mut projection = Balances::new(&store);
    projection.fail_commit_at = Some((fail_at, Arc::clone(&tripped)));
    let handle = runner(&store, 5).spawn(ExactlyOnce::new(&store, projection));
    let status = patiently("catch up", handle.wait_for(last)).await;
    assert!(
        matches!(status, ProjectionStatus::Running { .. }),
        "{status:?}"
    );
    assert!(
        tripped.load(Ordering::SeqCst),
        "the commit failure was injected"
    );
    handle.shutdown().await;
    assert_exactly_once(&pool, &store).await;
    assert_eq!(
        balance_of(&pool, &store, "ledger-a").await,
        expected_balance(8)
    );
}

/// Two runners of the same projection at once (a deployment overlap): the checkpoint row lock
/// makes their batches take turns and each skips what the other applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_runners_of_one_projection_apply_each_event_once() {
    let (store, pool) = store_with_read_model().await;
    let repo = Repository::new(store.clone());
    let last = activity(&repo, &["a", "b", "c"], 6).await;
    let mut first = Balances::new(&store);
    first.delay = Duration::from_millis(2);
    let mut second = Balances::new(&store);
    second.delay = Duration::from_millis(3);
    let a = runner(&store, 4).spawn(ExactlyOnce::new(&store, first));
    let b = runner(&store, 6).spawn(ExactlyOnce::new(&store, second));
    patiently("a", a.wait_for(last)).await;
    patiently("b", b.wait_for(last)).await;
    a.shutdown().await;
    b.shutdown().await;
    assert_exactly_once(&pool, &store).await;
    assert_eq!(
        balance_of(&pool, &store, "ledger-c").await,
        expected_balance(6)
    );
}

/// Rebuilding truncates the read model and the checkpoint in one transaction and replays to
/// identical table contents, even when the table was damaged in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebuild_from_zero_gives_identical_tables() {
    let (store, pool) = store_with_read_model().await;
    let repo = Repository::new(store.clone());
    let last = activity(&repo, &["a", "b", "c"], 7).await;
    let handle = runner(&store, 9).spawn(ExactlyOnce::new(&store, Balances::new(&store)));
    patiently("first build", handle.wait_for(last)).await;
    let before = balances(&pool, &store).await;
    let handled_before = handled(&pool, &store).await;
    assert_eq!(before.len(), 3);

    // A damaged read model (the bug a rebuild repairs): the replay starts from an empty table.
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE \"{}\".balances SET balance = balance * 2 + 1, entries = 0",
        store.schema()
    )))
    .execute(&pool)
    .await
    .unwrap();
    assert_ne!(balances(&pool, &store).await, before);

    handle.rebuild().await.unwrap();
    patiently("rebuild", handle.wait_for(last)).await;
    assert_eq!(balances(&pool, &store).await, before);
    assert_eq!(handled(&pool, &store).await, handled_before);
    handle.shutdown().await;
    assert_exactly_once(&pool, &store).await;
}

/// A rebuild racing a second active runner of the same projection, exactly once: runner `b`
/// parks before a batch (holding no transaction), runner `a` rebuilds (truncates the read model
/// and starts a new checkpoint generation in one transaction) and parks before reloading its
/// checkpoint; then `b`'s batch runs, then `a` reloads. `b`'s transaction finds the new
/// generation under the row lock and rolls back, so `a` replays every event: afterwards every
/// ledger event is applied exactly once and the balances equal a replay. (Before checkpoint
/// generations, `b`'s batch applied its event to the emptied tables and raised the new
/// checkpoint past every event before it, which `a` then skipped.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebuild_racing_a_second_runner_applies_every_event_once() {
    let (store, pool) = store_with_read_model().await;
    let repo = Repository::new(store.clone());
    let last = activity(&repo, &["a", "b"], 4).await;
    let a = GatedSink::new(ExactlyOnce::new(&store, Balances::new(&store)));
    let b = GatedSink::new(ExactlyOnce::new(&store, Balances::new(&store)));
    let (ga, gb) = (a.controls(), b.controls());
    let a = runner(&store, 5).spawn(a);
    let b = runner(&store, 5).spawn(b);
    patiently("a catches up", a.wait_for(last)).await;
    patiently("b catches up", b.wait_for(last)).await;

    gb.before_apply.arm();
    let next = repo
        .execute::<Ledger>("a", &LedgerCommand::Credit(5))
        .await
        .unwrap()
        .positions[0];
    patiently("b parks", gb.before_apply.parked()).await;
    patiently("a applies the new event", a.wait_for(next)).await;

    ga.before_checkpoint.arm();
    a.rebuild().await.unwrap();
    patiently("a parks", ga.before_checkpoint.parked()).await;
    assert!(
        balances(&pool, &store).await.is_empty(),
        "the read model was dropped"
    );

    let batches = gb.batches.load(Ordering::SeqCst);
    gb.before_apply.release();
    patiently("b's batch ends", async {
        while gb.batches.load(Ordering::SeqCst) == batches {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    ga.before_checkpoint.release();

    let later = activity(&repo, &["c"], 2).await;
    patiently("a catches up again", a.wait_for(later)).await;
    patiently("b catches up again", b.wait_for(later)).await;
    a.shutdown().await;
    b.shutdown().await;
    assert_exactly_once(&pool, &store).await;
    assert_eq!(
        balance_of(&pool, &store, "ledger-a").await,
        expected_balance(4) + 5
    );
    assert_eq!(
        balance_of(&pool, &store, "ledger-b").await,
        expected_balance(4)
    );
    assert_eq!(
        balance_of(&pool, &store, "ledger-c").await,
        expected_balance(2)
    );
    assert_eq!(gb.fenced.load(Ordering::SeqCst), 1, "b's batch was refused");
    let checkpoint = store.load_checkpoint("balances").await.unwrap();
    assert!(checkpoint.generation >= 1 && checkpoint.position >= later);
}

/// An event that always fails stops the projection with an error naming its id, type, stream,
/// stream version and position; the events before it are committed with their checkpoint,
/// nothing after it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poisoned_event_stops_the_projection_after_committing_the_events_before_it() {
    let (store, pool) = store_with_read_model().await;
    let repo = Repository::new(store.clone());
    activity(&repo, &["x"], 3).await;
    let poisoned = repo
        .execute::<Ledger>("x", &LedgerCommand::Credit(666))
        .await
        .unwrap();
    let poison = poisoned.positions[0];
    let after = repo
        .execute::<Ledger>("x", &LedgerCommand::Credit(1))
        .await
        .unwrap();

    let mut projection = Balances::new(&store);
    projection.poison = Some(poison);
    let handle = runner(&store, 1000).spawn(ExactlyOnce::new(&store, projection));
    let status = patiently("the projection stops", handle.wait_for(after.positions[0])).await;
    let ProjectionStatus::Failed(failure) = status else {
        panic!("expected the projection to fail, got {status:?}");
    };
    assert_eq!(failure.position(), Some(poison));
    for part in [
        poisoned.event_ids[0].to_string(),
        "`ledger-x`".to_owned(),
        format!("version {}", poisoned.version),
        format!("global position {poison}"),
        "Credited".to_owned(),
        "cannot handle".to_owned(),
    ] {
        assert!(
            failure.to_string().contains(&part),
            "names {part}: {failure}"
        );
    }
    assert_eq!(
        balance_of(&pool, &store, "ledger-x").await,
        expected_balance(3)
    );
    let applied: Vec<i64> = handled(&pool, &store)
        .await
        .iter()
        .map(|(p, _)| *p)
        .collect();
    let before: Vec<i64> = ledger_positions(&pool, &store)
        .await
        .into_iter()
        .filter(|p| u64::try_from(*p).unwrap() < poison)
        .collect();
    assert_eq!(applied, before);
    assert_eq!(
        store.load_checkpoint("balances").await.unwrap().position,
        u64::try_from(*before.last().unwrap()).unwrap()
    );
    handle.shutdown().await;
}

/// A stored event the read model cannot decode (an event type the ledger does not know) poisons
/// the projection the same way: it stops on that event, names it, and keeps everything before it
/// committed; a restarted runner stops on it again instead of skipping it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_undecodable_event_stops_the_projection_and_is_not_skipped() {
    let (store, pool) = store_with_read_model().await;
    let repo = Repository::new(store.clone());
    activity(&repo, &["y"], 2).await;
    let stream = StreamId::new("ledger", "y").unwrap();
    let bad = store
        .append(AppendRequest::new(
            stream,
            ExpectedVersion::Any,
            vec![NewEvent::from_value(
                "Exploded",
                1,
                &json!({ "boom": true }),
            )],
        ))
        .await
        .unwrap();
    let poison = bad.positions[0];
    let after = activity(&repo, &["z"], 1).await;
    let before: Vec<i64> = ledger_positions(&pool, &store)
        .await
        .into_iter()
        .filter(|p| u64::try_from(*p).unwrap() < poison)
        .collect();
    let last_before = u64::try_from(*before.last().unwrap()).unwrap();

    for run in 0..2 {
        let handle = runner(&store, 1000).spawn(ExactlyOnce::new(&store, Balances::new(&store)));
        let status = patiently("the projection stops", handle.wait_for(after)).await;
        let ProjectionStatus::Failed(failure) = status else {
            panic!("run {run}: expected the projection to fail, got {status:?}");
        };
        assert_eq!(failure.position(), Some(poison), "run {run}");
        for part in [
            "`balances`".to_owned(),
            "Exploded".to_owned(),
            "`ledger-y`".to_owned(),
            format!("version {}", bad.stream_version),
            format!("global position {poison}"),
        ] {
            assert!(
                failure.to_string().contains(&part),
                "run {run}: names {part}: {failure}"
            );
        }
        assert_eq!(
            store.load_checkpoint("balances").await.unwrap().position,
            last_before,
            "run {run}: the checkpoint stops right before the poisoned event"
        );
        handle.shutdown().await;
    }
    assert_eq!(
        balance_of(&pool, &store, "ledger-y").await,
        expected_balance(2)
    );
    assert_eq!(balance_of(&pool, &store, "ledger-z").await, 0);
    let applied: Vec<i64> = handled(&pool, &store)
        .await
        .iter()
        .map(|(p, n)| {
            assert_eq!(*n, 1);
            *p
        })
        .collect();
    assert_eq!(applied, before);
}
