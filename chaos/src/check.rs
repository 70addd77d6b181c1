//! The checks: the recorded history of a run against what the store holds at the end.
//!
//! Every violation is reported with what is needed to find it again: the stream, versions,
//! positions, the writer, task and request (ids map back to them, see [`crate::ids`]), and which
//! process saw it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;

use es_core::contract::position::{epoch_of, EpochStart};

use crate::ids::{self, Kind, ReqKey};
use crate::logs::{Published, SubscriberLog, WriterLine};

/// One event of the final feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FeedEvent {
    /// Global position.
    pub(crate) position: u64,
    /// Event id.
    pub(crate) id: u128,
    /// Stream.
    pub(crate) stream: String,
    /// Stream version.
    pub(crate) version: u64,
}

/// An acknowledged attempt of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ack {
    /// Stream version after the append.
    pub(crate) version: u64,
    /// Positions of the events.
    pub(crate) positions: Vec<u64>,
    /// Reported as an idempotent retry.
    pub(crate) duplicate: bool,
    /// A re-send after an earlier acknowledgement.
    pub(crate) after_ok: bool,
}

/// What the writer logs say about one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Request {
    /// Stream.
    pub(crate) stream: String,
    /// Number of events.
    pub(crate) events: u16,
    /// Indices of the events with an outbox message.
    pub(crate) outbox: Vec<u16>,
    /// Acknowledged attempts.
    pub(crate) acks: Vec<Ack>,
    /// The error kind of each failed attempt.
    pub(crate) errors: Vec<String>,
    /// Final outcome, if the writer recorded one.
    pub(crate) end: Option<String>,
}

/// A read model at the end of the run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Model {
    /// Its name in reports.
    pub(crate) name: String,
    /// Stream → (events counted, last version applied).
    pub(crate) rows: BTreeMap<String, (u64, u64)>,
    /// Versions it did not expect, as it recorded them.
    pub(crate) gaps: Vec<String>,
    /// Counts only the events of these writers (an inline projection runs in some writers
    /// only); its last versions are not compared.
    pub(crate) only_writers: Option<BTreeSet<u16>>,
    /// Consumes only this category.
    pub(crate) only_category: Option<String>,
}

/// A subscriber's log with its settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Subscriber {
    /// Its name in reports.
    pub(crate) name: String,
    /// The category it filters on, if any.
    pub(crate) category: Option<String>,
    /// What it logged.
    pub(crate) log: SubscriberLog,
}

/// Everything recorded in a run, and the store's final state.
#[derive(Debug, Clone, Default)]
pub(crate) struct History {
    /// The final feed, from position 0.
    pub(crate) feed: Vec<FeedEvent>,
    /// The position of the orchestrator's end marker.
    pub(crate) marker: Option<u64>,
    /// Every request the writers logged.
    pub(crate) requests: BTreeMap<ReqKey, Request>,
    /// Violations the writers logged: (kind, detail).
    pub(crate) writer_violations: Vec<(String, String)>,
    /// Faults the writers injected themselves, by kind.
    pub(crate) injected: BTreeMap<String, u64>,
    /// Writer process starts.
    pub(crate) writer_starts: u64,
    /// The slowest acknowledged attempt and the slowest failed one, in milliseconds.
    pub(crate) slowest: (u64, u64),
    /// The writers' append time-out, in milliseconds.
    pub(crate) append_timeout_ms: u64,
    /// Attempts a writer's injected fault had to fail (an inline projection failure, a
    /// statement time-out, a stall past the append time-out) that did fail.
    pub(crate) failed_as_injected: u64,
    /// The subscribers.
    pub(crate) subscribers: Vec<Subscriber>,
    /// The read models.
    pub(crate) models: Vec<Model>,
    /// Every record the relays published.
    pub(crate) published: Vec<Published>,
    /// Failures consumers logged: (process, kind, message).
    pub(crate) consumer_failures: Vec<(String, String, String)>,
    /// Records left in the outbox at the end.
    pub(crate) outbox_left: u64,
    /// Records the relays parked as dead letters (none may be: the publisher never rejects).
    pub(crate) dead_letters: Vec<String>,
    /// The store's epoch starts.
    pub(crate) epochs: Vec<EpochStart>,
    /// Violations the orchestrator saw itself: (kind, detail).
    pub(crate) notes: Vec<(String, String)>,
}

impl History {
    /// Adds writer `writer`'s log.
    pub(crate) fn add_writer_log(&mut self, writer: u16, lines: Vec<WriterLine>) {
        let key = |task: u8, seq: u64| ReqKey { writer, task, seq };
        // (task, seq, attempt) → the injected fault that must fail that attempt.
        let mut must_fail: HashMap<(u8, u64, u32), (String, u64)> = HashMap::new();
        for line in lines {
            match line {
                WriterLine::Start { .. } => {
                    self.writer_starts += 1;
                    // Attempts in flight died with the previous process.
                    must_fail.clear();
                }
                WriterLine::Req {
                    t,
                    s,
                    stream,
                    n,
                    ob,
                    ..
                } => {
                    let request = self.requests.entry(key(t, s)).or_default();
                    request.stream = stream;
                    request.events = n;
                    request.outbox = ob;
                }
                WriterLine::Ack {
                    t,
                    s,
                    a,
                    v,
                    p,
                    dup,
                    after_ok,
                    ms,
                } => {
                    self.slowest.0 = self.slowest.0.max(ms);
                    if let Some((what, injected)) = must_fail.remove(&(t, s, a)) {
                        self.writer_violations.push((
                            "injected_fault_acknowledged".into(),
                            format!(
                                "writer {writer}: attempt {a} of {} got `{what}` ({injected} ms; \
                                 append time-out {} ms) inside its transaction and was still \
                                 acknowledged as version {v} at {}",
                                key(t, s),
                                self.append_timeout_ms,
                                short(&p)
                            ),
                        ));
                    }
                    self.requests.entry(key(t, s)).or_default().acks.push(Ack {
                        version: v,
                        positions: p,
                        duplicate: dup,
                        after_ok,
                    });
                }
                WriterLine::Err { t, s, a, e, ms, .. } => {
                    self.slowest.1 = self.slowest.1.max(ms);
                    if must_fail.remove(&(t, s, a)).is_some() {
                        self.failed_as_injected += 1;
                    }
                    self.requests.entry(key(t, s)).or_default().errors.push(e);
                }
                WriterLine::End { t, s, r } => {
                    self.requests.entry(key(t, s)).or_default().end = Some(r);
                }
                WriterLine::Inj {
                    what, t, s, a, ms, ..
                } => {
                    let ms = ms.unwrap_or(0);
                    let fatal = match what.as_str() {
                        "inline_fail" | "stmt_timeout" => true,
                        "stall_idle" | "stall_sleep" => ms > self.append_timeout_ms,
                        _ => false,
                    };
                    if let (true, Some(t), Some(s), Some(a)) = (fatal, t, s, a) {
                        must_fail.insert((t, s, a), (what.clone(), ms));
                    }
                    *self.injected.entry(what).or_default() += 1;
                }
                WriterLine::Viol { what, detail } => self
                    .writer_violations
                    .push((what, format!("writer {writer}: {detail}"))),
            }
        }
    }
}

/// Counts and violations of one run.
#[derive(Debug, Clone, Default)]
pub(crate) struct Report {
    /// Named counts.
    pub(crate) counts: BTreeMap<String, u64>,
    /// Violations by kind, with details.
    pub(crate) violations: BTreeMap<String, Vec<String>>,
}

/// Details printed per violation kind.
const SHOWN: usize = 12;

impl Report {
    /// Adds `n` to count `name`.
    pub(crate) fn add(&mut self, name: &str, n: u64) {
        *self.counts.entry(name.to_owned()).or_default() += n;
    }

    /// Records a violation.
    pub(crate) fn violation(&mut self, kind: &str, detail: String) {
        self.violations
            .entry(kind.to_owned())
            .or_default()
            .push(detail);
    }

    /// Number of violations.
    pub(crate) fn total(&self) -> usize {
        self.violations.values().map(Vec::len).sum()
    }

    /// The violations of `kind`.
    #[cfg(test)]
    pub(crate) fn of(&self, kind: &str) -> usize {
        self.violations.get(kind).map_or(0, Vec::len)
    }

    /// The report as text.
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        let width = self.counts.keys().map(String::len).max().unwrap_or(0);
        for (name, n) in &self.counts {
            let _ = writeln!(out, "  {name:<width$}  {n}");
        }
        if self.violations.is_empty() {
            let _ = writeln!(out, "  violations: none");
        } else {
            let _ = writeln!(out, "  violations: {}", self.total());
            for (kind, details) in &self.violations {
                let _ = writeln!(out, "    {kind}: {}", details.len());
                for d in details.iter().take(SHOWN) {
                    let _ = writeln!(out, "      - {d}");
                }
                if details.len() > SHOWN {
                    let _ = writeln!(out, "      ... and {} more", details.len() - SHOWN);
                }
            }
        }
        out
    }
}

/// Each distinct item with how often it occurs, in first-occurrence order.
fn counted<T: Clone + PartialEq>(items: &[T]) -> Vec<(T, usize)> {
    let mut out: Vec<(T, usize)> = Vec::new();
    for item in items {
        match out.iter_mut().find(|(seen, _)| seen == item) {
            Some((_, n)) => *n += 1,
            None => out.push((item.clone(), 1)),
        }
    }
    out
}

fn times(n: usize) -> String {
    if n > 1 {
        format!(" ({n} times)")
    } else {
        String::new()
    }
}

fn category(stream: &str) -> &str {
    stream.split_once('-').map_or(stream, |(c, _)| c)
}

/// Runs every check.
pub(crate) fn check(history: &History) -> Report {
    let mut report = Report::default();
    let index = check_feed(history, &mut report);
    check_requests(history, &index, &mut report);
    check_subscribers(history, &index, &mut report);
    check_models(history, &mut report);
    check_outbox(history, &index, &mut report);
    check_epochs(history, &mut report);
    for (kind, detail) in &history.writer_violations {
        report.violation(kind, detail.clone());
    }
    for ((process, kind, message), n) in counted(&history.consumer_failures) {
        let kind = match kind.as_str() {
            "F" => "projection_failed",
            _ => "consumer_failed",
        };
        report.violation(kind, format!("{process}: {message}{}", times(n)));
    }
    for (kind, detail) in &history.notes {
        report.violation(kind, detail.clone());
    }
    for (what, n) in &history.injected {
        report.add(&format!("writer-injected {what}"), *n);
    }
    report.add("writer process starts", history.writer_starts);
    report.add("slowest acknowledged attempt ms", history.slowest.0);
    report.add("slowest failed attempt ms", history.slowest.1);
    report.add(
        "attempts failed by a fault injected in their transaction",
        history.failed_as_injected,
    );
    report
}

/// The feed on its own: positions strictly increase, ids are unique, each stream's versions
/// run 1, 2, 3, ... in feed order, and every event belongs to a logged request. Returns the
/// index of each event id in the feed.
fn check_feed(history: &History, report: &mut Report) -> HashMap<u128, usize> {
    let feed = &history.feed;
    report.add("feed events", feed.len() as u64);
    let mut index = HashMap::with_capacity(feed.len());
    let mut last_version: HashMap<&str, u64> = HashMap::new();
    for (i, e) in feed.iter().enumerate() {
        if i > 0 && feed[i - 1].position >= e.position {
            let p = &feed[i - 1];
            report.violation(
                "feed_order",
                format!(
                    "position {} (`{}` v{}) follows position {} (`{}` v{})",
                    e.position, e.stream, e.version, p.position, p.stream, p.version
                ),
            );
        }
        if let Some(first) = index.insert(e.id, i) {
            report.violation(
                "feed_duplicate_event",
                format!(
                    "event {:032x} stored at positions {} and {}",
                    e.id, feed[first].position, e.position
                ),
            );
        }
        let last = last_version.entry(e.stream.as_str()).or_default();
        if e.version != *last + 1 {
            report.violation(
                "stream_version_gap",
                format!(
                    "`{}`: version {} at position {} follows version {}",
                    e.stream, e.version, e.position, *last
                ),
            );
        }
        *last = (*last).max(e.version);
        match ids::decode(e.id) {
            Some((Kind::Control, _, _)) => {}
            Some((Kind::Event, key, i)) => match history.requests.get(&key) {
                Some(r) if i < r.events && r.stream == e.stream => {}
                Some(r) => report.violation(
                    "phantom_event",
                    format!(
                        "position {} (`{}` v{}) holds event {i} of {key}, which appended {} \
                         events to `{}`",
                        e.position, e.stream, e.version, r.events, r.stream
                    ),
                ),
                None => report.violation(
                    "phantom_event",
                    format!(
                        "position {} (`{}` v{}) holds event {i} of {key}, which no writer \
                         logged",
                        e.position, e.stream, e.version
                    ),
                ),
            },
            _ => report.violation(
                "phantom_event",
                format!(
                    "position {} (`{}` v{}) holds event {:032x}, not made by a writer",
                    e.position, e.stream, e.version, e.id
                ),
            ),
        }
    }
    report.add("streams", last_version.len() as u64);
    index
}

/// Every request against the feed: acknowledged ones stored exactly as acknowledged, refused
/// ones absent, the others whole or absent.
fn check_requests(history: &History, index: &HashMap<u128, usize>, report: &mut Report) {
    let feed = &history.feed;
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let (mut attempts, mut retried, mut resent, mut acked_events) = (0u64, 0u64, 0u64, 0u64);
    for (key, request) in &history.requests {
        let n = usize::from(request.events);
        let stored: Vec<Option<&FeedEvent>> = (0..request.events)
            .map(|i| {
                index
                    .get(&ids::event_id(*key, i).as_u128())
                    .map(|&j| &feed[j])
            })
            .collect();
        let present = stored.iter().flatten().count();
        let positions = || -> Vec<u64> { stored.iter().flatten().map(|e| e.position).collect() };
        attempts += (request.acks.len() + request.errors.len()) as u64;
        retried += u64::from(request.acks.len() + request.errors.len() > 1);
        for e in &request.errors {
            *errors.entry(e.clone()).or_default() += 1;
        }
        if present > 0 && present < n {
            let missing: Vec<usize> = (0..n).filter(|&i| stored[i].is_none()).take(8).collect();
            report.violation(
                "partial_batch",
                format!(
                    "{key} to `{}`: {present} of {n} events stored (at {:?}); missing event \
                     indices {missing:?}",
                    request.stream,
                    positions()
                ),
            );
        }
        let outcome = if let Some(first) = request.acks.first() {
            acked_events += n as u64;
            resent += request.acks.iter().filter(|a| a.after_ok).count() as u64;
            check_acks(key, request, first, &stored, report);
            "acknowledged".to_owned()
        } else {
            match request.end.as_deref() {
                Some(reason @ ("conflict" | "inline" | "duplicate" | "invalid")) => {
                    if present > 0 {
                        report.violation(
                            "refused_but_stored",
                            format!(
                                "{key} to `{}` ended as `{reason}` (errors {:?}), yet {present} \
                                 of its events are stored at {:?}",
                                request.stream,
                                request.errors,
                                short(&positions())
                            ),
                        );
                    }
                    format!("refused ({reason})")
                }
                end => {
                    let how = if end.is_some() { "gave up" } else { "cut off" };
                    if present == n {
                        format!("unknown outcome, {how}: stored")
                    } else {
                        format!("unknown outcome, {how}: absent")
                    }
                }
            }
        };
        *outcomes.entry(outcome).or_default() += 1;
    }
    report.add("requests", history.requests.len() as u64);
    for (outcome, n) in outcomes {
        report.add(&format!("requests {outcome}"), n);
    }
    report.add("events acknowledged", acked_events);
    report.add("attempts", attempts);
    report.add("requests sent more than once", retried);
    report.add("re-sends after success", resent);
    for (kind, n) in errors {
        report.add(&format!("attempt errors {kind}"), n);
    }
}

fn short(positions: &[u64]) -> String {
    if positions.len() <= 6 {
        format!("{positions:?}")
    } else {
        format!(
            "[{}, {}, {} .. {}] ({} positions)",
            positions[0],
            positions[1],
            positions[2],
            positions[positions.len() - 1],
            positions.len()
        )
    }
}

/// Each acknowledgement of a request gives the stored versions and positions, and all of them
/// agree; re-sends after success are reported as duplicates.
fn check_acks(
    key: &ReqKey,
    request: &Request,
    first: &Ack,
    stored: &[Option<&FeedEvent>],
    report: &mut Report,
) {
    let n = stored.len() as u64;
    for ack in &request.acks {
        if ack.version != first.version || ack.positions != first.positions {
            report.violation(
                "retry_mismatch",
                format!(
                    "{key} to `{}`: acknowledged as version {} at {} and as version {} at {}",
                    request.stream,
                    first.version,
                    short(&first.positions),
                    ack.version,
                    short(&ack.positions)
                ),
            );
        }
        if ack.after_ok && !ack.duplicate {
            report.violation(
                "retry_mismatch",
                format!(
                    "{key} to `{}`: re-sent after success and written again (version {} at {})",
                    request.stream,
                    ack.version,
                    short(&ack.positions)
                ),
            );
        }
    }
    let present = stored.iter().flatten().count();
    if present < stored.len() {
        let missing: Vec<String> = (0..stored.len())
            .filter(|&i| stored[i].is_none())
            .take(8)
            .map(|i| {
                format!(
                    "#{i} at {}",
                    first.positions.get(i).copied().unwrap_or_default()
                )
            })
            .collect();
        report.violation(
            "lost_acknowledged_append",
            format!(
                "{key}: {n} events acknowledged to `{}` as version {} at {}; {} missing: {}",
                request.stream,
                first.version,
                short(&first.positions),
                stored.len() - present,
                missing.join(", ")
            ),
        );
    }
    let first_version = (first.version + 1).saturating_sub(n);
    for (i, e) in stored.iter().enumerate() {
        let Some(e) = e else { continue };
        let acked = first.positions.get(i).copied();
        let version = first_version + i as u64;
        if acked != Some(e.position) || e.version != version || e.stream != request.stream {
            report.violation(
                "acknowledged_differently",
                format!(
                    "{key} event #{i}: acknowledged in `{}` as version {version} at {acked:?}, \
                     stored in `{}` as version {} at {}",
                    request.stream, e.stream, e.version, e.position
                ),
            );
        }
    }
}

/// Each subscriber delivered exactly the feed (of its category) up to the end marker, once, in
/// strictly increasing positions.
fn check_subscribers(history: &History, index: &HashMap<u128, usize>, report: &mut Report) {
    for sub in &history.subscribers {
        let name = &sub.name;
        let delivered = &sub.log.delivered;
        report.add(&format!("{name} deliveries"), delivered.len() as u64);
        report.add(
            &format!("{name} restarts"),
            sub.log.resumed.len().saturating_sub(1) as u64,
        );
        let mut seen: HashSet<u128> = HashSet::with_capacity(delivered.len());
        for (i, d) in delivered.iter().enumerate() {
            if i > 0 && delivered[i - 1].position >= d.position {
                report.violation(
                    "subscriber_order",
                    format!(
                        "{name}: delivered position {} (`{}` v{}) after position {}",
                        d.position,
                        d.stream,
                        d.version,
                        delivered[i - 1].position
                    ),
                );
            }
            if !seen.insert(d.id) {
                report.violation(
                    "subscriber_duplicate",
                    format!(
                        "{name}: delivered event {:032x} (`{}` v{} at {}) twice",
                        d.id, d.stream, d.version, d.position
                    ),
                );
            }
            if sub
                .category
                .as_deref()
                .is_some_and(|c| category(&d.stream) != c)
            {
                report.violation(
                    "subscriber_filter",
                    format!(
                        "{name}: delivered `{}` v{} at {} outside its category",
                        d.stream, d.version, d.position
                    ),
                );
            }
            match index.get(&d.id).map(|&j| &history.feed[j]) {
                None => report.violation(
                    "subscriber_phantom",
                    format!(
                        "{name}: delivered `{}` v{} at {} (event {:032x}), which the store does \
                         not hold at the end",
                        d.stream, d.version, d.position, d.id
                    ),
                ),
                Some(e)
                    if e.position != d.position
                        || e.stream != d.stream
                        || e.version != d.version =>
                {
                    report.violation(
                        "subscriber_mismatch",
                        format!(
                            "{name}: delivered event {:032x} as `{}` v{} at {}; stored as `{}` \
                             v{} at {}",
                            d.id, d.stream, d.version, d.position, e.stream, e.version, e.position
                        ),
                    );
                }
                Some(_) => {}
            }
        }
        report_skips(history, sub, &seen, report);
        for ((kind, message), n) in counted(&sub.log.errors) {
            let kind = if kind == "lost_tail" {
                "lost_tail"
            } else {
                "subscriber_error"
            };
            report.violation(kind, format!("{name}: {message}{}", times(n)));
        }
    }
}

/// Every event of `sub`'s category up to the end marker that it did not deliver, with the
/// positions it delivered around it.
fn report_skips(history: &History, sub: &Subscriber, seen: &HashSet<u128>, report: &mut Report) {
    let end = history.marker.unwrap_or(u64::MAX);
    let positions: Vec<u64> = sub.log.delivered.iter().map(|d| d.position).collect();
    let last = positions.last().copied().unwrap_or(0);
    let mut unreached: Option<(&FeedEvent, u64)> = None;
    for e in &history.feed {
        if e.position > end
            || sub
                .category
                .as_deref()
                .is_some_and(|c| category(&e.stream) != c)
            || seen.contains(&e.id)
        {
            continue;
        }
        if e.position > last {
            // Never reached: reported once, below.
            let (_, n) = unreached.get_or_insert((e, 0));
            *n += 1;
            continue;
        }
        let at = positions.partition_point(|&p| p < e.position);
        let before = at.checked_sub(1).map(|i| positions[i]);
        let after = positions.get(at).copied();
        report.violation(
            "subscriber_skip",
            format!(
                "{}: never delivered `{}` v{} at position {} (event {}); it delivered {} then {}",
                sub.name,
                e.stream,
                e.version,
                e.position,
                describe(e.id),
                before.map_or("nothing".to_owned(), |p| p.to_string()),
                after.map_or("nothing".to_owned(), |p| p.to_string()),
            ),
        );
    }
    if let Some((first, n)) = unreached {
        let why = sub.log.errors.last().map_or_else(
            || "without an error".to_owned(),
            |(kind, message)| format!("on `{kind}`: {message}"),
        );
        report.violation(
            "subscriber_incomplete",
            format!(
                "{}: stopped after position {last} {why}; {n} later events never delivered, the \
                 first `{}` v{} at {}",
                sub.name, first.stream, first.version, first.position
            ),
        );
    }
}

/// Names an event id's origin.
fn describe(id: u128) -> String {
    match ids::decode(id) {
        Some((Kind::Event, key, i)) => format!("#{i} of {key}"),
        Some((Kind::Control, _, _)) => "the end marker".to_owned(),
        _ => format!("{id:032x}"),
    }
}

/// Each read model equals a replay of the final feed.
fn check_models(history: &History, report: &mut Report) {
    for model in &history.models {
        let mut expected: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for e in &history.feed {
            if model
                .only_category
                .as_deref()
                .is_some_and(|c| category(&e.stream) != c)
            {
                continue;
            }
            if let Some(writers) = &model.only_writers {
                match ids::decode(e.id) {
                    Some((Kind::Event, key, _)) if writers.contains(&key.writer) => {}
                    _ => continue,
                }
            }
            let row = expected.entry(e.stream.as_str()).or_default();
            row.0 += 1;
            row.1 = row.1.max(e.version);
        }
        report.add(&format!("{} rows", model.name), model.rows.len() as u64);
        let streams: BTreeSet<&str> = expected
            .keys()
            .copied()
            .chain(model.rows.keys().map(String::as_str))
            .collect();
        for stream in streams {
            let want = expected.get(stream).copied().unwrap_or_default();
            let got = model.rows.get(stream).copied().unwrap_or_default();
            let same = if model.only_writers.is_some() {
                want.0 == got.0
            } else {
                want == got
            };
            if !same {
                report.violation(
                    "projection_mismatch",
                    format!(
                        "{}: `{stream}` has {} events (last version {}); the feed has {} (last \
                         version {})",
                        model.name, got.0, got.1, want.0, want.1
                    ),
                );
            }
        }
        for gap in &model.gaps {
            report.violation(
                "projection_gap",
                format!("{}: stream, expected, got, position: {gap}", model.name),
            );
        }
    }
}

/// Every outbox message of a stored append was published, nothing else was, first publications
/// keep each stream's order, and the outbox is empty at the end.
fn check_outbox(history: &History, index: &HashMap<u128, usize>, report: &mut Report) {
    // Message id → (source event id, stream, source position).
    let mut expected: HashMap<u128, (u128, &str, u64)> = HashMap::new();
    for (key, request) in &history.requests {
        for &i in &request.outbox {
            let source = ids::event_id(*key, i).as_u128();
            if let Some(&j) = index.get(&source) {
                let message = ids::message_id(*key, i).as_u128();
                expected.insert(message, (source, &request.stream, history.feed[j].position));
            }
        }
    }
    report.add("outbox messages stored", expected.len() as u64);
    report.add("outbox records published", history.published.len() as u64);
    let mut first: HashMap<u128, &Published> = HashMap::new();
    let mut order: HashMap<&str, (u64, u64)> = HashMap::new();
    let mut duplicates = 0u64;
    for p in &history.published {
        let Some(&(source, stream, source_position)) = expected.get(&p.message) else {
            report.violation(
                "outbox_phantom",
                format!(
                    "{} published message {} (outbox position {}, source {}, `{}`), whose append \
                     is not stored",
                    p.owner,
                    describe_message(p.message),
                    p.position,
                    describe(p.source),
                    p.stream
                ),
            );
            continue;
        };
        if p.source != source || p.stream != stream {
            report.violation(
                "outbox_mismatch",
                format!(
                    "{} published message {} with source {} in `{}`; it was appended with \
                     source {} in `{stream}`",
                    p.owner,
                    describe_message(p.message),
                    describe(p.source),
                    p.stream,
                    describe(source)
                ),
            );
        }
        if let Some(earlier) = first.get(&p.message) {
            duplicates += 1;
            if earlier.position != p.position {
                report.violation(
                    "outbox_stored_twice",
                    format!(
                        "message {} published from outbox positions {} ({}) and {} ({})",
                        describe_message(p.message),
                        earlier.position,
                        earlier.owner,
                        p.position,
                        p.owner
                    ),
                );
            }
            continue;
        }
        first.insert(p.message, p);
        let last = order.entry(stream).or_default();
        if source_position < last.0 {
            report.violation(
                "outbox_order",
                format!(
                    "{} first published the message of `{stream}` at position {source_position} \
                     (outbox {}) after the one at position {} (outbox {})",
                    p.owner, p.position, last.0, last.1
                ),
            );
        }
        *last = (source_position, p.position);
    }
    report.add("outbox records published again", duplicates);
    for (message, (source, stream, position)) in &expected {
        if !first.contains_key(message) {
            report.violation(
                "outbox_lost",
                format!(
                    "message {} of `{stream}` (source {} at position {position}) was never \
                     published",
                    describe_message(*message),
                    describe(*source)
                ),
            );
        }
    }
    for dead in &history.dead_letters {
        report.violation("outbox_dead_letter", dead.clone());
    }
    if history.outbox_left > 0 {
        report.violation(
            "outbox_pending",
            format!("{} records still pending at the end", history.outbox_left),
        );
    }
}

fn describe_message(id: u128) -> String {
    match ids::decode(id) {
        Some((Kind::Message, key, i)) => format!("#{i} of {key}"),
        _ => format!("{id:032x}"),
    }
}

/// Every epoch start records a previous head at or above every event stored in the epochs
/// before it. A lower head makes every reader that passed it fail with `LostTail` for events the
/// store still holds (a lost event, if any, is reported as a lost acknowledged append).
fn check_epochs(history: &History, report: &mut Report) {
    report.add("epoch starts", history.epochs.len() as u64);
    let positions: Vec<u64> = history.feed.iter().map(|e| e.position).collect();
    for start in &history.epochs {
        let from = positions.partition_point(|&p| p <= start.previous_head);
        let to = positions.partition_point(|&p| epoch_of(p) < start.epoch);
        if from < to {
            report.violation(
                "epoch_start_below_stored_head",
                format!(
                    "epoch {} recorded previous head {}, but the store holds {} events above it \
                     in earlier epochs (positions {} ..= {}): readers past {} get LostTail for \
                     events that are there",
                    start.epoch,
                    start.previous_head,
                    to - from,
                    positions[from],
                    positions[to - 1],
                    start.previous_head
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::Delivered;

    fn key(seq: u64) -> ReqKey {
        ReqKey {
            writer: 1,
            task: 0,
            seq,
        }
    }

    /// Three acknowledged requests (2, 1 and 3 events, the first and last with outbox
    /// messages), a refused one, one cut off before it was stored, and the end marker; a
    /// subscriber, a filtered subscriber, a read model and a relay that saw everything.
    fn clean() -> History {
        let mut h = History::default();
        let mut position = 0;
        let mut versions: HashMap<String, u64> = HashMap::new();
        for (seq, stream, n, outbox) in [
            (1, "acct-1", 2u16, vec![0u16, 1]),
            (2, "order-1", 1, vec![]),
            (3, "acct-1", 3, vec![2]),
        ] {
            let mut positions = Vec::new();
            for i in 0..n {
                position += 1;
                let v = versions.entry(stream.to_owned()).or_default();
                *v += 1;
                positions.push(position);
                h.feed.push(FeedEvent {
                    position,
                    id: ids::event_id(key(seq), i).as_u128(),
                    stream: stream.into(),
                    version: *v,
                });
            }
            h.requests.insert(
                key(seq),
                Request {
                    stream: stream.into(),
                    events: n,
                    outbox,
                    acks: vec![Ack {
                        version: versions[stream],
                        positions,
                        duplicate: false,
                        after_ok: false,
                    }],
                    errors: vec![],
                    end: Some("ok".into()),
                },
            );
        }
        h.requests.insert(
            key(4),
            Request {
                stream: "order-1".into(),
                events: 2,
                errors: vec!["conflict".into()],
                end: Some("conflict".into()),
                ..Request::default()
            },
        );
        h.requests.insert(
            key(5),
            Request {
                stream: "order-2".into(),
                events: 1,
                errors: vec!["unavailable".into()],
                ..Request::default()
            },
        );
        position += 10; // an aborted allocation leaves a gap
        h.feed.push(FeedEvent {
            position,
            id: ids::control_id(1).as_u128(),
            stream: "acct-end".into(),
            version: 1,
        });
        h.marker = Some(position);
        observe(&mut h);
        h
    }

    /// Subscribers, a read model and a relay that saw everything in `h`'s feed.
    fn observe(h: &mut History) {
        let all: Vec<Delivered> = h
            .feed
            .iter()
            .map(|e| Delivered {
                position: e.position,
                id: e.id,
                stream: e.stream.clone(),
                version: e.version,
            })
            .collect();
        let acct: Vec<Delivered> = all
            .iter()
            .filter(|d| d.stream.starts_with("acct-"))
            .cloned()
            .collect();
        h.subscribers = vec![
            Subscriber {
                name: "sub-0".into(),
                category: None,
                log: SubscriberLog {
                    delivered: all,
                    resumed: vec![0],
                    errors: vec![],
                },
            },
            Subscriber {
                name: "sub-1".into(),
                category: Some("acct".into()),
                log: SubscriberLog {
                    delivered: acct,
                    resumed: vec![0],
                    errors: vec![],
                },
            },
        ];
        let mut rows = BTreeMap::new();
        rows.insert("acct-1".to_owned(), (5, 5));
        rows.insert("order-1".to_owned(), (1, 1));
        rows.insert("acct-end".to_owned(), (1, 1));
        h.models = vec![Model {
            name: "model".into(),
            rows,
            ..Model::default()
        }];
        for (outbox_position, (seq, i)) in [(1, 0u16), (1, 1), (3, 2)].into_iter().enumerate() {
            h.published.push(Published {
                owner: "relay-0-0".into(),
                position: outbox_position as u64 + 1,
                message: ids::message_id(key(seq), i).as_u128(),
                source: ids::event_id(key(seq), i).as_u128(),
                stream: "acct-1".into(),
            });
        }
    }

    fn violations(h: &History) -> Report {
        check(h)
    }

    #[test]
    fn a_clean_history_passes() {
        let report = violations(&clean());
        assert_eq!(report.total(), 0, "{}", report.render());
        assert_eq!(report.counts["requests acknowledged"], 3);
        assert_eq!(report.counts["requests refused (conflict)"], 1);
        assert_eq!(
            report.counts["requests unknown outcome, cut off: absent"],
            1
        );
        // Published again by a relay that died before marking: allowed, counted.
        let mut h = clean();
        h.published.push(h.published[0].clone());
        let report = violations(&h);
        assert_eq!(report.total(), 0, "{}", report.render());
        assert_eq!(report.counts["outbox records published again"], 1);
    }

    #[test]
    fn a_subscriber_that_skips_an_event_is_caught() {
        let mut h = clean();
        h.subscribers[0].log.delivered.remove(2);
        let report = violations(&h);
        assert_eq!(report.of("subscriber_skip"), 1, "{}", report.render());
        let detail = &report.violations["subscriber_skip"][0];
        assert!(detail.contains("order-1` v1 at position 3"), "{detail}");
        assert!(detail.contains("delivered 2 then 4"), "{detail}");
        assert!(detail.contains("writer 1 task 0 request 2"), "{detail}");
    }

    #[test]
    fn an_append_that_outlived_its_injected_stall_is_caught() {
        let mut h = History {
            append_timeout_ms: 2000,
            ..History::default()
        };
        let req = |s| WriterLine::Req {
            t: 0,
            s,
            stream: "order-1".into(),
            exp: es_core::ExpectedVersion::Any,
            n: 1,
            pad: 0,
            ob: vec![],
        };
        let inj = |what: &str, s, a, ms| WriterLine::Inj {
            what: what.into(),
            t: Some(0),
            s: Some(s),
            a: Some(a),
            ms: Some(ms),
        };
        let ack = |s, a| WriterLine::Ack {
            t: 0,
            s,
            a,
            v: s,
            p: vec![s],
            dup: false,
            after_ok: false,
            ms: 10,
        };
        let err = |s, a| WriterLine::Err {
            t: 0,
            s,
            a,
            e: "unavailable".into(),
            msg: "aborted".into(),
            ms: 2000,
        };
        h.add_writer_log(
            1,
            vec![
                WriterLine::Start {
                    incarnation: 0,
                    pid: 1,
                },
                // Stalled past the time-out and aborted, then acknowledged on the retry.
                req(1),
                inj("stall_idle", 1, 1, 2500),
                err(1, 1),
                ack(1, 2),
                // A short stall may be acknowledged.
                req(2),
                inj("stall_sleep", 2, 1, 500),
                ack(2, 1),
                // Stalled past the time-out, yet acknowledged.
                req(3),
                inj("stall_sleep", 3, 1, 2600),
                ack(3, 1),
                // An injected failure that was acknowledged.
                req(4),
                inj("inline_fail", 4, 1, 0),
                ack(4, 1),
            ],
        );
        assert_eq!(h.failed_as_injected, 1);
        let caught: Vec<&String> = h
            .writer_violations
            .iter()
            .filter(|(kind, _)| kind == "injected_fault_acknowledged")
            .map(|(_, detail)| detail)
            .collect();
        assert_eq!(caught.len(), 2, "{caught:?}");
        assert!(
            caught[0].contains("attempt 1 of writer 1 task 0 request 3 got `stall_sleep` (2600 ms")
        );
        assert!(caught[1].contains("request 4 got `inline_fail`"));
    }

    #[test]
    fn a_subscriber_that_stops_early_is_reported_once() {
        let mut h = clean();
        h.subscribers[0].log.delivered.truncate(2);
        h.subscribers[0]
            .log
            .errors
            .push(("lost_tail".into(), "lost after 1".into()));
        let report = violations(&h);
        assert_eq!(report.of("subscriber_skip"), 0, "{}", report.render());
        let incomplete = &report.violations["subscriber_incomplete"];
        assert_eq!(incomplete.len(), 1);
        assert!(
            incomplete[0].contains("stopped after position 2 on `lost_tail`"),
            "{}",
            incomplete[0]
        );
        assert!(
            incomplete[0].contains("5 later events"),
            "{}",
            incomplete[0]
        );
        assert_eq!(report.of("lost_tail"), 1);
    }

    #[test]
    fn duplicates_and_disorder_in_a_subscriber_are_caught() {
        let mut h = clean();
        let again = h.subscribers[1].log.delivered[0].clone();
        h.subscribers[1].log.delivered.insert(2, again);
        let report = violations(&h);
        assert_eq!(report.of("subscriber_duplicate"), 1, "{}", report.render());
        assert_eq!(report.of("subscriber_order"), 1, "{}", report.render());
    }

    #[test]
    fn a_lost_acknowledged_event_is_caught_everywhere() {
        let mut h = clean();
        let lost = h.feed.remove(1);
        for sub in &mut h.subscribers {
            sub.log.delivered.retain(|d| d.id != lost.id);
        }
        let report = violations(&h);
        assert_eq!(
            report.of("lost_acknowledged_append"),
            1,
            "{}",
            report.render()
        );
        assert_eq!(report.of("partial_batch"), 1);
        assert_eq!(report.of("stream_version_gap"), 1);
        assert_eq!(report.of("projection_mismatch"), 1);
        // Its outbox message was published; its source is gone.
        assert_eq!(report.of("outbox_phantom"), 1);
    }

    #[test]
    fn a_refused_append_that_was_stored_is_caught() {
        let mut h = clean();
        let refused = h.requests.get_mut(&key(4)).unwrap();
        refused.events = 1;
        h.feed.insert(
            6,
            FeedEvent {
                position: 7,
                id: ids::event_id(key(4), 0).as_u128(),
                stream: "order-1".into(),
                version: 2,
            },
        );
        let report = violations(&h);
        assert_eq!(report.of("refused_but_stored"), 1, "{}", report.render());
        // Nobody saw it either.
        assert_eq!(report.of("subscriber_skip"), 1);
    }

    #[test]
    fn an_acknowledgement_that_differs_from_the_store_is_caught() {
        let mut h = clean();
        let request = h.requests.get_mut(&key(3)).unwrap();
        request.acks.push(Ack {
            version: 9,
            positions: vec![7, 8, 9],
            duplicate: true,
            after_ok: true,
        });
        request.acks[0].positions[1] += 1;
        let report = violations(&h);
        assert_eq!(report.of("retry_mismatch"), 1, "{}", report.render());
        assert_eq!(report.of("acknowledged_differently"), 1);
    }

    #[test]
    fn outbox_losses_disorder_and_leftovers_are_caught() {
        let mut h = clean();
        h.published.swap(0, 1);
        h.published.pop();
        h.outbox_left = 1;
        let report = violations(&h);
        assert_eq!(report.of("outbox_lost"), 1, "{}", report.render());
        assert_eq!(report.of("outbox_order"), 1);
        assert_eq!(report.of("outbox_pending"), 1);
    }

    #[test]
    fn model_gaps_phantoms_and_lost_tails_are_caught() {
        let mut h = clean();
        h.models[0].gaps.push("acct-1 2 3 3".into());
        h.feed.push(FeedEvent {
            position: 100,
            id: 42,
            stream: "order-9".into(),
            version: 1,
        });
        h.epochs.push(EpochStart {
            epoch: 1,
            previous_head: 3,
        });
        h.subscribers[0]
            .log
            .errors
            .push(("lost_tail".into(), "lost".into()));
        let report = violations(&h);
        assert_eq!(report.of("projection_gap"), 1, "{}", report.render());
        assert_eq!(report.of("phantom_event"), 1);
        let epoch = &report.violations["epoch_start_below_stored_head"];
        assert_eq!(epoch.len(), 1, "{}", report.render());
        assert!(epoch[0].contains("holds 5 events above it"), "{}", epoch[0]);
        assert_eq!(report.of("lost_tail"), 1);
    }
}
