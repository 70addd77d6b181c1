//! UI tests: each `tests/ui/*.rs` must fail to compile with exactly the errors in the `.stderr`
//! beside it; each `tests/ui-pass/*.rs` must compile and run.
//!
//! The `.stderr` files are tied to the workspace's stable toolchain. Regenerate them with
//! `cargo xtask bless` (`TRYBUILD=overwrite cargo test -p es-derive --test compiletest`) and
//! review the diff.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
    t.pass("tests/ui-pass/*.rs");
}
