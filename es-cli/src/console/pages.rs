//! The pages. Each handler's comment says which store calls it makes.

use anyhow::Context as _;
use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Json;
use es_core::{AsOf, EventStore, ListStreams, ReadStream, RecordedEvent, StreamId, StreamingStore};
use futures::TryStreamExt;
use maud::{html, Markup, PreEscaped};
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::audit::{scan, Wanted};
use super::live::read_now;
use super::view::{
    error_page, event_href, event_table, page, payload_text, q, short, stream_href, time, Section,
    CHART_JS, SLIDER_JS,
};
use super::App;
use crate::connect::{with_store, AnyStore};

/// Streams per page of the stream list.
const STREAMS_PAGE: u64 = 50;
/// Events per page of a stream.
const EVENTS_PAGE: u64 = 25;
/// Pending outbox records shown per outbox.
const PENDING_SHOWN: u64 = 20;
/// Dead letters shown per outbox.
const DEAD_SHOWN: u64 = 100;

/// Why a page could not be shown.
pub(crate) enum PageError {
    /// The request is malformed (400).
    Bad(String),
    /// What it names does not exist (404).
    NotFound(String),
    /// The store failed (500).
    Store(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for PageError {
    fn from(err: E) -> Self {
        PageError::Store(err.into())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        match self {
            PageError::Bad(text) => error_page(StatusCode::BAD_REQUEST, &text),
            PageError::NotFound(text) => error_page(StatusCode::NOT_FOUND, &text),
            PageError::Store(err) => {
                error_page(StatusCode::INTERNAL_SERVER_ERROR, &format!("{err:#}"))
            }
        }
    }
}

type PageResult = Result<Response, PageError>;

fn parse_stream(text: &str) -> Result<StreamId, PageError> {
    StreamId::parse(text).map_err(|e| PageError::Bad(e.to_string()))
}

/// `/`: the stream list.
pub(crate) async fn home() -> Redirect {
    Redirect::to("/streams")
}

#[derive(Deserialize)]
pub(crate) struct StreamsQuery {
    #[serde(default)]
    prefix: String,
    #[serde(default)]
    after: String,
}

/// `/streams?prefix=&after=`: one `list_streams` call of 50 streams.
pub(crate) async fn streams(
    State(app): State<App>,
    Query(query): Query<StreamsQuery>,
) -> PageResult {
    let mut list = ListStreams::all().limit(STREAMS_PAGE);
    if !query.prefix.is_empty() {
        list = list.prefix(query.prefix.as_str());
    }
    if !query.after.is_empty() {
        list = list.after(parse_stream(&query.after)?);
    }
    list.validate()
        .map_err(|e| PageError::Bad(format!("prefix {:?}: {e}", query.prefix)))?;
    let listed = with_store!(&app.store, s => s.list_streams(list).await)?;
    let body = html! {
        form method="get" action="/streams" {
            input name="prefix" value=(query.prefix) placeholder="stream id prefix, e.g. order-" size="30";
            " " button { "Search" }
        }
        @if listed.streams.is_empty() {
            p.muted { "No streams." }
        } @else {
            table #streams {
                tr { th { "Stream" } th { "Version" } th { "State" } }
                @for summary in &listed.streams {
                    tr {
                        td { a href=(stream_href(summary.stream_id.as_str())) { (summary.stream_id.as_str()) } }
                        td.n { (summary.version) }
                        td { a href=(format!("/state?stream={}", q(summary.stream_id.as_str()))) { "history" } }
                    }
                }
            }
        }
        p.pager {
            @if !query.after.is_empty() {
                a href=(format!("/streams?prefix={}", q(&query.prefix))) { "« first page" }
            }
            @if let Some(next) = &listed.next {
                a #next href=(format!("/streams?prefix={}&after={}", q(&query.prefix), q(next.as_str()))) { "next page »" }
            }
        }
    };
    Ok(page(Some(Section::Streams), "Streams", &body).into_response())
}

#[derive(Deserialize)]
pub(crate) struct StreamQuery {
    id: String,
    from: Option<u64>,
}

/// `/stream?id=&from=`: `stream_version`, then one `read_stream` of 25 events.
pub(crate) async fn stream(State(app): State<App>, Query(query): Query<StreamQuery>) -> PageResult {
    let id = parse_stream(&query.id)?;
    let current = with_store!(&app.store, s => s.stream_version(&id).await)?;
    if current == 0 {
        return Err(PageError::NotFound(format!("stream {id} has no events")));
    }
    let from = query.from.unwrap_or(1).clamp(1, current);
    let events: Vec<RecordedEvent> = with_store!(&app.store, s => {
        s.read_stream(&id, ReadStream::forward().from(from).limit(EVENTS_PAGE))
            .try_collect()
            .await
    })?;
    let href = |from: u64| format!("{}&from={from}", stream_href(id.as_str()));
    let last_page = current.saturating_sub(EVENTS_PAGE - 1).max(1);
    let body = html! {
        p {
            "Version " (current) " · "
            a href=(format!("/state?stream={}", q(id.as_str()))) { "state through its history" }
        }
        (event_table(&events, false))
        p.pager {
            @if from > 1 {
                a href=(href(1)) { "« first" }
                a #prev href=(href(from.saturating_sub(EVENTS_PAGE).max(1))) { "‹ previous" }
            }
            @if from + EVENTS_PAGE <= current {
                a #next href=(href(from + EVENTS_PAGE)) { "next ›" }
                a href=(href(last_page)) { "last »" }
            }
        }
    };
    Ok(page(Some(Section::Streams), &format!("Stream {id}"), &body).into_response())
}

#[derive(Deserialize)]
pub(crate) struct EventQuery {
    stream: Option<String>,
    version: Option<u64>,
    id: Option<Uuid>,
}

/// `/event?stream=&version=`: one `read_stream` of one event. `/event?id=`: a feed scan
/// ([`scan`]) to the event, then a redirect to its page.
pub(crate) async fn event(State(app): State<App>, Query(query): Query<EventQuery>) -> PageResult {
    if let Some(event_id) = query.id {
        let found =
            with_store!(&app.store, s => scan(s, Wanted::Event(event_id), app.scan_limit).await)?;
        return match found.found.first() {
            Some(e) => Ok(
                Redirect::to(&event_href(e.stream_id.as_str(), e.stream_version)).into_response(),
            ),
            None => Err(PageError::NotFound(format!(
                "no event {event_id} in the {} event(s) read{}",
                found.read,
                if found.cut {
                    " (the scan stopped at --scan-limit)"
                } else {
                    " (the whole feed)"
                }
            ))),
        };
    }
    let (Some(stream), Some(version)) = (query.stream.as_deref(), query.version) else {
        return Err(PageError::Bad(
            "name an event: ?stream=<stream>&version=<n>, or ?id=<event id>".to_owned(),
        ));
    };
    let id = parse_stream(stream)?;
    let event = event_at(&app.store, &id, version).await?;
    let m = &event.metadata;
    let custom = if m.custom.is_empty() {
        None
    } else {
        Some(serde_json::to_string_pretty(&m.custom)?)
    };
    let body = html! {
        table #envelope {
            tr { th { "Stream" } td { a href=(stream_href(id.as_str())) { (id.as_str()) } } }
            tr { th { "Version" } td { (event.stream_version) } }
            tr { th { "Global position" } td { (event.global_position) " (partition " (event.partition) ")" } }
            tr { th { "Event id" } td.id { (event.event_id) } }
            tr { th { "Type" } td #type { (event.event_type) "@v" (event.schema_version) } }
            tr { th { "Recorded (UTC)" } td { (time(&event.recorded_at)) } }
            tr { th { "Actor" } td #actor { (m.actor.as_deref().unwrap_or("-")) } }
            tr {
                th { "Correlation" }
                td.id {
                    @if let Some(c) = m.correlation_id {
                        a #correlation href=(format!("/chain?correlation={c}")) { (c) }
                        span.muted { " every event of this correlation" }
                    } @else { "-" }
                }
            }
            tr {
                th { "Causation" }
                td.id {
                    @if let Some(c) = m.causation_id {
                        a #causation href=(format!("/event?id={c}")) { (c) }
                        span.muted { " the event that caused this one" }
                    } @else { "-" }
                }
            }
            tr {
                th { "Caused" }
                td { a #caused href=(format!("/chain?caused_by={}", event.event_id)) { "the events this one caused" } }
            }
        }
        @if let Some(custom) = custom {
            h2 { "Metadata" }
            pre #metadata { (custom) }
        }
        h2 { "Payload" }
        pre #payload { (payload_text(&event)) }
        p.pager {
            @if event.stream_version > 1 {
                a href=(event_href(id.as_str(), event.stream_version - 1)) { "‹ previous event" }
            }
            a href=(event_href(id.as_str(), event.stream_version + 1)) { "next event ›" }
            a href=(format!("/state?stream={}&version={}", q(id.as_str()), event.stream_version)) { "state after this event" }
        }
    };
    Ok(page(
        Some(Section::Streams),
        &format!("{id} version {}", event.stream_version),
        &body,
    )
    .into_response())
}

/// The event at `version` of `stream` (one `read_stream` of one event).
async fn event_at(
    store: &AnyStore,
    stream: &StreamId,
    version: u64,
) -> Result<RecordedEvent, PageError> {
    let events: Vec<RecordedEvent> = with_store!(store, s => {
        s.read_stream(stream, ReadStream::forward().from(version.max(1)).limit(1))
            .try_collect()
            .await
    })?;
    events
        .into_iter()
        .find(|e| e.stream_version == version)
        .ok_or_else(|| PageError::NotFound(format!("stream {stream} has no version {version}")))
}

#[derive(Deserialize)]
pub(crate) struct ChainQuery {
    correlation: Option<Uuid>,
    caused_by: Option<Uuid>,
}

/// `/chain?correlation=` (every event of a correlation) or `/chain?caused_by=` (the events an
/// event caused): a feed scan ([`scan`]).
pub(crate) async fn chain(State(app): State<App>, Query(query): Query<ChainQuery>) -> PageResult {
    let (wanted, title) = match (query.correlation, query.caused_by) {
        (Some(id), None) => (
            Wanted::Correlation(id),
            format!("Correlation {}", short(id)),
        ),
        (None, Some(id)) => (Wanted::CausedBy(id), format!("Caused by {}", short(id))),
        _ => {
            return Err(PageError::Bad(
                "name one id: ?correlation=<id> or ?caused_by=<event id>".to_owned(),
            ))
        }
    };
    let mut found = with_store!(&app.store, s => scan(s, wanted, app.scan_limit).await)?;
    found
        .found
        .sort_by_key(|e| (e.recorded_at, e.partition, e.global_position));
    let body = html! {
        p {
            (found.found.len()) " event(s), found by reading " (found.read) " event(s) of the feed"
            @if found.cut {
                span.warn { " — the scan stopped at --scan-limit: older matches may be missing" }
            } @else { " (all of it)" }
            "."
        }
        @match wanted {
            Wanted::CausedBy(id) => p { "Caused by event " a.id href=(format!("/event?id={id}")) { (id) } "." },
            Wanted::Correlation(id) => p.id { (id) },
            Wanted::Event(_) => {},
        }
        (event_table(&found.found, true))
    };
    Ok(page(Some(Section::Streams), &title, &body).into_response())
}

#[derive(Deserialize)]
pub(crate) struct StateQuery {
    stream: String,
    version: Option<u64>,
}

/// An aggregate's state after one version of its stream.
struct StateView {
    version: u64,
    current: u64,
    /// Whether an aggregate of the stream's category is registered (else `state` is the list
    /// of events up to `version`).
    registered: bool,
    state: Value,
    event: RecordedEvent,
}

/// The state of `stream` after `version` (its last version when `None`): `stream_version`,
/// then the registered aggregate loaded as of that version (its snapshot and events, through
/// the repository with the registered upcasters) and the event at the version; without a
/// registered aggregate, one `read_stream` of the events up to the version.
async fn state_at(
    app: &App,
    stream: &StreamId,
    version: Option<u64>,
) -> Result<StateView, PageError> {
    let current = with_store!(&app.store, s => s.stream_version(stream).await)?;
    if current == 0 {
        return Err(PageError::NotFound(format!(
            "stream {stream} has no events"
        )));
    }
    let version = version.unwrap_or(current).clamp(1, current);
    let as_of = AsOf::Version(version);
    let loaded = match &app.store {
        AnyStore::Postgres(s) => {
            app.registry
                .load_pg(s.clone(), stream.category(), stream.id(), as_of)
                .await
        }
        AnyStore::Redis(s) => {
            app.registry
                .load_redis(s.clone(), stream.category(), stream.id(), as_of)
                .await
        }
    };
    if let Some(loaded) = loaded {
        let (state, _) = loaded?;
        let event = event_at(&app.store, stream, version).await?;
        return Ok(StateView {
            version,
            current,
            registered: true,
            state,
            event,
        });
    }
    let events: Vec<RecordedEvent> = with_store!(&app.store, s => {
        s.read_stream(stream, ReadStream::forward().limit(version))
            .try_collect()
            .await
    })?;
    let state = Value::Array(
        events
            .iter()
            .map(|e| {
                json!({
                    "version": e.stream_version,
                    "type": e.event_type,
                    "payload": e.payload_json().unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&e.payload).into_owned())),
                })
            })
            .collect(),
    );
    let event = events
        .into_iter()
        .last()
        .context("the stream's read returned no event")?;
    Ok(StateView {
        version,
        current,
        registered: false,
        state,
        event,
    })
}

/// `/state?stream=&version=`: [`state_at`], with a slider over the stream's versions.
pub(crate) async fn state(State(app): State<App>, Query(query): Query<StateQuery>) -> PageResult {
    let id = parse_stream(&query.stream)?;
    let view = state_at(&app, &id, query.version).await?;
    let body = html! {
        p {
            "Version " strong #shown { (view.version) } " of " (view.current) " "
            input #version type="range" min="1" max=(view.current) step="1" value=(view.version) data-stream=(id.as_str());
        }
        @if !view.registered {
            p.muted {
                "No aggregate is registered for category " code { (id.category()) }
                ": the state is shown as the events that make it."
            }
        }
        h2 { "State after this version" }
        pre #state { (serde_json::to_string_pretty(&view.state)?) }
        h2 {
            "The event at this version: "
            a #event-link href=(event_href(id.as_str(), view.version)) { span #event-type { (view.event.event_type) } }
            " " span #event-time.muted { (time(&view.event.recorded_at)) }
        }
        pre #event-payload { (payload_text(&view.event)) }
        script { (PreEscaped(SLIDER_JS)) }
    };
    Ok(page(Some(Section::Streams), &format!("State of {id}"), &body).into_response())
}

/// `/api/state?stream=&version=`: [`state_at`] as JSON, for the slider.
pub(crate) async fn state_json(
    State(app): State<App>,
    Query(query): Query<StateQuery>,
) -> PageResult {
    let id = parse_stream(&query.stream)?;
    let view = state_at(&app, &id, query.version).await?;
    Ok(Json(json!({
        "stream": id.as_str(),
        "version": view.version,
        "current": view.current,
        "registered": view.registered,
        "state": view.state,
        "event": {
            "version": view.event.stream_version,
            "type": view.event.event_type,
            "recorded_at": time(&view.event.recorded_at),
            "payload": view.event.payload_json().unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&view.event.payload).into_owned())),
        },
    }))
    .into_response())
}

/// `/projections`: a reading of every projection's lag ([`read_now`]), and the lag chart.
pub(crate) async fn projections(State(app): State<App>) -> PageResult {
    let reading = read_now(&app).await?;
    let body = html! {
        @if app.projections.is_empty() {
            p.muted {
                "No projections to show: the application registers them in its "
                code { "es" } " binary, or name them with " code { "es console --projection NAME" } "."
            }
        } @else {
            table #projections {
                tr { th { "Projection" } th { "Partition" } th { "Checkpoint" } th { "Generation" } th { "Head" } th { "Lag" } }
                @for row in &reading.lags {
                    tr {
                        td { (row.projection) }
                        td.n { @if let Some(p) = row.partition { (p) } @else { "-" } }
                        td.n { (row.position) }
                        td.n { (row.generation) }
                        td.n { (row.head) }
                        td.n.lag id=(format!("lag-{}", row.key())) { (row.lag) }
                    }
                }
            }
        }
        h2 { "Lag (events behind the head), live" }
        svg #lag-chart.chart data-series="lag" width="600" height="140" viewBox="0 0 600 140" {}
        script { (PreEscaped(CHART_JS)) }
    };
    Ok(page(Some(Section::Projections), "Projections", &body).into_response())
}

#[derive(Deserialize)]
pub(crate) struct OutboxQuery {
    requeued: Option<u64>,
}

/// `/outbox`: per outbox, `relay_status`, `pending_outbox` (20) and `dead_letters` (100);
/// the backlog chart.
pub(crate) async fn outbox(State(app): State<App>, Query(query): Query<OutboxQuery>) -> PageResult {
    let outboxes = with_store!(&app.store, s => outbox_view(s).await)?;
    let body = html! {
        @if let Some(n) = query.requeued {
            p #requeued { "Re-queued " (n) " dead letter(s)." }
        }
        h2 { "Backlog, live" }
        svg #backlog-chart.chart data-series="backlog" width="600" height="140" viewBox="0 0 600 140" {}
        @for (index, (status, pending, dead)) in outboxes.iter().enumerate() {
            h2 { "Outbox " (index) }
            table.status {
                tr { th { "Pending" } th { "Dead letters" } th { "Relay lease" } th { "Last error" } }
                tr {
                    td.n.pending { (status.pending) }
                    td.n.dead { (status.dead_letters) }
                    td {
                        @if let Some(l) = &status.lease {
                            (l.owner) " gen " (l.generation) @if l.held { " (held)" } @else { " (free)" }
                        } @else { "-" }
                    }
                    td {
                        @if let Some(e) = &status.last_error {
                            "position " (e.position) " at " (time(&e.at)) ": " (e.error)
                        } @else { "-" }
                    }
                }
            }
            h2 { "Dead letters of outbox " (index) }
            @if dead.is_empty() {
                p.muted { "None." }
            } @else {
                table.dead-letters {
                    tr { th { "Position" } th { "Stream" } th { "Topic" } th { "Type" } th { "Attempts" } th { "Dead since" } th { "Error" } th {} }
                    @for d in dead {
                        tr {
                            td.n { (d.record.position) }
                            td { a href=(stream_href(d.record.stream_id.as_str())) { (d.record.stream_id.as_str()) } }
                            td { (d.record.message.topic) }
                            td { (d.record.message.message_type) }
                            td.n { (d.attempts) }
                            td { (time(&d.dead_at)) }
                            td.error { (d.error) }
                            td { @if app.writable() { (requeue_form(index, Some(d.record.position))) } }
                        }
                    }
                }
                @if app.writable() {
                    p { (requeue_form(index, None)) }
                } @else {
                    p.muted { "Read-only: start the console with " code { "--token" } " to re-queue dead letters." }
                }
            }
            h2 { "Pending records of outbox " (index) " (oldest " (PENDING_SHOWN) ")" }
            @if pending.is_empty() {
                p.muted { "None." }
            } @else {
                table.pending {
                    tr { th { "Position" } th { "Stream" } th { "Topic" } th { "Key" } th { "Type" } th { "Recorded (UTC)" } }
                    @for r in pending {
                        tr {
                            td.n { (r.position) }
                            td { a href=(stream_href(r.stream_id.as_str())) { (r.stream_id.as_str()) } }
                            td { (r.message.topic) }
                            td { (r.message.key) }
                            td { (r.message.message_type) "@v" (r.message.schema_version) }
                            td { (time(&r.recorded_at)) }
                        }
                    }
                }
            }
        }
        script { (PreEscaped(CHART_JS)) }
    };
    Ok(page(Some(Section::Outbox), "Outbox", &body).into_response())
}

type OutboxView = Vec<(
    es_core::RelayStatus,
    Vec<es_core::OutboxRecord>,
    Vec<es_core::DeadLetter>,
)>;

async fn outbox_view<S: StreamingStore>(store: &S) -> anyhow::Result<OutboxView> {
    let mut outboxes = Vec::new();
    for index in 0..store.outbox_partitions() {
        let outbox = store.outbox_partition(index)?;
        outboxes.push((
            outbox.relay_status().await?,
            outbox.pending_outbox(PENDING_SHOWN).await?,
            outbox.dead_letters(DEAD_SHOWN).await?,
        ));
    }
    Ok(outboxes)
}

/// A form re-queueing one dead letter (or all of them with `None`); the token is typed in.
fn requeue_form(outbox: usize, position: Option<u64>) -> Markup {
    html! {
        form.inline method="post" action="/outbox/requeue" {
            input type="hidden" name="outbox" value=(outbox);
            @if let Some(position) = position {
                input type="hidden" name="position" value=(position);
            } @else {
                input type="hidden" name="all" value="1";
            }
            input type="password" name="token" placeholder="token" size="10";
            " "
            button { @if position.is_some() { "re-queue" } @else { "re-queue all" } }
        }
    }
}

#[derive(Deserialize)]
pub(crate) struct RequeueForm {
    #[serde(default)]
    outbox: u32,
    position: Option<u64>,
    all: Option<String>,
    token: Option<String>,
}

/// `POST /outbox/requeue` (form: `outbox`, `position` or `all`, `token`; or the token as
/// `Authorization: Bearer`): refused with 401 without a token, 403 with a wrong one or when
/// the console has none; then `requeue_dead_letters` (after one `dead_letters` read for
/// `all`), and a redirect to the outbox page.
pub(crate) async fn requeue(
    State(app): State<App>,
    headers: HeaderMap,
    Form(form): Form<RequeueForm>,
) -> PageResult {
    if let Err(refusal) = app.authorize(&headers, form.token.as_deref()) {
        return Ok(refusal.into_response());
    }
    let all = form.all.is_some();
    let positions: Vec<u64> = match (form.position, all) {
        (Some(position), false) => vec![position],
        (None, true) => Vec::new(),
        _ => {
            return Err(PageError::Bad(
                "name one dead letter (`position`) or all of them (`all`)".to_owned(),
            ))
        }
    };
    let requeued = with_store!(&app.store, s => {
        requeue_on(s, form.outbox, all, positions).await
    })?;
    Ok(Redirect::to(&format!("/outbox?requeued={requeued}")).into_response())
}

async fn requeue_on<S: StreamingStore>(
    store: &S,
    outbox: u32,
    all: bool,
    mut positions: Vec<u64>,
) -> anyhow::Result<u64> {
    let outbox = store.outbox_partition(outbox)?;
    if all {
        positions = outbox
            .dead_letters(u64::MAX)
            .await?
            .iter()
            .map(|d| d.record.position)
            .collect();
    }
    Ok(outbox.requeue_dead_letters(&positions).await?)
}
