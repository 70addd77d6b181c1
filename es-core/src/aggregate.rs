//! The write model: aggregates decide on commands and evolve by applying events.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::event::DomainEvent;
use crate::stream_id::{InvalidStreamId, StreamId};

/// A consistency boundary whose state is rebuilt from its events.
///
/// `handle` is a pure decision: it sees the current state and a command and returns the events
/// that happened, or a domain error. It never mutates the aggregate; the repository applies the
/// returned events with [`evolve`](Aggregate::evolve). When a later decision in one command must
/// see the effect of an earlier event, build the result with a [`Decision`], which applies events
/// to a scratch copy as they are emitted.
///
/// How the state evolves is written once per event payload, as [`Apply`] impls; the event enum
/// routes each variant to its impl through [`ApplyEvent`], which `#[derive(DomainEvent)]` with
/// `#[event(apply(ThisAggregate))]` generates. So an aggregate writes no `evolve` of its own:
///
/// ```
/// use es_core::{Aggregate, Apply, DomainEvent};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Serialize, Deserialize)]
/// struct Deposited { amount: u64 }
///
/// #[derive(Debug, DomainEvent)]
/// #[event(apply(Account))]
/// enum AccountEvent { Deposited(Deposited) }
///
/// #[derive(Clone, Debug, Default, Serialize, Deserialize)]
/// struct Account { balance: u64 }
///
/// impl Apply<Deposited> for Account {
///     fn apply(&mut self, event: &Deposited) { self.balance += event.amount; }
/// }
///
/// impl Aggregate for Account {
///     const CATEGORY: &'static str = "account";
///     type Command = u64;
///     type Event = AccountEvent;
///     type Error = std::convert::Infallible;
///     fn handle(&self, amount: &u64) -> Result<Vec<AccountEvent>, Self::Error> {
///         Ok(vec![Deposited { amount: *amount }.into()])
///     }
/// }
///
/// // Both traits are in scope: a payload goes to its `Apply` impl, an event to `evolve`.
/// let mut account = Account::default();
/// account.apply(&Deposited { amount: 2 });
/// account.evolve(&AccountEvent::from(Deposited { amount: 3 }));
/// assert_eq!(account.balance, 5);
/// ```
///
/// Without the derive's `apply(..)`, implement [`ApplyEvent<Account>`](ApplyEvent) for the event
/// enum by hand: a `match` that says what each variant does.
///
/// The state is cloned (a repository keeps it in memory between commands and hands each caller
/// the state after its command) and serializable (for snapshots); bump
/// [`SNAPSHOT_VERSION`](Aggregate::SNAPSHOT_VERSION) whenever its serialized shape changes and old
/// snapshots are ignored (the aggregate is then rebuilt from its events).
pub trait Aggregate:
    Clone + Default + Serialize + DeserializeOwned + Send + Sync + 'static
{
    /// The aggregate type's name; it is the category of its streams (`<CATEGORY>-<id>`).
    const CATEGORY: &'static str;

    /// Schema version of this aggregate's snapshots.
    const SNAPSHOT_VERSION: u32 = 1;

    /// The commands it accepts.
    type Command: Send + Sync;

    /// The events it emits and is rebuilt from; [`ApplyEvent`] routes each one to the state.
    type Event: DomainEvent + ApplyEvent<Self>;

    /// Why it rejects a command.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Decides what happens in response to `command`.
    fn handle(&self, command: &Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// Evolves the state by one event: [`ApplyEvent::apply_to`], which routes each variant to its
    /// [`Apply`] impl. Deterministic and infallible: events are facts.
    ///
    /// Provided; the repository, [`Decision`] and the test harness call it. Override it only to
    /// wrap the dispatch (say, to count events): what an event does belongs in its [`Apply`] impl
    /// or in a hand-written [`ApplyEvent`].
    fn evolve(&mut self, event: &Self::Event) {
        event.apply_to(self);
    }

    /// The stream of the aggregate with id `id`: `<CATEGORY>-<id>`, validated. Needs no store or
    /// repository:
    ///
    /// ```
    /// # use es_core::Aggregate;
    /// # #[allow(dead_code)]
    /// # fn show<Account: Aggregate>() -> Result<(), es_core::InvalidStreamId> {
    /// let stream = Account::stream_id("42")?;
    /// assert_eq!(stream.id(), "42");
    /// # Ok(()) }
    /// ```
    fn stream_id(id: &str) -> Result<StreamId, InvalidStreamId> {
        StreamId::new(Self::CATEGORY, id)
    }
}

/// Applies one event payload type to a state. Implement it once per event of an aggregate; the
/// `DomainEvent` derive routes each variant of the event enum to the matching impl.
///
/// Its method is `apply` and the aggregate's is [`evolve`](Aggregate::evolve), so with both traits
/// in scope `state.apply(&payload)` and `state.evolve(&event)` are never ambiguous.
#[diagnostic::on_unimplemented(
    message = "`{Self}` has no handler for event `{E}`",
    label = "this variant's payload needs a handler",
    note = "add `impl Apply<{E}> for {Self} {{ fn apply(&mut self, event: &{E}) {{ .. }} }}`"
)]
pub trait Apply<E> {
    /// Evolves the state by `event`.
    fn apply(&mut self, event: &E);
}

/// Routes every variant of an event enum to the state's [`Apply`] impls. Generated by
/// `#[derive(DomainEvent)]` with `#[event(apply(State))]`; implement it by hand for a dispatch of
/// your own (an [`Aggregate`]'s event enum must implement it for the aggregate).
pub trait ApplyEvent<S> {
    /// Applies this event to `state`.
    fn apply_to(&self, state: &mut S);
}

/// Builds the events of one command while letting later decisions see earlier events.
///
/// ```
/// # use es_core::{Aggregate, Decision};
/// # #[allow(dead_code)]
/// # fn example<A: Aggregate + Clone>(account: &A, first: A::Event, second: impl FnOnce(&A) -> Option<A::Event>) -> Vec<A::Event> {
/// let mut decision = Decision::new(account);
/// decision.emit(first);
/// if let Some(event) = second(decision.state()) {
///     decision.emit(event);
/// }
/// decision.into_events()
/// # }
/// ```
///
/// The aggregate is cloned on the first emit only; `handle` keeps `&self`.
#[derive(Debug)]
pub struct Decision<'a, A: Aggregate + Clone> {
    base: &'a A,
    scratch: Option<A>,
    events: Vec<A::Event>,
}

impl<'a, A: Aggregate + Clone> Decision<'a, A> {
    /// Starts a decision on `state`.
    pub fn new(state: &'a A) -> Self {
        Self {
            base: state,
            scratch: None,
            events: Vec::new(),
        }
    }

    /// The state as it would be after the events emitted so far.
    pub fn state(&self) -> &A {
        self.scratch.as_ref().unwrap_or(self.base)
    }

    /// Records an event and applies it to the scratch state.
    pub fn emit(&mut self, event: impl Into<A::Event>) -> &A {
        let event = event.into();
        let state = self.scratch.get_or_insert_with(|| self.base.clone());
        state.evolve(&event);
        self.events.push(event);
        state
    }

    /// The events emitted so far.
    pub fn events(&self) -> &[A::Event] {
        &self.events
    }

    /// Finishes the decision.
    pub fn into_events(self) -> Vec<A::Event> {
        self.events
    }
}
