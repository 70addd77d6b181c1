//! Given/when/then tests for aggregates.

use std::fmt::Debug;

use es_core::{Aggregate, DomainEvent};

/// A given/when/then test of one aggregate, with no store involved.
///
/// Every given and emitted event is also round-tripped through its stored form, so a payload that
/// does not deserialize back into itself fails the test.
///
/// ```
/// use es_testkit::domain::{
///     Credited, Debited, Ledger, LedgerCommand, LedgerError, LedgerEvent, Opened,
/// };
/// use es_testkit::AggregateTest;
///
/// AggregateTest::<Ledger>::given([LedgerEvent::Opened(Opened {})])
///     .when(LedgerCommand::Debit(5))
///     .then_expect_error(LedgerError::InsufficientFunds { balance: 0, requested: 5 });
///
/// let credited = Credited { amount: 7, currency: "EUR".into() };
/// let ledger = AggregateTest::<Ledger>::given([
///     LedgerEvent::Opened(Opened {}),
///     LedgerEvent::Credited(credited),
/// ])
/// .when(LedgerCommand::Debit(5))
/// .then_expect_events([LedgerEvent::Debited(Debited { amount: 5 })]);
/// assert_eq!(ledger.balance, 2);
/// ```
#[derive(Debug)]
pub struct AggregateTest<A> {
    state: A,
}

impl<A: Aggregate> AggregateTest<A> {
    /// Starts from the state produced by `events`.
    #[track_caller]
    pub fn given<I>(events: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<A::Event>,
    {
        let mut state = A::default();
        for event in events {
            let event = roundtrip(&event.into());
            state.evolve(&event);
        }
        Self { state }
    }

    /// Starts from an aggregate with no events.
    pub fn given_no_events() -> Self {
        Self {
            state: A::default(),
        }
    }

    /// Handles `command`.
    #[track_caller]
    pub fn when(self, command: impl Into<A::Command>) -> Outcome<A> {
        let result = self.state.handle(&command.into());
        Outcome {
            state: self.state,
            result,
        }
    }
}

/// The result of [`AggregateTest::when`], to assert on.
#[derive(Debug)]
pub struct Outcome<A: Aggregate> {
    state: A,
    result: Result<Vec<A::Event>, A::Error>,
}

impl<A: Aggregate> Outcome<A> {
    /// Asserts that the command emitted exactly `expected`; returns the state after applying them.
    #[track_caller]
    pub fn then_expect_events<I>(self, expected: I) -> A
    where
        I: IntoIterator,
        I::Item: Into<A::Event>,
        A::Event: PartialEq + Debug,
        A::Error: Debug,
    {
        let expected: Vec<A::Event> = expected.into_iter().map(Into::into).collect();
        match self.result {
            Ok(events) => {
                assert_eq!(events, expected, "the command emitted other events");
                let mut state = self.state;
                for event in events {
                    let event = roundtrip(&event);
                    state.evolve(&event);
                }
                state
            }
            Err(err) => panic!("expected events {expected:?}, but the command failed: {err:?}"),
        }
    }

    /// Asserts that the command emitted no events.
    #[track_caller]
    pub fn then_expect_no_events(self) -> A
    where
        A::Event: Debug,
        A::Error: Debug,
    {
        match self.result {
            Ok(events) if events.is_empty() => self.state,
            Ok(events) => panic!("expected no events, but the command emitted {events:?}"),
            Err(err) => panic!("expected no events, but the command failed: {err:?}"),
        }
    }

    /// Asserts that the command failed with `expected`.
    #[track_caller]
    // Taking the error by value reads naturally: `.then_expect_error(Error::NotOpen)`.
    #[allow(clippy::needless_pass_by_value)]
    pub fn then_expect_error(self, expected: A::Error)
    where
        A::Event: Debug,
        A::Error: PartialEq + Debug,
    {
        match self.result {
            Ok(events) => panic!("expected error {expected:?}, but the command emitted {events:?}"),
            Err(err) => assert_eq!(err, expected, "the command failed with another error"),
        }
    }

    /// Asserts that the command failed with an error for which `check` holds.
    #[track_caller]
    pub fn then_expect_error_matching(self, check: impl FnOnce(&A::Error) -> bool)
    where
        A::Event: Debug,
        A::Error: Debug,
    {
        match self.result {
            Ok(events) => panic!("expected an error, but the command emitted {events:?}"),
            Err(err) => assert!(
                check(&err),
                "the command failed with an unexpected error: {err:?}"
            ),
        }
    }

    /// The raw result, for custom assertions.
    pub fn into_result(self) -> Result<Vec<A::Event>, A::Error> {
        self.result
    }
}

#[track_caller]
fn roundtrip<E: DomainEvent>(event: &E) -> E {
    let payload = event
        .to_payload()
        .unwrap_or_else(|e| panic!("event `{}` does not serialize: {e}", event.event_type()));
    E::from_payload(event.event_type(), &payload).unwrap_or_else(|e| {
        panic!(
            "event `{}` does not deserialize from its own payload {}: {e}",
            event.event_type(),
            String::from_utf8_lossy(&payload)
        )
    })
}
