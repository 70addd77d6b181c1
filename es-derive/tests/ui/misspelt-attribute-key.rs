// A misspelt key gets a "did you mean" (a key of the other level too, saying where it goes);
// a key that is not close to any lists the valid ones.
use es_core::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Opened {}

#[derive(Serialize, Deserialize)]
struct Closed {}

struct Account;

#[derive(DomainEvent)]
#[event(aply(Account), renam = "AccountEvent")]
enum AccountEvent {
    #[event(verison = 2)]
    Opened(Opened),
    #[event(rename = "AccountClosed", crat = "::es_core", tagged)]
    Closed(Closed),
}

fn main() {}
