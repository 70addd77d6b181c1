//! The Prometheus endpoint: what `es console` serves at `/metrics`, and what an application
//! mounts in its own process to export the metrics of `es_core::telemetry` (commands, appends,
//! projection lag, the relay and the outbox), which only the process doing that work records.
//!
//! ```no_run
//! # async fn run() -> anyhow::Result<()> {
//! // In the application, before starting projections and relays:
//! let handle = es_cli::metrics::install()?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:9464").await?;
//! tokio::spawn(async move { axum::serve(listener, es_cli::metrics::router(handle)).await });
//! # Ok(())
//! # }
//! ```

use std::sync::{Mutex, PoisonError};

use anyhow::{Context, Result};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Installs the process's Prometheus recorder (once: later calls get the same handle) and
/// describes every metric of `es_core::telemetry`. Fails if another recorder was installed
/// first.
pub fn install() -> Result<PrometheusHandle> {
    static HANDLE: Mutex<Option<PrometheusHandle>> = Mutex::new(None);
    let mut handle = HANDLE.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(handle) = handle.as_ref() {
        return Ok(handle.clone());
    }
    let installed = PrometheusBuilder::new()
        .install_recorder()
        .context("cannot install the Prometheus metrics recorder")?;
    es_core::telemetry::describe();
    Ok(handle.insert(installed).clone())
}

/// A router with one route, `GET /metrics`: what `handle`'s recorder holds, in Prometheus text
/// format. Merge it into the application's own router, or serve it alone.
pub fn router(handle: PrometheusHandle) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let handle = handle.clone();
            async move { render(&handle) }
        }),
    )
}

/// The response of `/metrics`.
pub(crate) fn render(handle: &PrometheusHandle) -> axum::response::Response {
    handle.run_upkeep();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response()
}
