//! Given/when/then tests of the bank account, with no store.

use es_testkit::AggregateTest;
use example_bank::{
    AccountCommand, AccountError, AccountOpened, BankAccount, MoneyDeposited, MoneyWithdrawn,
};

fn opened() -> AccountOpened {
    AccountOpened {
        owner: "ada".into(),
        currency: "EUR".into(),
    }
}

#[test]
fn opening_an_account() {
    let state = AggregateTest::<BankAccount>::given_no_events()
        .when(AccountCommand::OpenAccount {
            owner: "ada".into(),
            currency: "EUR".into(),
        })
        .then_expect_events([opened()]);
    assert_eq!(state.owner.as_deref(), Some("ada"));
}

#[test]
fn an_account_opens_once() {
    AggregateTest::<BankAccount>::given([opened()])
        .when(AccountCommand::OpenAccount {
            owner: "bob".into(),
            currency: "EUR".into(),
        })
        .then_expect_error(AccountError::AlreadyOpen);
}

#[test]
fn deposits_and_withdrawals_move_the_balance() {
    let state =
        AggregateTest::<BankAccount>::given(
            [opened().into(), MoneyDeposited { amount: 500 }.into()]
                as [example_bank::AccountEvent; 2],
        )
        .when(AccountCommand::WithdrawMoney { amount: 200 })
        .then_expect_events([MoneyWithdrawn { amount: 200 }]);
    assert_eq!(state.balance, 300);
}

#[test]
fn overdrawing_is_refused() {
    AggregateTest::<BankAccount>::given(
        [opened().into(), MoneyDeposited { amount: 100 }.into()] as [example_bank::AccountEvent; 2]
    )
    .when(AccountCommand::WithdrawMoney { amount: 101 })
    .then_expect_error(AccountError::InsufficientFunds {
        balance: 100,
        requested: 101,
    });
}

#[test]
fn a_missing_account_refuses_money() {
    AggregateTest::<BankAccount>::given_no_events()
        .when(AccountCommand::DepositMoney { amount: 1 })
        .then_expect_error(AccountError::NotOpen);
}

#[test]
fn zero_amounts_are_refused() {
    AggregateTest::<BankAccount>::given([opened()])
        .when(AccountCommand::DepositMoney { amount: 0 })
        .then_expect_error_matching(|e| *e == AccountError::InvalidAmount);
}
