//! Tables and JSON lines on standard output.

use std::io::Write;

use es_core::RecordedEvent;
use serde_json::{json, Value};

/// A table printed with aligned columns; the last column is never padded.
pub(crate) struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new(header: &[&'static str]) -> Self {
        Self {
            header: header.to_vec(),
            rows: Vec::new(),
        }
    }

    pub(crate) fn row(&mut self, row: Vec<String>) {
        self.rows.push(row);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Prints the table to `out`.
    pub(crate) fn print(&self, out: &mut impl Write) -> std::io::Result<()> {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(cell.chars().count());
                }
            }
        }
        let line = |out: &mut dyn Write, cells: &mut dyn Iterator<Item = &str>| {
            let cells: Vec<&str> = cells.collect();
            let mut text = String::new();
            for (i, cell) in cells.iter().enumerate() {
                if i + 1 == cells.len() {
                    text.push_str(cell);
                } else {
                    let pad = widths[i].saturating_sub(cell.chars().count());
                    text.push_str(cell);
                    text.push_str(&" ".repeat(pad + 2));
                }
            }
            writeln!(out, "{}", text.trim_end())
        };
        line(out, &mut self.header.iter().copied())?;
        for row in &self.rows {
            line(out, &mut row.iter().map(String::as_str))?;
        }
        Ok(())
    }
}

/// Prints `value` as one line of JSON.
pub(crate) fn json_line(out: &mut impl Write, value: &Value) -> std::io::Result<()> {
    writeln!(out, "{value}")
}

/// An event as a JSON object: the envelope, the metadata and the payload (as JSON when it is
/// JSON, as text otherwise).
pub(crate) fn event_json(event: &RecordedEvent) -> Value {
    json!({
        "position": event.global_position,
        "partition": event.partition,
        "stream": event.stream_id.as_str(),
        "version": event.stream_version,
        "event_id": event.event_id.to_string(),
        "type": event.event_type,
        "schema_version": event.schema_version,
        "recorded_at": event.recorded_at.to_rfc3339(),
        "correlation_id": event.metadata.correlation_id.map(|id| id.to_string()),
        "causation_id": event.metadata.causation_id.map(|id| id.to_string()),
        "actor": event.metadata.actor,
        "metadata": event.metadata.custom,
        "payload": payload(event),
    })
}

fn payload(event: &RecordedEvent) -> Value {
    event
        .payload_json()
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&event.payload).into_owned()))
}

/// The columns of [`event_row`].
pub(crate) const EVENT_HEADER: &[&str] = &[
    "POSITION",
    "STREAM",
    "VERSION",
    "TYPE",
    "RECORDED_AT",
    "CORRELATION",
    "CAUSATION",
    "ACTOR",
    "PAYLOAD",
];

/// An event as a table row.
pub(crate) fn event_row(event: &RecordedEvent) -> Vec<String> {
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
    vec![
        event.global_position.to_string(),
        event.stream_id.to_string(),
        event.stream_version.to_string(),
        format!("{}@v{}", event.event_type, event.schema_version),
        event
            .recorded_at
            .format("%Y-%m-%dT%H:%M:%S%.6fZ")
            .to_string(),
        or_dash(event.metadata.correlation_id.map(|id| id.to_string())),
        or_dash(event.metadata.causation_id.map(|id| id.to_string())),
        or_dash(event.metadata.actor.clone()),
        payload(event).to_string(),
    ]
}
