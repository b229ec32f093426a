//! Chaos drills: `meridian drill <scenario>` (see chaos/README.md).
//!
//! - `workload`: simulated clients (meridian-client) in every region, recording every
//!   acknowledged send and every received entry (`record`).
//! - `check`: the invariants checked at the end of every drill.
//! - `report`: report.json, report.svg and the terminal summary.
//! - `control`: the client of the launcher's control API (faults) and the admin API.

pub mod check;
pub mod record;
pub mod workload;
