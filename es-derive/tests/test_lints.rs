//! The generated code is lint-clean in the user's crate.

#![deny(warnings, unused_qualifications, missing_docs, unreachable_pub)]
#![deny(clippy::all, clippy::pedantic)]
#![deny(unused_results, trivial_casts, trivial_numeric_casts, unused_lifetimes)]
#![deny(unused_import_braces, single_use_lifetimes, variant_size_differences)]
#![deny(let_underscore_drop, meta_variable_misuse, elided_lifetimes_in_paths)]

use es_core::{Apply, ApplyEvent, DomainEvent, EventSchema, PayloadError};
use serde::{Deserialize, Serialize};
// Imported like the items the generated code calls: it must not qualify them in the user's scope.
use serde_json::{from_slice, from_value, to_vec};

/// Opened.
#[derive(Debug, Serialize, Deserialize)]
pub struct Opened {
    /// Owner.
    pub owner: String,
}

/// Deposited.
#[derive(Debug, Serialize, Deserialize)]
pub struct Deposited {
    /// Amount.
    pub amount: u64,
}

/// Closed.
#[derive(Debug, Serialize, Deserialize)]
pub struct Closed;

/// Events of a public enum (public items need docs; the generated ones have them).
#[derive(Debug, DomainEvent)]
#[event(apply(Account, Summary))]
pub enum AccountEvent {
    /// Opened.
    Opened(Opened),
    /// Deposited.
    #[event(rename = "MoneyDeposited", version = 100_000)]
    Deposited(Deposited),
    /// Closed.
    #[event(version = 100_000)]
    Closed(Closed),
}

/// A state.
#[derive(Debug, Default)]
pub struct Account {
    /// Balance.
    pub balance: u64,
}

impl Apply<Opened> for Account {
    fn apply(&mut self, _: &Opened) {}
}
impl Apply<Deposited> for Account {
    fn apply(&mut self, event: &Deposited) {
        self.balance += event.amount;
    }
}
impl Apply<Closed> for Account {
    fn apply(&mut self, _: &Closed) {}
}

/// Another state.
#[derive(Debug, Default)]
pub struct Summary;

impl<E> Apply<E> for Summary {
    fn apply(&mut self, _: &E) {}
}

/// The same through a re-export named by a crate-relative path.
mod facade {
    pub(crate) use es_core as es;
}

mod reexported {
    use crate::facade::es::{Apply, DomainEvent};
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Serialize, Deserialize)]
    pub(crate) struct Renamed {}

    #[derive(Debug, DomainEvent)]
    #[event(crate = "crate::facade::es", apply(State))]
    pub(crate) enum Event {
        Renamed(Renamed),
    }

    #[derive(Debug, Default)]
    pub(crate) struct State;

    impl Apply<Renamed> for State {
        fn apply(&mut self, _: &Renamed) {}
    }

    pub(crate) fn name() -> &'static str {
        let event = Event::from(Renamed {});
        event.apply_to(&mut State);
        event.event_type()
    }
}

mod private {
    use es_core::DomainEvent;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Serialize, Deserialize)]
    pub(crate) struct Only {}

    /// A private enum with one variant, applied nowhere: nothing may be reported as unused.
    #[derive(Debug, DomainEvent)]
    #[event(apply(State))]
    pub(crate) enum Private {
        Only(Only),
    }

    #[derive(Debug, Default)]
    pub(crate) struct State;

    impl es_core::Apply<Only> for State {
        fn apply(&mut self, _: &Only) {}
    }

    pub(crate) fn name() -> &'static str {
        Private::Only(Only {}).event_type()
    }
}

#[test]
fn compiles_without_warnings() {
    let event = AccountEvent::from(Deposited { amount: 1 });
    let mut account = Account::default();
    event.apply_to(&mut account);
    assert_eq!(account.balance, 1);
    assert_eq!(private::name(), "Only");
    assert_eq!(reexported::name(), "Renamed");

    // Use the imports the way a user module would.
    ApplyEvent::<Summary>::apply_to(&event, &mut Summary);
    let payload = to_vec(&Opened {
        owner: String::new(),
    })
    .unwrap();
    let opened: Opened = from_slice(&payload).unwrap();
    assert!(opened.owner.is_empty());
    let opened: Opened = from_value(serde_json::json!({ "owner": "x" })).unwrap();
    assert_eq!(opened.owner, "x");
    let schema: Option<EventSchema> = AccountEvent::schema_of("Opened");
    assert!(schema.is_some());
    let decoded: Result<AccountEvent, PayloadError> =
        AccountEvent::from_payload("Opened", &payload);
    assert!(decoded.is_ok());
}
