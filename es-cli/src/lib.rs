//! `es`, the command line of the event store: list and search streams, show a stream's events
//! with their metadata, an aggregate's state at a version, position or time, follow the feed
//! live, inspect projection checkpoints and the outbox, re-queue dead letters, purge snapshots,
//! and print the PostgreSQL migration SQL and grants. It connects by URL to PostgreSQL
//! (`postgres://`) or Redis (`redis://`, `rediss://` with the `tls` feature, several
//! comma-separated nodes of a Redis Cluster with the `cluster` feature), and uses nothing but the
//! stores' public API.
//!
//! ```text
//! cargo install --path es-cli
//! es --url postgres://app@db/app streams list --category order
//! ```
//!
//! `es console --listen 127.0.0.1:8080 [--token TOKEN]` serves a web console over the same
//! store: streams, events with their audit chain, an aggregate's state through its history,
//! projection lag and the outbox as live charts, dead letters (re-queued with the token only)
//! and `/metrics` in Prometheus format.
//!
//! The URL comes from `--url` or `ES_URL`; `--schema` (`ES_SCHEMA`) names the PostgreSQL
//! schema, `--redis-prefix` (`ES_REDIS_PREFIX`) the Redis key prefix, `--partitions` the store's feed
//! partitions. The command line never migrates a PostgreSQL schema: it expects one migrated by
//! the application or by `es migrations sql`.
//!
//! # Registering the application's aggregates
//!
//! Without registrations, `es state` shows the raw events that make a stream's state at the
//! bound. An application that wants its aggregates' state shown builds its own binary with a
//! [`Registry`]:
//!
//! ```no_run
//! # use es_core::Aggregate;
//! # fn run<Account: Aggregate>() -> std::process::ExitCode {
//! es_cli::Registry::new().aggregate::<Account>().main()
//! # }
//! ```
//!
//! `es state account-42 --version 7` then loads the aggregate through a
//! [`Repository`](es_core::Repository) with the registered upcasters and prints its state as
//! JSON.

mod cli;
mod connect;
mod console;
pub mod metrics;
mod output;
mod registry;
mod run;

pub use registry::{Error, Registry};
