//! Faults on purpose, and the drills that show Meridian survives them.
//!
//! # Layout
//! - [`link`]: [`LinkProxy`], a TCP proxy standing for one WAN link between regions (delay,
//!   jitter, loss, cuts); `meridian up` puts one between each region's nats-server and the
//!   hub.
//! - [`drill`]: `meridian drill <scenario>`: a workload of simulated clients in every region,
//!   faults from a scenario, the invariant checker that runs at the end, and the report
//!   (report.json, report.svg).

pub mod drill;
pub mod link;

pub use link::{LinkConfig, LinkError, LinkHandle, LinkProxy, LinkShape};
