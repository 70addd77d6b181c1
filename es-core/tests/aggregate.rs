//! Writing an aggregate: the derived dispatch by default, a hand-written one when wanted, and
//! `Apply` and `Aggregate` in scope together without an ambiguous method.

use es_core::{Aggregate, Apply, ApplyEvent, Decision, DomainEvent, EventStore, Repository};
use es_memory::InMemoryStore;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Deposited {
    amount: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Withdrawn {
    amount: u64,
}

#[derive(Debug, Clone, DomainEvent)]
#[event(apply(Account))]
enum AccountEvent {
    Deposited(Deposited),
    Withdrawn(Withdrawn),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Account {
    balance: u64,
    moves: u32,
}

impl Apply<Deposited> for Account {
    fn apply(&mut self, event: &Deposited) {
        self.balance += event.amount;
        self.moves += 1;
    }
}

impl Apply<Withdrawn> for Account {
    fn apply(&mut self, event: &Withdrawn) {
        self.balance -= event.amount;
        self.moves += 1;
    }
}

#[derive(Debug, thiserror::Error)]
#[error("insufficient funds")]
struct Insufficient;

/// Deposits a signed amount; a withdrawal larger than the balance is refused.
impl Aggregate for Account {
    const CATEGORY: &'static str = "account";
    type Command = i64;
    type Event = AccountEvent;
    type Error = Insufficient;

    fn handle(&self, amount: &i64) -> Result<Vec<AccountEvent>, Insufficient> {
        let mut decision = Decision::new(self);
        if *amount >= 0 {
            decision.emit(Deposited {
                amount: amount.unsigned_abs(),
            });
        } else if amount.unsigned_abs() <= decision.state().balance {
            decision.emit(Withdrawn {
                amount: amount.unsigned_abs(),
            });
        } else {
            return Err(Insufficient);
        }
        Ok(decision.into_events())
    }
}

#[test]
fn apply_and_evolve_are_never_ambiguous() {
    let mut account = Account::default();
    // `Apply::apply` on a payload, `Aggregate::evolve` on an event of the enum.
    account.apply(&Deposited { amount: 10 });
    account.evolve(&AccountEvent::from(Withdrawn { amount: 4 }));
    account.evolve(&Deposited { amount: 1 }.into());
    assert_eq!((account.balance, account.moves), (7, 3));
}

#[tokio::test]
async fn the_repository_evolves_through_the_derived_dispatch() {
    let repo = Repository::new(InMemoryStore::new());
    repo.execute::<Account>("a", &10).await.unwrap();
    let executed = repo.execute::<Account>("a", &-3).await.unwrap();
    assert_eq!(executed.aggregate.balance, 7);
    let loaded = repo.load::<Account>("a").await.unwrap();
    assert_eq!((loaded.aggregate.balance, loaded.version), (7, 2));
    assert!(matches!(
        repo.execute::<Account>("a", &-8).await,
        Err(es_core::RepositoryError::Domain { .. })
    ));
}

/// A tally of the event types seen, with its dispatch written by hand.
#[derive(Debug, Clone, DomainEvent)]
enum TallyEvent {
    Deposited(Deposited),
    Withdrawn(Withdrawn),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Tally {
    deposits: u32,
    withdrawals: u32,
}

impl ApplyEvent<Tally> for TallyEvent {
    fn apply_to(&self, tally: &mut Tally) {
        match self {
            Self::Deposited(_) => tally.deposits += 1,
            Self::Withdrawn(_) => tally.withdrawals += 1,
        }
    }
}

impl Aggregate for Tally {
    const CATEGORY: &'static str = "tally";
    type Command = bool;
    type Event = TallyEvent;
    type Error = std::convert::Infallible;

    fn handle(&self, deposit: &bool) -> Result<Vec<TallyEvent>, Self::Error> {
        Ok(vec![if *deposit {
            Deposited { amount: 1 }.into()
        } else {
            Withdrawn { amount: 1 }.into()
        }])
    }
}

#[tokio::test]
async fn a_hand_written_dispatch_serves_the_repository_too() {
    let repo = Repository::new(InMemoryStore::new());
    for deposit in [true, true, false] {
        repo.execute::<Tally>("t", &deposit).await.unwrap();
    }
    let tally = repo.load::<Tally>("t").await.unwrap().aggregate;
    assert_eq!((tally.deposits, tally.withdrawals), (2, 1));
    let mut fresh = Tally::default();
    fresh.evolve(&Withdrawn { amount: 9 }.into());
    assert_eq!(fresh.withdrawals, 1);
}

#[tokio::test]
async fn the_stream_id_needs_no_repository_and_matches_the_repositorys() {
    // Called on the aggregate alone: no store type to spell out.
    let stream = Tally::stream_id("t").unwrap();
    assert_eq!(stream.as_str(), "tally-t");
    assert_eq!(
        Repository::<InMemoryStore>::stream_id::<Tally>("t").unwrap(),
        stream
    );
    assert!(Tally::stream_id("").is_err(), "an empty id is refused");

    // The repository writes to exactly that stream.
    let store = InMemoryStore::new();
    let repo = Repository::new(store.clone());
    repo.execute::<Tally>("t", &true).await.unwrap();
    assert_eq!(store.stream_version(&stream).await.unwrap(), 1);
}
