//! The pages' frame, their style and scripts, and the small pieces every page shows.
//!
//! Every value is interpolated with maud's `(...)`, which HTML-escapes it; `PreEscaped` is used
//! for the console's own constant CSS and JavaScript only.

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use chrono::{DateTime, Utc};
use es_core::RecordedEvent;
use maud::{html, Markup, PreEscaped, DOCTYPE};
use uuid::Uuid;

const CSS: &str = "
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d2430;background:#f6f7f9}
nav{background:#1d2430;padding:8px 16px}nav a{color:#dfe6f0;margin-right:18px;text-decoration:none;font-weight:600}
nav a.here{color:#fff;border-bottom:2px solid #6cb2ff}
main{padding:12px 20px}h1{font-size:20px;margin:6px 0 12px}h2{font-size:16px;margin:18px 0 8px}
table{border-collapse:collapse;background:#fff;margin-bottom:8px}
th,td{border:1px solid #d8dde5;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef1f5}td.n{text-align:right;font-variant-numeric:tabular-nums}
code,pre,.id{font-family:ui-monospace,monospace;font-size:12px}
pre{background:#fff;border:1px solid #d8dde5;padding:8px;max-width:1100px;overflow:auto;white-space:pre-wrap}
a{color:#0b5cad}.muted{color:#667}.warn{color:#a33;font-weight:600}
.pager a{margin-right:12px}form.inline{display:inline}
svg.chart{background:#fff;border:1px solid #d8dde5}
input[type=range]{width:420px;vertical-align:middle}
";

/// The live charts: polls `/api/live` and draws each `svg[data-series]` from the samples.
pub(crate) const CHART_JS: &str = r"
const colors=['#0b5cad','#c2410c','#15803d','#7e22ce','#b91c1c','#0e7490'];
function draw(svg,data){
  const kind=svg.dataset.series,W=600,H=140,n=data.samples.length,series=new Map();
  data.samples.forEach((s,i)=>{for(const [k,v] of Object.entries(s[kind])){
    if(!series.has(k))series.set(k,[]);series.get(k).push([i,v]);}});
  let top=1;series.forEach(p=>p.forEach(([,v])=>{if(v>top)top=v;}));
  const max=Math.ceil(top*1.25);
  while(svg.firstChild)svg.removeChild(svg.firstChild);
  const ns='http://www.w3.org/2000/svg';let j=0;
  const label=document.createElementNS(ns,'text');
  label.setAttribute('x',4);label.setAttribute('y',12);label.setAttribute('font-size',11);
  label.textContent='top '+max+' · last '+n+' samples';svg.appendChild(label);
  series.forEach((pts,name)=>{
    const line=document.createElementNS(ns,'polyline');
    line.setAttribute('fill','none');line.setAttribute('stroke',colors[j%colors.length]);
    line.setAttribute('stroke-width',2);line.setAttribute('data-name',name);
    line.setAttribute('points',pts.map(([i,v])=>
      ((n>1?i*W/(n-1):0).toFixed(1)+','+(H-4-v*(H-20)/max).toFixed(1))).join(' '));
    svg.appendChild(line);
    const key=document.createElementNS(ns,'text');
    key.setAttribute('x',W-190);key.setAttribute('y',14+14*j);key.setAttribute('font-size',11);
    key.setAttribute('fill',colors[j%colors.length]);
    key.textContent=name+': '+pts[pts.length-1][1];svg.appendChild(key);j++;});
  svg.setAttribute('data-samples',n);
}
async function poll(){
  try{const r=await fetch('/api/live');const d=await r.json();
    document.querySelectorAll('svg[data-series]').forEach(s=>draw(s,d));}catch(e){}
}
poll();setInterval(poll,2000);
";

/// The state slider: shows the aggregate's state at the slider's version, fetched from
/// `/api/state`; a `#v=N` fragment moves it there on load.
pub(crate) const SLIDER_JS: &str = r"
const slider=document.getElementById('version');
const stream=slider.dataset.stream;
async function show(v){
  const r=await fetch('/api/state?stream='+encodeURIComponent(stream)+'&version='+v);
  if(!r.ok)return;
  const d=await r.json();
  document.getElementById('shown').textContent=d.version;
  document.getElementById('state').textContent=JSON.stringify(d.state,null,2);
  document.getElementById('event-type').textContent=d.event.type;
  document.getElementById('event-time').textContent=d.event.recorded_at;
  document.getElementById('event-payload').textContent=JSON.stringify(d.event.payload,null,2);
  const link=document.getElementById('event-link');
  link.href='/event?stream='+encodeURIComponent(stream)+'&version='+d.version;
  slider.value=d.version;
  history.replaceState(null,'','/state?stream='+encodeURIComponent(stream)+'&version='+d.version);
}
slider.addEventListener('input',()=>show(slider.value));
const m=location.hash.match(/^#v=(\d+)$/);if(m)show(m[1]);
";

/// Which section of the console a page belongs to (highlighted in the menu).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Section {
    Streams,
    Projections,
    Outbox,
}

/// A whole page: the menu, the title and `body`.
pub(crate) fn page(section: Option<Section>, title: &str, body: &Markup) -> Html<String> {
    let here = |s: Section| if section == Some(s) { "here" } else { "" };
    Html(
        html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    title { (title) " · es console" }
                    style { (PreEscaped(CSS)) }
                }
                body {
                    nav {
                        a class=(here(Section::Streams)) href="/streams" { "Streams" }
                        a class=(here(Section::Projections)) href="/projections" { "Projections" }
                        a class=(here(Section::Outbox)) href="/outbox" { "Outbox" }
                        a href="/metrics" { "Metrics" }
                    }
                    main {
                        h1 { (title) }
                        (body)
                    }
                }
            }
        }
        .into_string(),
    )
}

/// An error page with `status`.
pub(crate) fn error_page(status: StatusCode, text: &str) -> Response {
    let title = status.canonical_reason().unwrap_or("Error");
    (
        status,
        page(None, title, &html! { p.warn id="error" { (text) } }),
    )
        .into_response()
}

/// `text` percent-encoded for a query string.
pub(crate) fn q(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// The link to an event's page.
pub(crate) fn event_href(stream: &str, version: u64) -> String {
    format!("/event?stream={}&version={version}", q(stream))
}

/// The link to a stream's page.
pub(crate) fn stream_href(stream: &str) -> String {
    format!("/stream?id={}", q(stream))
}

pub(crate) fn time(at: &DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S%.3f").to_string()
}

/// A correlation id, linked to the events that share it.
pub(crate) fn correlation(id: Option<Uuid>) -> Markup {
    html! {
        @if let Some(id) = id {
            a.id href=(format!("/chain?correlation={id}")) title=(format!("{id}: every event of this correlation")) { (short(id)) }
        } @else {
            span.muted { "-" }
        }
    }
}

/// A causation id, linked to the event it names.
pub(crate) fn causation(id: Option<Uuid>) -> Markup {
    html! {
        @if let Some(id) = id {
            a.id href=(format!("/event?id={id}")) title=(format!("{id}: the event that caused this one")) { (short(id)) }
        } @else {
            span.muted { "-" }
        }
    }
}

/// The last 8 hex digits of an id (its random part in a version 7 UUID, whose first digits are a
/// timestamp shared by ids made close together); the whole id is in the link and its title.
pub(crate) fn short(id: Uuid) -> String {
    id.simple().to_string()[24..].to_owned()
}

/// The event's payload as indented JSON (as text when it is not JSON).
pub(crate) fn payload_text(event: &RecordedEvent) -> String {
    match event.payload_json() {
        Ok(value) => serde_json::to_string_pretty(&value).unwrap_or_default(),
        Err(_) => String::from_utf8_lossy(&event.payload).into_owned(),
    }
}

/// A table of events: version, stream, position, type, time, event id, correlation, causation,
/// actor.
pub(crate) fn event_table(events: &[RecordedEvent], with_stream: bool) -> Markup {
    html! {
        table.events {
            tr {
                th { "Version" } @if with_stream { th { "Stream" } } th { "Position" } th { "Type" }
                th { "Recorded (UTC)" } th { "Event" } th { "Correlation" } th { "Causation" } th { "Actor" }
            }
            @for e in events {
                tr {
                    td.n { a href=(event_href(e.stream_id.as_str(), e.stream_version)) { (e.stream_version) } }
                    @if with_stream { td { a href=(stream_href(e.stream_id.as_str())) { (e.stream_id.as_str()) } } }
                    td.n { (e.global_position) }
                    td { (e.event_type) "@v" (e.schema_version) }
                    td { (time(&e.recorded_at)) }
                    td.id title=(e.event_id) { (short(e.event_id)) }
                    td { (correlation(e.metadata.correlation_id)) }
                    td { (causation(e.metadata.causation_id)) }
                    td { (e.metadata.actor.as_deref().unwrap_or("-")) }
                }
            }
        }
    }
}
