//! `cargo xtask fresh [--keep] [-- <args for cargo xtask test>]`: the README's two commands in a
//! fresh clone.
//!
//! Clones the committed `HEAD` of this repository into a new directory that only its owner can
//! enter (mode 0700, like root's home or a `mktemp -d` directory) under the system's temporary
//! directory, and runs there, as a newcomer would: `cargo run -p example-bank`, then `cargo xtask
//! test [args]`, which installs what is missing, starts its servers and runs everything. The
//! clone builds in its own `target/`, and none of this shell's `DATABASE_URL`, `REDIS_URL`,
//! `KAFKA_BROKERS` or cargo variables reach it. Each step prints a line with its time. The clone
//! is removed afterwards, unless a step failed or `--keep` was given.
//!
//! Uncommitted changes are not in the clone. The whole run builds the workspace from scratch:
//! expect half an hour or more on 2 cores (`-- -p es-derive` makes a short one).

use std::env;
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{self, Command};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

use crate::setup::{self, Needs, Prereq};
use crate::{project_root, show};

const USAGE: &str = "usage: cargo xtask fresh [--keep] [-- <args for cargo xtask test>]";

/// Variables that describe this shell's build or servers, not the clone's.
const CLEARED: &[&str] = &[
    "CARGO",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET_DIR",
    "RUSTUP_TOOLCHAIN",
    "RUSTUP_TOOLCHAIN_SOURCE",
    "RUST_RECURSION_COUNT",
    "DATABASE_URL",
    "REDIS_URL",
    "KAFKA_BROKERS",
];

/// Prefixes of the variables cargo sets for the program it runs (this xtask).
const CLEARED_PREFIXES: &[&str] = &[
    "CARGO_PKG_",
    "CARGO_MANIFEST_",
    "CARGO_CRATE_",
    "CARGO_BIN_",
    "CARGO_PRIMARY_PACKAGE",
];

pub(crate) fn run(args: &[String]) -> Result<()> {
    let mut keep = false;
    let mut test_args = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--keep" => keep = true,
            "--" => test_args.extend(args.by_ref().cloned()),
            other => bail!("unknown argument `{other}`\n{USAGE}"),
        }
    }
    setup::ensure(&Needs::new(&[Prereq::Git], &[]), setup::mode_from(&[]).0)?;

    let root = project_root();
    let head = git_output(&root, &["rev-parse", "HEAD"])?;
    let dirty = git_output(&root, &["status", "--porcelain", "--untracked-files=no"])?;
    if !dirty.is_empty() {
        eprintln!("xtask fresh: uncommitted changes are not in the clone:\n{dirty}");
    }
    let parent = private_dir()?;
    let clone = parent.join("es");
    eprintln!(
        "xtask fresh: {} (HEAD {head}) into {} (mode 0700)",
        root.display(),
        clone.display()
    );

    let mut steps: Vec<(String, String)> = Vec::new();
    let result = (|| {
        step(&mut steps, "clone", || {
            crate::run(
                Command::new("git")
                    .args(["clone", "--quiet", "--no-checkout"])
                    .arg(&root)
                    .arg(&clone),
            )?;
            crate::run(
                Command::new("git")
                    .arg("-C")
                    .arg(&clone)
                    .args(["fetch", "--quiet"])
                    .arg(&root)
                    .arg(&head),
            )?;
            crate::run(
                Command::new("git")
                    .arg("-C")
                    .arg(&clone)
                    .args(["checkout", "--quiet", "--detach", &head]),
            )
        })?;
        step(&mut steps, "cargo run -p example-bank", || {
            crate::run(clean_cargo(&clone).args(["run", "-p", "example-bank"]))
        })?;
        let test_name = if test_args.is_empty() {
            "cargo xtask test".to_owned()
        } else {
            format!("cargo xtask test {}", test_args.join(" "))
        };
        step(&mut steps, &test_name, || {
            crate::run(clean_cargo(&clone).args(["xtask", "test"]).args(&test_args))
        })
    })();

    eprintln!("xtask fresh: summary");
    for (name, outcome) in &steps {
        eprintln!("  {name:<40} {outcome}");
    }
    if result.is_ok() && !keep {
        fs::remove_dir_all(&parent)
            .with_context(|| format!("cannot remove {}", parent.display()))?;
        eprintln!("xtask fresh: removed {}", parent.display());
    } else {
        eprintln!("xtask fresh: the clone is kept in {}", clone.display());
    }
    result
}

/// Runs one step, printing its name and time and recording them in `steps`.
fn step(
    steps: &mut Vec<(String, String)>,
    name: &str,
    f: impl FnOnce() -> Result<()>,
) -> Result<()> {
    eprintln!("xtask fresh: step `{name}`");
    let start = Instant::now();
    let result = f();
    let took = setup::took(start.elapsed());
    let outcome = match &result {
        Ok(()) => format!("passed in {took}"),
        Err(_) => format!("FAILED after {took}"),
    };
    eprintln!("xtask fresh: step `{name}` {outcome}");
    steps.push((name.to_owned(), outcome));
    result.with_context(|| format!("step `{name}` failed"))
}

/// `cargo` (the rustup proxy on `PATH`, so the clone's `rust-toolchain.toml` applies) in `dir`,
/// without the variables of this shell's build and servers.
fn clean_cargo(dir: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(dir);
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        if CLEARED.contains(&key.as_ref()) || CLEARED_PREFIXES.iter().any(|p| key.starts_with(p)) {
            cmd.env_remove(key.as_ref());
        }
    }
    cmd
}

/// A new directory under the system's temporary directory that only this user can enter.
fn private_dir() -> Result<PathBuf> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = env::temp_dir().join(format!("es-fresh-{}-{nanos}", process::id()));
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// The trimmed standard output of `git args` in `dir`.
fn git_output(dir: &Path, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("git");
    cmd.arg("-C").arg(dir).args(args);
    let out = cmd
        .output()
        .with_context(|| format!("cannot run `{}`", show(&cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            show(&cmd),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
