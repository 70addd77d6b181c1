//! The files every process records its history in, and how they are read back.
//!
//! Each process appends to its own file. A line is written with one `write` call on a file
//! opened for appending (no user-space buffer for writers and relays), so a line is in the
//! kernel before the process acts on what it records, and kill -9 can cut a process off only
//! between lines. Readers ignore a last line without its newline.
//!
//! - Writers: one JSON object per line ([`WriterLine`]).
//! - Subscribers: `E <position> <event id> <stream> <version>` per delivered event, `R <after>`
//!   when a process (re)starts its subscription, `X <kind> <message>` when it ends on an error.
//!   With several feed partitions an `E` line ends with the event's partition, and `R` gives the
//!   position resumed after in each partition (partition 0 first).
//! - Relays, all in one file (the broker's): `P <owner> <outbox position> <message id> <source
//!   event id> <stream>` per published record, one write per publish call, so the file holds
//!   the publications in the order the broker received them; `X <owner>: <message>` when a relay
//!   stops on an error; in a relay group, `G <owner> <outboxes>` whenever the set of outboxes the
//!   process publishes changes (comma-separated, `-` for none).
//! - Projections, all in one file: `F <message>` when the runner reports a failure, `X <kind>
//!   <message>` on a fatal error; in a consumer group, `C <member> <partition> <position>` when a
//!   worker has claimed (fenced) a partition's checkpoint at that position, and `G <member>
//!   <partitions>` whenever the set of partitions it runs changes.
//!
//! Ids are written as 32 hex digits.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::sync::Mutex;

use anyhow::{Context, Result};
use es_core::ExpectedVersion;
use serde::{Deserialize, Serialize};

/// One line of a writer's log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "snake_case")]
pub(crate) enum WriterLine {
    /// A process (re)started.
    Start {
        /// Its incarnation number.
        incarnation: u32,
        /// Its process id.
        pid: u32,
    },
    /// A request, written before it is first sent.
    Req {
        /// Task.
        t: u8,
        /// Sequence number in the task.
        s: u64,
        /// Stream.
        stream: String,
        /// Expected version.
        exp: ExpectedVersion,
        /// Number of events.
        n: u16,
        /// Padding bytes in each payload.
        pad: u16,
        /// Indices of the events that carry an outbox message.
        ob: Vec<u16>,
    },
    /// An acknowledged attempt.
    Ack {
        /// Task.
        t: u8,
        /// Sequence number.
        s: u64,
        /// Attempt number (from 1, counted per process).
        a: u32,
        /// The stream version after the append.
        v: u64,
        /// The positions of the events.
        p: Vec<u64>,
        /// Whether the store reported an idempotent retry.
        dup: bool,
        /// Whether this was a re-send after an earlier acknowledged attempt.
        after_ok: bool,
        /// How long the attempt took, in milliseconds.
        #[serde(default)]
        ms: u64,
    },
    /// A failed attempt.
    Err {
        /// Task.
        t: u8,
        /// Sequence number.
        s: u64,
        /// Attempt number.
        a: u32,
        /// The error's variant.
        e: String,
        /// The error's message.
        msg: String,
        /// How long the attempt took, in milliseconds.
        #[serde(default)]
        ms: u64,
    },
    /// The request's final outcome: `ok`, `conflict`, `inline`, `duplicate`, `invalid` or
    /// `gave_up`.
    End {
        /// Task.
        t: u8,
        /// Sequence number.
        s: u64,
        /// Outcome.
        r: String,
    },
    /// A fault the writer injected itself (inline projection failures and stalls, in-transaction
    /// time-outs).
    Inj {
        /// What.
        what: String,
        /// The task of the append it hit, if known.
        t: Option<u8>,
        /// The sequence number of the append it hit, if known.
        s: Option<u64>,
        /// The attempt it hit.
        #[serde(default)]
        a: Option<u32>,
        /// How long it stalled the append or what time-out it set, in milliseconds.
        #[serde(default)]
        ms: Option<u64>,
    },
    /// Something the writer saw that breaks a guarantee.
    Viol {
        /// The kind of violation.
        what: String,
        /// Details.
        detail: String,
    },
}

/// An append-only log file shared by the tasks of one process.
#[derive(Debug)]
pub(crate) struct LogFile {
    file: Mutex<File>,
}

impl LogFile {
    /// Opens (creating) `path` for appending.
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Self {
            file: Mutex::new(file),
        })
    }

    /// Appends `text` (one or more whole lines) with one write.
    ///
    /// A process that cannot record what it did must not go on doing it: on failure it exits.
    pub(crate) fn write_text(&self, text: &str) {
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(e) = file.write_all(text.as_bytes()) {
            eprintln!("es-chaos: cannot write the log: {e}");
            std::process::exit(70);
        }
    }

    /// Appends one writer line.
    pub(crate) fn write(&self, line: &WriterLine) {
        let mut text = serde_json::to_string(line).unwrap_or_else(|e| {
            eprintln!("es-chaos: cannot encode a log line: {e}");
            std::process::exit(70);
        });
        text.push('\n');
        self.write_text(&text);
    }
}

/// Calls `f` with every complete line of `path` (none if the file does not exist).
pub(crate) fn for_each_line(path: &Path, mut f: impl FnMut(&str) -> Result<()>) -> Result<()> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
    };
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut line = String::new();
    let mut number = 0u64;
    loop {
        line.clear();
        let read = reader
            .read_line(&mut line)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if read == 0 || !line.ends_with('\n') {
            // The end, or a last line cut off by kill -9.
            return Ok(());
        }
        number += 1;
        f(line.trim_end_matches('\n'))
            .with_context(|| format!("{}:{number}: {}", path.display(), line.trim_end()))?;
    }
}

/// Reads a writer log.
pub(crate) fn read_writer_log(path: &Path) -> Result<Vec<WriterLine>> {
    let mut lines = Vec::new();
    for_each_line(path, |line| {
        lines.push(serde_json::from_str(line)?);
        Ok(())
    })?;
    Ok(lines)
}

/// Formats an id as 32 hex digits.
pub(crate) fn hex(id: uuid::Uuid) -> String {
    format!("{:032x}", id.as_u128())
}

/// Parses 32 hex digits.
pub(crate) fn parse_hex(text: &str) -> Result<u128> {
    u128::from_str_radix(text, 16).with_context(|| format!("bad id {text:?}"))
}

/// One event a subscriber delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Delivered {
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

/// A subscriber's log, read back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SubscriberLog {
    /// Delivered events, in delivery order (across restarts).
    pub(crate) delivered: Vec<Delivered>,
    /// Per (re)start, the positions the process resumed after, one per partition.
    pub(crate) resumed: Vec<Vec<u64>>,
    /// Errors that ended a subscription: `(kind, message)`.
    pub(crate) errors: Vec<(String, String)>,
}

/// Formats the `E` line of a delivered event; the partition is written only if the store has
/// several.
pub(crate) fn delivered_line(d: &Delivered, partitions: u32) -> String {
    let line = format!("E {} {:032x} {} {}", d.position, d.id, d.stream, d.version);
    if partitions > 1 {
        format!("{line} {}", d.partition)
    } else {
        line
    }
}

/// Formats the `R` line of a (re)start after `after` (one position per partition).
pub(crate) fn resumed_line(after: &[u64]) -> String {
    let positions: Vec<String> = after.iter().map(u64::to_string).collect();
    format!("R {}", positions.join(" "))
}

fn parse_delivered<'a>(mut words: impl Iterator<Item = &'a str>) -> Result<Delivered> {
    let mut next = || words.next().context("short line");
    let position = next()?.parse()?;
    let id = parse_hex(next()?)?;
    let stream = next()?.to_owned();
    let version = next()?.parse()?;
    let partition = match words.next() {
        Some(p) => p.parse()?,
        None => 0,
    };
    Ok(Delivered {
        partition,
        position,
        id,
        stream,
        version,
    })
}

/// Parses a subscriber log.
pub(crate) fn read_subscriber_log(path: &Path) -> Result<SubscriberLog> {
    let mut log = SubscriberLog::default();
    for_each_line(path, |line| {
        let (kind, rest) = line.split_once(' ').unwrap_or((line, ""));
        match kind {
            "E" => log.delivered.push(parse_delivered(rest.split(' '))?),
            "R" => log.resumed.push(
                rest.split(' ')
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .context("bad position")?,
            ),
            "X" => {
                let (kind, message) = rest.split_once(' ').unwrap_or((rest, ""));
                log.errors.push((kind.to_owned(), message.to_owned()));
            }
            _ => anyhow::bail!("unknown line"),
        }
        Ok(())
    })?;
    Ok(log)
}

/// Where a restarted subscriber resumes: the last delivered position of each partition (0 where
/// none), and the partitions whose end marker it has delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Resume {
    /// Per partition, the last delivered position.
    pub(crate) after: Vec<u64>,
    /// The partitions whose end marker was delivered.
    pub(crate) markers: BTreeSet<u32>,
}

/// Reads where a subscriber's log leaves off, over `partitions` partitions.
pub(crate) fn resume_point(path: &Path, partitions: u32) -> Result<Resume> {
    let mut resume = Resume {
        after: vec![0; partitions as usize],
        markers: BTreeSet::new(),
    };
    for_each_line(path, |line| {
        if let Some(rest) = line.strip_prefix("E ") {
            let d = parse_delivered(rest.split(' '))?;
            let slot = resume
                .after
                .get_mut(d.partition as usize)
                .with_context(|| format!("partition {} of {partitions}", d.partition))?;
            *slot = d.position;
            if matches!(
                crate::ids::decode(d.id),
                Some((crate::ids::Kind::Control, _, _))
            ) {
                resume.markers.insert(d.partition);
            }
        }
        Ok(())
    })?;
    Ok(resume)
}

/// One record a relay published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Published {
    /// The relay's owner name.
    pub(crate) owner: String,
    /// Outbox position.
    pub(crate) position: u64,
    /// Message id.
    pub(crate) message: u128,
    /// Source event id.
    pub(crate) source: u128,
    /// Stream.
    pub(crate) stream: String,
}

/// What the relays and projections recorded besides their output: `(kind, message)` of each
/// failure line (`F`) and fatal error line (`X`).
pub(crate) type Failures = Vec<(String, String)>;

/// A consumer-group worker's claim of a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Claimed {
    /// The worker.
    pub(crate) member: String,
    /// The partition.
    pub(crate) partition: u32,
    /// The checkpoint position it took the partition over at.
    pub(crate) position: u64,
}

/// A relay or projection log, read back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ConsumerLog {
    /// Published records (relays).
    pub(crate) published: Vec<Published>,
    /// Failures and fatal errors.
    pub(crate) failures: Failures,
    /// Claims of partitions (projection groups), in log order.
    pub(crate) claims: Vec<Claimed>,
    /// Each change of the partitions (or outboxes) a group worker runs: (worker, what it runs
    /// from then on), in log order.
    pub(crate) owned: Vec<(String, Vec<u32>)>,
}

/// Formats the `G` line of a group worker that runs `owned` from now on.
pub(crate) fn owned_line(member: &str, owned: &[u32]) -> String {
    let list: Vec<String> = owned.iter().map(u32::to_string).collect();
    let list = if list.is_empty() {
        "-".to_owned()
    } else {
        list.join(",")
    };
    format!("G {member} {list}\n")
}

/// Parses a relay or projection log.
pub(crate) fn read_consumer_log(path: &Path) -> Result<ConsumerLog> {
    let mut log = ConsumerLog::default();
    for_each_line(path, |line| {
        let mut words = line.split(' ');
        match words.next() {
            Some("P") => {
                let mut next = || words.next().context("short line");
                log.published.push(Published {
                    owner: next()?.to_owned(),
                    position: next()?.parse()?,
                    message: parse_hex(next()?)?,
                    source: parse_hex(next()?)?,
                    stream: next()?.to_owned(),
                });
            }
            Some("C") => {
                let mut next = || words.next().context("short line");
                log.claims.push(Claimed {
                    member: next()?.to_owned(),
                    partition: next()?.parse()?,
                    position: next()?.parse()?,
                });
            }
            Some("G") => {
                let member = words.next().context("short line")?.to_owned();
                let owned = match words.next().context("short line")? {
                    "-" => Vec::new(),
                    list => list
                        .split(',')
                        .map(str::parse)
                        .collect::<Result<_, _>>()
                        .context("bad partition")?,
                };
                log.owned.push((member, owned));
            }
            Some(kind @ ("X" | "F")) => {
                let rest: Vec<&str> = words.collect();
                log.failures.push((kind.to_owned(), rest.join(" ")));
            }
            _ => anyhow::bail!("unknown line"),
        }
        Ok(())
    })?;
    Ok(log)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_lines_round_trip() {
        let line = WriterLine::Req {
            t: 1,
            s: 7,
            stream: "order-3".into(),
            exp: ExpectedVersion::Exact(4),
            n: 3,
            pad: 10,
            ob: vec![0, 2],
        };
        let text = serde_json::to_string(&line).unwrap();
        assert!(text.starts_with(r#"{"k":"req""#), "{text}");
        assert_eq!(serde_json::from_str::<WriterLine>(&text).unwrap(), line);
    }

    #[test]
    fn a_cut_off_last_line_is_ignored() {
        let dir = std::env::temp_dir().join(format!("es-chaos-logs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sub.log");
        std::fs::write(
            &path,
            format!(
                "R 0\nE 1 {} acct-1 1\nE 2 {} acct-1 2\nE 3 0000",
                hex(uuid::Uuid::from_u128(5)),
                hex(uuid::Uuid::from_u128(6))
            ),
        )
        .unwrap();
        let log = read_subscriber_log(&path).unwrap();
        assert_eq!(log.delivered.len(), 2);
        assert_eq!(log.delivered[1].id, 6);
        assert_eq!(log.resumed, vec![vec![0]]);
        assert_eq!(resume_point(&path, 1).unwrap().after, vec![2]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn partitioned_subscriber_and_group_lines_round_trip() {
        let dir = std::env::temp_dir().join(format!("es-chaos-plogs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sub.log");
        let event = |partition, position, id: u128| Delivered {
            partition,
            position,
            id,
            stream: "acct-1".into(),
            version: position,
        };
        let marker = crate::ids::control_id(2).as_u128();
        let lines = [
            resumed_line(&[0, 0, 0]),
            delivered_line(&event(2, 7, 5), 3),
            delivered_line(&event(0, 3, 6), 3),
            delivered_line(&event(2, 9, marker), 3),
            resumed_line(&[3, 0, 9]),
        ];
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        let log = read_subscriber_log(&path).unwrap();
        assert_eq!(log.delivered[0], event(2, 7, 5));
        assert_eq!(log.resumed, vec![vec![0, 0, 0], vec![3, 0, 9]]);
        let resume = resume_point(&path, 3).unwrap();
        assert_eq!(resume.after, vec![3, 0, 9]);
        assert_eq!(resume.markers, BTreeSet::from([2]));
        // One partition: the line is what it always was.
        assert_eq!(
            delivered_line(&event(0, 3, 6), 1),
            format!("E 3 {:032x} acct-1 3", 6)
        );

        let path = dir.join("projection.log");
        let text = format!(
            "C projection-0-0 3 120\n{}{}F projection-1-0 partition 2: failed\n",
            owned_line("projection-0-0", &[1, 3]),
            owned_line("projection-1-0", &[])
        );
        std::fs::write(&path, text).unwrap();
        let log = read_consumer_log(&path).unwrap();
        assert_eq!(
            log.claims,
            vec![Claimed {
                member: "projection-0-0".into(),
                partition: 3,
                position: 120
            }]
        );
        assert_eq!(
            log.owned,
            vec![
                ("projection-0-0".to_owned(), vec![1, 3]),
                ("projection-1-0".to_owned(), vec![])
            ]
        );
        assert_eq!(log.failures.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
