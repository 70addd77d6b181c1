//! `#[derive(DomainEvent)]` for es-core. Use it through `es_core::DomainEvent` (feature `derive`,
//! on by default); this crate is an implementation detail.
//!
//! The derive goes on an enum whose variants each wrap one payload type. It implements
//! `es_core::DomainEvent` (stable type names, schema versions, the list of all event types, and
//! JSON (de)serialization of the payload *without* the enum tag), `From<Payload>` for each
//! variant, and with `apply(...)` the `es_core::ApplyEvent` dispatch that routes each variant to
//! the state's `es_core::Apply<Payload>` impl.
//!
//! ```
//! use es_core::{Apply, DomainEvent};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Serialize, Deserialize)]
//! struct Opened { owner: String }
//! #[derive(Debug, Serialize, Deserialize)]
//! struct Deposited { amount: u64 }
//!
//! #[derive(Debug, DomainEvent)]
//! #[event(apply(Account))]
//! enum AccountEvent {
//!     Opened(Opened),
//!     #[event(rename = "MoneyDeposited", version = 2)]
//!     Deposited(Deposited),
//! }
//!
//! #[derive(Default)]
//! struct Account { balance: u64 }
//!
//! impl Apply<Opened> for Account {
//!     fn apply(&mut self, _: &Opened) {}
//! }
//! impl Apply<Deposited> for Account {
//!     fn apply(&mut self, e: &Deposited) { self.balance += e.amount; }
//! }
//!
//! let event = AccountEvent::from(Deposited { amount: 5 });
//! assert_eq!(event.event_type(), "MoneyDeposited");
//! assert_eq!(event.schema_version(), 2);
//! assert_eq!(event.to_payload().unwrap(), br#"{"amount":5}"#);
//!
//! let mut account = Account::default();
//! event.apply_to(&mut account);
//! assert_eq!(account.balance, 5);
//! ```
//!
//! # Attributes
//!
//! On the enum:
//!
//! - `#[event(apply(State, other::State, ...))]`: implement `ApplyEvent<State>` for each listed
//!   state. Every state must implement `Apply<Payload>` for every variant's payload; a missing
//!   impl is a compile error pointing at the variant. Also adds an inherent
//!   `fn apply_to<S>(&self, state: &mut S)` so callers need not import `ApplyEvent`.
//! - `#[event(crate = "::path::to::es_core")]`: where es-core is found, for crates that
//!   re-export it under another name. Default: `::es_core`.
//!
//! On a variant:
//!
//! - `#[event(rename = "Name")]`: the stable event type name stored with each event. Default:
//!   the variant name. Names are 1 to 256 bytes of ASCII letters, digits, `_`, `.` and `-`, and
//!   unique within the enum. Renaming the variant later keeps stored events readable as long as
//!   the name stays.
//! - `#[event(version = N)]`: the schema version new events are written with, 1 or more.
//!   Default: 1. Bump it when the payload's shape changes and register an upcaster for the old
//!   version.
//!
//! # Requirements
//!
//! - Each variant wraps exactly one payload type (`Name(Payload)`), and each payload type
//!   appears in one variant only (it gets a `From` impl).
//! - Payload types implement `serde::Serialize` and `serde::Deserialize`.
//! - The enum has no generic parameters and at least one variant.
//!
//! Every misuse is a compile error on the offending tokens, all reported at once: a misspelt key
//! gets a "did you mean" (`unknown key "verison"; did you mean "version"?`), a duplicate event
//! type name is reported on the `rename` that caused it, and a payload type without serde impls
//! gets one error naming the derives it lacks.

mod ast;
mod attr;
mod ctxt;
mod expand;
mod fallback;
mod valid;

use proc_macro::TokenStream;
use syn::{parse_macro_input, DeriveInput};

/// Derives `es_core::DomainEvent`, `From<Payload>` for each variant and, with
/// `#[event(apply(State))]`, `es_core::ApplyEvent<State>`. See the [crate docs](crate).
#[proc_macro_derive(DomainEvent, attributes(event))]
pub fn derive_domain_event(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand::derive(&input).into()
}
