//! `es projections replay | switch | discard`: replay to fix a bug, end to end through the
//! command line (`Registry::run`), on the real PostgreSQL (`DATABASE_URL`) and Redis
//! (`REDIS_URL`), with read models where an application keeps them: two tables of its database,
//! two hashes of its Redis.
//!
//! A balance projection with a bug (withdrawals added instead of subtracted, and a row for every
//! event type it does not know) runs live. The replay of the fixed code is interrupted after its
//! first batch and resumed; its diff names exactly the rows the bug spoiled; the switch makes
//! the fixed rows live (the table renamed, the key renamed, in one step) and moves the live
//! checkpoint to the shadow's position, from where the fixed projection goes on. A second
//! replay finds nothing to fix and is discarded; a switch with no shadow is refused and changes
//! nothing.

use std::collections::{BTreeMap, HashMap};

use es_core::projection::HandlerError;
use es_core::replay::{ReplayTarget, Side};
use es_core::{
    AppendRequest, AtLeastOnce, EventStore, ExpectedVersion, NewEvent, Projection,
    ProjectionRunner, RecordedEvent, StreamId, StreamingStore,
};
use es_postgres::sqlx::{self, AssertSqlSafe, PgPool};
use es_postgres::PgStore;
use es_redis::redis::{self, AsyncCommands};
use es_redis::RedisStore;
use es_testkit::support::unique_name;
use serde_json::{json, Value};

/// What a balance event does to its account, with the bug or without.
fn effect(event: &RecordedEvent, fixed: bool) -> Result<Option<(String, i64)>, HandlerError> {
    let amount = serde_json::from_slice::<Value>(&event.payload)?["amount"]
        .as_i64()
        .unwrap_or(0);
    let account = event.stream_id.to_string();
    Ok(match (event.event_type.as_str(), fixed) {
        // The bug: a withdrawal counted as a deposit.
        ("Deposited", _) | ("Withdrawn", false) => Some((account, amount)),
        ("Withdrawn", true) => Some((account, -amount)),
        ("Opened", true) => Some((account, 0)),
        (other, false) => Some((format!("unknown:{other}"), 0)),
        (_, true) => None,
    })
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL: tables `balances` and `balances_shadow` of a schema of the application's

/// The balance projection on a table; idempotent by position (a row keeps the last one).
struct PgBalances {
    pool: PgPool,
    table: String,
    fixed: bool,
}

impl Projection for PgBalances {
    fn name(&self) -> &'static str {
        "balances"
    }

    async fn handle(&mut self, event: &RecordedEvent) -> Result<(), HandlerError> {
        let Some((account, delta)) = effect(event, self.fixed)? else {
            return Ok(());
        };
        let table = &self.table;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {table} AS t (account, balance, last_position) VALUES ($1, $2, $3) \
             ON CONFLICT (account) DO UPDATE SET balance = t.balance + excluded.balance, \
             last_position = excluded.last_position WHERE t.last_position < excluded.last_position"
        )))
        .bind(account)
        .bind(delta)
        .bind(i64::try_from(event.global_position)?)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn reset(&mut self) -> Result<(), HandlerError> {
        let table = &self.table;
        sqlx::raw_sql(AssertSqlSafe(format!(
            "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (account text PRIMARY KEY, \
             balance bigint NOT NULL, last_position bigint NOT NULL)"
        )))
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

struct PgTarget {
    pool: PgPool,
    schema: String,
}

impl PgTarget {
    fn table(&self, side: Side) -> String {
        match side {
            Side::Live => format!("\"{}\".balances", self.schema),
            Side::Shadow => format!("\"{}\".balances_shadow", self.schema),
        }
    }

    fn projection(&self, side: Side, fixed: bool) -> PgBalances {
        PgBalances {
            pool: self.pool.clone(),
            table: self.table(side),
            fixed,
        }
    }
}

impl ReplayTarget for PgTarget {
    type Projection = PgBalances;

    fn shadow(&self) -> PgBalances {
        self.projection(Side::Shadow, true)
    }

    async fn rows(&self, side: Side) -> Result<BTreeMap<String, Value>, HandlerError> {
        if side == Side::Shadow && !self.has_shadow().await? {
            return Ok(BTreeMap::new());
        }
        let rows: Vec<(String, i64)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT account, balance FROM {}",
            self.table(side)
        )))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(k, v)| (k, json!(v))).collect())
    }

    async fn has_shadow(&self) -> Result<bool, HandlerError> {
        let found: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(self.table(Side::Shadow))
            .fetch_one(&self.pool)
            .await?;
        Ok(found.is_some())
    }

    async fn promote(&self) -> Result<(), HandlerError> {
        // One transaction: readers see the old table or the new one, whole.
        let mut tx = self.pool.begin().await?;
        sqlx::query(AssertSqlSafe(format!(
            "DROP TABLE IF EXISTS {}",
            self.table(Side::Live)
        )))
        .execute(&mut *tx)
        .await?;
        sqlx::query(AssertSqlSafe(format!(
            "ALTER TABLE {} RENAME TO balances",
            self.table(Side::Shadow)
        )))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn discard(&self) -> Result<(), HandlerError> {
        sqlx::query(AssertSqlSafe(format!(
            "DROP TABLE IF EXISTS {}",
            self.table(Side::Shadow)
        )))
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Redis: hashes `<prefix>:rm:balances` and `<prefix>:rm:balances:shadow`

/// The hash field that marks a read model as built (it holds no account).
const BUILT: &str = "~built";

/// The balance projection on a hash of `account -> "balance last_position"`.
struct RedisBalances {
    conn: redis::aio::ConnectionManager,
    key: String,
    fixed: bool,
}

impl Projection for RedisBalances {
    fn name(&self) -> &'static str {
        "balances"
    }

    async fn handle(&mut self, event: &RecordedEvent) -> Result<(), HandlerError> {
        let Some((account, delta)) = effect(event, self.fixed)? else {
            return Ok(());
        };
        // Idempotent by position, in one script.
        let script = redis::Script::new(
            "local v = redis.call('HGET', KEYS[1], ARGV[1]) \
             local b, p = 0, 0 \
             if v then b, p = string.match(v, '(-?%d+) (%d+)') b, p = tonumber(b), tonumber(p) end \
             if p < tonumber(ARGV[3]) then \
               redis.call('HSET', KEYS[1], ARGV[1], string.format('%d %d', b + tonumber(ARGV[2]), tonumber(ARGV[3]))) \
             end",
        );
        let () = script
            .key(&self.key)
            .arg(account)
            .arg(delta)
            .arg(event.global_position)
            .invoke_async(&mut self.conn)
            .await?;
        Ok(())
    }

    async fn reset(&mut self) -> Result<(), HandlerError> {
        let () = redis::pipe()
            .atomic()
            .del(&self.key)
            .hset(&self.key, BUILT, 1)
            .query_async(&mut self.conn)
            .await?;
        Ok(())
    }
}

struct RedisTarget {
    conn: redis::aio::ConnectionManager,
    prefix: String,
}

impl RedisTarget {
    fn key(&self, side: Side) -> String {
        match side {
            Side::Live => format!("{}:rm:balances", self.prefix),
            Side::Shadow => format!("{}:rm:balances:shadow", self.prefix),
        }
    }

    fn projection(&self, side: Side, fixed: bool) -> RedisBalances {
        RedisBalances {
            conn: self.conn.clone(),
            key: self.key(side),
            fixed,
        }
    }
}

impl ReplayTarget for RedisTarget {
    type Projection = RedisBalances;

    fn shadow(&self) -> RedisBalances {
        self.projection(Side::Shadow, true)
    }

    async fn rows(&self, side: Side) -> Result<BTreeMap<String, Value>, HandlerError> {
        let mut conn = self.conn.clone();
        let all: HashMap<String, String> = conn.hgetall(self.key(side)).await?;
        all.into_iter()
            .filter(|(k, _)| k != BUILT)
            .map(|(k, v)| {
                let balance: i64 = v
                    .split(' ')
                    .next()
                    .and_then(|b| b.parse().ok())
                    .ok_or_else(|| format!("a bad row {k}: {v}"))?;
                Ok((k, json!(balance)))
            })
            .collect()
    }

    async fn has_shadow(&self) -> Result<bool, HandlerError> {
        let mut conn = self.conn.clone();
        Ok(conn.exists(self.key(Side::Shadow)).await?)
    }

    async fn promote(&self) -> Result<(), HandlerError> {
        // RENAME replaces the live hash in one step; with no shadow it fails and changes nothing.
        let mut conn = self.conn.clone();
        let () = conn
            .rename(self.key(Side::Shadow), self.key(Side::Live))
            .await?;
        Ok(())
    }

    async fn discard(&self) -> Result<(), HandlerError> {
        let mut conn = self.conn.clone();
        let () = conn.del(self.key(Side::Shadow)).await?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The scenario

fn event(event_type: &str, amount: i64) -> NewEvent {
    NewEvent::from_value(event_type, 1, &json!({ "amount": amount }))
}

/// 1,200 events over four accounts (the shadow records its checkpoint every 500); returns each
/// account's balance as the fixed code computes it.
async fn seed<S: EventStore>(store: &S) -> BTreeMap<String, Value> {
    let mut balances: BTreeMap<String, i64> = BTreeMap::new();
    for round in 0..100_i64 {
        for id in ["a", "b", "c", "d"] {
            let mut batch = vec![("Deposited", 10 + round)];
            if id != "d" {
                batch.push(("Withdrawn", 3));
            }
            if round == 0 {
                batch.insert(0, ("Opened", 0));
            }
            let balance = balances.entry(format!("account-{id}")).or_default();
            for (t, a) in &batch {
                *balance += match *t {
                    "Deposited" => *a,
                    "Withdrawn" => -*a,
                    _ => 0,
                };
            }
            let stream = StreamId::new("account", id).unwrap();
            store
                .append(AppendRequest::new(
                    stream,
                    ExpectedVersion::Any,
                    batch.iter().map(|(t, a)| event(t, *a)).collect(),
                ))
                .await
                .unwrap();
        }
    }
    balances.into_iter().map(|(k, v)| (k, json!(v))).collect()
}

/// Runs `es <conn> projections <step> balances [extra]`; returns what it printed, or the error.
async fn es(
    registry: &es_cli::Registry,
    conn: &[String],
    step: &str,
    extra: &[&str],
    interrupt: impl std::future::Future<Output = ()> + Send + 'static,
) -> (String, Option<es_cli::Error>) {
    let mut args = vec!["es".to_owned()];
    args.extend(conn.iter().cloned());
    args.extend(["projections", step, "balances"].map(str::to_owned));
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let mut out = Vec::new();
    let result = registry.run(args, &mut out, interrupt).await;
    (String::from_utf8(out).unwrap(), result.err())
}

async fn scenario<S, T, L>(
    store: S,
    conn: Vec<String>,
    registry: es_cli::Registry,
    target: T,
    live: L,
) where
    S: StreamingStore,
    T: ReplayTarget,
    L: Fn(bool) -> T::Projection,
{
    let fixed = seed(&store).await;
    let head = store.head_position().await.unwrap();
    let runner = ProjectionRunner::new(store.clone());
    let buggy = runner.spawn(AtLeastOnce::new(live(false), store.clone()));
    buggy.wait_for(head).await;
    let spoiled = target.rows(Side::Live).await.unwrap();
    assert_eq!(
        spoiled.len(),
        5,
        "four accounts and the bug's extra row: {spoiled:?}"
    );

    // Interrupted at once: it stops after its first batch.
    let (text, err) = es(&registry, &conn, "replay", &[], async {}).await;
    let err = err.expect("the replay is interrupted");
    assert!(err.is_interrupted(), "{err}");
    let shadow = store.load_checkpoint("balances~shadow").await.unwrap();
    assert!(
        shadow.position > 0 && shadow.position < head,
        "{shadow:?} of {head}"
    );
    assert_eq!(
        text.trim(),
        format!(
            "interrupted replaying balances at position {} of {head}; `es projections replay \
             balances --resume` goes on from there",
            shadow.position
        )
    );
    assert!(target.has_shadow().await.unwrap());

    let (text, err) = es(
        &registry,
        &conn,
        "replay",
        &["--resume", "--sample=2"],
        std::future::pending(),
    )
    .await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(
        text,
        format!(
            "shadow of balances built to position {head}\n\
             0 added, 3 changed, 1 removed, 1 unchanged\n\
             ~ account-a: 6250 -> 5650\n\
             ~ account-b: 6250 -> 5650\n\
             - unknown:Opened: 0\n\
             (1 more not shown)\n\
             `es projections switch balances` makes the shadow live; `es projections discard \
             balances` drops it\n"
        )
    );
    assert_eq!(target.rows(Side::Shadow).await.unwrap(), fixed);
    assert_eq!(
        target.rows(Side::Live).await.unwrap(),
        spoiled,
        "the live side untouched"
    );

    buggy.shutdown().await;
    switched_then_discarded(&store, &conn, &registry, &target, live, fixed).await;
}

/// Switches the built shadow in (the buggy worker stopped), lets the fixed projection go on with
/// a later event, then replays again (an empty diff) and discards; a switch with no shadow is
/// refused and changes nothing.
async fn switched_then_discarded<S, T, L>(
    store: &S,
    conn: &[String],
    registry: &es_cli::Registry,
    target: &T,
    live: L,
    fixed: BTreeMap<String, Value>,
) where
    S: StreamingStore,
    T: ReplayTarget,
    L: Fn(bool) -> T::Projection,
{
    let head = store.head_position().await.unwrap();
    let runner = ProjectionRunner::new(store.clone());
    let (text, err) = es(registry, conn, "switch", &[], std::future::pending()).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(
        text.trim(),
        format!(
            "switched balances: the shadow is the live read model, its checkpoint at position \
             {head}"
        )
    );
    assert_eq!(target.rows(Side::Live).await.unwrap(), fixed);
    assert!(!target.has_shadow().await.unwrap());
    assert_eq!(
        store.load_checkpoint("balances").await.unwrap().position,
        head
    );
    let stream = StreamId::new("account", "a").unwrap();
    store
        .append(AppendRequest::new(
            stream,
            ExpectedVersion::Any,
            vec![event("Withdrawn", 50)],
        ))
        .await
        .unwrap();
    let mut expected = fixed.clone();
    expected.insert("account-a".to_owned(), json!(5600));
    let repaired = runner.spawn(AtLeastOnce::new(live(true), store.clone()));
    repaired
        .wait_for(store.head_position().await.unwrap())
        .await;
    repaired.shutdown().await;
    assert_eq!(target.rows(Side::Live).await.unwrap(), expected);

    // Nothing left to fix: an empty diff, then discarded.
    let (text, err) = es(registry, conn, "replay", &[], std::future::pending()).await;
    assert!(err.is_none(), "{err:?}");
    assert!(
        text.contains("\n0 added, 0 changed, 0 removed, 4 unchanged\n"),
        "{text}"
    );
    let (text, err) = es(registry, conn, "discard", &[], std::future::pending()).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(
        text.trim(),
        "discarded the shadow of balances; the live read model is unchanged"
    );
    assert!(!target.has_shadow().await.unwrap());
    let before = store.load_checkpoint("balances").await.unwrap();
    let (_, err) = es(registry, conn, "switch", &[], std::future::pending()).await;
    let err = err.expect("a switch with no shadow is refused");
    assert!(
        err.to_string().contains("there is no shadow of `balances`"),
        "{err}"
    );
    assert_eq!(store.load_checkpoint("balances").await.unwrap(), before);
    assert_eq!(target.rows(Side::Live).await.unwrap(), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_to_fix_on_postgres() {
    let url = es_test_support::database_url();
    let schema = unique_name("t_cli_replay", '_');
    let store = PgStore::builder_from_url(url.as_str())
        .schema(schema.as_str())
        .build()
        .await
        .expect("the test store builds");
    let target = |store: &PgStore| PgTarget {
        pool: store.pool().clone(),
        schema: store.schema().as_str().to_owned(),
    };
    let registry =
        es_cli::Registry::new().replay("balances", target, |_: &RedisStore| unreachable_target());
    let conn = vec![format!("--url={url}"), format!("--schema={schema}")];
    let ours = target(&store);
    let live = {
        let ours = PgTarget {
            pool: ours.pool.clone(),
            schema: ours.schema.clone(),
        };
        move |fixed| ours.projection(Side::Live, fixed)
    };
    // The live table exists before the live projection's first event.
    live(false).reset().await.unwrap();
    scenario(store, conn, registry, ours, live).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_to_fix_on_redis() {
    let url = es_test_support::redis_url();
    let prefix = unique_name("t:cli-replay", ':');
    let store = RedisStore::builder(url.as_str())
        .prefix(prefix.as_str())
        .build()
        .await
        .expect("the test store builds");
    let client = redis::Client::open(url.as_str()).unwrap();
    let conn = redis::aio::ConnectionManager::new(client).await.unwrap();
    let target = {
        let (conn, prefix) = (conn.clone(), prefix.clone());
        move |_: &RedisStore| RedisTarget {
            conn: conn.clone(),
            prefix: prefix.clone(),
        }
    };
    let registry = es_cli::Registry::new().replay(
        "balances",
        |_: &PgStore| unreachable_target(),
        target.clone(),
    );
    let args = vec![format!("--url={url}"), format!("--redis-prefix={prefix}")];
    let ours = target(&store);
    let live = {
        let ours = RedisTarget {
            conn: ours.conn.clone(),
            prefix: ours.prefix.clone(),
        };
        move |fixed| ours.projection(Side::Live, fixed)
    };
    scenario(store, args, registry, ours, live).await;
}

/// The target of the backend a test does not use: the registry needs one per backend.
fn unreachable_target() -> PgTarget {
    panic!("this test connects to the other backend")
}
