//! The bank account domain: written once against `es-core`, independent of any store.
//!
//! Commands `OpenAccount`, `DepositMoney` and `WithdrawMoney` become the events `AccountOpened`,
//! `MoneyDeposited` and `MoneyWithdrawn`; a withdrawal the balance does not cover is rejected
//! with a domain error. `AccountOpened` is at schema version 2 (version 1 had no currency); the
//! [`upcasters`] bring old events up to date when they are read.

use es_core::{upcast, Aggregate, Apply, DomainEvent, StreamId, Translator};
use serde::{Deserialize, Serialize};

/// The aggregate's category: accounts live in streams `account-<id>`.
pub const CATEGORY: &str = "account";

/// An account was opened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountOpened {
    /// Who owns it.
    pub owner: String,
    /// ISO currency code (added in schema version 2).
    pub currency: String,
}

/// Money was paid in, in cents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoneyDeposited {
    /// Amount in cents.
    pub amount: u64,
}

/// Money was paid out, in cents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoneyWithdrawn {
    /// Amount in cents.
    pub amount: u64,
}

/// Everything that can happen to an account.
#[derive(Debug, Clone, PartialEq, Eq, DomainEvent)]
#[event(apply(BankAccount))]
pub enum AccountEvent {
    /// See [`AccountOpened`].
    #[event(version = 2)]
    AccountOpened(AccountOpened),
    /// See [`MoneyDeposited`].
    MoneyDeposited(MoneyDeposited),
    /// See [`MoneyWithdrawn`].
    MoneyWithdrawn(MoneyWithdrawn),
}

/// What a teller can ask of an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccountCommand {
    /// Open the account.
    OpenAccount {
        /// Owner's name.
        owner: String,
        /// ISO currency code.
        currency: String,
    },
    /// Pay money in.
    DepositMoney {
        /// Amount in cents.
        amount: u64,
    },
    /// Pay money out, if the balance covers it.
    WithdrawMoney {
        /// Amount in cents.
        amount: u64,
    },
}

/// Why an account refuses a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccountError {
    /// The account was opened before.
    #[error("the account is already open")]
    AlreadyOpen,
    /// The account does not exist yet.
    #[error("the account is not open")]
    NotOpen,
    /// Zero amounts are refused.
    #[error("the amount must be positive")]
    InvalidAmount,
    /// The balance does not cover the withdrawal.
    #[error("insufficient funds: balance {balance} cents, requested {requested} cents")]
    InsufficientFunds {
        /// Balance in cents.
        balance: u64,
        /// Requested amount in cents.
        requested: u64,
    },
    /// A transfer between accounts of different currencies.
    #[error("cannot transfer from a {from} account to a {to} account")]
    CurrencyMismatch {
        /// The paying account's currency.
        from: String,
        /// The receiving account's currency.
        to: String,
    },
}

/// The decision of a transfer of `amount` cents from `from` to `to`: a withdrawal from one and a
/// deposit into the other, or the reason it is refused (either account not open, a zero amount,
/// insufficient funds, different currencies). Recorded in both accounts at once with
/// [`es_core::Repository::execute_two`]:
///
/// ```
/// # use es_core::{Metadata, Repository};
/// # use example_bank::{transfer, BankAccount};
/// # async fn pay(repo: &Repository<es_memory::InMemoryStore>) {
/// let moved = repo
///     .execute_two::<BankAccount, BankAccount, _>("alice", "bob", &Metadata::new(), |a, b| {
///         transfer(a, b, 2_500)
///     })
///     .await;
/// # let _ = moved;
/// # }
/// ```
pub fn transfer(
    from: &BankAccount,
    to: &BankAccount,
    amount: u64,
) -> Result<(Vec<AccountEvent>, Vec<AccountEvent>), AccountError> {
    if from.owner.is_some() && to.owner.is_some() && from.currency != to.currency {
        return Err(AccountError::CurrencyMismatch {
            from: from.currency.clone(),
            to: to.currency.clone(),
        });
    }
    let debit = from.handle(&AccountCommand::WithdrawMoney { amount })?;
    let credit = to.handle(&AccountCommand::DepositMoney { amount })?;
    Ok((debit, credit))
}

/// A bank account's state, rebuilt from its events.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BankAccount {
    /// The owner, once opened.
    pub owner: Option<String>,
    /// Currency of the account.
    pub currency: String,
    /// Balance in cents.
    pub balance: u64,
}

impl Aggregate for BankAccount {
    const CATEGORY: &'static str = CATEGORY;
    type Command = AccountCommand;
    type Event = AccountEvent;
    type Error = AccountError;

    fn handle(&self, command: &AccountCommand) -> Result<Vec<AccountEvent>, AccountError> {
        match command {
            AccountCommand::OpenAccount { owner, currency } => {
                if self.owner.is_some() {
                    return Err(AccountError::AlreadyOpen);
                }
                Ok(vec![AccountOpened {
                    owner: owner.clone(),
                    currency: currency.clone(),
                }
                .into()])
            }
            _ if self.owner.is_none() => Err(AccountError::NotOpen),
            AccountCommand::DepositMoney { amount: 0 }
            | AccountCommand::WithdrawMoney { amount: 0 } => Err(AccountError::InvalidAmount),
            AccountCommand::DepositMoney { amount } => {
                Ok(vec![MoneyDeposited { amount: *amount }.into()])
            }
            AccountCommand::WithdrawMoney { amount } if *amount > self.balance => {
                Err(AccountError::InsufficientFunds {
                    balance: self.balance,
                    requested: *amount,
                })
            }
            AccountCommand::WithdrawMoney { amount } => {
                Ok(vec![MoneyWithdrawn { amount: *amount }.into()])
            }
        }
    }
}

impl Apply<AccountOpened> for BankAccount {
    fn apply(&mut self, event: &AccountOpened) {
        self.owner = Some(event.owner.clone());
        self.currency.clone_from(&event.currency);
    }
}

impl Apply<MoneyDeposited> for BankAccount {
    fn apply(&mut self, event: &MoneyDeposited) {
        self.balance += event.amount;
    }
}

impl Apply<MoneyWithdrawn> for BankAccount {
    fn apply(&mut self, event: &MoneyWithdrawn) {
        self.balance -= event.amount;
    }
}

/// Upcasters for stored account events: `AccountOpened` v1 had no currency; accounts opened then
/// were all in euros.
pub fn upcasters() -> Vec<upcast::FnUpcaster> {
    vec![upcast::map("AccountOpened", 1, |mut payload| {
        let object = payload
            .as_object_mut()
            .ok_or(upcast::UpcastError::NotAnObject)?;
        object.insert("currency".into(), "EUR".into());
        Ok(payload)
    })]
}

/// The public contract other systems consume: integration events with their own names and
/// versions, so the domain events above can change without breaking consumers.
pub mod public {
    use es_core::DomainEvent;
    use serde::{Deserialize, Serialize};

    /// An account was opened.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct AccountOpenedV1 {
        /// The account id (the stream's aggregate id).
        pub account_id: String,
        /// Its currency.
        pub currency: String,
    }

    /// An account's balance changed.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct BalanceChangedV1 {
        /// The account id.
        pub account_id: String,
        /// Signed change in cents.
        pub delta_cents: i64,
        /// `deposit` or `withdrawal`.
        pub reason: String,
    }

    /// Messages on the `bank.accounts` topic.
    #[derive(Debug, Clone, PartialEq, Eq, DomainEvent)]
    pub enum AccountMessage {
        /// See [`AccountOpenedV1`].
        #[event(rename = "bank.account.opened")]
        Opened(AccountOpenedV1),
        /// See [`BalanceChangedV1`].
        #[event(rename = "bank.account.balance_changed")]
        BalanceChanged(BalanceChangedV1),
    }
}

/// The Kafka topic of the public account messages.
pub const PUBLIC_TOPIC: &str = "bank.accounts";

/// Translates account events into the public contract; the owner's name stays private.
#[derive(Debug, Clone, Copy, Default)]
pub struct PublicTranslator;

impl Translator<BankAccount> for PublicTranslator {
    type Message = public::AccountMessage;

    fn topic(&self) -> &'static str {
        PUBLIC_TOPIC
    }

    fn translate(&self, stream: &StreamId, event: &AccountEvent) -> Vec<public::AccountMessage> {
        let account_id = stream.id().to_owned();
        let change = |delta_cents: i64, reason: &str| {
            public::AccountMessage::BalanceChanged(public::BalanceChangedV1 {
                account_id: account_id.clone(),
                delta_cents,
                reason: reason.to_owned(),
            })
        };
        match event {
            AccountEvent::AccountOpened(e) => {
                vec![public::AccountMessage::Opened(public::AccountOpenedV1 {
                    account_id: account_id.clone(),
                    currency: e.currency.clone(),
                })]
            }
            AccountEvent::MoneyDeposited(e) => {
                vec![change(
                    i64::try_from(e.amount).unwrap_or(i64::MAX),
                    "deposit",
                )]
            }
            AccountEvent::MoneyWithdrawn(e) => {
                vec![change(
                    -i64::try_from(e.amount).unwrap_or(i64::MAX),
                    "withdrawal",
                )]
            }
        }
    }
}

/// Formats cents as `123.45`.
pub fn money(cents: u64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

/// A short description of an event, for display.
pub fn describe(event: &AccountEvent) -> String {
    match event {
        AccountEvent::AccountOpened(e) => format!("opened for {} in {}", e.owner, e.currency),
        AccountEvent::MoneyDeposited(e) => format!("deposited {}", money(e.amount)),
        AccountEvent::MoneyWithdrawn(e) => format!("withdrew {}", money(e.amount)),
    }
}

/// The bank's customers: a profile whose name and e-mail address are personal data, sealed
/// with the customer's own key (crypto-shredding, `es_core::personal`) so that forgetting the
/// customer erases them everywhere they are stored.
pub mod customer {
    use es_core::personal::Personal;
    use es_core::{Aggregate, Apply, DomainEvent};
    use serde::{Deserialize, Serialize};

    /// A customer registered: the subject of both personal fields is the customer id.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct CustomerRegistered {
        /// Personal: the full name.
        pub name: Personal<String>,
        /// Personal: the e-mail address.
        pub email: Personal<String>,
        /// Not personal: the service level.
        pub segment: String,
    }

    /// A customer's address changed.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct AddressChanged {
        /// Personal: the postal address.
        pub address: Personal<String>,
    }

    /// What can happen to a customer.
    #[derive(Debug, Clone, PartialEq, Eq, DomainEvent)]
    #[event(apply(Customer))]
    pub enum CustomerEvent {
        /// See [`CustomerRegistered`].
        CustomerRegistered(CustomerRegistered),
        /// See [`AddressChanged`].
        AddressChanged(AddressChanged),
    }

    /// What the bank can do with a customer.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum CustomerCommand {
        /// Register.
        Register {
            /// Full name.
            name: String,
            /// E-mail address.
            email: String,
        },
        /// Record a new postal address.
        ChangeAddress {
            /// The address.
            address: String,
        },
    }

    /// Why a customer refuses a command.
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    pub enum CustomerError {
        /// Registered before.
        #[error("the customer is already registered")]
        AlreadyRegistered,
        /// Not registered yet.
        #[error("the customer is not registered")]
        NotRegistered,
    }

    /// A customer profile, rebuilt from its events.
    #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Customer {
        /// The customer id (the subject of every personal field), once registered.
        pub id: Option<String>,
        /// The name.
        pub name: Option<Personal<String>>,
        /// The e-mail address.
        pub email: Option<Personal<String>>,
        /// The last postal address.
        pub address: Option<Personal<String>>,
        /// The service level.
        pub segment: String,
        /// How many times the address changed.
        pub moves: u32,
    }

    impl Customer {
        /// A personal field for display: the value, or `<erased>`.
        pub fn show(field: Option<&Personal<String>>) -> String {
            match field {
                None => "-".to_owned(),
                Some(Personal::Value { value, .. }) => value.clone(),
                Some(Personal::Erased { .. }) => "<erased>".to_owned(),
            }
        }
    }

    impl Aggregate for Customer {
        const CATEGORY: &'static str = "customer";
        /// The command, with the customer id (the subject of its personal data).
        type Command = (String, CustomerCommand);
        type Event = CustomerEvent;
        type Error = CustomerError;

        fn handle(
            &self,
            (id, command): &(String, CustomerCommand),
        ) -> Result<Vec<CustomerEvent>, CustomerError> {
            match command {
                CustomerCommand::Register { .. } if self.id.is_some() => {
                    Err(CustomerError::AlreadyRegistered)
                }
                CustomerCommand::Register { name, email } => Ok(vec![CustomerRegistered {
                    name: Personal::new(id, name.clone()),
                    email: Personal::new(id, email.clone()),
                    segment: "retail".into(),
                }
                .into()]),
                CustomerCommand::ChangeAddress { .. } if self.id.is_none() => {
                    Err(CustomerError::NotRegistered)
                }
                CustomerCommand::ChangeAddress { address } => Ok(vec![AddressChanged {
                    address: Personal::new(id, address.clone()),
                }
                .into()]),
            }
        }
    }

    impl Apply<CustomerRegistered> for Customer {
        fn apply(&mut self, event: &CustomerRegistered) {
            self.id = Some(event.name.subject().to_owned());
            self.name = Some(event.name.clone());
            self.email = Some(event.email.clone());
            self.segment.clone_from(&event.segment);
        }
    }

    impl Apply<AddressChanged> for Customer {
        fn apply(&mut self, event: &AddressChanged) {
            self.address = Some(event.address.clone());
            self.moves += 1;
        }
    }
}
