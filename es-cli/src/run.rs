//! Running the commands.

use std::io::Write;
use std::ops::ControlFlow;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use es_core::contract::position::distance;
use es_core::replay::{Built, Replay, ReplayTarget};
use es_core::{
    AsOf, AtLeastOnce, EventFilter, EventStore, FeedPosition, ListStreams, Projection,
    ProjectionRunner, ProjectionStatus, ReadStream, SnapshotStore, StreamId, StreamingStore,
};
use futures::{FutureExt, StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::cli::{
    Cli, Command, EventsArgs, LimitArgs, ListArgs, MigrationsCmd, OutboxCmd, ProjectionsCmd,
    RequeueArgs, SnapshotsCmd, StateArgs, StreamsCmd, TailArgs,
};
use crate::connect::{connect, with_store, AnyStore};
use crate::output::{event_json, event_row, json_line, Table, EVENT_HEADER};
use crate::registry::{Interrupt, Registry, ReplayStep};

/// Why a run ended without finishing its command.
#[derive(Debug)]
pub(crate) struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

pub(crate) fn main(registry: &Registry) -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("es: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let interrupt: Interrupt = async {
            if tokio::signal::ctrl_c().await.is_err() {
                // No signal handling here: never interrupted.
                std::future::pending::<()>().await;
            }
        }
        .boxed()
        .shared();
        let mut out = std::io::stdout();
        run(cli, registry, &mut out, interrupt).await
    });
    // Background tasks of the stores end with the runtime.
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.is::<Interrupted>() => {
            eprintln!("es: interrupted; nothing was left half done");
            ExitCode::from(130)
        }
        Err(err) => {
            if err
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
            {
                return ExitCode::SUCCESS;
            }
            eprintln!("es: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `cli`; a command that cannot stop safely anywhere watches `interrupt` itself, every
/// other one is dropped where it stands when `interrupt` resolves.
pub(crate) async fn run(
    cli: Cli,
    registry: &Registry,
    out: &mut (dyn Write + Send),
    interrupt: Interrupt,
) -> Result<()> {
    if let Command::Projections(ProjectionsCmd::Rebuild { name, resume }) = &cli.command {
        let Some(rebuilders) = registry.projections.get(name) else {
            return Err(unregistered(
                name,
                "",
                registry.projections.keys(),
                "projection",
            ));
        };
        let store = connect(&cli.conn).await?;
        return match store {
            AnyStore::Postgres(s) => (rebuilders.pg)(s, *resume, out, interrupt).await,
            AnyStore::Redis(s) => (rebuilders.redis)(s, *resume, out, interrupt).await,
        };
    }
    let replay = match &cli.command {
        Command::Projections(ProjectionsCmd::Replay {
            name,
            resume,
            sample,
        }) => Some((
            name,
            ReplayStep::Build {
                resume: *resume,
                sample: *sample,
            },
        )),
        Command::Projections(ProjectionsCmd::Switch { name }) => Some((name, ReplayStep::Switch)),
        Command::Projections(ProjectionsCmd::Discard { name }) => Some((name, ReplayStep::Discard)),
        _ => None,
    };
    if let Some((name, step)) = replay {
        let Some(replayers) = registry.replays.get(name) else {
            return Err(unregistered(
                name,
                " for replay",
                registry.replays.keys(),
                "replay",
            ));
        };
        let store = connect(&cli.conn).await?;
        return match store {
            AnyStore::Postgres(s) => (replayers.pg)(s, step, out, interrupt).await,
            AnyStore::Redis(s) => (replayers.redis)(s, step, out, interrupt).await,
        };
    }
    if let Command::Console(args) = &cli.command {
        let store = connect(&cli.conn).await?;
        return crate::console::serve(args.clone(), store, registry, out, interrupt).await;
    }
    tokio::select! {
        result = command(cli, registry, out) => result,
        () = interrupt => Err(Interrupted.into()),
    }
}

/// The error for a projection `name` this `es` has no registration of (`what_for` says which kind,
/// `method` which `Registry` method registers one), listing the ones it has.
fn unregistered<'a>(
    name: &str,
    what_for: &str,
    known: impl Iterator<Item = &'a String>,
    method: &str,
) -> anyhow::Error {
    let known: Vec<&str> = known.map(String::as_str).collect();
    let known = if known.is_empty() {
        "none".to_owned()
    } else {
        known.join(", ")
    };
    anyhow::anyhow!(
        "no projection `{name}` is registered{what_for} in this `es` (registered: {known}); an \
         application registers them with `es_cli::Registry::{method}`"
    )
}

async fn command(cli: Cli, registry: &Registry, out: &mut (dyn Write + Send)) -> Result<()> {
    let mut out = out;
    let out = &mut out;
    if let Command::Migrations(cmd) = &cli.command {
        return migrations(cmd, &cli.conn.schema, out);
    }
    let store = connect(&cli.conn).await?;
    match cli.command {
        Command::Streams(StreamsCmd::List(args)) => {
            with_store!(store, s => list_streams(&s, args, out).await)
        }
        Command::Streams(StreamsCmd::Search {
            text,
            category,
            json,
        }) => {
            with_store!(store, s => search_streams(&s, &text, category.as_deref(), json.json, out).await)
        }
        Command::Events(args) => with_store!(store, s => events(&s, args, out).await),
        Command::State(args) => state(store, registry, args, out).await,
        Command::Tail(args) => with_store!(store, s => tail(&s, args, out).await),
        Command::Head(json) => with_store!(store, s => head(&s, json.json, out).await),
        Command::Outbox(cmd) => with_store!(store, s => outbox(&s, cmd, out).await),
        Command::Projections(ProjectionsCmd::Status {
            names,
            partition,
            json,
        }) => with_store!(store, s => projections(&s, &names, partition, json.json, out).await),
        Command::Snapshots(SnapshotsCmd::Purge { streams, category }) => {
            with_store!(store, s => purge(&s, streams, category, out).await)
        }
        Command::Migrations(_)
        | Command::Projections(
            ProjectionsCmd::Rebuild { .. }
            | ProjectionsCmd::Replay { .. }
            | ProjectionsCmd::Switch { .. }
            | ProjectionsCmd::Discard { .. },
        )
        | Command::Console(_) => {
            unreachable!("handled before")
        }
    }
}

/// Rebuilds `projection` on `store` (or, with `resume`, goes on with an interrupted rebuild):
/// drops its read model and starts a new checkpoint generation at 0, then runs it until it has
/// handled the head the feed had when this began, showing a progress bar with an ETA on
/// standard error. When `interrupt` resolves, the runner finishes the batch in hand (its
/// checkpoint recorded with it) and stops; a later `resume` goes on from that checkpoint, so
/// nothing is replayed twice but the batch in hand of a hard kill (at least once), and nothing
/// is skipped.
pub(crate) async fn rebuild<S: StreamingStore, P: Projection>(
    store: S,
    projection: P,
    resume: bool,
    out: &mut (dyn Write + Send),
    interrupt: Interrupt,
) -> Result<()> {
    let name = projection.name().to_owned();
    if !store.partitioning().is_single() {
        bail!("rebuilding `{name}`: this store has {}; the command line rebuilds projections of a single feed", store.partitioning());
    }
    let target = store.head_position().await?;
    let before = store.load_checkpoint(&name).await?;
    let runner = ProjectionRunner::new(store.clone());
    let handle = runner.spawn(AtLeastOnce::new(projection, store.clone()));
    if !resume {
        handle
            .rebuild()
            .await
            .with_context(|| format!("dropping the read model of `{name}`"))?;
    }
    let total = distance(0, target);
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} {bar:30} {pos}/{len} positions [{elapsed} < {eta}, {per_sec}]",
    ) {
        bar.set_style(style);
    }
    bar.set_message(format!("rebuilding {name}"));
    let mut interrupt = std::pin::pin!(interrupt);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            () = &mut interrupt => {
                bar.abandon();
                let status = handle.shutdown().await;
                let at = match status {
                    ProjectionStatus::Stopped { position } | ProjectionStatus::Running { position } => position,
                    _ => store.load_checkpoint(&name).await?.position,
                };
                writeln!(
                    out,
                    "interrupted rebuilding {name} at position {at} of {target}; `es projections rebuild {name} --resume` goes on from there"
                )?;
                return Err(Interrupted.into());
            }
            _ = tick.tick() => {
                let status = handle.status();
                if let ProjectionStatus::Failed(failure) = status {
                    bar.abandon();
                    let _ = handle.shutdown().await;
                    bail!("projection `{name}` failed: {failure}");
                }
                let position = handle.position();
                let rebuilding = matches!(status, ProjectionStatus::Starting | ProjectionStatus::Rebuilding);
                if !rebuilding {
                    bar.set_position(distance(0, position).min(total));
                    if position >= target {
                        break;
                    }
                }
            }
        }
    }
    bar.finish_and_clear();
    let status = handle.shutdown().await;
    let checkpoint = store.load_checkpoint(&name).await?;
    let how = if resume {
        "resumed and finished"
    } else {
        "rebuilt"
    };
    writeln!(
        out,
        "{how} {name}: at position {} (head {target}), checkpoint generation {} (was {}), {}",
        checkpoint.position,
        checkpoint.generation,
        before.generation,
        match status {
            ProjectionStatus::Stopped { .. } => "stopped cleanly",
            _ => "stopped",
        }
    )?;
    Ok(())
}

/// One step of a replay to fix a bug (see `es_core::replay`): builds the shadow with a progress
/// bar and prints the diff, or switches, or discards. When `interrupt` resolves during a build,
/// the build stops after the batch in hand (its checkpoint recorded) and a later `--resume`
/// goes on from there.
pub(crate) async fn replay<S: StreamingStore, T: ReplayTarget>(
    store: S,
    target: T,
    step: ReplayStep,
    out: &mut (dyn Write + Send),
    interrupt: Interrupt,
) -> Result<()> {
    if !store.partitioning().is_single() {
        bail!(
            "replaying: this store has {}; the command line replays projections of a single feed",
            store.partitioning()
        );
    }
    let replay = Replay::new(store, target);
    let name = replay.name().to_owned();
    let (resume, sample) = match step {
        ReplayStep::Build { resume, sample } => (resume, sample),
        ReplayStep::Switch => {
            let position = replay.switch().await?;
            writeln!(
                out,
                "switched {name}: the shadow is the live read model, its checkpoint at position \
                 {position}"
            )?;
            return Ok(());
        }
        ReplayStep::Discard => {
            replay.discard().await?;
            writeln!(
                out,
                "discarded the shadow of {name}; the live read model is unchanged"
            )?;
            return Ok(());
        }
    };
    // The interrupt is polled by a task of its own; the build checks the flag between batches.
    let interrupted = Arc::new(AtomicBool::new(false));
    let watcher = {
        let interrupted = Arc::clone(&interrupted);
        tokio::spawn(async move {
            interrupt.await;
            interrupted.store(true, Ordering::Relaxed);
        })
    };
    let bar = ProgressBar::new(0);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} {bar:30} {pos}/{len} positions [{elapsed} < {eta}, {per_sec}]",
    ) {
        bar.set_style(style);
    }
    bar.set_message(format!("replaying {name} into its shadow"));
    let progress = |at: u64, head: u64| {
        bar.set_length(head);
        bar.set_position(at);
        if interrupted.load(Ordering::Relaxed) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let built = if resume {
        replay.resume(progress).await
    } else {
        replay.build(progress).await
    };
    watcher.abort();
    match built? {
        Built::Interrupted { position, head } => {
            bar.abandon();
            writeln!(
                out,
                "interrupted replaying {name} at position {position} of {head}; `es projections \
                 replay {name} --resume` goes on from there"
            )?;
            Err(Interrupted.into())
        }
        Built::Complete { position } => {
            bar.finish_and_clear();
            let diff = replay.diff().await?;
            writeln!(out, "shadow of {name} built to position {position}")?;
            write!(out, "{}", diff.report(sample))?;
            writeln!(
                out,
                "`es projections switch {name}` makes the shadow live; `es projections discard \
                 {name}` drops it"
            )?;
            Ok(())
        }
    }
}

/// A spinner on standard error (hidden when it is not a terminal) for operations that page.
fn spinner(what: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} {pos} [{elapsed}]") {
        bar.set_style(style);
    }
    bar.set_message(what.to_owned());
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

fn stream_id(text: &str) -> Result<StreamId> {
    StreamId::parse(text).with_context(|| format!("`{text}` is not a stream id"))
}

async fn list_streams<S: EventStore>(
    store: &S,
    args: ListArgs,
    out: &mut impl Write,
) -> Result<()> {
    let mut list = match (&args.category, &args.prefix) {
        (Some(category), _) => ListStreams::category(category),
        (None, Some(prefix)) => ListStreams::all().prefix(prefix.clone()),
        (None, None) => ListStreams::all(),
    };
    if let Some(after) = &args.after {
        list = list.after(stream_id(after)?);
    }
    let mut left = args.limit.unwrap_or(u64::MAX);
    let mut table = Table::new(&["STREAM", "VERSION"]);
    let bar = spinner("listing streams");
    let mut more = None;
    while left > 0 {
        let page = store
            .list_streams(list.clone().limit(left.min(1000)))
            .await?;
        for summary in page.streams {
            left -= 1;
            bar.inc(1);
            if args.json.json {
                json_line(
                    out,
                    &json!({ "stream": summary.stream_id.as_str(), "version": summary.version }),
                )?;
            } else {
                table.row(vec![
                    summary.stream_id.to_string(),
                    summary.version.to_string(),
                ]);
            }
        }
        match page.next {
            Some(next) if left > 0 => list = list.after(next),
            next => {
                more = next;
                break;
            }
        }
    }
    bar.finish_and_clear();
    if !args.json.json {
        table.print(out)?;
        if let Some(next) = more {
            writeln!(out, "more after {next} (--after {next})")?;
        }
    }
    Ok(())
}

async fn search_streams<S: EventStore>(
    store: &S,
    text: &str,
    category: Option<&str>,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    let mut list = category
        .map_or_else(ListStreams::all, ListStreams::category)
        .limit(1000);
    let bar = spinner("searching streams");
    let mut table = Table::new(&["STREAM", "VERSION"]);
    loop {
        let page = store.list_streams(list.clone()).await?;
        bar.inc(page.streams.len() as u64);
        for summary in page.streams {
            if !summary.stream_id.as_str().contains(text) {
                continue;
            }
            if json {
                json_line(
                    out,
                    &json!({ "stream": summary.stream_id.as_str(), "version": summary.version }),
                )?;
            } else {
                table.row(vec![
                    summary.stream_id.to_string(),
                    summary.version.to_string(),
                ]);
            }
        }
        match page.next {
            Some(next) => list = list.after(next),
            None => break,
        }
    }
    bar.finish_and_clear();
    if !json {
        table.print(out)?;
    }
    Ok(())
}

async fn events<S: EventStore>(store: &S, args: EventsArgs, out: &mut impl Write) -> Result<()> {
    let stream = stream_id(&args.stream)?;
    let mut read = if args.backward {
        ReadStream::backward()
    } else {
        ReadStream::forward()
    };
    if let Some(from) = args.from {
        read = read.from(from);
    }
    if let Some(limit) = args.limit {
        read = read.limit(limit);
    }
    let mut events = store.read_stream(&stream, read);
    let mut table = Table::new(EVENT_HEADER);
    while let Some(event) = events.try_next().await? {
        if args.json.json {
            json_line(out, &event_json(&event))?;
        } else {
            table.row(event_row(&event));
        }
    }
    if !args.json.json {
        if table.is_empty() {
            writeln!(out, "stream {stream} has no events")?;
        } else {
            table.print(out)?;
        }
    }
    Ok(())
}

async fn state(
    store: AnyStore,
    registry: &Registry,
    args: StateArgs,
    out: &mut impl Write,
) -> Result<()> {
    let stream = stream_id(&args.stream)?;
    let as_of = match (args.version, args.position, args.at) {
        (Some(version), _, _) => Some(AsOf::Version(version)),
        (_, Some(position), _) => Some(AsOf::Position(position)),
        (_, _, Some(at)) => Some(AsOf::Time(at)),
        _ => None,
    };
    let latest = AsOf::Version(u64::MAX);
    let loaded = match &store {
        AnyStore::Postgres(s) => {
            registry
                .load_pg(
                    s.clone(),
                    stream.category(),
                    stream.id(),
                    as_of.unwrap_or(latest),
                )
                .await
        }
        AnyStore::Redis(s) => {
            registry
                .load_redis(
                    s.clone(),
                    stream.category(),
                    stream.id(),
                    as_of.unwrap_or(latest),
                )
                .await
        }
    };
    if let Some(loaded) = loaded {
        let (state, version) = loaded?;
        if args.json.json {
            json_line(
                out,
                &json!({ "stream": stream.as_str(), "version": version, "state": state }),
            )?;
        } else {
            writeln!(out, "{stream} at version {version}")?;
            writeln!(out, "{}", serde_json::to_string_pretty(&state)?)?;
        }
        return Ok(());
    }
    // No aggregate registered for the category: the raw events that make the state.
    let events: Vec<_> = with_store!(store, s => {
        s.read_stream(&stream, ReadStream::forward())
            .try_take_while(|event| {
                let keep = match as_of {
                    None => true,
                    Some(AsOf::Version(v)) => event.stream_version <= v,
                    Some(AsOf::Position(p)) => event.global_position <= p,
                    Some(AsOf::Time(t)) => event.recorded_at <= t,
                };
                std::future::ready(Ok(keep))
            })
            .try_collect()
            .await?
    });
    let version = events.last().map_or(0, |e| e.stream_version);
    if args.json.json {
        for event in &events {
            json_line(out, &event_json(event))?;
        }
    } else {
        writeln!(
            out,
            "{stream} at version {version}: no aggregate registered for category `{}`; the events that make its state:",
            stream.category()
        )?;
        let mut table = Table::new(EVENT_HEADER);
        for event in &events {
            table.row(event_row(event));
        }
        table.print(out)?;
    }
    Ok(())
}

async fn tail<S: EventStore>(store: &S, args: TailArgs, out: &mut impl Write) -> Result<()> {
    let mut filter = EventFilter::all();
    for category in args.categories {
        filter = filter.category(category);
    }
    for event_type in args.types {
        filter = filter.event_type(event_type);
    }
    let partitioning = store.partitioning();
    let mut from = FeedPosition::start(&partitioning);
    if !args.from_start {
        match args.after {
            Some(after) => {
                if !partitioning.is_single() {
                    bail!("--after names a position of the single feed; this store has {partitioning}");
                }
                from.advance(0, after);
            }
            None => {
                for partition in partitioning.partitions() {
                    from.advance(partition, store.partition_head(partition).await?);
                }
            }
        }
    }
    let mut events = store.subscribe_all(&from, filter);
    let mut seen = 0;
    if !args.json.json {
        writeln!(out, "{}", EVENT_HEADER.join("  "))?;
        out.flush()?;
    }
    while args.count.is_none_or(|count| seen < count) {
        let Some(event) = events.next().await else {
            break;
        };
        let event = event?;
        if args.json.json {
            json_line(out, &event_json(&event))?;
        } else {
            writeln!(out, "{}", event_row(&event).join("  "))?;
        }
        out.flush()?;
        seen += 1;
    }
    Ok(())
}

async fn head<S: EventStore>(store: &S, json: bool, out: &mut impl Write) -> Result<()> {
    let partitioning = store.partitioning();
    let mut table = Table::new(&["PARTITION", "HEAD", "EPOCHS"]);
    for partition in partitioning.partitions() {
        let head = store.partition_head(partition).await?;
        let epochs = store.partition_epochs(partition).await?;
        if json {
            let epochs: Vec<_> = epochs
                .iter()
                .map(|e| json!({ "epoch": e.epoch, "previous_head": e.previous_head }))
                .collect();
            json_line(
                out,
                &json!({ "partition": partition, "head": head, "epochs": epochs }),
            )?;
        } else {
            let epochs: Vec<String> = epochs
                .iter()
                .map(|e| format!("{} (after {})", e.epoch, e.previous_head))
                .collect();
            let epochs = if epochs.is_empty() {
                "-".to_owned()
            } else {
                epochs.join(", ")
            };
            table.row(vec![partition.to_string(), head.to_string(), epochs]);
        }
    }
    if !json {
        writeln!(out, "store: {partitioning}")?;
        table.print(out)?;
    }
    Ok(())
}

async fn outbox<S: StreamingStore>(store: &S, cmd: OutboxCmd, out: &mut impl Write) -> Result<()> {
    match cmd {
        OutboxCmd::Status(json) => outbox_status(store, json.json, out).await,
        OutboxCmd::Pending(args) => outbox_pending(store, &args, out).await,
        OutboxCmd::Dead(args) => outbox_dead(store, &args, out).await,
        OutboxCmd::Requeue(args) => outbox_requeue(store, args, out).await,
    }
}

async fn outbox_status<S: StreamingStore>(
    store: &S,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    let outboxes = store.outbox_partitions();
    let mut table = Table::new(&["OUTBOX", "PENDING", "DEAD", "LEASE", "LAST_ERROR"]);
    for index in 0..outboxes {
        let status = store.outbox_partition(index)?.relay_status().await?;
        let lease = status.lease.as_ref().map(|l| {
            format!(
                "{} gen {} ({})",
                l.owner,
                l.generation,
                if l.held { "held" } else { "free" }
            )
        });
        let error = status.last_error.as_ref().map(|e| {
            format!(
                "position {} at {}: {}",
                e.position,
                e.at.to_rfc3339(),
                e.error
            )
        });
        if json {
            json_line(
                out,
                &json!({
                    "outbox": index,
                    "pending": status.pending,
                    "dead_letters": status.dead_letters,
                    "lease": status.lease.as_ref().map(|l| json!({
                        "owner": l.owner, "generation": l.generation, "held": l.held
                    })),
                    "last_error": status.last_error.as_ref().map(|e| json!({
                        "position": e.position, "error": e.error, "at": e.at.to_rfc3339()
                    })),
                }),
            )?;
        } else {
            table.row(vec![
                index.to_string(),
                status.pending.to_string(),
                status.dead_letters.to_string(),
                lease.unwrap_or_else(|| "-".to_owned()),
                error.unwrap_or_else(|| "-".to_owned()),
            ]);
        }
    }
    if !json {
        table.print(out)?;
    }
    Ok(())
}

async fn outbox_pending<S: StreamingStore>(
    store: &S,
    args: &LimitArgs,
    out: &mut impl Write,
) -> Result<()> {
    let outboxes = store.outbox_partitions();
    let mut table = Table::new(&[
        "OUTBOX",
        "POSITION",
        "STREAM",
        "TOPIC",
        "KEY",
        "TYPE",
        "MESSAGE_ID",
    ]);
    for index in 0..outboxes {
        for record in store
            .outbox_partition(index)?
            .pending_outbox(args.limit)
            .await?
        {
            let m = &record.message;
            if args.json.json {
                json_line(
                    out,
                    &json!({
                        "outbox": index,
                        "position": record.position,
                        "stream": record.stream_id.as_str(),
                        "recorded_at": record.recorded_at.to_rfc3339(),
                        "topic": m.topic,
                        "key": m.key,
                        "type": m.message_type,
                        "schema_version": m.schema_version,
                        "message_id": m.message_id.to_string(),
                        "source_event_id": m.source_event_id.to_string(),
                    }),
                )?;
            } else {
                table.row(vec![
                    index.to_string(),
                    record.position.to_string(),
                    record.stream_id.to_string(),
                    m.topic.clone(),
                    m.key.clone(),
                    format!("{}@v{}", m.message_type, m.schema_version),
                    m.message_id.to_string(),
                ]);
            }
        }
    }
    if !args.json.json {
        table.print(out)?;
    }
    Ok(())
}

async fn outbox_dead<S: StreamingStore>(
    store: &S,
    args: &LimitArgs,
    out: &mut impl Write,
) -> Result<()> {
    let outboxes = store.outbox_partitions();
    let mut table = Table::new(&[
        "OUTBOX", "POSITION", "STREAM", "TOPIC", "TYPE", "ATTEMPTS", "DEAD_AT", "ERROR",
    ]);
    for index in 0..outboxes {
        for dead in store
            .outbox_partition(index)?
            .dead_letters(args.limit)
            .await?
        {
            let record = &dead.record;
            let m = &record.message;
            if args.json.json {
                json_line(
                    out,
                    &json!({
                        "outbox": index,
                        "position": record.position,
                        "stream": record.stream_id.as_str(),
                        "topic": m.topic,
                        "type": m.message_type,
                        "message_id": m.message_id.to_string(),
                        "attempts": dead.attempts,
                        "dead_at": dead.dead_at.to_rfc3339(),
                        "error": dead.error,
                    }),
                )?;
            } else {
                table.row(vec![
                    index.to_string(),
                    record.position.to_string(),
                    record.stream_id.to_string(),
                    m.topic.clone(),
                    m.message_type.clone(),
                    dead.attempts.to_string(),
                    dead.dead_at.to_rfc3339(),
                    dead.error.clone(),
                ]);
            }
        }
    }
    if !args.json.json {
        table.print(out)?;
    }
    Ok(())
}

async fn outbox_requeue<S: StreamingStore>(
    store: &S,
    args: RequeueArgs,
    out: &mut impl Write,
) -> Result<()> {
    let outbox = store.outbox_partition(args.outbox)?;
    let positions: Vec<u64> = if args.all {
        outbox
            .dead_letters(u64::MAX)
            .await?
            .iter()
            .map(|d| d.record.position)
            .collect()
    } else {
        args.positions
    };
    let requeued = outbox.requeue_dead_letters(&positions).await?;
    writeln!(
        out,
        "re-queued {requeued} of {} dead letter(s)",
        positions.len()
    )?;
    Ok(())
}

async fn projections<S: StreamingStore>(
    store: &S,
    names: &[String],
    partition: u32,
    json: bool,
    out: &mut impl Write,
) -> Result<()> {
    let head = store.partition_head(partition).await?;
    let mut table = Table::new(&["PROJECTION", "POSITION", "GENERATION", "HEAD", "LAG"]);
    for name in names {
        let checkpoint = store.load_checkpoint(name).await?;
        let lag = distance(checkpoint.position, head);
        if json {
            json_line(
                out,
                &json!({
                    "projection": name,
                    "position": checkpoint.position,
                    "generation": checkpoint.generation,
                    "head": head,
                    "lag": lag,
                }),
            )?;
        } else {
            table.row(vec![
                name.clone(),
                checkpoint.position.to_string(),
                checkpoint.generation.to_string(),
                head.to_string(),
                lag.to_string(),
            ]);
        }
    }
    if !json {
        table.print(out)?;
    }
    Ok(())
}

async fn purge<S: SnapshotStore + EventStore>(
    store: &S,
    streams: Vec<String>,
    category: Option<String>,
    out: &mut impl Write,
) -> Result<()> {
    let mut targets: Vec<StreamId> = streams
        .iter()
        .map(|s| stream_id(s))
        .collect::<Result<_>>()?;
    if let Some(category) = category {
        let mut list = ListStreams::category(&category).limit(1000);
        loop {
            let page = store.list_streams(list.clone()).await?;
            targets.extend(page.streams.into_iter().map(|s| s.stream_id));
            match page.next {
                Some(next) => list = list.after(next),
                None => break,
            }
        }
    }
    let bar = ProgressBar::new(targets.len() as u64);
    if let Ok(style) =
        ProgressStyle::with_template("{bar:30} {pos}/{len} snapshots [{elapsed} < {eta}]")
    {
        bar.set_style(style);
    }
    let mut purged = 0;
    for stream in &targets {
        // Each deletion stands alone: an interruption leaves the rest as they were.
        if let Some(snapshot) = store.load_snapshot(stream).await? {
            if store.delete_snapshot(stream, snapshot.version).await? {
                purged += 1;
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    writeln!(
        out,
        "purged {purged} snapshot(s) of {} stream(s)",
        targets.len()
    )?;
    Ok(())
}

fn migrations(cmd: &MigrationsCmd, schema: &str, out: &mut impl Write) -> Result<()> {
    match cmd {
        MigrationsCmd::Sql => write!(out, "{}", es_postgres::migration_script(schema)?)?,
        MigrationsCmd::Grants { role } => {
            write!(out, "{}", es_postgres::grants_script(schema, role)?)?;
        }
    }
    Ok(())
}
