//! Meridian's vocabulary, shared by every role: validated ids, the hybrid logical clock,
//! order keys and cursors, the generated event types, and the errors they raise.
//!
//! # Layout
//! - [`ids`]: `UserId`, `ConversationId` (direct ids derived from the two members),
//!   `EventId` (UUIDv7, or UUIDv8 derived from sender + client_msg_id), `RegionId`, `DeviceId`.
//! - [`hlc`]: the hybrid logical clock that stamps every event.
//! - [`order_key`]: `(hlc, origin_region, event_id)` with an order-preserving byte encoding
//!   and the opaque cursor strings clients see.
//! - [`events`]: the prost types generated from `proto/meridian/v1/`: the event envelope
//!   (`events.proto`) and the live delivery message `LiveEntry` (`live.proto`).
//! - [`error`]: `ModelError`, raised when input does not validate.

pub mod error;
pub mod hlc;
pub mod ids;
pub mod order_key;

/// The event envelope and every event body (`proto/meridian/v1/events.proto`), and the live
/// delivery message `LiveEntry` (`proto/meridian/v1/live.proto`).
#[allow(clippy::all, missing_docs)]
pub mod events {
    include!(concat!(env!("OUT_DIR"), "/meridian.v1.rs"));
}

pub use error::ModelError;
pub use hlc::{Hlc, HybridClock};
pub use ids::{ConversationId, DeviceId, EventId, RegionId, UserId};
pub use order_key::{Cursor, OrderKey};
