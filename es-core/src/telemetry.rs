//! What the runtime reports while it works: the names of its metrics and tracing spans.
//!
//! The names here are stable: dashboards and alerts may rely on them. A rename is a breaking
//! change of this crate.
//!
//! # Metrics
//!
//! Recorded through the [`metrics`](https://docs.rs/metrics) facade. Nothing is kept unless the
//! application installs a recorder (for Prometheus, `metrics-exporter-prometheus`; the `es
//! console` command serves one at `/metrics`); without one each call site costs a load of the
//! global recorder and nothing more. Call [`describe`] once after installing a recorder to give
//! each metric its help text and unit.
//!
//! | Name | Kind | Labels | What |
//! |---|---|---|---|
//! | `es_commands_total` | counter | `category`, `outcome` | commands run by the repository's `execute` (a two-aggregate `execute_two` shows in the append metrics and its `es.execute_two` span); `outcome`: `ok`, `rejected` (the aggregate's own error), `conflict` (gave up after its attempts), `closed` (the aggregate's stream is closed), `error` (anything else) |
//! | `es_command_seconds` | histogram | `category` | a command from its call to its answer, retries included |
//! | `es_command_conflicts_total` | counter | `category` | conflicts a command met and retried (or gave up on) |
//! | `es_append_seconds` | histogram | | one append call of the repository to the store (a multi-stream append is one call) |
//! | `es_append_events` | histogram | | events in that call (commands that queued behind each other share one) |
//! | `es_append_retries_total` | counter | | appends re-sent after a transient store failure |
//! | `es_projection_events_total` | counter | `projection` | events handled (recorded with their checkpoint) |
//! | `es_projection_batch_events` | histogram | `projection` | events per batch handed to the sink |
//! | `es_projection_retries_total` | counter | `projection` | batches that failed and were tried again |
//! | `es_projection_lag_events` | gauge | `projection`, `partition` | positions of the partition's feed after the projection's position |
//! | `es_projection_lag_seconds` | gauge | `projection`, `partition` | age of the oldest event the projection has not handled yet (0 when caught up) |
//! | `es_relay_records_total` | counter | `outcome` | outbox records the relay settled: `delivered`, `dead_lettered`, `failed` (to be sent again) |
//! | `es_relay_batch_records` | histogram | | records per publish call |
//! | `es_outbox_backlog` | gauge | `outbox` | records waiting for delivery |
//! | `es_outbox_dead_letters` | gauge | `outbox` | records in the dead letters |
//!
//! **Lag and backlog are sampled.** A projection worker reads its partition's head (one store
//! call, and one read of a single event while it is behind) every
//! [`RunnerConfig::lag_every`](crate::projection::RunnerConfig::lag_every) (default 1 s); a relay
//! reads [`relay_status`](crate::contract::OutboxStore::relay_status) at most every
//! [`RelayConfig::backlog_every`](crate::outbox::RelayConfig::backlog_every) (default 1 s) while
//! it holds its lease. Each process reports only the partitions it works on: a worker that
//! gives a partition up sets its lag to 0, so the lag of a consumer group is the maximum (or
//! sum) of its processes' figures. A projection stopped by a failure keeps reporting its lag,
//! which then grows: the alert to set.
//!
//! # Spans
//!
//! Through [`tracing`]; field names are stable as well.
//!
//! | Span | Level | Fields |
//! |---|---|---|
//! | `es.execute` | debug | `category`, `stream_id`, `version`, `events`, `attempts` |
//! | `es.execute_two` | debug | `first`, `second` (the two stream ids), `attempts` |
//! | `es.append` | debug | `stream_id`, `expected`, `events` |
//! | `es.load` | debug | `stream_id`, `version`, `events` |
//! | `es.snapshot` | debug | `stream_id`, `version` (a snapshot written by policy) |
//! | `es.projection` | info | `projection`, `partition` (a projection worker's whole life) |
//! | `es.projection.batch` | debug | `projection`, `events`, `first_position`, `last_position` |
//! | `es.relay.batch` | debug | `owner`, `first_position`, `records` |

/// `es_commands_total`: commands run, by `category` and `outcome`.
pub const COMMANDS: &str = "es_commands_total";
/// `es_command_seconds`: a command's latency, by `category`.
pub const COMMAND_SECONDS: &str = "es_command_seconds";
/// `es_command_conflicts_total`: conflicts met by commands, by `category`.
pub const COMMAND_CONFLICTS: &str = "es_command_conflicts_total";
/// `es_append_seconds`: the latency of one append call.
pub const APPEND_SECONDS: &str = "es_append_seconds";
/// `es_append_events`: events per append call.
pub const APPEND_EVENTS: &str = "es_append_events";
/// `es_append_retries_total`: appends re-sent after a transient failure.
pub const APPEND_RETRIES: &str = "es_append_retries_total";
/// `es_projection_events_total`: events handled, by `projection`.
pub const PROJECTION_EVENTS: &str = "es_projection_events_total";
/// `es_projection_batch_events`: events per batch, by `projection`.
pub const PROJECTION_BATCH_EVENTS: &str = "es_projection_batch_events";
/// `es_projection_retries_total`: failed batches tried again, by `projection`.
pub const PROJECTION_RETRIES: &str = "es_projection_retries_total";
/// `es_projection_lag_events`: positions not handled yet, by `projection` and `partition`.
pub const PROJECTION_LAG_EVENTS: &str = "es_projection_lag_events";
/// `es_projection_lag_seconds`: age of the oldest event not handled yet, by `projection` and
/// `partition`.
pub const PROJECTION_LAG_SECONDS: &str = "es_projection_lag_seconds";
/// `es_relay_records_total`: records settled by the relay, by `outcome`.
pub const RELAY_RECORDS: &str = "es_relay_records_total";
/// `es_relay_batch_records`: records per publish call.
pub const RELAY_BATCH_RECORDS: &str = "es_relay_batch_records";
/// `es_outbox_backlog`: records waiting for delivery, by `outbox`.
pub const OUTBOX_BACKLOG: &str = "es_outbox_backlog";
/// `es_outbox_dead_letters`: records in the dead letters, by `outbox`.
pub const OUTBOX_DEAD_LETTERS: &str = "es_outbox_dead_letters";

/// Gives every metric above its unit and help text in the installed recorder (call once, after
/// installing it; a recorder installed later knows none of them).
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        COMMANDS,
        Unit::Count,
        "Commands run by the repository, by outcome."
    );
    describe_histogram!(
        COMMAND_SECONDS,
        Unit::Seconds,
        "A command from its call to its answer, retries included."
    );
    describe_counter!(
        COMMAND_CONFLICTS,
        Unit::Count,
        "Conflicts commands met (each retried or given up on)."
    );
    describe_histogram!(
        APPEND_SECONDS,
        Unit::Seconds,
        "One append call of the repository to the store."
    );
    describe_histogram!(APPEND_EVENTS, Unit::Count, "Events per append call.");
    describe_counter!(
        APPEND_RETRIES,
        Unit::Count,
        "Appends re-sent after a transient store failure."
    );
    describe_counter!(
        PROJECTION_EVENTS,
        Unit::Count,
        "Events handled by a projection."
    );
    describe_histogram!(
        PROJECTION_BATCH_EVENTS,
        Unit::Count,
        "Events per batch handed to a projection's sink."
    );
    describe_counter!(
        PROJECTION_RETRIES,
        Unit::Count,
        "Projection batches that failed and were tried again."
    );
    describe_gauge!(
        PROJECTION_LAG_EVENTS,
        Unit::Count,
        "Feed positions after the projection's position."
    );
    describe_gauge!(
        PROJECTION_LAG_SECONDS,
        Unit::Seconds,
        "Age of the oldest event the projection has not handled (0 when caught up)."
    );
    describe_counter!(
        RELAY_RECORDS,
        Unit::Count,
        "Outbox records settled by the relay, by outcome."
    );
    describe_histogram!(
        RELAY_BATCH_RECORDS,
        Unit::Count,
        "Records per publish call."
    );
    describe_gauge!(
        OUTBOX_BACKLOG,
        Unit::Count,
        "Outbox records waiting for delivery."
    );
    describe_gauge!(
        OUTBOX_DEAD_LETTERS,
        Unit::Count,
        "Outbox records in the dead letters."
    );
}
