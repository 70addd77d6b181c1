//! `cargo xtask ci`: every check a change must pass, stopping at the first that fails.
//!
//! rustfmt, clippy and rustdoc with warnings denied, then the tests as `cargo xtask test` runs
//! them. `.ci/run` runs the same steps on a fresh machine after installing what is missing.

use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::cargo;

pub(crate) fn run(args: &[String]) -> Result<()> {
    if !args.is_empty() {
        bail!("usage: cargo xtask ci (it takes no arguments)");
    }
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
    step("tests", || crate::test::run(&[]))?;
    eprintln!("xtask ci: all steps passed");
    Ok(())
}

/// Runs one step, printing its name and how long it took.
fn step(name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    eprintln!("xtask ci: step `{name}`");
    let start = Instant::now();
    let result = f();
    let took = start.elapsed().as_secs_f64();
    match &result {
        Ok(()) => eprintln!("xtask ci: step `{name}` passed in {took:.1}s"),
        Err(_) => eprintln!("xtask ci: step `{name}` FAILED after {took:.1}s"),
    }
    result.with_context(|| format!("ci step `{name}` failed"))
}
