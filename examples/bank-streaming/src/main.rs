//! Run with
//!
//! ```not_rust
//! cargo xtask db up && source target/es-services/dev/env
//! cargo run -p example-bank-streaming
//! ```
//!
//! It needs PostgreSQL at `DATABASE_URL` and a Kafka broker at `KAFKA_BROKERS`. The events live
//! in schema `bank_streaming` (kept between runs, so every run opens accounts of its own); the
//! integration events go to topic `bank.accounts`.
//!
//! The demo starts two balance read models, the relay and then runs a teller's commands: the
//! PostgreSQL read model (exactly once: rows and checkpoint in one transaction) resumes from its
//! checkpoint of the previous run, the in-memory one (at least once) replays the whole history.
//! It prints both read models beside the aggregates' balances, rebuilds the PostgreSQL one from
//! position 0, and reads the integration events of this run back from Kafka.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context;
use es_core::{
    Aggregate, AtLeastOnce, CheckpointStore, DomainEvent, EventStore, Metadata, ProjectionRunner,
    Relay, RelayConfig, Repository, RepositoryError, Store,
};
use es_kafka::{headers, KafkaConfig, KafkaPublisher};
use es_postgres::{ExactlyOnce, PgStore};
use example_bank::public::AccountMessage;
use example_bank::{describe, money, AccountCommand, BankAccount, PublicTranslator, PUBLIC_TOPIC};
use example_bank_streaming::{
    aggregate_balances, balance_rows, bank_repository, caught_up, create_balance_table,
    outbox_drained, Balances, MemoryBalances, MemoryCheckpoints, PgBalances, SharedBalances,
};
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

/// The schema holding the demo's events, outbox, checkpoints and read model.
const SCHEMA: &str = "bank_streaming";

/// Partitions of the topic when the demo creates it.
const PARTITIONS: u32 = 3;

/// How long the demo waits for the projections, the relay or the broker before giving up.
const PATIENCE: Duration = Duration::from_secs(60);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let database_url = server_env("DATABASE_URL", "PostgreSQL");
    let brokers = server_env("KAFKA_BROKERS", "Kafka broker");

    let pool = PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(5))
        .test_before_acquire(false)
        .connect(&database_url)
        .await
        .with_context(|| format!("cannot connect to PostgreSQL at DATABASE_URL={database_url}"))?;
    let store = PgStore::builder(pool)
        .schema(SCHEMA)
        .poll_interval(Duration::from_millis(200))
        .build()
        .await
        .with_context(|| format!("cannot open the store in schema `{SCHEMA}`"))?;
    let repo = bank_repository(store.clone(), PublicTranslator)?;
    let kafka = KafkaConfig::new(brokers.clone());
    es_kafka::ensure_topic(&kafka, PUBLIC_TOPIC, PARTITIONS)
        .await
        .with_context(|| format!("cannot create topic `{PUBLIC_TOPIC}` at {brokers}"))?;
    println!("Bank streaming demo: events in PostgreSQL schema `{SCHEMA}`, integration events to Kafka topic `{PUBLIC_TOPIC}` at {brokers}\n");

    // The read models: in PostgreSQL exactly once, in memory at least once.
    create_balance_table(&store).await?;
    let runner = ProjectionRunner::new(store.clone());
    let pg_checkpoint = store.load_checkpoint(PgBalances::NAME).await?.position;
    let pg = runner.spawn(ExactlyOnce::new(&store, PgBalances::new(repo.clone())));
    let memory = MemoryBalances::new(repo.clone());
    let in_memory = memory.balances();
    let mem = runner.spawn(AtLeastOnce::new(memory, MemoryCheckpoints::default()));
    println!("== Read models ==");
    println!(
        "  PostgreSQL table {SCHEMA}.bank_balances, exactly once: resumes after its checkpoint, \
         position {pg_checkpoint}"
    );
    println!("  in memory, at least once: replays the feed from position 0\n");

    // The relay: outbox -> Kafka, marking records delivered once the broker acknowledged them.
    let relay = Relay::new(
        store.clone(),
        KafkaPublisher::new(kafka.clone())?,
        RelayConfig {
            owner: format!("bank-streaming-{}", Uuid::now_v7()),
            idle_poll: Duration::from_millis(100),
            ..RelayConfig::default()
        },
    );
    let (stop_relay, relay_stopped) = tokio::sync::oneshot::channel::<()>();
    let relay = tokio::spawn(relay.run(async {
        let _ = relay_stopped.await;
    }));
    println!("== Relay ==\n  publishing the outbox to `{PUBLIC_TOPIC}`\n");

    let run = Uuid::new_v4().simple().to_string()[24..].to_owned();
    let ids = [format!("dora-{run}"), format!("emil-{run}")];
    commands(&repo, &ids).await?;

    let head = store.head_position().await?;
    caught_up(&pg, head, PATIENCE).await?;
    caught_up(&mem, head, PATIENCE).await?;
    let pg_rows = show_balances(&store, &repo, &in_memory, &ids, head).await?;

    println!("\n== Rebuild ==");
    pg.rebuild()
        .await
        .map_err(|e| anyhow::anyhow!("rebuilding the read model: {e}"))?;
    caught_up(&pg, head, PATIENCE).await?;
    let rebuilt = balance_rows(&store).await?;
    println!(
        "  dropped {SCHEMA}.bank_balances and replayed from position 0: {} rows, identical to \
         before: {}",
        rebuilt.len(),
        rebuilt == pg_rows
    );

    outbox_drained(&store, PATIENCE).await?;
    let _ = stop_relay.send(());
    relay.await??;
    read_back(&kafka, &ids).await?;

    pg.shutdown().await;
    mem.shutdown().await;
    Ok(())
}

/// Prints both read models beside the aggregates and whether they agree; returns the rows of
/// the PostgreSQL read model.
async fn show_balances(
    store: &PgStore,
    repo: &Repository<PgStore>,
    in_memory: &SharedBalances,
    ids: &[String; 2],
    head: u64,
) -> anyhow::Result<Balances> {
    let pg_rows = balance_rows(store).await?;
    let mem_rows = in_memory.snapshot();
    let aggregates = aggregate_balances(repo, ids).await?;
    println!("\n== Balances of this run's accounts (head position {head}) ==");
    println!(
        "  {:<16} {:>12} {:>12} {:>12}",
        "account", "PostgreSQL", "in memory", "aggregate"
    );
    for (id, aggregate) in &aggregates {
        let show = |rows: &Balances| {
            rows.get(id).map_or_else(
                || "-".to_owned(),
                |b| format!("{} {}", money(b.balance), b.currency),
            )
        };
        println!(
            "  {id:<16} {:>12} {:>12} {:>12}",
            show(&pg_rows),
            show(&mem_rows),
            format!("{} {}", money(aggregate.balance), aggregate.currency)
        );
    }
    let agree = ids
        .iter()
        .all(|id| pg_rows.get(id) == aggregates.get(id) && mem_rows.get(id) == aggregates.get(id));
    println!("  this run's accounts agree with their aggregates: {agree}");
    println!(
        "  the two read models agree on all {} accounts of all runs: {}",
        pg_rows.len(),
        pg_rows == mem_rows
    );
    Ok(pg_rows)
}

/// The URL or address in `var`; without one, says how to start the servers and exits with
/// status 2.
fn server_env(var: &str, server: &str) -> String {
    match std::env::var(var) {
        Ok(value) if !value.trim().is_empty() => value,
        _ => {
            eprintln!(
                "error: {var} is not set: this demo needs a {server}.\n\
                 Start the development servers (PostgreSQL, Redis and a Kafka broker) and load \
                 their addresses with\n\
                 \n    cargo xtask db up\n    source target/es-services/dev/env\n\n\
                 then run the demo again."
            );
            std::process::exit(2);
        }
    }
}

/// A teller's commands on two fresh accounts; a rejected one publishes nothing.
async fn commands<S: Store>(repo: &Repository<S>, ids: &[String; 2]) -> anyhow::Result<()> {
    println!("== Commands ==");
    let [dora, emil] = ids;
    let open = |owner: &str, currency: &str| AccountCommand::OpenAccount {
        owner: owner.into(),
        currency: currency.into(),
    };
    let deposit = |amount| AccountCommand::DepositMoney { amount };
    let withdraw = |amount| AccountCommand::WithdrawMoney { amount };
    let script = [
        (dora, open("Dora", "EUR")),
        (emil, open("Emil", "CHF")),
        (dora, deposit(25_000)),
        (emil, deposit(4_000)),
        (dora, withdraw(7_500)),
        (emil, withdraw(9_000)),
        (emil, deposit(1_500)),
        (dora, deposit(300)),
    ];
    let visit = Metadata::new()
        .with_correlation_id(Uuid::now_v7())
        .with_actor("teller:grace");
    for (id, command) in &script {
        let shown = format!("{command:?}");
        match repo.execute_with::<BankAccount>(id, command, &visit).await {
            Ok(done) => {
                let what: Vec<String> = done.events.iter().map(describe).collect();
                println!(
                    "  accepted  {id:<14} {shown:<46} -> {} (position {})",
                    what.join(", "),
                    done.positions.last().copied().unwrap_or(0)
                );
            }
            Err(RepositoryError::Domain { source, .. }) => {
                println!("  rejected  {id:<14} {shown:<46} -> {source}");
            }
            Err(other) => return Err(other.into()),
        }
    }
    Ok(())
}

/// Reads the topic back with es-kafka's reader and prints this run's messages.
async fn read_back(kafka: &KafkaConfig, ids: &[String; 2]) -> anyhow::Result<()> {
    println!("\n== Read back from Kafka topic `{PUBLIC_TOPIC}` ==");
    let keys: BTreeSet<String> = ids
        .iter()
        .map(|id| BankAccount::stream_id(id).map(|s| s.to_string()))
        .collect::<Result<_, _>>()?;
    let messages = es_kafka::read_topic(kafka, PUBLIC_TOPIC, PATIENCE).await?;
    let mut shown = 0;
    for m in &messages {
        let Some(key) = m.key_str().filter(|k| keys.contains(*k)) else {
            continue;
        };
        shown += 1;
        println!(
            "  p{} @{:<4} key={key:<21} {:<29} id={} {}",
            m.partition,
            m.offset,
            m.header(headers::MESSAGE_TYPE).unwrap_or("-"),
            m.header(headers::MESSAGE_ID).unwrap_or("-"),
            String::from_utf8_lossy(&m.payload)
        );
    }
    let public: Vec<&str> = AccountMessage::EVENT_TYPES.iter().map(|t| t.name).collect();
    println!(
        "  {shown} message(s) of this run ({} in the topic); the public contract has only {} \
         (the owner's name stays private)",
        messages.len(),
        public.join(" and ")
    );
    Ok(())
}
