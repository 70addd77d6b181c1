//! `cargo xtask test [nextest args]`: the whole test suite against throwaway servers.
//!
//! Starts PostgreSQL and Redis (see `services.rs`) unless `DATABASE_URL` / `REDIS_URL` are set,
//! runs `cargo nextest run --workspace --all-features --no-fail-fast [args]` and then the
//! doctests, which nextest does not run. Without cargo-nextest it runs `cargo test` instead.
//! `-p <package>` arguments replace `--workspace` and select the doctests too. Run without
//! arguments (as CI does), it ends with the short run of the fault-injecting checker
//! ([`crate::chaos::short_runs`]) on servers of its own.

use std::process::Stdio;

use anyhow::{bail, Result};

use crate::cargo;
use crate::services::Services;

pub(crate) fn run(args: &[String]) -> Result<()> {
    let services = Services::start()?;
    let result = run_tests(&services, args);
    services.stop(result.is_err());
    result
}

fn run_tests(services: &Services, args: &[String]) -> Result<()> {
    let packages = package_args(args);
    let nextest = has_nextest();
    let mut failed = Vec::new();

    let mut tests = cargo();
    if nextest {
        tests.args(["nextest", "run"]);
    } else {
        eprintln!(
            "xtask: cargo-nextest not found, using `cargo test` \
             (install it with `cargo install cargo-nextest --locked`)"
        );
        tests.arg("test");
    }
    if packages.is_empty() {
        tests.arg("--workspace");
    }
    tests.args(["--all-features", "--no-fail-fast"]).args(args);
    services.apply(&mut tests);
    if let Err(e) = crate::run(&mut tests) {
        failed.push(e);
    }

    if nextest {
        let mut doctests = cargo();
        doctests.arg("test");
        if packages.is_empty() {
            doctests.arg("--workspace");
        }
        doctests.args(&packages).args(["--all-features", "--doc"]);
        services.apply(&mut doctests);
        if let Err(e) = crate::run(&mut doctests) {
            failed.push(e);
        }
    }

    if args.is_empty() {
        if let Err(e) = crate::chaos::short_runs() {
            failed.push(e);
        }
    }

    if failed.len() > 1 {
        let list: Vec<String> = failed.iter().map(|e| format!("\n  - {e:#}")).collect();
        bail!("{} steps failed:{}", failed.len(), list.concat());
    }
    failed.pop().map_or(Ok(()), Err)
}

/// Whether `cargo nextest` is installed.
fn has_nextest() -> bool {
    cargo()
        .args(["nextest", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The `-p <name>` / `--package <name>` / `--package=<name>` arguments in `args` (before `--`).
fn package_args(args: &[String]) -> Vec<String> {
    let mut packages = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if arg == "--" {
            break;
        } else if arg == "-p" || arg == "--package" {
            packages.push(arg.clone());
            packages.extend(args.next().cloned());
        } else if arg.starts_with("--package=") || (arg.starts_with("-p") && arg.len() > 2) {
            packages.push(arg.clone());
        }
    }
    packages
}

#[cfg(test)]
mod tests {
    use super::package_args;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|&a| a.to_owned()).collect()
    }

    #[test]
    fn picks_out_the_package_selection() {
        let args = strings(&[
            "-p",
            "a",
            "--package",
            "b",
            "--package=c",
            "-pd",
            "-E",
            "test(x)",
        ]);
        assert_eq!(
            package_args(&args),
            strings(&["-p", "a", "--package", "b", "--package=c", "-pd"])
        );
        assert!(package_args(&strings(&["--", "-p", "a"])).is_empty());
    }
}
