//! The bank of `example-bank`, streaming: its balances as read models and its integration events
//! on Kafka, with the events in PostgreSQL.
//!
//! - [`PgBalances`]: a balance read model in the PostgreSQL table `<schema>.bank_balances`, run
//!   with [`es_postgres::ExactlyOnce`]: each batch's row writes and the projection's checkpoint
//!   commit in one transaction, so every event is applied exactly once, whatever crashes.
//! - [`MemoryBalances`]: the same read model in memory, run at least once with
//!   [`es_core::AtLeastOnce`] and its checkpoint in [`MemoryCheckpoints`]. An event handed to it
//!   again is recognised by its stream version and skipped.
//! - [`bank_repository`]: the bank's repository with the upcasters and a translator (the bank's
//!   [`PublicTranslator`], or [`PublicTranslatorTo`] for another topic), so every command writes its integration events to the outbox in the same
//!   transaction as its domain events. The [`es_core::Relay`] with an
//!   [`es_kafka::KafkaPublisher`] sends them to Kafka.
//!
//! Both read models hold one [`AccountBalance`] per account id and must agree with each other and
//! with the balances the aggregates load to.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use es_core::contract::Checkpoint;
use es_core::contract::StoreFuture;
use es_core::projection::HandlerError;
use es_core::{
    CheckpointStore, EventFilter, OutboxStore, Projection, ProjectionHandle, ProjectionStatus,
    RecordedEvent, Repository, Store, StoreError, StreamId, Translator,
};
use es_postgres::{PgProjection, PgStore};
use example_bank::{public, upcasters, AccountEvent, BankAccount, PublicTranslator, CATEGORY};
use sqlx::{AssertSqlSafe, PgConnection, Row};

/// One account's line in a balance read model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountBalance {
    /// The account's currency (empty until the account is opened).
    pub currency: String,
    /// Balance in cents.
    pub balance: u64,
    /// Stream version of the last event applied: the version the aggregate loads to.
    pub version: u64,
}

/// A whole read model: balances by account id (the id of stream `account-<id>`).
pub type Balances = BTreeMap<String, AccountBalance>;

/// What one account event does to a balance line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change<'a> {
    /// The currency the account was opened in, for `AccountOpened`.
    pub currency: Option<&'a str>,
    /// Signed change of the balance in cents.
    pub delta_cents: i64,
}

/// The change `event` makes to its account's balance line.
pub fn change(event: &AccountEvent) -> Change<'_> {
    let cents = |amount: u64| i64::try_from(amount).unwrap_or(i64::MAX);
    match event {
        AccountEvent::AccountOpened(e) => Change {
            currency: Some(&e.currency),
            delta_cents: 0,
        },
        AccountEvent::MoneyDeposited(e) => Change {
            currency: None,
            delta_cents: cents(e.amount),
        },
        AccountEvent::MoneyWithdrawn(e) => Change {
            currency: None,
            delta_cents: -cents(e.amount),
        },
    }
}

impl AccountBalance {
    /// Applies `change`, made by the event at stream version `version`.
    pub fn apply(&mut self, change: Change<'_>, version: u64) {
        if let Some(currency) = change.currency {
            currency.clone_into(&mut self.currency);
        }
        self.balance = self.balance.saturating_add_signed(change.delta_cents);
        self.version = version;
    }
}

/// The bank's repository over `store`: the account upcasters, and `translator` writing the
/// integration events of every command to the outbox, atomically with its domain events.
pub fn bank_repository<S: Store, T: Translator<BankAccount>>(
    store: S,
    translator: T,
) -> anyhow::Result<Repository<S>> {
    let mut builder = Repository::builder(store).translator::<BankAccount, _>(translator);
    for upcaster in upcasters() {
        builder = builder.upcaster::<BankAccount>(upcaster);
    }
    Ok(builder.build()?)
}

/// The bank's [`PublicTranslator`] sending to another topic than
/// [`PUBLIC_TOPIC`](example_bank::PUBLIC_TOPIC) (each test run uses a topic of its own).
#[derive(Debug, Clone)]
pub struct PublicTranslatorTo {
    /// Where the messages go.
    pub topic: String,
}

impl Translator<BankAccount> for PublicTranslatorTo {
    type Message = public::AccountMessage;

    fn topic(&self) -> &str {
        &self.topic
    }

    fn translate(&self, stream: &StreamId, event: &AccountEvent) -> Vec<public::AccountMessage> {
        PublicTranslator.translate(stream, event)
    }
}

/// The events both read models consume: those of the `account` category.
pub fn account_events() -> EventFilter {
    EventFilter::all().category(CATEGORY)
}

/// The balance read model in PostgreSQL: table `bank_balances` in the store's schema, one row per
/// account. Run it with [`es_postgres::ExactlyOnce`]; create the table first with
/// [`create_balance_table`].
pub struct PgBalances {
    repo: Repository<PgStore>,
    table: String,
}

impl std::fmt::Debug for PgBalances {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgBalances")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl PgBalances {
    /// The projection's name, which keys its checkpoint.
    pub const NAME: &'static str = "bank_balances";

    /// The read model of `repo`'s store; `repo` decodes (and upcasts) the events.
    pub fn new(repo: Repository<PgStore>) -> Self {
        let table = balance_table(repo.store());
        Self { repo, table }
    }
}

/// The read model's table, schema-qualified and quoted. The schema name is validated by
/// [`es_postgres::SchemaName`] (lowercase letters, digits and `_` only), so it quotes safely.
fn balance_table(store: &PgStore) -> String {
    format!("\"{}\".bank_balances", store.schema().as_str())
}

/// Creates the read model's table unless it exists.
pub async fn create_balance_table(store: &PgStore) -> anyhow::Result<()> {
    let sql = format!(
        "CREATE TABLE IF NOT EXISTS {} (
             account_id text   NOT NULL PRIMARY KEY,
             currency   text   NOT NULL,
             balance    bigint NOT NULL,
             version    bigint NOT NULL
         )",
        balance_table(store)
    );
    sqlx::query(AssertSqlSafe(sql))
        .execute(store.pool())
        .await
        .context("creating the bank_balances table")?;
    Ok(())
}

/// Every row of the PostgreSQL read model.
pub async fn balance_rows(store: &PgStore) -> anyhow::Result<Balances> {
    let sql = format!(
        "SELECT account_id, currency, balance, version FROM {} ORDER BY account_id",
        balance_table(store)
    );
    let rows = sqlx::query(AssertSqlSafe(sql))
        .fetch_all(store.pool())
        .await
        .context("reading the bank_balances table")?;
    let mut balances = Balances::new();
    for row in rows {
        let id: String = row.try_get(0)?;
        let balance: i64 = row.try_get(2)?;
        let version: i64 = row.try_get(3)?;
        let line = AccountBalance {
            currency: row.try_get(1)?,
            balance: u64::try_from(balance)
                .with_context(|| format!("account {id} has a negative balance {balance}"))?,
            version: u64::try_from(version)
                .with_context(|| format!("account {id} has a negative version {version}"))?,
        };
        balances.insert(id, line);
    }
    Ok(balances)
}

impl PgProjection for PgBalances {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn filter(&self) -> EventFilter {
        account_events()
    }

    async fn handle(
        &mut self,
        tx: &mut PgConnection,
        event: &RecordedEvent,
    ) -> Result<(), HandlerError> {
        let sql = format!(
            "INSERT INTO {t} AS b (account_id, currency, balance, version) \
             VALUES ($1, COALESCE($2, ''), $3, $4) \
             ON CONFLICT (account_id) DO UPDATE SET \
                 currency = COALESCE($2, b.currency), \
                 balance = b.balance + $3, \
                 version = $4",
            t = self.table
        );
        let version = i64::try_from(event.stream_version)?;
        for typed in self.repo.decode::<BankAccount>(event)? {
            let change = change(&typed);
            sqlx::query(AssertSqlSafe(sql.clone()))
                .bind(event.stream_id.id())
                .bind(change.currency)
                .bind(change.delta_cents)
                .bind(version)
                .execute(&mut *tx)
                .await?;
        }
        Ok(())
    }

    async fn reset(&mut self, tx: &mut PgConnection) -> Result<(), HandlerError> {
        let sql = format!("TRUNCATE {}", self.table);
        sqlx::query(AssertSqlSafe(sql)).execute(&mut *tx).await?;
        Ok(())
    }
}

/// A handle on the balances of a [`MemoryBalances`], readable while the projection runs.
#[derive(Debug, Clone, Default)]
pub struct SharedBalances(Arc<Mutex<Balances>>);

impl SharedBalances {
    /// A copy of the read model now.
    pub fn snapshot(&self) -> Balances {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// The balance read model in memory, for [`es_core::AtLeastOnce`]. An event delivered again
/// (after a crash between handling and saving the checkpoint) is skipped: its stream version is
/// not above the version its account's line already reflects.
pub struct MemoryBalances<S> {
    repo: Repository<S>,
    balances: SharedBalances,
}

impl<S> std::fmt::Debug for MemoryBalances<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBalances")
            .field("balances", &self.balances)
            .finish_non_exhaustive()
    }
}

impl<S: Store> MemoryBalances<S> {
    /// The projection's name, which keys its checkpoint.
    pub const NAME: &'static str = "bank_balances_in_memory";

    /// An empty read model; `repo` decodes (and upcasts) the events.
    pub fn new(repo: Repository<S>) -> Self {
        Self {
            repo,
            balances: SharedBalances::default(),
        }
    }

    /// A handle to read the balances while the projection runs.
    pub fn balances(&self) -> SharedBalances {
        self.balances.clone()
    }
}

impl<S: Store> Projection for MemoryBalances<S> {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn filter(&self) -> EventFilter {
        account_events()
    }

    async fn handle(&mut self, event: &RecordedEvent) -> Result<(), HandlerError> {
        let typed = self.repo.decode::<BankAccount>(event)?;
        let mut balances = self
            .balances
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let line = balances.entry(event.stream_id.id().to_owned()).or_default();
        if event.stream_version <= line.version {
            // Handled before: at-least-once delivery may hand it over again.
            return Ok(());
        }
        for typed in &typed {
            line.apply(change(typed), event.stream_version);
        }
        Ok(())
    }

    async fn reset(&mut self) -> Result<(), HandlerError> {
        self.balances
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        Ok(())
    }
}

/// Checkpoints kept in memory: the right place for the checkpoint of a read model kept in memory,
/// since both start from nothing when the process starts.
#[derive(Debug, Clone, Default)]
pub struct MemoryCheckpoints(Arc<Mutex<HashMap<String, Checkpoint>>>);

impl CheckpointStore for MemoryCheckpoints {
    fn load_checkpoint(&self, name: &str) -> impl StoreFuture<Checkpoint> {
        let checkpoint = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .copied()
            .unwrap_or_default();
        std::future::ready(Ok(checkpoint))
    }

    fn save_checkpoint(&self, name: &str, checkpoint: Checkpoint) -> impl StoreFuture<bool> {
        let mut checkpoints = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let stored = checkpoints.entry(name.to_owned()).or_default();
        let result = if stored.generation == checkpoint.generation {
            let raised = checkpoint.position > stored.position;
            if raised {
                stored.position = checkpoint.position;
            }
            Ok(raised)
        } else {
            Err(StoreError::Fenced {
                resource: format!("the checkpoint of projection `{name}`"),
                reason: "the projection was rebuilt".to_owned(),
            })
        };
        std::future::ready(result)
    }

    fn reset_checkpoint(&self, name: &str) -> impl StoreFuture<Checkpoint> {
        let mut checkpoints = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let stored = checkpoints.entry(name.to_owned()).or_default();
        *stored = Checkpoint {
            position: 0,
            generation: stored.generation + 1,
        };
        std::future::ready(Ok(*stored))
    }

    fn fence_checkpoint(&self, name: &str) -> impl StoreFuture<Checkpoint> {
        let mut checkpoints = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let stored = checkpoints.entry(name.to_owned()).or_default();
        stored.generation += 1;
        std::future::ready(Ok(*stored))
    }
}

/// The balances the aggregates `ids` load to, in the shape of the read models.
pub async fn aggregate_balances<S: Store>(
    repo: &Repository<S>,
    ids: impl IntoIterator<Item = impl AsRef<str>>,
) -> anyhow::Result<Balances> {
    let mut balances = Balances::new();
    for id in ids {
        let id = id.as_ref();
        let loaded = repo.load::<BankAccount>(id).await?;
        balances.insert(
            id.to_owned(),
            AccountBalance {
                currency: loaded.aggregate.currency,
                balance: loaded.aggregate.balance,
                version: loaded.version,
            },
        );
    }
    Ok(balances)
}

/// Waits until the projection of `handle` has handled `position`; an error if it failed or
/// stopped, or did not get there within `patience`.
pub async fn caught_up<S: Store>(
    handle: &ProjectionHandle<S>,
    position: u64,
    patience: Duration,
) -> anyhow::Result<()> {
    let status = tokio::time::timeout(patience, handle.wait_for(position))
        .await
        .with_context(|| {
            format!(
                "projection `{}` did not reach position {position} within {patience:?}: {:?}",
                handle.name(),
                handle.status()
            )
        })?;
    match status {
        ProjectionStatus::Running { position: at } if at >= position => Ok(()),
        other => bail!(
            "projection `{}` did not reach position {position}: {other:?}",
            handle.name()
        ),
    }
}

/// Waits until the relay has delivered every outbox record of `store`; an error if some are still
/// pending after `patience`.
pub async fn outbox_drained<S: OutboxStore>(store: &S, patience: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let pending = store.outbox_len().await?;
        if pending == 0 {
            return Ok(());
        }
        if start.elapsed() > patience {
            bail!("{pending} outbox record(s) still pending after {patience:?}: is the relay running and the broker up?");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
