//! `cargo xtask test [--no-install] [nextest args]`: the test suite against throwaway servers.
//!
//! Works out from the `-p <package>` arguments what the selected tests need (the whole workspace
//! without any; see [`crate::setup::PACKAGES`]), checks all of it up front and installs what is
//! missing ([`crate::setup::ensure`]; `--no-install` only checks). Then starts the shared servers
//! those packages use, and only those (see `services.rs`), unless `DATABASE_URL` / `REDIS_URL` /
//! `KAFKA_BROKERS` are set; runs `cargo nextest run --workspace --all-features --no-fail-fast
//! [args]` and then the doctests, which nextest does not run. `-p <package>` arguments replace
//! `--workspace` and select the doctests too. Run without arguments (as CI does), it ends with
//! the short run of the fault-injecting checker ([`crate::chaos::short_runs`]) on servers of its
//! own.

use anyhow::{bail, Result};

use crate::cargo;
use crate::services::Services;
use crate::setup::{self, Needs};

pub(crate) fn run(args: &[String]) -> Result<()> {
    let (mode, args) = setup::mode_from(args);
    let packages = package_names(&args);
    let needs = if packages.is_empty() {
        let needs = Needs::workspace();
        if args.is_empty() {
            needs.with(&Needs::chaos())
        } else {
            needs
        }
    } else {
        Needs::of_packages(&packages)
    };
    setup::ensure(&needs, mode)?;
    let services = Services::start(&needs.servers)?;
    let result = run_tests(&services, &args);
    services.stop(result.is_err());
    result
}

fn run_tests(services: &Services, args: &[String]) -> Result<()> {
    let packages = package_args(args);
    let mut failed = Vec::new();

    let mut tests = cargo();
    tests.args(["nextest", "run"]);
    if packages.is_empty() {
        tests.arg("--workspace");
    }
    tests.args(["--all-features", "--no-fail-fast"]).args(args);
    services.apply(&mut tests);
    if let Err(e) = crate::run(&mut tests) {
        failed.push(e);
    }

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

/// The package names (or patterns) [`package_args`] selects.
fn package_names(args: &[String]) -> Vec<String> {
    let selection = package_args(args);
    let mut names = Vec::new();
    let mut words = selection.iter();
    while let Some(word) = words.next() {
        if word == "-p" || word == "--package" {
            names.extend(words.next().cloned());
        } else if let Some(name) = word.strip_prefix("--package=") {
            names.push(name.to_owned());
        } else if let Some(name) = word.strip_prefix("-p") {
            names.push(name.to_owned());
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::{package_args, package_names};

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
        assert_eq!(package_names(&args), strings(&["a", "b", "c", "d"]));
        assert!(package_args(&strings(&["--", "-p", "a"])).is_empty());
    }
}
