//! Raw calls of the List app, for tests that go through `Session::invoke`.

use bytes::Bytes;
use edgeshift_examples::pb::list::{AddReply, AddRequest, ItemsReply, ItemsRequest};
use prost::Message;

/// `List/Add`.
pub const ADD: &str = "/list.v1.List/Add";
/// `List/Items`.
pub const ITEMS: &str = "/list.v1.List/Items";

/// An encoded `AddRequest`.
pub fn add(item: &str) -> Bytes {
    AddRequest { item: item.into() }.encode_to_vec().into()
}

/// An encoded `ItemsRequest`.
pub fn items_req(delay_ms_per_item: u32) -> Bytes {
    ItemsRequest { delay_ms_per_item }.encode_to_vec().into()
}

/// The items of an encoded `ItemsReply`.
pub fn items_of(b: Bytes) -> Vec<String> {
    ItemsReply::decode(b).expect("an ItemsReply").items
}

/// The count of an encoded `AddReply`.
pub fn count_of(b: Bytes) -> u64 {
    AddReply::decode(b).expect("an AddReply").count
}
