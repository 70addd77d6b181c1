//! The order aggregate the benchmarks rehydrate and command: realistic payloads (about 200 bytes
//! of JSON per event), one upcast event type. And a warehouse item, whose commands can be
//! rejected, for the command race.

use es_core::{upcast, Aggregate, Apply, DomainEvent, Metadata};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A line added to an order (schema v2; v1 had no currency).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ItemAdded {
    pub(crate) order_id: String,
    pub(crate) sku: String,
    pub(crate) qty: u32,
    pub(crate) unit_price_cents: u64,
    // A default lets the plain-serde baseline decode v1 payloads too.
    #[serde(default)]
    pub(crate) currency: String,
    pub(crate) note: String,
}

/// A payment against an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct PaymentReceived {
    pub(crate) order_id: String,
    pub(crate) amount_cents: u64,
    pub(crate) method: String,
    pub(crate) reference: String,
}

/// The order was shipped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct OrderShipped {
    pub(crate) order_id: String,
    pub(crate) carrier: String,
    pub(crate) tracking: String,
}

/// Order events.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
#[event(apply(Order))]
pub(crate) enum OrderEvent {
    #[event(version = 2)]
    ItemAdded(ItemAdded),
    PaymentReceived(PaymentReceived),
    OrderShipped(OrderShipped),
}

/// Order state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Order {
    pub(crate) lines: u64,
    pub(crate) total_cents: u64,
    pub(crate) paid_cents: u64,
    pub(crate) shipments: u64,
    pub(crate) last_sku: String,
}

impl Apply<ItemAdded> for Order {
    fn apply(&mut self, e: &ItemAdded) {
        self.lines += 1;
        self.total_cents += u64::from(e.qty) * e.unit_price_cents;
        self.last_sku.clone_from(&e.sku);
    }
}

impl Apply<PaymentReceived> for Order {
    fn apply(&mut self, e: &PaymentReceived) {
        self.paid_cents += e.amount_cents;
    }
}

impl Apply<OrderShipped> for Order {
    fn apply(&mut self, _: &OrderShipped) {
        self.shipments += 1;
    }
}

/// Orders never reject commands in the benchmarks.
#[derive(Debug, thiserror::Error)]
#[error("never")]
pub(crate) struct Never;

/// An order's command is the events it records: the benchmarks choose how many per command.
impl Aggregate for Order {
    const CATEGORY: &'static str = "order";
    type Command = Vec<OrderEvent>;
    type Event = OrderEvent;
    type Error = Never;

    fn handle(&self, command: &Vec<OrderEvent>) -> Result<Vec<OrderEvent>, Never> {
        Ok(command.clone())
    }
}

/// The same dispatch written by hand, to compare with the derived one.
pub(crate) fn apply_by_hand(order: &mut Order, event: &OrderEvent) {
    match event {
        OrderEvent::ItemAdded(e) => <Order as Apply<ItemAdded>>::apply(order, e),
        OrderEvent::PaymentReceived(e) => <Order as Apply<PaymentReceived>>::apply(order, e),
        OrderEvent::OrderShipped(e) => <Order as Apply<OrderShipped>>::apply(order, e),
    }
}

/// Plain `serde_json` decoding of a stored payload into the enum, without the framework.
pub(crate) fn decode_by_hand(event_type: &str, payload: &[u8]) -> serde_json::Result<OrderEvent> {
    Ok(match event_type {
        "ItemAdded" => OrderEvent::ItemAdded(serde_json::from_slice(payload)?),
        "PaymentReceived" => OrderEvent::PaymentReceived(serde_json::from_slice(payload)?),
        _ => OrderEvent::OrderShipped(serde_json::from_slice(payload)?),
    })
}

/// The `i`-th event of the benchmark stream as the domain emits it today (current schemas).
pub(crate) fn order_event(i: u64) -> OrderEvent {
    let (event_type, _, mut payload) = stored_event(i);
    if event_type == "ItemAdded" {
        payload["currency"] = "EUR".into();
    }
    decode_by_hand(event_type, payload.to_string().as_bytes())
        .expect("the benchmark payloads decode")
}

/// The metadata of one benchmark command: a correlation and a causation id, as an application
/// would set them.
pub(crate) fn metadata() -> Metadata {
    Metadata::new()
        .with_correlation_id(Uuid::now_v7())
        .with_causation_id(Uuid::new_v4())
}

/// `ItemAdded` v1 had no currency; every v1 order was in euros.
pub(crate) fn item_added_v1() -> upcast::FnUpcaster {
    upcast::map("ItemAdded", 1, |mut payload| {
        payload["currency"] = "EUR".into();
        Ok(payload)
    })
}

/// The `i`-th event of the benchmark stream, as stored: one in a hundred is an old `ItemAdded`
/// v1 that must be upcast. Returns (type, schema version, payload).
pub(crate) fn stored_event(i: u64) -> (&'static str, u32, serde_json::Value) {
    let order_id = "ord_7f3c2a9e-4b1d-4c8e-9a2f-1e5d6c7b8a90";
    match i % 4 {
        0 | 1 if i % 100 == 1 => (
            "ItemAdded",
            1,
            serde_json::json!({ "order_id": order_id, "sku": format!("SKU-RED-SHIRT-{i}"), "qty": 2,
                "unit_price_cents": 1999, "note": "gift wrap, please: handle with care" }),
        ),
        0 | 1 => (
            "ItemAdded",
            2,
            serde_json::json!({ "order_id": order_id, "sku": format!("SKU-RED-SHIRT-{i}"), "qty": 2,
                "unit_price_cents": 1999, "currency": "EUR", "note": "gift wrap, please: handle with care" }),
        ),
        2 => (
            "PaymentReceived",
            1,
            serde_json::json!({ "order_id": order_id, "amount_cents": 3998, "method": "card",
                "reference": format!("pay_{i:012}_cus_42a1b3c4") }),
        ),
        _ => (
            "OrderShipped",
            1,
            serde_json::json!({ "order_id": order_id, "carrier": "DHL Express",
                "tracking": format!("JD0146000033{i:08}") }),
        ),
    }
}

/// Units put on the shelf.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Stocked {
    pub(crate) units: u64,
}

/// Units set aside for an order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Reserved {
    pub(crate) units: u64,
}

/// Warehouse item events.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
#[event(apply(Item))]
pub(crate) enum ItemEvent {
    Stocked(Stocked),
    Reserved(Reserved),
}

/// The stock of one warehouse item.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Item {
    pub(crate) available: u64,
    pub(crate) reserved: u64,
}

impl Apply<Stocked> for Item {
    fn apply(&mut self, e: &Stocked) {
        self.available += e.units;
    }
}

impl Apply<Reserved> for Item {
    fn apply(&mut self, e: &Reserved) {
        self.available -= e.units;
        self.reserved += e.units;
    }
}

/// Warehouse item commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ItemCommand {
    /// Put this many units on the shelf.
    Stock(u64),
    /// Set this many units aside, if there are that many.
    Reserve(u64),
}

/// A reservation asked for more than is on the shelf.
#[derive(Debug, thiserror::Error)]
#[error("out of stock: {requested} unit(s) asked for, {available} available")]
pub(crate) struct OutOfStock {
    pub(crate) requested: u64,
    pub(crate) available: u64,
}

impl Aggregate for Item {
    const CATEGORY: &'static str = "item";
    type Command = ItemCommand;
    type Event = ItemEvent;
    type Error = OutOfStock;

    fn handle(&self, command: &ItemCommand) -> Result<Vec<ItemEvent>, OutOfStock> {
        Ok(vec![match *command {
            ItemCommand::Stock(units) => Stocked { units }.into(),
            ItemCommand::Reserve(units) if units <= self.available => Reserved { units }.into(),
            ItemCommand::Reserve(requested) => {
                return Err(OutOfStock {
                    requested,
                    available: self.available,
                })
            }
        }])
    }
}
