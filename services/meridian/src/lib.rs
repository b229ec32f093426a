//! The `meridian` binary's library: everything but argument parsing, so tests and the
//! launcher start roles in-process from the same code the binary runs.
//!
//! # Layout
//! - [`config`]: `RegionConfig`, the region file (`regions/<r>.toml`) with env overrides.
//! - [`logging`]: the log subscriber: text, or JSON lines for log shippers.
//! - [`region`]: one region process: store + bus + gateway + applier + sweeper, ordered stop.
//! - [`up`]: `meridian up`, a local deployment: a nats-server and a region process per
//!   region, supervised, stopped in order.
//! - [`nats_auth`]: `meridian nats-auth`, the NATS users of a production region.

pub mod admin;
pub mod bench;
pub mod config;
pub mod logging;
pub mod nats_auth;
pub mod region;
pub mod up;
