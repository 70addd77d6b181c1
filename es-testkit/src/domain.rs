//! A small ledger aggregate used by the conformance suite. Its `DomainEvent` impl is written by
//! hand so the suite does not depend on the derive.

use serde::{Deserialize, Serialize};

use es_core::{Aggregate, ApplyEvent, DomainEvent, EventSchema, PayloadError};

/// Category of ledger streams.
pub const CATEGORY: &str = "ledger";

/// A ledger account.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    /// Whether it was opened.
    pub open: bool,
    /// Current balance.
    pub balance: i64,
    /// Number of credits and debits.
    pub entries: u64,
    /// Currency of the last credit.
    pub currency: String,
}

/// Ledger commands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerCommand {
    /// Open the ledger.
    Open,
    /// Add an amount.
    Credit(i64),
    /// Remove an amount, if covered.
    Debit(i64),
    /// Emits nothing.
    Noop,
}

/// Ledger errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// Not opened yet.
    #[error("the ledger is not open")]
    NotOpen,
    /// Opened twice.
    #[error("the ledger is already open")]
    AlreadyOpen,
    /// Balance too low.
    #[error("insufficient funds: balance {balance}, requested {requested}")]
    InsufficientFunds {
        /// Balance at decision time.
        balance: i64,
        /// Amount requested.
        requested: i64,
    },
}

/// Payload of `Opened`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Opened {}

/// Payload of `Credited` (schema v2: v1 had no currency).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credited {
    /// Amount.
    pub amount: i64,
    /// Currency.
    pub currency: String,
}

/// Payload of `Debited`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Debited {
    /// Amount.
    pub amount: i64,
}

/// Ledger events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerEvent {
    /// The ledger was opened.
    Opened(Opened),
    /// Money came in.
    Credited(Credited),
    /// Money went out.
    Debited(Debited),
}

impl DomainEvent for LedgerEvent {
    const EVENT_TYPES: &'static [EventSchema] = &[
        EventSchema {
            name: "Opened",
            version: 1,
        },
        EventSchema {
            name: "Credited",
            version: 2,
        },
        EventSchema {
            name: "Debited",
            version: 1,
        },
    ];

    fn event_type(&self) -> &'static str {
        match self {
            Self::Opened(_) => "Opened",
            Self::Credited(_) => "Credited",
            Self::Debited(_) => "Debited",
        }
    }

    fn schema_version(&self) -> u32 {
        match self {
            Self::Credited(_) => 2,
            Self::Opened(_) | Self::Debited(_) => 1,
        }
    }

    fn to_payload(&self) -> Result<Vec<u8>, serde_json::Error> {
        match self {
            Self::Opened(p) => serde_json::to_vec(p),
            Self::Credited(p) => serde_json::to_vec(p),
            Self::Debited(p) => serde_json::to_vec(p),
        }
    }

    fn from_payload(event_type: &str, payload: &[u8]) -> Result<Self, PayloadError> {
        match event_type {
            "Opened" => serde_json::from_slice(payload).map(Self::Opened),
            "Credited" => serde_json::from_slice(payload).map(Self::Credited),
            "Debited" => serde_json::from_slice(payload).map(Self::Debited),
            other => return Err(PayloadError::UnknownType(other.to_owned())),
        }
        .map_err(PayloadError::Invalid)
    }

    fn from_value(event_type: &str, payload: serde_json::Value) -> Result<Self, PayloadError> {
        match event_type {
            "Opened" => serde_json::from_value(payload).map(Self::Opened),
            "Credited" => serde_json::from_value(payload).map(Self::Credited),
            "Debited" => serde_json::from_value(payload).map(Self::Debited),
            other => return Err(PayloadError::UnknownType(other.to_owned())),
        }
        .map_err(PayloadError::Invalid)
    }
}

impl Aggregate for Ledger {
    const CATEGORY: &'static str = CATEGORY;
    type Command = LedgerCommand;
    type Event = LedgerEvent;
    type Error = LedgerError;

    fn handle(&self, command: &LedgerCommand) -> Result<Vec<LedgerEvent>, LedgerError> {
        match command {
            LedgerCommand::Open if self.open => Err(LedgerError::AlreadyOpen),
            LedgerCommand::Open => Ok(vec![LedgerEvent::Opened(Opened {})]),
            _ if !self.open => Err(LedgerError::NotOpen),
            LedgerCommand::Credit(amount) => Ok(vec![LedgerEvent::Credited(Credited {
                amount: *amount,
                currency: "EUR".to_owned(),
            })]),
            LedgerCommand::Debit(amount) if *amount > self.balance => {
                Err(LedgerError::InsufficientFunds {
                    balance: self.balance,
                    requested: *amount,
                })
            }
            LedgerCommand::Debit(amount) => {
                Ok(vec![LedgerEvent::Debited(Debited { amount: *amount })])
            }
            LedgerCommand::Noop => Ok(Vec::new()),
        }
    }
}

/// A hand-written dispatch: the events of a ledger, each applied by one arm.
impl ApplyEvent<Ledger> for LedgerEvent {
    fn apply_to(&self, ledger: &mut Ledger) {
        match self {
            LedgerEvent::Opened(_) => ledger.open = true,
            LedgerEvent::Credited(e) => {
                ledger.balance += e.amount;
                ledger.entries += 1;
                ledger.currency.clone_from(&e.currency);
            }
            LedgerEvent::Debited(e) => {
                ledger.balance -= e.amount;
                ledger.entries += 1;
            }
        }
    }
}
