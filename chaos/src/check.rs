//! The checks: the recorded history of a run against what the store holds at the end.
//!
//! Every violation is reported with what is needed to find it again: the stream, versions,
//! positions, the writer, task and request (ids map back to them, see [`crate::ids`]), and which
//! process saw it.
//!
//! With several feed partitions every feed check holds per partition: positions are those of the
//! event's partition (a position is named with its partition in reports), each partition's feed
//! strictly increases, each subscriber delivers each partition's feed in order up to that
//! partition's end marker, and each partition's epochs are checked against its own events. Each
//! event must also be in the partition its stream hashes to, and a consumer group's claims of a
//! partition never find its checkpoint lower than an earlier claim did.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;

use es_core::contract::position::{epoch_of, EpochStart};
use es_core::{Partitioning, StreamId};

use crate::ids::{self, Kind, ReqKey};
use crate::logs::{Claimed, Published, SubscriberLog, WriterLine};

/// One event of the final feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FeedEvent {
    /// Feed partition (0 with one partition).
    pub(crate) partition: u32,
    /// Position in the partition's feed.
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

/// What the workers of a consumer group logged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Group {
    /// Its name in reports.
    pub(crate) name: String,
    /// Partitions claimed (fenced), in log order.
    pub(crate) claims: Vec<Claimed>,
    /// Each change of what a worker runs: (worker, partitions from then on), in log order.
    pub(crate) owned: Vec<(String, Vec<u32>)>,
}

/// Everything recorded in a run, and the store's final state.
#[derive(Debug, Clone, Default)]
pub(crate) struct History {
    /// The store's feed partitions (0 is taken as 1).
    pub(crate) partitions: u32,
    /// The final feed, each partition from position 0, partition after partition.
    pub(crate) feed: Vec<FeedEvent>,
    /// Per partition, the position of the orchestrator's end marker in it.
    pub(crate) markers: BTreeMap<u32, u64>,
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
    /// The store's epoch starts, per partition.
    pub(crate) epochs: BTreeMap<u32, Vec<EpochStart>>,
    /// The consumer groups (projection and relay workers), if any ran.
    pub(crate) groups: Vec<Group>,
    /// Violations the orchestrator saw itself: (kind, detail).
    pub(crate) notes: Vec<(String, String)>,
}

impl History {
    /// Whether the store has several feed partitions.
    fn partitioned(&self) -> bool {
        self.partitions > 1
    }

    /// ` of partition <p>` on a store with several partitions, nothing with one: follows a
    /// position in reports.
    fn of(&self, partition: u32) -> String {
        if self.partitioned() {
            format!(" of partition {partition}")
        } else {
            String::new()
        }
    }

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
    count_groups(history, &mut report);
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
    let partitioning = Partitioning::new(history.partitions.max(1)).unwrap_or_default();
    let mut index = HashMap::with_capacity(feed.len());
    let mut last_version: HashMap<&str, u64> = HashMap::new();
    let mut per_partition: BTreeMap<u32, u64> = BTreeMap::new();
    for (i, e) in feed.iter().enumerate() {
        let of = history.of(e.partition);
        *per_partition.entry(e.partition).or_default() += 1;
        if i > 0 && feed[i - 1].partition == e.partition && feed[i - 1].position >= e.position {
            let p = &feed[i - 1];
            report.violation(
                "feed_order",
                format!(
                    "position {}{of} (`{}` v{}) follows position {} (`{}` v{})",
                    e.position, e.stream, e.version, p.position, p.stream, p.version
                ),
            );
        }
        if let Ok(stream) = StreamId::parse(&e.stream) {
            let expected = partitioning.partition_of(&stream);
            if expected != e.partition {
                report.violation(
                    "feed_partition",
                    format!(
                        "`{}` v{} is at position {}{of}; the stream belongs to partition \
                         {expected}",
                        e.stream, e.version, e.position
                    ),
                );
            }
        }
        if let Some(first) = index.insert(e.id, i) {
            let f = &feed[first];
            report.violation(
                "feed_duplicate_event",
                format!(
                    "event {:032x} stored at positions {}{} and {}{of}",
                    e.id,
                    f.position,
                    history.of(f.partition),
                    e.position
                ),
            );
        }
        let last = last_version.entry(e.stream.as_str()).or_default();
        if e.version != *last + 1 {
            report.violation(
                "stream_version_gap",
                format!(
                    "`{}`: version {} at position {}{of} follows version {}",
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
                        "position {}{of} (`{}` v{}) holds event {i} of {key}, which appended {} \
                         events to `{}`",
                        e.position, e.stream, e.version, r.events, r.stream
                    ),
                ),
                None => report.violation(
                    "phantom_event",
                    format!(
                        "position {}{of} (`{}` v{}) holds event {i} of {key}, which no writer \
                         logged",
                        e.position, e.stream, e.version
                    ),
                ),
            },
            _ => report.violation(
                "phantom_event",
                format!(
                    "position {}{of} (`{}` v{}) holds event {:032x}, not made by a writer",
                    e.position, e.stream, e.version, e.id
                ),
            ),
        }
    }
    report.add("streams", last_version.len() as u64);
    if history.partitioned() {
        for p in 0..history.partitions {
            let n = per_partition.get(&p).copied().unwrap_or_default();
            report.add(&format!("feed events in partition {p}"), n);
        }
    }
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
/// strictly increasing positions (per partition).
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
        let mut last: BTreeMap<u32, u64> = BTreeMap::new();
        let mut per_partition: BTreeMap<u32, u64> = BTreeMap::new();
        for d in delivered {
            let of = history.of(d.partition);
            *per_partition.entry(d.partition).or_default() += 1;
            if let Some(previous) = last.insert(d.partition, d.position) {
                if previous >= d.position {
                    report.violation(
                        "subscriber_order",
                        format!(
                            "{name}: delivered position {}{of} (`{}` v{}) after position \
                             {previous}",
                            d.position, d.stream, d.version,
                        ),
                    );
                }
            }
            if !seen.insert(d.id) {
                report.violation(
                    "subscriber_duplicate",
                    format!(
                        "{name}: delivered event {:032x} (`{}` v{} at {}{of}) twice",
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
                        "{name}: delivered `{}` v{} at {}{of} outside its category",
                        d.stream, d.version, d.position
                    ),
                );
            }
            match index.get(&d.id).map(|&j| &history.feed[j]) {
                None => report.violation(
                    "subscriber_phantom",
                    format!(
                        "{name}: delivered `{}` v{} at {}{of} (event {:032x}), which the store \
                         does not hold at the end",
                        d.stream, d.version, d.position, d.id
                    ),
                ),
                Some(e)
                    if e.partition != d.partition
                        || e.position != d.position
                        || e.stream != d.stream
                        || e.version != d.version =>
                {
                    report.violation(
                        "subscriber_mismatch",
                        format!(
                            "{name}: delivered event {:032x} as `{}` v{} at {}{of}; stored as \
                             `{}` v{} at {}{}",
                            d.id,
                            d.stream,
                            d.version,
                            d.position,
                            e.stream,
                            e.version,
                            e.position,
                            history.of(e.partition)
                        ),
                    );
                }
                Some(_) => {}
            }
        }
        if history.partitioned() {
            for p in 0..history.partitions {
                let n = per_partition.get(&p).copied().unwrap_or_default();
                report.add(&format!("{name} deliveries in partition {p}"), n);
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

/// Every event of `sub`'s category up to its partition's end marker that it did not deliver,
/// with the positions it delivered around it in that partition.
fn report_skips(history: &History, sub: &Subscriber, seen: &HashSet<u128>, report: &mut Report) {
    let mut positions: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
    for d in &sub.log.delivered {
        positions.entry(d.partition).or_default().push(d.position);
    }
    let none = Vec::new();
    // Per partition, the first event never reached and how many there are.
    let mut unreached: BTreeMap<u32, (&FeedEvent, u64)> = BTreeMap::new();
    for e in &history.feed {
        let end = history
            .markers
            .get(&e.partition)
            .copied()
            .unwrap_or(u64::MAX);
        if e.position > end
            || sub
                .category
                .as_deref()
                .is_some_and(|c| category(&e.stream) != c)
            || seen.contains(&e.id)
        {
            continue;
        }
        let positions = positions.get(&e.partition).unwrap_or(&none);
        let last = positions.last().copied().unwrap_or(0);
        if e.position > last {
            // Never reached: reported once per partition, below.
            let (_, n) = unreached.entry(e.partition).or_insert((e, 0));
            *n += 1;
            continue;
        }
        let at = positions.partition_point(|&p| p < e.position);
        let before = at.checked_sub(1).map(|i| positions[i]);
        let after = positions.get(at).copied();
        report.violation(
            "subscriber_skip",
            format!(
                "{}: never delivered `{}` v{} at position {}{} (event {}); it delivered {} then {}",
                sub.name,
                e.stream,
                e.version,
                e.position,
                history.of(e.partition),
                describe(e.id),
                before.map_or("nothing".to_owned(), |p| p.to_string()),
                after.map_or("nothing".to_owned(), |p| p.to_string()),
            ),
        );
    }
    for (partition, (first, n)) in unreached {
        let last = positions
            .get(&partition)
            .and_then(|p| p.last())
            .copied()
            .unwrap_or(0);
        let why = sub.log.errors.last().map_or_else(
            || "without an error".to_owned(),
            |(kind, message)| format!("on `{kind}`: {message}"),
        );
        report.violation(
            "subscriber_incomplete",
            format!(
                "{}: stopped after position {last}{} {why}; {n} later events never delivered, the \
                 first `{}` v{} at {}",
                sub.name,
                history.of(partition),
                first.stream,
                first.version,
                first.position
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

/// Every epoch start of a partition records a previous head at or above every event stored in
/// the partition's epochs before it. A lower head makes every reader that passed it fail with
/// `LostTail` for events the store still holds (a lost event, if any, is reported as a lost
/// acknowledged append).
fn check_epochs(history: &History, report: &mut Report) {
    report.add(
        "epoch starts",
        history.epochs.values().map(Vec::len).sum::<usize>() as u64,
    );
    for (&partition, starts) in &history.epochs {
        let positions: Vec<u64> = history
            .feed
            .iter()
            .filter(|e| e.partition == partition)
            .map(|e| e.position)
            .collect();
        let of = history.of(partition);
        for start in starts {
            let from = positions.partition_point(|&p| p <= start.previous_head);
            let to = positions.partition_point(|&p| epoch_of(p) < start.epoch);
            if from < to {
                report.violation(
                    "epoch_start_below_stored_head",
                    format!(
                        "epoch {}{of} recorded previous head {}, but the store holds {} events \
                         above it in earlier epochs (positions {} ..= {}): readers past {} get \
                         LostTail for events that are there",
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
}

/// Counts what the consumer groups did: claims, and hand-overs (a partition taken by another
/// worker than the one that ran it before; a restarted process is another worker). Checks that
/// a partition's checkpoint never goes back across claims: each claim fences the checkpoint and
/// logs its position before the worker handles anything, so in log order the positions claimed
/// of a partition never decrease (a lower one means an earlier holder's checkpoint was lost, or
/// a stale holder lowered it).
fn count_groups(history: &History, report: &mut Report) {
    for group in &history.groups {
        let name = &group.name;
        if !group.claims.is_empty() {
            report.add(
                &format!("{name} partition claims"),
                group.claims.len() as u64,
            );
            let mut last: HashMap<u32, &Claimed> = HashMap::new();
            let mut changed = 0;
            for c in &group.claims {
                if let Some(before) = last.insert(c.partition, c) {
                    changed += u64::from(before.member != c.member);
                    if c.position < before.position {
                        report.violation(
                            "group_checkpoint_regressed",
                            format!(
                                "{name}: {} claimed partition {} at position {}, after {} had \
                                 claimed it at {}",
                                c.member, c.partition, c.position, before.member, before.position
                            ),
                        );
                    }
                }
            }
            report.add(&format!("{name} claims by another worker"), changed);
        }
        let mut holder: HashMap<u32, &str> = HashMap::new();
        let mut handovers = 0;
        for (member, owned) in &group.owned {
            for p in owned {
                if holder
                    .insert(*p, member)
                    .is_some_and(|before| before != member)
                {
                    handovers += 1;
                }
            }
        }
        report.add(&format!("{name} hand-overs"), handovers);
        let workers: BTreeSet<&String> = group.owned.iter().map(|(m, _)| m).collect();
        report.add(&format!("{name} workers"), workers.len() as u64);
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
        partitioned(1)
    }

    /// [`clean`] on a store with `partitions` feed partitions: each stream in the partition it
    /// hashes to, positions counted per partition, an end marker in every partition.
    fn partitioned(partitions: u32) -> History {
        let partitioning = Partitioning::new(partitions).unwrap();
        let mut h = History {
            partitions,
            ..History::default()
        };
        let mut heads: HashMap<u32, u64> = HashMap::new();
        let mut versions: HashMap<String, u64> = HashMap::new();
        for (seq, stream, n, outbox) in [
            (1, "acct-1", 2u16, vec![0u16, 1]),
            (2, "order-1", 1, vec![]),
            (3, "acct-1", 3, vec![2]),
        ] {
            let partition = partitioning.partition_of(&StreamId::parse(stream).unwrap());
            let mut positions = Vec::new();
            for i in 0..n {
                let position = heads.entry(partition).or_default();
                *position += 1;
                let v = versions.entry(stream.to_owned()).or_default();
                *v += 1;
                positions.push(*position);
                h.feed.push(FeedEvent {
                    partition,
                    position: *position,
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
        for (n, stream) in (1..).zip(crate::stores::marker_streams(partitioning)) {
            let partition = partitioning.partition_of(&stream);
            let head = heads.entry(partition).or_default();
            *head += 10; // an aborted allocation leaves a gap
            h.feed.push(FeedEvent {
                partition,
                position: *head,
                id: ids::control_id(n).as_u128(),
                stream: stream.to_string(),
                version: 1,
            });
            h.markers.insert(partition, *head);
        }
        h.feed.sort_by_key(|e| (e.partition, e.position));
        observe(&mut h);
        h
    }

    /// Subscribers, a read model and a relay that saw everything in `h`'s feed (the partitions
    /// interleaved by position).
    fn observe(h: &mut History) {
        let mut all: Vec<Delivered> = h
            .feed
            .iter()
            .map(|e| Delivered {
                partition: e.partition,
                position: e.position,
                id: e.id,
                stream: e.stream.clone(),
                version: e.version,
            })
            .collect();
        all.sort_by_key(|d| (d.position, d.partition));
        let acct: Vec<Delivered> = all
            .iter()
            .filter(|d| d.stream.starts_with("acct-"))
            .cloned()
            .collect();
        let start = vec![vec![0; h.partitions.max(1) as usize]];
        h.subscribers = vec![
            Subscriber {
                name: "sub-0".into(),
                category: None,
                log: SubscriberLog {
                    delivered: all,
                    resumed: start.clone(),
                    errors: vec![],
                },
            },
            Subscriber {
                name: "sub-1".into(),
                category: Some("acct".into()),
                log: SubscriberLog {
                    delivered: acct,
                    resumed: start,
                    errors: vec![],
                },
            },
        ];
        let mut rows: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for e in &h.feed {
            let row = rows.entry(e.stream.clone()).or_default();
            *row = (row.0 + 1, e.version);
        }
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
                partition: 0,
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
        let order9 = Partitioning::single().partition_of(&StreamId::parse("order-9").unwrap());
        h.feed.push(FeedEvent {
            partition: order9,
            position: 100,
            id: 42,
            stream: "order-9".into(),
            version: 1,
        });
        h.epochs.entry(0).or_default().push(EpochStart {
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

    /// The partition `stream` hashes to among `partitions`.
    fn partition_of(partitions: u32, stream: &str) -> u32 {
        Partitioning::new(partitions)
            .unwrap()
            .partition_of(&StreamId::parse(stream).unwrap())
    }

    #[test]
    fn a_clean_partitioned_history_passes_and_is_counted_per_partition() {
        let h = partitioned(4);
        assert_eq!(h.markers.len(), 4);
        // The partitions' positions overlap: no order across partitions is asked for.
        assert!(h.feed.iter().filter(|e| e.position == 1).count() > 1);
        let report = violations(&h);
        assert_eq!(report.total(), 0, "{}", report.render());
        let per_partition: u64 = (0..4)
            .map(|p| report.counts[&format!("feed events in partition {p}")])
            .sum();
        assert_eq!(per_partition, report.counts["feed events"]);
        assert_eq!(
            report.counts["sub-0 deliveries"],
            report.counts["feed events"]
        );
    }

    #[test]
    fn a_subscriber_that_skips_an_event_of_one_partition_is_caught() {
        let mut h = partitioned(4);
        let p = partition_of(4, "acct-1");
        let at = h.subscribers[0]
            .log
            .delivered
            .iter()
            .position(|d| d.stream == "acct-1" && d.version == 2)
            .unwrap();
        h.subscribers[0].log.delivered.remove(at);
        let report = violations(&h);
        assert_eq!(report.total(), 1, "{}", report.render());
        let detail = &report.violations["subscriber_skip"][0];
        assert!(
            detail.contains(&format!("`acct-1` v2 at position 2 of partition {p}")),
            "{detail}"
        );
        assert!(detail.contains("delivered 1 then 3"), "{detail}");
    }

    #[test]
    fn a_subscriber_that_stops_in_one_partition_is_caught_for_that_partition() {
        let mut h = partitioned(4);
        let p = partition_of(4, "acct-1");
        // Delivered up to acct-1 v3 in its partition; every other partition to its end.
        h.subscribers[1]
            .log
            .delivered
            .retain(|d| d.partition != p || d.position <= 3);
        let report = violations(&h);
        let incomplete = &report.violations["subscriber_incomplete"];
        assert_eq!(incomplete.len(), 1, "{}", report.render());
        assert!(
            incomplete[0].contains(&format!("sub-1: stopped after position 3 of partition {p}")),
            "{}",
            incomplete[0]
        );
        assert_eq!(report.of("subscriber_skip"), 0);
    }

    #[test]
    fn disorder_within_a_partition_and_wrong_partitions_are_caught() {
        let mut h = partitioned(4);
        let p = partition_of(4, "acct-1");
        let delivered = &mut h.subscribers[0].log.delivered;
        let first = delivered.iter().position(|d| d.partition == p).unwrap();
        let second = first
            + 1
            + delivered[first + 1..]
                .iter()
                .position(|d| d.partition == p)
                .unwrap();
        delivered.swap(first, second);
        let report = violations(&h);
        assert_eq!(report.of("subscriber_order"), 1, "{}", report.render());
        assert_eq!(report.total(), 1, "{}", report.render());

        let mut h = partitioned(4);
        let moved = h.feed.iter_mut().find(|e| e.stream == "order-1").unwrap();
        moved.partition = (moved.partition + 1) % 4;
        let report = violations(&h);
        assert!(report.of("feed_partition") >= 1, "{}", report.render());
        assert!(report.of("subscriber_mismatch") >= 1, "{}", report.render());
    }

    #[test]
    fn epochs_are_checked_against_their_own_partition() {
        let mut h = partitioned(4);
        let p = partition_of(4, "acct-1");
        let other = (p + 1) % 4;
        let head = |partition: u32| {
            h.feed
                .iter()
                .filter(|e| e.partition == partition)
                .map(|e| e.position)
                .max()
                .unwrap_or(0)
        };
        // A new epoch of another partition after its own head: nothing is above it there,
        // whatever the other partitions hold.
        let other_head = head(other);
        assert!(other_head < head(p));
        let above = h
            .feed
            .iter()
            .filter(|e| e.partition == p && e.position > 3)
            .count();
        h.epochs.entry(other).or_default().push(EpochStart {
            epoch: 1,
            previous_head: other_head,
        });
        assert_eq!(violations(&h).total(), 0);
        // acct-1 has positions 1 to 5 in its partition: a new epoch there after 3 is below it.
        h.epochs.entry(p).or_default().push(EpochStart {
            epoch: 1,
            previous_head: 3,
        });
        let report = violations(&h);
        let epoch = &report.violations["epoch_start_below_stored_head"];
        assert_eq!(epoch.len(), 1, "{}", report.render());
        assert!(
            epoch[0].contains(&format!(
                "epoch 1 of partition {p} recorded previous head 3"
            )),
            "{}",
            epoch[0]
        );
        assert!(
            epoch[0].contains(&format!("holds {above} events above it")),
            "{}",
            epoch[0]
        );
    }

    #[test]
    fn group_hand_overs_are_counted() {
        let claim = |member: &str, partition, position| Claimed {
            member: member.into(),
            partition,
            position,
        };
        let mut h = History {
            groups: vec![Group {
                name: "projection group".into(),
                claims: vec![
                    claim("a", 0, 0),
                    claim("b", 1, 0),
                    claim("a", 0, 10),
                    claim("b", 0, 10),
                ],
                owned: vec![
                    ("a".into(), vec![0, 1]),
                    ("b".into(), vec![1]),
                    ("a".into(), vec![0]),
                    ("c".into(), vec![0, 1]),
                ],
            }],
            ..History::default()
        };
        let report = violations(&h);
        assert_eq!(report.counts["projection group partition claims"], 4);
        assert_eq!(
            report.counts["projection group claims by another worker"],
            1
        );
        assert_eq!(report.counts["projection group hand-overs"], 3);
        assert_eq!(report.counts["projection group workers"], 3);
        assert_eq!(report.total(), 0, "{}", report.render());
        // A worker that takes a partition over below where the last one took it.
        h.groups[0].claims.push(claim("c", 0, 7));
        let report = violations(&h);
        let regressed = &report.violations["group_checkpoint_regressed"];
        assert_eq!(regressed.len(), 1, "{}", report.render());
        assert!(
            regressed[0]
                .contains("c claimed partition 0 at position 7, after b had claimed it at 10"),
            "{}",
            regressed[0]
        );
    }
}
