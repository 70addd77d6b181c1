//! `cargo xtask bench [--quick] [--update-readme] [groups...]`: the benchmarks against real
//! servers.
//!
//! Starts PostgreSQL (default, durable settings), Redis (append-only file, fsync every second)
//! and a Kafka-protocol broker (tansu) unless `DATABASE_URL` / `REDIS_URL` / `KAFKA_BROKERS` are
//! set, and runs `cargo run --release -p es-bench -- [args]`: every group (`memory`, `postgres`,
//! `redis`, `kafka`) or the ones named, `--quick` for a smoke check with small sizes. es-bench
//! prints one markdown table; with `--update-readme` that table also replaces the lines between
//! `<!-- bench:start -->` and `<!-- bench:end -->` in README.md (not with `--quick`: its figures
//! are not meant to be quoted).

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;

use anyhow::{bail, ensure, Context, Result};

use crate::services::Services;
use crate::setup::{self, Needs, Prereq, Server};
use crate::{cargo, project_root, show};

const UPDATE_README: &str = "--update-readme";
const START: &str = "<!-- bench:start -->";
const END: &str = "<!-- bench:end -->";

pub(crate) fn run(args: &[String]) -> Result<()> {
    let (mode, args) = setup::mode_from(args);
    let args = args.as_slice();
    let update_readme = args.iter().any(|a| a == UPDATE_README);
    let args: Vec<&String> = args.iter().filter(|a| *a != UPDATE_README).collect();
    ensure!(
        !(update_readme && args.iter().any(|a| *a == "--quick")),
        "`--quick` figures are a smoke check: run without `--quick` to update README.md"
    );
    let readme = project_root().join("README.md");
    if update_readme {
        // Fail before the benchmarks run, not after.
        let text = fs::read_to_string(&readme)
            .with_context(|| format!("cannot read {}", readme.display()))?;
        splice(&text, "").with_context(|| format!("in {}", readme.display()))?;
    }

    let needs = Needs::new(
        &[Prereq::CBuild],
        &[
            Server::Postgres,
            Server::Redis,
            Server::RedisCluster,
            Server::Kafka,
        ],
    );
    setup::ensure(&needs, mode)?;
    let services = Services::start(&needs.servers)?;
    let mut bench = cargo();
    bench
        .args(["run", "--release", "-p", "es-bench", "--"])
        .args(&args);
    services.apply(&mut bench);
    if !update_readme {
        let result = crate::run(&mut bench);
        services.stop(result.is_err());
        return result;
    }

    let result = run_capturing(&mut bench);
    services.stop(result.is_err());
    let table = result?;
    let text = fs::read_to_string(&readme)?;
    fs::write(&readme, splice(&text, &table)?)
        .with_context(|| format!("cannot write {}", readme.display()))?;
    eprintln!("xtask: updated the benchmark table in {}", readme.display());
    Ok(())
}

/// Runs `cmd`, passing its stdout through and returning it.
fn run_capturing(cmd: &mut std::process::Command) -> Result<String> {
    let shown = show(cmd);
    eprintln!("$ {shown}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run `{shown}`"))?;
    let mut captured = String::new();
    let mut stdout = std::io::stdout();
    for line in BufReader::new(child.stdout.take().context("no stdout")?).lines() {
        let line = line?;
        writeln!(stdout, "{line}")?;
        captured.push_str(&line);
        captured.push('\n');
    }
    let status = child.wait()?;
    ensure!(status.success(), "`{shown}` failed ({status})");
    Ok(captured)
}

/// `text` with the lines between the `START` and `END` marker lines replaced by `table`.
fn splice(text: &str, table: &str) -> Result<String> {
    let lines: Vec<&str> = text.lines().collect();
    let Some(start) = lines.iter().position(|l| l.trim() == START) else {
        bail!("no `{START}` line: add `{START}` and `{END}` lines where the table goes");
    };
    let Some(end) = lines[start..].iter().position(|l| l.trim() == END) else {
        bail!("no `{END}` line after `{START}`");
    };
    let end = start + end;
    let mut out: Vec<&str> = lines[..=start].to_vec();
    out.extend(table.trim_matches('\n').lines());
    out.extend(&lines[end..]);
    let mut out = out.join("\n");
    if text.ends_with('\n') {
        out.push('\n');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::splice;

    #[test]
    fn replaces_only_the_lines_between_the_markers() {
        let readme = "# es\n<!-- bench:start -->\nold\ntable\n<!-- bench:end -->\nmore\n";
        let new = splice(readme, "| a |\n|---|\n").unwrap();
        assert_eq!(
            new,
            "# es\n<!-- bench:start -->\n| a |\n|---|\n<!-- bench:end -->\nmore\n"
        );
        assert_eq!(splice(&new, "| a |\n|---|\n").unwrap(), new);
    }

    #[test]
    fn missing_markers_are_an_error() {
        assert!(splice("# es\n", "t")
            .unwrap_err()
            .to_string()
            .contains("bench:start"));
        let no_end = splice("<!-- bench:start -->\n", "t").unwrap_err();
        assert!(no_end.to_string().contains("bench:end"));
    }
}
