//! Project automation, run as `cargo xtask <task>` (the alias is in `.cargo/config.toml`).
//!
//! Each task lives in its own file; `setup.rs` checks (and installs) what the tests need on the
//! machine, `services.rs` starts and stops the servers they use. Only `std`, `anyhow` and
//! `es-test-support` are used, so this builds quickly.

mod bench;
mod bless;
mod chaos;
mod ci;
mod db;
mod fresh;
mod services;
mod setup;
mod test;

use std::env;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, ensure, Context, Result};

const HELP: &str = "\
Usage: cargo xtask <task> [args]

Tasks:
  test [args]      Check what the selected tests need and install what is missing (see `setup`),
                   start the throwaway servers they use (PostgreSQL, Redis, the Kafka-protocol
                   broker tansu) unless DATABASE_URL / REDIS_URL / KAFKA_BROKERS are set, run
                   `cargo nextest run --workspace --all-features [args]` (`-p <package>` replaces
                   `--workspace` and starts only that package's servers), then the doctests,
                   then (with no [args]) a short `chaos` run per store.
  setup [--check | --dry-run] [-p <package>]...
                   Check what the tests need (PostgreSQL >= 14, redis-server >= 7, tansu with
                   SQLite storage, kafka-python, procps, a C toolchain, cargo-nextest) and
                   install what is missing: apt-get as root or with sudo, cargo install, pip.
                   `--check` only reports, `--dry-run` prints the commands. `--no-install` (or
                   XTASK_NO_INSTALL=1) makes test, ci, bench, chaos and db only check.
  chaos [args]     The fault-injecting checker: `--store postgres|redis|all`, `--minutes N` or
                   `--seconds N` of faults per store (default 60 s), `--writers K`, `--seed S`.
                   Builds es-chaos in release and runs it on servers of its own.
  ci               `setup`, then rustfmt, clippy and rustdoc with warnings denied, then `test`.
  fresh [--keep] [-- <test args>]
                   Clone HEAD into a new 0700 directory and run the README's two commands there
                   (`cargo run -p example-bank`, `cargo xtask test`), timing each step.
  bench [args]     Start the servers and run `cargo run --release -p es-bench -- [args]`.
                   `--update-readme` also writes its table between the `<!-- bench:start -->`
                   and `<!-- bench:end -->` lines of README.md.
  bless            Regenerate the es-derive UI test `.stderr` files (TRYBUILD=overwrite).
  db up|down|env   Start (detached) / stop PostgreSQL, Redis and the broker under target/es-services/dev, or
                   print their `export` lines: `eval \"$(cargo xtask db up)\"`.
  help             Print this message.
";

fn main() -> ExitCode {
    match try_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn try_main() -> Result<()> {
    let mut args = env::args().skip(1);
    let task = args.next();
    let args: Vec<String> = args.collect();
    match task.as_deref() {
        Some("test") => test::run(&args),
        Some("ci") => ci::run(&args),
        Some("bench") => bench::run(&args),
        Some("chaos") => chaos::run(&args),
        Some("bless") => bless::run(&args),
        Some("db") => db::run(&args),
        Some("setup") => setup::run(&args),
        Some("fresh") => fresh::run(&args),
        Some(services::REAP_TASK) => services::reap(&args),
        None | Some("help" | "-h" | "--help") => {
            print!("{HELP}");
            Ok(())
        }
        Some(other) => bail!("unknown task `{other}`\n\n{HELP}"),
    }
}

/// The workspace root: the parent of this crate's directory.
fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_owned()
}

/// The workspace's `target/` directory (or `CARGO_TARGET_DIR`).
fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR").map_or_else(|| project_root().join("target"), PathBuf::from)
}

/// The cargo that runs us (the `CARGO` variable), in the workspace root.
fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(project_root());
    cmd
}

/// Prints `cmd`, runs it with inherited stdio and fails unless it exits successfully.
fn run(cmd: &mut Command) -> Result<()> {
    let shown = show(cmd);
    eprintln!("$ {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot run `{shown}`"))?;
    ensure!(status.success(), "`{shown}` failed ({status})");
    Ok(())
}

/// `cmd` as a shell line: the variables set on it, the program's file name and the arguments.
fn show(cmd: &Command) -> String {
    fn word(w: &OsStr) -> String {
        let w = w.to_string_lossy();
        if w.is_empty() || w.contains(char::is_whitespace) {
            format!("'{w}'")
        } else {
            w.into_owned()
        }
    }
    let vars = cmd
        .get_envs()
        .filter_map(|(k, v)| Some(format!("{}={}", k.to_string_lossy(), word(v?))));
    let program = Path::new(cmd.get_program())
        .file_name()
        .unwrap_or(cmd.get_program());
    let words = std::iter::once(program).chain(cmd.get_args()).map(word);
    vars.chain(words).collect::<Vec<_>>().join(" ")
}
