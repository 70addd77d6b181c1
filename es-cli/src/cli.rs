//! The command line: options and commands.

use clap::{Args, Parser, Subcommand, ValueEnum};

/// The event store's command line.
#[derive(Debug, Parser)]
#[command(name = "es", version, about)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) conn: ConnArgs,
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Where the store is.
#[derive(Debug, Args)]
pub(crate) struct ConnArgs {
    /// The store's URL: postgres://..., redis://..., rediss://... (feature `tls`), or several
    /// comma-separated redis:// nodes of a cluster (feature `cluster`).
    #[arg(long, env = "ES_URL", global = true, hide_env_values = true)]
    pub(crate) url: Option<String>,
    /// The PostgreSQL schema holding the store.
    #[arg(long, env = "ES_SCHEMA", default_value = "es", global = true)]
    pub(crate) schema: String,
    /// The Redis key prefix of the store.
    #[arg(long, env = "ES_REDIS_PREFIX", default_value = "es", global = true)]
    pub(crate) redis_prefix: String,
    /// The store's feed partitions (as the application built it).
    #[arg(long, env = "ES_PARTITIONS", default_value_t = 1, global = true)]
    pub(crate) partitions: u32,
    /// What decides a stream's partition (as the application built it).
    #[arg(long, value_enum, default_value_t = KeyArg::Stream, global = true)]
    pub(crate) partition_key: KeyArg,
}

/// [`es_core::PartitionKey`] on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum KeyArg {
    /// The whole stream id.
    Stream,
    /// The stream's category.
    Category,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// List or search streams.
    #[command(subcommand)]
    Streams(StreamsCmd),
    /// Show a stream's events with their metadata (correlation, causation, actor).
    Events(EventsArgs),
    /// Show an aggregate's state at a version, a global position or a time.
    State(StateArgs),
    /// Follow the feed live, optionally only some categories or event types.
    Tail(TailArgs),
    /// Show the head of each feed partition and its epochs.
    Head(JsonArg),
    /// Inspect the outbox and its dead letters, and re-queue them.
    #[command(subcommand)]
    Outbox(OutboxCmd),
    /// Show projection checkpoints and their lag; rebuild a registered projection.
    #[command(subcommand)]
    Projections(ProjectionsCmd),
    /// Purge snapshots.
    #[command(subcommand)]
    Snapshots(SnapshotsCmd),
    /// Print the PostgreSQL migration SQL or grants (needs no connection).
    #[command(subcommand)]
    Migrations(MigrationsCmd),
    /// Serve the web console: streams, events and their audit chain, an aggregate's state
    /// through its history, projection lag, the outbox and its dead letters, and `/metrics`.
    Console(ConsoleArgs),
}

/// `es console`.
#[derive(Debug, Clone, Args)]
pub(crate) struct ConsoleArgs {
    /// The address to listen on (port 0: one the system chooses, printed on start).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub(crate) listen: std::net::SocketAddr,
    /// The token every write (re-queueing dead letters) must carry; without one (or with an
    /// empty one) the console refuses every write.
    #[arg(long, env = "ES_CONSOLE_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// A projection whose checkpoint and lag to show, besides the registered ones (repeat for
    /// several).
    #[arg(long = "projection")]
    pub(crate) projections: Vec<String>,
    /// The most events one audit-chain lookup (by event id, correlation or causation) reads
    /// from the feed.
    #[arg(long, default_value_t = 100_000)]
    pub(crate) scan_limit: u64,
    /// How often the live charts and gauges take a reading of lags and backlogs, in
    /// milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub(crate) sample_interval_ms: u64,
}

/// `--json`.
#[derive(Debug, Args)]
pub(crate) struct JsonArg {
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum StreamsCmd {
    /// List streams with their versions, in stream-id order.
    List(ListArgs),
    /// Every stream whose id contains TEXT (walks every page of the listing).
    Search {
        /// The text to look for in stream ids.
        text: String,
        /// Only streams of this category.
        #[arg(long)]
        category: Option<String>,
        #[command(flatten)]
        json: JsonArg,
    },
}

#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    /// Only streams of this category.
    #[arg(long, conflicts_with = "prefix")]
    pub(crate) category: Option<String>,
    /// Only streams whose id starts with this.
    #[arg(long)]
    pub(crate) prefix: Option<String>,
    /// Start after this stream id (the `next` a previous listing printed).
    #[arg(long)]
    pub(crate) after: Option<String>,
    /// The most streams to print (every one if not given).
    #[arg(long)]
    pub(crate) limit: Option<u64>,
    #[command(flatten)]
    pub(crate) json: JsonArg,
}

#[derive(Debug, Args)]
pub(crate) struct EventsArgs {
    /// The stream, `<category>-<id>`.
    pub(crate) stream: String,
    /// The first version to show (default: the first, or the last with --backward).
    #[arg(long)]
    pub(crate) from: Option<u64>,
    /// The most events to show.
    #[arg(long)]
    pub(crate) limit: Option<u64>,
    /// Newest first.
    #[arg(long)]
    pub(crate) backward: bool,
    #[command(flatten)]
    pub(crate) json: JsonArg,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("bound").args(["version", "position", "at"]))]
pub(crate) struct StateArgs {
    /// The stream, `<category>-<id>`.
    pub(crate) stream: String,
    /// The state after this stream version.
    #[arg(long)]
    pub(crate) version: Option<u64>,
    /// The state made of the stream's events at or below this global position.
    #[arg(long)]
    pub(crate) position: Option<u64>,
    /// The state made of the stream's events recorded at or before this time (RFC 3339).
    #[arg(long)]
    pub(crate) at: Option<chrono::DateTime<chrono::Utc>>,
    #[command(flatten)]
    pub(crate) json: JsonArg,
}

#[derive(Debug, Args)]
pub(crate) struct TailArgs {
    /// Only events of this category (repeat for several).
    #[arg(long = "category")]
    pub(crate) categories: Vec<String>,
    /// Only events of this type (repeat for several).
    #[arg(long = "type")]
    pub(crate) types: Vec<String>,
    /// Start after this global position (single-feed stores) instead of at the head.
    #[arg(long, conflicts_with = "from_start")]
    pub(crate) after: Option<u64>,
    /// Start at the beginning of the feed instead of at the head.
    #[arg(long)]
    pub(crate) from_start: bool,
    /// Stop after this many events (default: follow until interrupted).
    #[arg(long)]
    pub(crate) count: Option<u64>,
    #[command(flatten)]
    pub(crate) json: JsonArg,
}

#[derive(Debug, Subcommand)]
pub(crate) enum OutboxCmd {
    /// Pending and dead-letter counts, the last error and the relay lease, per outbox.
    Status(JsonArg),
    /// Records waiting for delivery, oldest first.
    Pending(LimitArgs),
    /// Records parked as dead letters, with their errors.
    Dead(LimitArgs),
    /// Move dead letters back into the outbox, at its end.
    Requeue(RequeueArgs),
}

#[derive(Debug, Args)]
pub(crate) struct LimitArgs {
    /// The most records to show, per outbox.
    #[arg(long, default_value_t = 100)]
    pub(crate) limit: u64,
    #[command(flatten)]
    pub(crate) json: JsonArg,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("which").args(["positions", "all"]).required(true))]
pub(crate) struct RequeueArgs {
    /// The outbox positions of the dead letters to re-queue.
    pub(crate) positions: Vec<u64>,
    /// Re-queue every dead letter.
    #[arg(long)]
    pub(crate) all: bool,
    /// The outbox (of a store with one outbox per partition); default: the first.
    #[arg(long, default_value_t = 0)]
    pub(crate) outbox: u32,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ProjectionsCmd {
    /// Each projection's checkpoint, generation and lag behind the head.
    Status {
        /// The projections' names (their checkpoint names).
        #[arg(required = true)]
        names: Vec<String>,
        /// The feed partition the checkpoints follow (stores with several partitions).
        #[arg(long, default_value_t = 0)]
        partition: u32,
        #[command(flatten)]
        json: JsonArg,
    },
    /// Drop a registered projection's read model and replay the feed up to the head it had
    /// when the rebuild began, with a progress bar. Interrupted (Ctrl-C), it records how far it
    /// got; `--resume` goes on from there without dropping anything.
    Rebuild {
        /// The projection (registered by the application's `es` binary).
        name: String,
        /// Continue an interrupted rebuild from the projection's checkpoint instead of
        /// starting over.
        #[arg(long)]
        resume: bool,
    },
    /// Replay to fix a bug: rebuild a registered projection with the application's fixed code
    /// into a shadow read model beside the live one (which keeps running), with a progress bar,
    /// then print how the shadow differs from the live read model. Interrupted (Ctrl-C), it
    /// records how far it got; `--resume` goes on from there. The shadow stays until `switch`
    /// or `discard`.
    Replay {
        /// The projection (registered for replay by the application's `es` binary).
        name: String,
        /// Continue an interrupted replay from the shadow's checkpoint instead of starting over.
        #[arg(long)]
        resume: bool,
        /// Rows of each kind (added, changed, removed) the diff shows.
        #[arg(long, default_value_t = 5)]
        sample: usize,
    },
    /// Make the shadow that `replay` built the live read model; the live checkpoint moves to the
    /// shadow's position. Stop the live workers first, or restart them with the fixed code.
    Switch {
        /// The projection.
        name: String,
    },
    /// Drop the shadow that `replay` built; the live read model stays as it is.
    Discard {
        /// The projection.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum SnapshotsCmd {
    /// Delete the snapshots of these streams, or of every stream of a category; aggregates are
    /// then loaded from their events until a new snapshot is taken.
    Purge {
        /// The streams whose snapshots to delete.
        streams: Vec<String>,
        /// Every stream of this category.
        #[arg(long, required_unless_present = "streams")]
        category: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum MigrationsCmd {
    /// The SQL that creates or brings the schema (`--schema`) to this version, for psql or a
    /// migration tool (run it in one transaction).
    Sql,
    /// The grants a role needs to run a store on the schema (`--schema`), and nothing more.
    Grants {
        /// The role to grant to.
        #[arg(long)]
        role: String,
    },
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
