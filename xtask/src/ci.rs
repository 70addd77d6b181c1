//! `cargo xtask ci`: every check a change must pass, stopping at the first that fails.
//!
//! First what the checks and tests need is checked and installed when missing (as `cargo xtask
//! setup` does; `--no-install` only checks): clippy builds librdkafka. Then rustfmt, clippy and
//! rustdoc with warnings denied, then the tests as `cargo xtask test` runs them. `.ci/run` runs
//! the same steps.

use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::cargo;
use crate::setup::{self, Needs};

pub(crate) fn run(args: &[String]) -> Result<()> {
    let (mode, args) = setup::mode_from(args);
    if !args.is_empty() {
        bail!("usage: cargo xtask ci [--no-install]");
    }
    step("setup", || {
        setup::ensure(&Needs::workspace().with(&Needs::chaos()), mode)
    })?;
    step("rustfmt", || {
        crate::run(cargo().args(["fmt", "--all", "--check"]))
    })?;
    step("clippy", || {
        crate::run(
            cargo()
                .args(["clippy", "--workspace", "--all-targets", "--all-features"])
                .args(["--", "-D", "warnings"]),
        )
    })?;
    step("rustdoc", || {
        let mut doc = cargo();
        doc.env("RUSTDOCFLAGS", "-D warnings").args([
            "doc",
            "--workspace",
            "--no-deps",
            "--all-features",
        ]);
        crate::run(&mut doc)
    })?;
    // Everything is installed by now; the tests step only checks again.
    step("tests", || {
        crate::test::run(&[setup::NO_INSTALL_FLAG.to_owned()])
    })?;
    eprintln!("xtask ci: all steps passed");
    Ok(())
}

/// Runs one step, printing its name and how long it took.
fn step(name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    eprintln!("xtask ci: step `{name}`");
    let start = Instant::now();
    let result = f();
    let took = setup::took(start.elapsed());
    match &result {
        Ok(()) => eprintln!("xtask ci: step `{name}` passed in {took}"),
        Err(_) => eprintln!("xtask ci: step `{name}` FAILED after {took}"),
    }
    result.with_context(|| format!("ci step `{name}` failed"))
}
