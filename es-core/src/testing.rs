//! Test support (feature `testing`).
//!
//! - [`AggregateTest`]: given/when/then unit tests for aggregates, with no store.
//! - [`conformance`] and [`conformance_tests!`](crate::conformance_tests): the backend contract
//!   suite, stamped onto a backend factory as one named test per case.

pub mod conformance;
pub mod domain;
mod scenario;
pub mod streaming;

pub use scenario::{AggregateTest, Outcome};
