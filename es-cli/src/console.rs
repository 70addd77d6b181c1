//! `es console`: a read-only web console over the store, served by axum as server-rendered HTML
//! with a few lines of JavaScript (the state slider and the live charts).
//!
//! Every page reads through the stores' public API only; what each page costs is written beside
//! its handler and in `docs/10-operating.md`. Writes (re-queueing dead letters) need the token
//! the console was started with (`--token` or `ES_CONSOLE_TOKEN`); with no token configured the
//! console refuses every write. Everything that comes from the store is HTML-escaped by the
//! templates (maud escapes every interpolated value).

mod audit;
mod live;
mod pages;
mod view;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::extract::Request;
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::cli::ConsoleArgs;
use crate::connect::AnyStore;
use crate::registry::{Interrupt, Registry};

/// What every handler shares.
pub(crate) struct Console {
    pub(crate) store: AnyStore,
    pub(crate) registry: Registry,
    /// The token writes need; `None`: the console is read-only.
    token: Option<String>,
    /// The projections whose checkpoints the console shows: the registered ones and those
    /// named with `--projection`.
    pub(crate) projections: Vec<String>,
    /// The most events one audit-chain lookup reads from the feed.
    pub(crate) scan_limit: u64,
    pub(crate) live: live::Samples,
    metrics: PrometheusHandle,
}

pub(crate) type App = Arc<Console>;

/// Serves the console on `args.listen` until `interrupt` resolves; prints the address it
/// listens on (the port the system chose for `:0`) as its first line.
pub(crate) async fn serve(
    args: ConsoleArgs,
    store: AnyStore,
    registry: &Registry,
    out: &mut (dyn Write + Send),
    interrupt: Interrupt,
) -> Result<()> {
    let metrics = crate::metrics::install()?;
    let projections: BTreeSet<String> = registry
        .projections
        .keys()
        .cloned()
        .chain(args.projections.iter().cloned())
        .collect();
    let token = args.token.filter(|t| !t.is_empty());
    let app: App = Arc::new(Console {
        store,
        registry: registry.clone(),
        token,
        projections: projections.into_iter().collect(),
        scan_limit: args.scan_limit,
        live: live::Samples::default(),
        metrics,
    });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr: SocketAddr = listener.local_addr()?;
    writeln!(
        out,
        "es console on http://{addr}/ ({})",
        if app.token.is_some() {
            "read-only; writes need the token"
        } else {
            "read-only; no token, so writes are refused"
        }
    )?;
    out.flush()?;
    let sampler = tokio::spawn(live::sample_forever(
        Arc::clone(&app),
        Duration::from_millis(args.sample_interval_ms.max(50)),
    ));
    let result = axum::serve(listener, router(app))
        .with_graceful_shutdown(interrupt)
        .await
        .context("the console's server failed");
    sampler.abort();
    result
}

fn router(app: App) -> Router {
    Router::new()
        .route("/", get(pages::home))
        .route("/streams", get(pages::streams))
        .route("/stream", get(pages::stream))
        .route("/event", get(pages::event))
        .route("/chain", get(pages::chain))
        .route("/state", get(pages::state))
        .route("/api/state", get(pages::state_json))
        .route("/projections", get(pages::projections))
        .route("/outbox", get(pages::outbox))
        .route("/outbox/requeue", post(pages::requeue))
        .route("/api/live", get(live::live_json))
        .route("/metrics", get(metrics_text))
        .layer(axum::middleware::from_fn(count_requests))
        .with_state(app)
}

/// The route a path belongs to, for the request metrics (a fixed set, so the label's
/// cardinality stays bounded).
fn route_label(path: &str) -> &'static str {
    match path {
        "/" => "home",
        "/streams" => "streams",
        "/stream" => "stream",
        "/event" => "event",
        "/chain" => "chain",
        "/state" => "state",
        "/api/state" => "api_state",
        "/projections" => "projections",
        "/outbox" => "outbox",
        "/outbox/requeue" => "requeue",
        "/api/live" => "api_live",
        "/metrics" => "metrics",
        _ => "other",
    }
}

/// Counts every request (`es_console_requests_total{page,status}`) and times it
/// (`es_console_request_seconds{page}`).
async fn count_requests(request: Request, next: Next) -> Response {
    let page = route_label(request.uri().path());
    let started = Instant::now();
    let response = next.run(request).await;
    metrics::counter!(
        "es_console_requests_total",
        "page" => page,
        "status" => response.status().as_u16().to_string()
    )
    .increment(1);
    metrics::histogram!("es_console_request_seconds", "page" => page)
        .record(started.elapsed().as_secs_f64());
    response
}

/// `/metrics`: everything the process's recorder holds, in Prometheus text format.
async fn metrics_text(axum::extract::State(app): axum::extract::State<App>) -> Response {
    crate::metrics::render(&app.metrics)
}

/// Why a write was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The console has no token: it is read-only.
    ReadOnly,
    /// The request carries no token.
    Missing,
    /// The request's token is not the console's.
    Wrong,
}

impl Console {
    /// Whether a write carrying `given` (a form field) or an `Authorization: Bearer` header in
    /// `headers` may proceed.
    pub(crate) fn authorize(
        &self,
        headers: &HeaderMap,
        given: Option<&str>,
    ) -> Result<(), Refusal> {
        let Some(expected) = self.token.as_deref() else {
            return Err(Refusal::ReadOnly);
        };
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let Some(given) = given.filter(|g| !g.is_empty()).or(bearer) else {
            return Err(Refusal::Missing);
        };
        if same_bytes(given.as_bytes(), expected.as_bytes()) {
            Ok(())
        } else {
            Err(Refusal::Wrong)
        }
    }

    /// Whether the console accepts writes at all (it was given a token).
    pub(crate) fn writable(&self) -> bool {
        self.token.is_some()
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let (status, text) = match self {
            Refusal::ReadOnly => (
                StatusCode::FORBIDDEN,
                "this console is read-only: it was started without --token, so it refuses every write",
            ),
            Refusal::Missing => (
                StatusCode::UNAUTHORIZED,
                "this write needs the console's token (form field `token` or `Authorization: Bearer`)",
            ),
            Refusal::Wrong => (StatusCode::FORBIDDEN, "wrong token: nothing was changed"),
        };
        view::error_page(status, text)
    }
}

/// Compares two byte strings in time that depends on their lengths only, not on where they
/// differ.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::same_bytes;

    #[test]
    fn tokens_compare_by_every_byte() {
        assert!(same_bytes(b"secret", b"secret"));
        assert!(!same_bytes(b"secret", b"secreT"));
        assert!(!same_bytes(b"secret", b"secret!"));
        assert!(!same_bytes(b"", b"x"));
    }
}
