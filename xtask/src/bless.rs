//! `cargo xtask bless`: regenerate the `.stderr` files of es-derive's UI tests.
//!
//! Runs `TRYBUILD=overwrite cargo test -p es-derive --test compiletest`; review the diff before
//! committing it. Extra arguments go to `cargo test` (a test name filter, for example).

use anyhow::Result;

use crate::cargo;

pub(crate) fn run(args: &[String]) -> Result<()> {
    crate::run(
        cargo()
            .env("TRYBUILD", "overwrite")
            .args(["test", "-p", "es-derive", "--test", "compiletest"])
            .args(args),
    )?;
    eprintln!("xtask: regenerated; review `git diff es-derive/tests` before committing");
    Ok(())
}
