//! What metrics and tracing cost a command (rows `<group>:telemetry`): the same 1-event commands
//! from 16 tasks, each on its own aggregate, with telemetry on and off in alternating rounds of
//! one run.
//!
//! "On" is what an application that watches the framework runs: a Prometheus recorder
//! (`metrics-exporter-prometheus`) holding every metric of `es_core::telemetry`, and a `tracing`
//! subscriber formatting every info span and event (to a sink, so the disk is not measured).
//! "Off" is no recorder and no subscriber: what the call sites cost when nothing listens. The
//! recorder and the subscriber are installed once and switched between rounds, since neither
//! can be uninstalled.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use es_core::{Repository, Store};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::{fmt, reload, Layer, Registry};

use crate::command::command_round;
use crate::domain::{self, OrderEvent};
use crate::load::{round, rounds};
use crate::report::{human, Report, Row, Samples};

/// Tasks, each on its own aggregate.
const TASKS: usize = 16;

/// Whether the recorder keeps what it is given.
static ON: AtomicBool = AtomicBool::new(false);

/// A Prometheus recorder that keeps nothing while [`ON`] is false.
struct Switched(PrometheusRecorder);

impl Recorder for Switched {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.0.describe_counter(key, unit, description);
    }
    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.0.describe_gauge(key, unit, description);
    }
    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.0.describe_histogram(key, unit, description);
    }
    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        if ON.load(Ordering::Relaxed) {
            self.0.register_counter(key, metadata)
        } else {
            Counter::noop()
        }
    }
    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        if ON.load(Ordering::Relaxed) {
            self.0.register_gauge(key, metadata)
        } else {
            Gauge::noop()
        }
    }
    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        if ON.load(Ordering::Relaxed) {
            self.0.register_histogram(key, metadata)
        } else {
            Histogram::noop()
        }
    }
}

/// The installed recorder's handle and the switch of the subscriber's level.
struct Installed {
    prometheus: PrometheusHandle,
    level: reload::Handle<LevelFilter, Registry>,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

/// Installs the switched recorder and subscriber (once per process), both off.
fn installed() -> anyhow::Result<&'static Installed> {
    if let Some(installed) = INSTALLED.get() {
        return Ok(installed);
    }
    let recorder = PrometheusBuilder::new().build_recorder();
    let prometheus = recorder.handle();
    metrics::set_global_recorder(Switched(recorder))
        .map_err(|e| anyhow::anyhow!("a metrics recorder is installed already: {e}"))?;
    es_core::telemetry::describe();
    let (filter, level) = reload::Layer::new(LevelFilter::OFF);
    let subscriber =
        Registry::default().with(fmt::layer().with_writer(std::io::sink).with_filter(filter));
    tracing::subscriber::set_global_default(subscriber)?;
    Ok(INSTALLED.get_or_init(|| Installed { prometheus, level }))
}

/// Turns metrics and tracing on or off.
fn switch(installed: &Installed, on: bool) -> anyhow::Result<()> {
    ON.store(on, Ordering::SeqCst);
    let level = if on {
        LevelFilter::INFO
    } else {
        LevelFilter::OFF
    };
    installed.level.modify(|filter| *filter = level)?;
    Ok(())
}

/// The count of `es_commands_total{outcome="ok"}` in the recorder, summed over categories.
fn commands_recorded(handle: &PrometheusHandle) -> f64 {
    handle
        .render()
        .lines()
        .filter(|line| line.starts_with("es_commands_total{") && line.contains("outcome=\"ok\""))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Alternating rounds of commands with telemetry on ("ours") and off ("raw").
pub(crate) async fn run<S: Store>(
    report: &mut Report,
    group: &'static str,
    store: S,
) -> anyhow::Result<()> {
    let installed = installed()?;
    let repo = Repository::builder(store).build()?;
    let events: Arc<[OrderEvent]> = (0..64).map(domain::order_event).collect();
    let round_with = |on: bool| {
        let (repo, events) = (repo.clone(), Arc::clone(&events));
        async move {
            switch(installed, on)?;
            let rate = command_round(&repo, &events, TASKS, 1).await;
            switch(installed, false)?;
            rate
        }
    };
    round_with(false).await?;
    round_with(true).await?;
    let before = commands_recorded(&installed.prometheus);
    let mut samples = Samples::default();
    for i in 0..rounds() {
        let (on, off) = if i % 2 == 0 {
            let off = round_with(false).await?;
            (round_with(true).await?, off)
        } else {
            let on = round_with(true).await?;
            (on, round_with(false).await?)
        };
        samples.push(on, off);
    }
    let recorded = commands_recorded(&installed.prometheus) - before;
    anyhow::ensure!(
        recorded > 0.0,
        "the recorder holds no command of the rounds with telemetry on"
    );
    report.push(Row::paired(
        group,
        format!("commands of 1 event x{TASKS}, metrics + tracing on vs off"),
        &samples,
        "events/s",
        Some(0.97),
        format!(
            "on = a Prometheus recorder with every es_core::telemetry metric and a tracing \
             subscriber formatting info spans to a sink ({} commands recorded); off = neither; \
             {:.1}s rounds, {}",
            human(recorded),
            round().as_secs_f64(),
            samples.describe()
        ),
    ));
    Ok(())
}
