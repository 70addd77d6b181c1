//! Run with
//!
//! ```not_rust
//! cargo run -p example-bank                       # the embedded in-memory store
//! cargo run -p example-bank -- --store postgres   # PostgreSQL at DATABASE_URL
//! cargo run -p example-bank -- --store redis      # Redis at REDIS_URL
//! ```
//!
//! `ES_STORE=memory|postgres|redis` selects the store too. For PostgreSQL and Redis, start the
//! development servers with `cargo xtask db up` and load their addresses with
//! `source target/es-services/dev/env`. The demo keeps its data in schema `bank` (PostgreSQL) or
//! under key prefix `bank` (Redis); those stores keep it between runs, so every run there uses
//! account ids of its own (`alice-<run>`).
//!
//! The same domain code runs on every store. The demo shows commands accepted and rejected, a
//! live balance projection fed by a subscription, the audit trail with metadata, balances as of
//! an earlier version, time and global position, a snapshot being used, an event stored at an
//! old schema version upcast on load, the integration events waiting in the outbox, a transfer
//! between two accounts recorded in both streams by one all-or-nothing append, an account
//! closed while its balance moves out (a later deposit refused with the typed error), and a
//! customer forgotten: the personal fields of the customer profiles are encrypted with a key per
//! customer (`es_core::personal`, keys in the store's own key store), and destroying the key
//! erases them from every event and snapshot while the stream stays replayable.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use es_core::personal::{Encrypted, KeyStore};
use es_core::{
    AppendRequest, AsOf, DomainEvent, EventFilter, EventStore, ExpectedVersion, Metadata, NewEvent,
    ReadStream, RecordedEvent, Repository, RepositoryError, SnapshotPolicy, Store, StoreError,
    StreamId, StreamingStore,
};
use es_memory::{InMemoryKeyStore, InMemoryStore};
use es_postgres::PgStore;
use es_redis::RedisStore;
use example_bank::customer::{Customer, CustomerCommand};
use example_bank::{
    describe, money, transfer, upcasters, AccountCommand, AccountEvent, BankAccount,
    PublicTranslator,
};
use futures::{StreamExt, TryStreamExt};
use sqlx::postgres::PgPoolOptions;
use tokio::sync::watch;
use uuid::Uuid;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let choice = std::env::args()
        .skip_while(|a| a != "--store")
        .nth(1)
        .or_else(|| std::env::var("ES_STORE").ok())
        .unwrap_or_else(|| "memory".to_owned());
    match choice.as_str() {
        "memory" => {
            let store = Encrypted::new(InMemoryStore::new(), InMemoryKeyStore::new());
            demo(store, "in-memory", &RunIds::plain()).await
        }
        "postgres" => {
            let url = server_url("DATABASE_URL", "PostgreSQL", "postgres");
            let pool = PgPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(Duration::from_secs(5))
                .test_before_acquire(false)
                .connect(&url)
                .await
                .with_context(|| format!("cannot connect to PostgreSQL at DATABASE_URL={url}"))?;
            let store = PgStore::builder(pool)
                .schema(SCHEMA)
                .build()
                .await
                .with_context(|| format!("cannot open the store in schema `{SCHEMA}`"))?;
            let name = format!("PostgreSQL (schema `{SCHEMA}`)");
            let keys = store.key_store();
            demo(Encrypted::new(store, keys), &name, &RunIds::unique()).await
        }
        "redis" => {
            let url = server_url("REDIS_URL", "Redis", "redis");
            let store = RedisStore::builder(url.as_str())
                .prefix(SCHEMA)
                .build()
                .await
                .with_context(|| format!("cannot connect to Redis at REDIS_URL={url}"))?;
            let name = format!("Redis (key prefix `{SCHEMA}`)");
            let keys = store.key_store();
            demo(Encrypted::new(store, keys), &name, &RunIds::unique()).await
        }
        other => bail!("unknown store `{other}`: use memory, postgres or redis"),
    }
}

/// The PostgreSQL schema and the Redis key prefix the demo keeps its data under.
const SCHEMA: &str = "bank";

/// The server URL in `var`; without one, says how to start a server and exits with status 2.
fn server_url(var: &str, server: &str, store: &str) -> String {
    match std::env::var(var) {
        Ok(url) if !url.trim().is_empty() => url,
        _ => {
            eprintln!(
                "error: {var} is not set: `--store {store}` needs a {server} server.\n\
                 Start the development servers and load their addresses with\n\
                 \n    cargo xtask db up\n    source target/es-services/dev/env\n\n\
                 then run the demo again (or set {var} to a {server} server of your own)."
            );
            std::process::exit(2);
        }
    }
}

/// The demo's account ids. A persistent store keeps the accounts of earlier runs, so each run
/// there gets ids of its own (`alice-<run>`); the in-memory store starts empty every time.
struct RunIds {
    alice: String,
    bob: String,
    carol: String,
}

impl RunIds {
    fn plain() -> Self {
        Self::with_suffix("")
    }

    fn unique() -> Self {
        // The random tail of a fresh UUID: 8 hex digits are plenty for the runs of one demo.
        let uuid = Uuid::new_v4().simple().to_string();
        Self::with_suffix(&format!("-{}", &uuid[24..]))
    }

    fn with_suffix(suffix: &str) -> Self {
        Self {
            alice: format!("alice{suffix}"),
            bob: format!("bob{suffix}"),
            carol: format!("carol{suffix}"),
        }
    }

    fn all(&self) -> [&str; 3] {
        [&self.alice, &self.bob, &self.carol]
    }
}

/// Balances per account, kept by a subscription to the `account` category.
#[derive(Clone)]
struct BalanceProjection {
    balances: Arc<Mutex<BTreeMap<String, u64>>>,
    position: watch::Receiver<u64>,
}

impl BalanceProjection {
    /// Follows the feed from `after`, applying every account event to the balances.
    fn start<S: Store>(repo: &Repository<S>, after: u64) -> Self {
        let balances = Arc::new(Mutex::new(BTreeMap::new()));
        let (tx, position) = watch::channel(after);
        let mut feed = repo
            .store()
            .subscribe(after, EventFilter::all().category(example_bank::CATEGORY));
        let repo = repo.clone();
        let shared = Arc::clone(&balances);
        tokio::spawn(async move {
            while let Some(recorded) = feed.next().await {
                let recorded = match recorded {
                    Ok(recorded) => recorded,
                    Err(err) => {
                        eprintln!("projection stopped: {err}");
                        return;
                    }
                };
                let events = match repo.decode::<BankAccount>(&recorded) {
                    Ok(events) => events,
                    Err(err) => {
                        eprintln!(
                            "projection stopped at position {}: {err}",
                            recorded.global_position
                        );
                        return;
                    }
                };
                {
                    let mut balances = shared.lock().expect("projection lock");
                    let balance = balances
                        .entry(recorded.stream_id.id().to_owned())
                        .or_insert(0);
                    for event in events {
                        match event {
                            AccountEvent::MoneyDeposited(e) => *balance += e.amount,
                            AccountEvent::MoneyWithdrawn(e) => *balance -= e.amount,
                            AccountEvent::AccountOpened(_) => {}
                        }
                    }
                }
                tx.send_replace(recorded.global_position);
            }
        });
        Self { balances, position }
    }

    /// Waits until the projection has handled `position`, then returns `id`'s balance.
    async fn balance_at(&self, id: &str, position: u64) -> anyhow::Result<u64> {
        let mut rx = self.position.clone();
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|p| *p >= position))
            .await
            .context("the projection did not catch up within 10 s")??;
        Ok(self
            .balances
            .lock()
            .expect("projection lock")
            .get(id)
            .copied()
            .unwrap_or(0))
    }
}

async fn demo<S: StreamingStore, K: KeyStore>(
    store: Encrypted<S, K>,
    store_name: &str,
    ids: &RunIds,
) -> anyhow::Result<()> {
    let mut builder = Repository::builder(store.clone())
        .snapshot_policy::<BankAccount>(SnapshotPolicy::EveryNEvents(5))
        .snapshot_policy::<Customer>(SnapshotPolicy::EveryNEvents(2))
        .translator::<BankAccount, _>(PublicTranslator);
    for upcaster in upcasters() {
        builder = builder.upcaster::<BankAccount>(upcaster);
    }
    let repo = builder.build()?;
    let (alice, bob, carol) = (&ids.alice, &ids.bob, &ids.carol);

    println!("Bank demo on the {store_name} store");
    println!("Accounts of this run: {}\n", ids.all().join(", "));
    let projection = BalanceProjection::start(&repo, store.head_position().await?);
    commands(&repo, &projection, alice, bob).await?;
    let trail = audit_trail(&store, alice).await?;
    history(&repo, alice, &trail).await?;
    snapshot(&repo, alice).await?;
    archiving(&repo, alice, &trail).await?;
    upcasting(&repo, carol).await?;
    integration_events(&store, ids).await?;
    transfers(&repo, alice, bob).await?;
    closing(&repo, bob, alice).await?;

    println!("\n== Live projection ==");
    let head = store.head_position().await?;
    for id in ids.all() {
        let balance = projection.balance_at(id, head).await?;
        println!("  {id}: {}", money(balance));
    }
    forgetting(&repo, &store, ids).await
}

/// Runs a teller's commands; prints what was accepted or rejected and what the projection saw.
async fn commands<S: Store>(
    repo: &Repository<S>,
    projection: &BalanceProjection,
    alice: &str,
    bob: &str,
) -> anyhow::Result<()> {
    println!("== Commands ==");
    // Every command of this visit shares a correlation id; each command is its own cause.
    let visit = Uuid::now_v7();
    let teller = || {
        Metadata::new()
            .with_correlation_id(visit)
            .with_causation_id(Uuid::now_v7())
            .with_actor("teller:ada")
            .with("branch", "Main Street")
    };
    let open = |owner: &str, currency: &str| AccountCommand::OpenAccount {
        owner: owner.into(),
        currency: currency.into(),
    };
    let deposit = |amount| AccountCommand::DepositMoney { amount };
    let withdraw = |amount| AccountCommand::WithdrawMoney { amount };
    let script = [
        (alice, open("Alice", "EUR")),
        (alice, deposit(10_000)),
        (alice, withdraw(3_000)),
        (alice, withdraw(50_000)),
        (bob, deposit(500)),
        (alice, open("Mallory", "USD")),
        (alice, deposit(1_250)),
        (alice, deposit(750)),
        (alice, withdraw(2_000)),
    ];
    for (id, command) in &script {
        let shown = format!("{command:?}");
        match repo
            .execute_with::<BankAccount>(id, command, &teller())
            .await
        {
            Ok(done) => {
                let what: Vec<String> = done.events.iter().map(describe).collect();
                let snapshot = if done.snapshot_saved {
                    ", snapshot saved"
                } else {
                    ""
                };
                println!(
                    "  accepted  {shown:<40} -> {} (version {}{snapshot})",
                    what.join(", "),
                    done.version
                );
                let projected = projection
                    .balance_at(id, done.positions.last().copied().unwrap_or(0))
                    .await?;
                println!(
                    "            live projection: {id} balance {} (aggregate says {})",
                    money(projected),
                    money(done.aggregate.balance)
                );
            }
            Err(RepositoryError::Domain {
                stream_id: stream,
                version,
                source,
            }) => {
                println!("  rejected  {shown:<40} -> {source} ({stream} at version {version})");
            }
            Err(other) => return Err(other.into()),
        }
    }
    Ok(())
}

/// Transfers between two accounts: each one decision over both accounts, recorded in both
/// streams by one multi-stream append (all or nothing).
async fn transfers<S: Store>(repo: &Repository<S>, alice: &str, bob: &str) -> anyhow::Result<()> {
    println!("\n== Transfers between accounts (multi-stream append) ==");
    let opened = repo
        .execute::<BankAccount>(
            bob,
            &AccountCommand::OpenAccount {
                owner: "Bob".into(),
                currency: "EUR".into(),
            },
        )
        .await;
    if let Ok(done) = opened {
        println!("  opened    {bob} (version {})", done.version);
    }
    let metadata = Metadata::new().with_actor("teller:ada");
    for amount in [2_500, 1_000_000] {
        let before = (
            repo.load::<BankAccount>(alice).await?.version,
            repo.load::<BankAccount>(bob).await?.version,
        );
        let moved = repo
            .execute_two::<BankAccount, BankAccount, _>(alice, bob, &metadata, |from, to| {
                transfer(from, to, amount)
            })
            .await;
        match moved {
            Ok(done) => {
                let (from, to) = (&done.first, &done.second);
                println!(
                    "  accepted  transfer {} {alice} -> {bob}: one call appended {} to {} (version \
                     {}, position {}) and {} to {} (version {}, position {})",
                    money(amount),
                    describe(&from.events[0]),
                    from.stream_id,
                    from.version,
                    from.positions[0],
                    describe(&to.events[0]),
                    to.stream_id,
                    to.version,
                    to.positions[0],
                );
                println!(
                    "            balances now {alice} {}, {bob} {}",
                    money(from.aggregate.balance),
                    money(to.aggregate.balance)
                );
            }
            Err(RepositoryError::Domain { source, .. }) => {
                let after = (
                    repo.load::<BankAccount>(alice).await?.version,
                    repo.load::<BankAccount>(bob).await?.version,
                );
                println!(
                    "  rejected  transfer {} {alice} -> {bob}: {source}; neither stream written \
                     (versions {} and {} before, {} and {} after)",
                    money(amount),
                    before.0,
                    before.1,
                    after.0,
                    after.1
                );
            }
            Err(other) => return Err(other.into()),
        }
    }
    // A transfer whose expected versions are stale: the store refuses both parts.
    let stale = repo
        .store()
        .append_streams(vec![
            AppendRequest::new(
                Repository::<S>::stream_id::<BankAccount>(alice)?,
                ExpectedVersion::Exact(1),
                vec![NewEvent::from_domain(&AccountEvent::MoneyWithdrawn(
                    example_bank::MoneyWithdrawn { amount: 100 },
                ))?],
            ),
            AppendRequest::new(
                Repository::<S>::stream_id::<BankAccount>(bob)?,
                ExpectedVersion::Exact(1),
                vec![NewEvent::from_domain(&AccountEvent::MoneyDeposited(
                    example_bank::MoneyDeposited { amount: 100 },
                ))?],
            ),
        ])
        .await;
    match stale {
        Err(err) => println!("  refused   a raw transfer expecting version 1 of both: {err}"),
        Ok(_) => bail!("a transfer with stale versions was written"),
    }
    Ok(())
}

/// Closing an account: its balance moves to another account and its stream is closed by one
/// all-or-nothing multi-stream append (the tombstone last in its part, with the reason in its
/// metadata); a later deposit is refused with the typed error, by the repository and by the
/// store, while the closed account still loads, with its history.
async fn closing<S: Store>(repo: &Repository<S>, leaving: &str, to: &str) -> anyhow::Result<()> {
    println!("\n== Closing an account ==");
    let from = repo.load::<BankAccount>(leaving).await?;
    let other = repo.load::<BankAccount>(to).await?;
    let amount = from.aggregate.balance;
    let reason = Metadata::new()
        .with_actor("teller:ada")
        .with("reason", "customer moved away");
    let mut leaving_events = Vec::new();
    let mut parts = Vec::new();
    if amount > 0 {
        let (debit, credit) = transfer(&from.aggregate, &other.aggregate, amount)?;
        for event in &debit {
            leaving_events.push(NewEvent::from_domain(event)?);
        }
        let credit = credit
            .iter()
            .map(NewEvent::from_domain)
            .collect::<Result<Vec<_>, _>>()?;
        parts.push(AppendRequest::new(
            other.stream_id.clone(),
            ExpectedVersion::Exact(other.version),
            credit,
        ));
    }
    leaving_events.push(NewEvent::closing().with_metadata(reason));
    parts.insert(
        0,
        AppendRequest::new(
            from.stream_id.clone(),
            ExpectedVersion::Exact(from.version),
            leaving_events,
        ),
    );
    let results = repo.store().append_streams(parts).await?;
    println!(
        "  closed    {leaving}: one call moved {} to {to} and appended the tombstone `{}` \
         (version {}, position {})",
        money(amount),
        es_core::CLOSED_EVENT_TYPE,
        results[0].stream_version,
        results[0].positions.last().copied().unwrap_or(0)
    );
    let deposit = AccountCommand::DepositMoney { amount: 100 };
    match repo.execute::<BankAccount>(leaving, &deposit).await {
        Err(err @ RepositoryError::Closed { .. }) => {
            println!("  refused   {deposit:?} on {leaving}: {err}");
        }
        other => bail!("a deposit on a closed account was not refused as closed: {other:?}"),
    }
    let raw = repo
        .store()
        .append(AppendRequest::new(
            from.stream_id.clone(),
            ExpectedVersion::Any,
            vec![NewEvent::from_domain(&AccountEvent::MoneyDeposited(
                example_bank::MoneyDeposited { amount: 100 },
            ))?],
        ))
        .await;
    match raw {
        Err(err @ es_core::StoreError::StreamClosed { .. }) => {
            println!("  refused   a raw append expecting any version: {err}");
        }
        other => bail!("a raw append to a closed stream was not refused: {other:?}"),
    }
    let closed = repo.load::<BankAccount>(leaving).await?;
    println!(
        "  {leaving} still loads: closed = {}, version {}, balance {}; its history stays readable",
        closed.closed,
        closed.version,
        money(closed.aggregate.balance)
    );
    // A closed account is history only: everything but its tombstone leaves hot storage.
    match repo
        .store()
        .archive_stream(&closed.stream_id, closed.version)
        .await
    {
        Ok(archived) => {
            let history: Vec<RecordedEvent> = repo
                .store()
                .read_stream(&closed.stream_id, ReadStream::forward())
                .try_collect()
                .await?;
            println!(
                "  archived  {leaving}: {} event(s) moved out of hot storage, the tombstone \
                 stays; its history still reads {} events",
                archived.moved,
                history.len()
            );
        }
        Err(StoreError::InvalidArchive { reason, .. }) => {
            println!("  not archived: {reason}");
        }
        Err(err) => return Err(err.into()),
    }
    Ok(())
}

/// Prints every event of `id`'s stream with its metadata.
async fn audit_trail<S: Store>(store: &S, id: &str) -> anyhow::Result<Vec<RecordedEvent>> {
    println!("\n== Audit trail of account-{id} ==");
    let stream = StreamId::new(example_bank::CATEGORY, id)?;
    let trail: Vec<RecordedEvent> = store
        .read_stream(&stream, ReadStream::forward())
        .try_collect()
        .await?;
    for e in &trail {
        println!(
            "  v{} pos {:>3}  {}  {} v{} {}  actor={} correlation={} causation={} branch={}",
            e.stream_version,
            e.global_position,
            e.recorded_at.format("%H:%M:%S%.6f"),
            e.event_type,
            e.schema_version,
            String::from_utf8_lossy(&e.payload),
            e.metadata.actor.as_deref().unwrap_or("-"),
            short(e.metadata.correlation_id),
            short(e.metadata.causation_id),
            e.metadata
                .custom
                .get("branch")
                .and_then(|v| v.as_str())
                .unwrap_or("-"),
        );
    }
    Ok(trail)
}

/// Loads `id` as of a version, a time and a global position.
async fn history<S: Store>(
    repo: &Repository<S>,
    id: &str,
    trail: &[RecordedEvent],
) -> anyhow::Result<()> {
    println!("\n== History ==");
    let at_v2 = repo.load_as_of::<BankAccount>(id, AsOf::Version(2)).await?;
    println!(
        "  balance as of version 2: {}",
        money(at_v2.aggregate.balance)
    );
    let third = &trail[2];
    let at_time = repo
        .load_as_of::<BankAccount>(id, AsOf::Time(third.recorded_at))
        .await?;
    println!(
        "  balance as of {} (after the first withdrawal): {} at version {}",
        third.recorded_at.format("%H:%M:%S%.6f"),
        money(at_time.aggregate.balance),
        at_time.version
    );
    let position = trail[1].global_position;
    let at_position = repo
        .load_as_of::<BankAccount>(id, AsOf::Position(position))
        .await?;
    println!(
        "  balance as of global position {position}: {}",
        money(at_position.aggregate.balance)
    );
    Ok(())
}

/// Shows that a load started from the snapshot and equals a full replay.
async fn snapshot<S: Store>(repo: &Repository<S>, id: &str) -> anyhow::Result<()> {
    println!("\n== Snapshot ==");
    let loaded = repo.load::<BankAccount>(id).await?;
    match loaded.snapshot_version {
        Some(v) => println!(
            "  loaded account-{id} from the snapshot at version {v} plus {} newer event(s): \
             balance {} at version {}",
            loaded.events_read,
            money(loaded.aggregate.balance),
            loaded.version
        ),
        None => println!("  no snapshot was used (policy: every 5 events)"),
    }
    let replayed = repo.load_without_snapshot::<BankAccount>(id).await?;
    println!(
        "  full replay of {} events gives the same state: {}",
        replayed.events_read,
        replayed.aggregate == loaded.aggregate
    );
    Ok(())
}

/// Moves what the latest snapshot covers out of hot storage, then reads the history again: the
/// same audit trail and the same past states, now partly from the archive.
async fn archiving<S: Store>(
    repo: &Repository<S>,
    id: &str,
    trail: &[RecordedEvent],
) -> anyhow::Result<()> {
    println!("\n== Archiving ==");
    let archived = match repo.archive_behind_snapshot::<BankAccount>(id).await {
        Ok(archived) => archived,
        Err(RepositoryError::Store {
            source: StoreError::InvalidArchive { reason, .. },
            ..
        }) => {
            println!("  this store does not archive: {reason}");
            return Ok(());
        }
        Err(err) => return Err(err.into()),
    };
    println!(
        "  moved {} event(s) of account-{id} behind its snapshot out of hot storage; hot \
         storage now starts at version {}",
        archived.moved, archived.hot_from
    );
    let stream = StreamId::new(example_bank::CATEGORY, id)?;
    let again: Vec<RecordedEvent> = repo
        .store()
        .read_stream(&stream, ReadStream::forward())
        .try_collect()
        .await?;
    println!(
        "  the audit trail reads the same {} events (from the archive, then hot storage): {}",
        again.len(),
        again == trail
    );
    let at_v2 = repo.load_as_of::<BankAccount>(id, AsOf::Version(2)).await?;
    println!(
        "  balance as of version 2, rebuilt from archived events: {}",
        money(at_v2.aggregate.balance)
    );
    Ok(())
}

/// Lists this run's integration events waiting in the outbox: recorded with the domain events,
/// in the same atomic append, for a relay to publish (see the bank-streaming example).
async fn integration_events<S: StreamingStore>(store: &S, ids: &RunIds) -> anyhow::Result<()> {
    println!("\n== Integration events in the outbox ==");
    // A persistent store may hold messages of earlier runs too (no relay runs in this demo).
    let waiting = store.outbox_len().await?;
    let pending = store.pending_outbox(waiting).await?;
    let ours: Vec<_> = pending
        .iter()
        .filter(|r| {
            r.stream_id.category() == example_bank::CATEGORY
                && ids.all().contains(&r.stream_id.id())
        })
        .collect();
    for record in &ours {
        let m = &record.message;
        println!(
            "  #{:<3} {} key={} {} v{} {}  (from event {})",
            record.position,
            m.topic,
            m.key,
            m.message_type,
            m.schema_version,
            String::from_utf8_lossy(&m.payload),
            short(Some(m.source_event_id)),
        );
    }
    let earlier = pending.len() - ours.len();
    if earlier == 0 {
        println!("  {} message(s) waiting for the relay", ours.len());
    } else {
        println!(
            "  {} message(s) of this run waiting for the relay, {earlier} more from earlier runs",
            ours.len()
        );
    }
    Ok(())
}

/// Stores events the way an older release wrote them and reads them back upcast.
async fn upcasting<S: Store>(repo: &Repository<S>, id: &str) -> anyhow::Result<()> {
    println!("\n== Upcasting ==");
    // An account opened by an older release, when AccountOpened (v1) had no currency.
    let legacy = StreamId::new(example_bank::CATEGORY, id)?;
    let import = Metadata::new().with_actor("migration:2019-import");
    let old_events = vec![
        NewEvent::new("AccountOpened", 1, r#"{"owner":"Carol"}"#)?.with_metadata(import.clone()),
        NewEvent::new("MoneyDeposited", 1, r#"{"amount":4200}"#)?.with_metadata(import),
    ];
    let store = repo.store();
    store
        .append(AppendRequest::new(
            legacy.clone(),
            ExpectedVersion::NoStream,
            old_events,
        ))
        .await?;
    let stored: Vec<RecordedEvent> = store
        .read_stream(&legacy, ReadStream::forward().limit(1))
        .try_collect()
        .await?;
    println!(
        "  stored:  {} v{} {}",
        stored[0].event_type,
        stored[0].schema_version,
        String::from_utf8_lossy(&stored[0].payload)
    );
    let typed = repo.decode::<BankAccount>(&stored[0])?;
    println!(
        "  read as: {} v{} {}",
        typed[0].event_type(),
        typed[0].schema_version(),
        describe(&typed[0])
    );
    let account = repo.load::<BankAccount>(id).await?;
    println!(
        "  account-{id}: owner {}, currency {}, balance {}",
        account.aggregate.owner.as_deref().unwrap_or("-"),
        account.aggregate.currency,
        money(account.aggregate.balance)
    );
    Ok(())
}

/// Registers two customers, forgets one, and shows what is stored and what loads before and
/// after.
async fn forgetting<S: StreamingStore, K: KeyStore>(
    repo: &Repository<Encrypted<S, K>>,
    store: &Encrypted<S, K>,
    ids: &RunIds,
) -> anyhow::Result<()> {
    println!("\n== Forgetting a customer (crypto-shredding) ==");
    let (alice, bob) = (&ids.alice, &ids.bob);
    let people = [
        (alice, "Alice Liddell", "alice@example.com", "1 Rabbit Hole"),
        (bob, "Bob Marley", "bob@example.com", "56 Hope Road"),
    ];
    for (id, name, email, address) in people {
        let register = CustomerCommand::Register {
            name: name.into(),
            email: email.into(),
        };
        repo.execute::<Customer>(id, &(id.clone(), register))
            .await?;
        let moved = CustomerCommand::ChangeAddress {
            address: address.into(),
        };
        let done = repo.execute::<Customer>(id, &(id.clone(), moved)).await?;
        let c = &done.aggregate;
        println!(
            "  customer-{id}: name {}, email {}, address {} (version {}{})",
            Customer::show(c.name.as_ref()),
            Customer::show(c.email.as_ref()),
            Customer::show(c.address.as_ref()),
            done.version,
            if done.snapshot_saved {
                ", snapshot saved"
            } else {
                ""
            }
        );
    }
    let stream = StreamId::new("customer", alice)?;
    let raw = |store: &S| {
        let stream = stream.clone();
        let store = store.clone();
        async move {
            let events: Vec<RecordedEvent> = store
                .read_stream(&stream, ReadStream::forward())
                .try_collect()
                .await?;
            anyhow::Ok(events)
        }
    };
    let stored = raw(store.inner()).await?;
    println!(
        "  as the database holds it (what psql or redis-cli sees):\n    {} {}",
        stored[0].event_type,
        abbreviate(&String::from_utf8_lossy(&stored[0].payload))
    );

    let destroyed = store.forget(alice).await?;
    println!("  forget({alice}): key destroyed = {destroyed}");
    let loaded = repo.load::<Customer>(alice).await?;
    let c = &loaded.aggregate;
    println!(
        "  customer-{alice} loaded again{}: name {}, email {}, address {}, segment {}, moves {}",
        loaded
            .snapshot_version
            .map(|v| format!(" from the snapshot at version {v} taken before the erasure"))
            .unwrap_or_default(),
        Customer::show(c.name.as_ref()),
        Customer::show(c.email.as_ref()),
        Customer::show(c.address.as_ref()),
        c.segment,
        c.moves
    );
    let replayed = repo.load_without_snapshot::<Customer>(alice).await?;
    println!(
        "  full replay of its {} events gives the same state: {}",
        replayed.events_read,
        replayed.aggregate == loaded.aggregate
    );
    println!(
        "  its stored events are unchanged (still replayable): {}",
        raw(store.inner()).await? == stored
    );
    let other = repo.load::<Customer>(bob).await?;
    println!(
        "  customer-{bob} is untouched: name {}",
        Customer::show(other.aggregate.name.as_ref())
    );
    println!(
        "  forget({alice}) again: key destroyed = {}",
        store.forget(alice).await?
    );
    Ok(())
}

/// JSON text with its long base64 strings cut short, for display.
fn abbreviate(json: &str) -> String {
    let mut out = String::new();
    for (i, part) in json.split('"').enumerate() {
        if i > 0 {
            out.push('"');
        }
        if i % 2 == 1 && part.len() > 24 {
            out.extend(part.chars().take(12));
            out.push_str("..");
        } else {
            out.push_str(part);
        }
    }
    out
}

fn short(id: Option<Uuid>) -> String {
    id.map_or_else(
        || "-".to_owned(),
        |id| id.simple().to_string()[24..].to_owned(),
    )
}
