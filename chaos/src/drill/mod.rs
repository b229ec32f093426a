//! Chaos drills: `meridian drill <scenario>` (chaos/README.md says what each proves).
//!
//! A drill runs a workload of simulated clients in every region, puts one scenario's faults
//! on the deployment through the launcher's control API, stops the workload, lets the regions
//! converge and checks the invariants; the verdict, the evidence of every violation and a
//! picture go to `<out>/<scenario>-<UTC time>/report.{json,svg}`.
//!
//! - `control`: the deployment (cluster.json), the control API and the admin calls.
//! - `workload`: simulated clients (meridian-client) in every region, recording every
//!   acknowledged send and every received entry (`record`).
//! - `check`: the invariants checked at the end of every drill.
//! - `report`: report.json, report.svg, the terminal summary and the progress line.
//! - `scenario`: the faults of each scenario, on a timeline.

pub mod check;
pub mod control;
pub mod record;
pub mod report;
mod scenario;
pub mod workload;

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use control::{Deployment, LinkSetting};
pub use record::now_ms;
pub use report::Report;

#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    #[error("setup: {0}")]
    Setup(String),
    #[error("call: {0}")]
    Call(String),
    #[error("calling {endpoint}: {message}")]
    Http { endpoint: String, message: String },
    #[error(transparent)]
    Client(#[from] meridian_client::ClientError),
    #[error("{0}")]
    Fault(String),
    #[error("cancelled")]
    Cancelled,
    #[error("writing the report: {0}")]
    Io(#[from] std::io::Error),
}

/// The scenarios of `meridian drill`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// A whole region killed (or hung with SIGSTOP), failed over, brought back, failed back.
    RegionLoss,
    /// A region's WAN link cut, then healed.
    Partition,
    /// Latency, jitter and loss on every region-to-region link.
    SlowLink,
    /// kill -9 of a random process every few seconds; the launcher restarts it.
    CrashSoak,
    /// One region's clock ahead (or behind) by a configured amount.
    ClockSkew,
}

impl Scenario {
    pub const ALL: [Scenario; 5] = [
        Scenario::RegionLoss,
        Scenario::Partition,
        Scenario::SlowLink,
        Scenario::CrashSoak,
        Scenario::ClockSkew,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scenario::RegionLoss => "region-loss",
            Scenario::Partition => "partition",
            Scenario::SlowLink => "slow-link",
            Scenario::CrashSoak => "crash-soak",
            Scenario::ClockSkew => "clock-skew",
        }
    }
}

impl FromStr for Scenario {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Scenario::ALL
            .into_iter()
            .find(|x| x.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Scenario::ALL.iter().map(|x| x.as_str()).collect();
                format!("unknown scenario {s:?}; one of {}", names.join(", "))
            })
    }
}

impl std::fmt::Display for Scenario {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a drill is asked for.
#[derive(Clone)]
pub struct DrillOptions {
    pub scenario: Scenario,
    /// The deployment's cluster.json.
    pub cluster: PathBuf,
    /// The deployment's admin key (not in cluster.json).
    pub admin_key: String,
    /// How long the workload runs, faults included.
    pub duration: Duration,
    /// The run goes to `<out>/<scenario>-<UTC yyyymmddThhmmssZ>/`.
    pub out: PathBuf,
    /// Sends per second, all regions together.
    pub rate_per_s: f64,
    pub users_per_region: usize,
    pub seed: u64,
    /// The region a fault hits (region-loss, partition, clock-skew); default: the second.
    pub target: Option<String>,
    /// region-loss: hang the region (SIGSTOP) instead of killing it.
    pub hang: bool,
    /// clock-skew: the offset of the target region's clock (negative: behind).
    pub skew_ms: i64,
    /// slow-link: what every region-to-region path gets (split over its two links).
    pub slow: LinkSetting,
    /// crash-soak: the mean interval between two kills.
    pub crash_every: Duration,
    /// How long the regions get to converge after the workload stops.
    pub converge_timeout: Duration,
}

impl DrillOptions {
    pub fn new(scenario: Scenario, cluster: PathBuf, admin_key: String) -> DrillOptions {
        DrillOptions {
            scenario,
            cluster,
            admin_key,
            duration: Duration::from_secs(60),
            out: PathBuf::from("drills"),
            rate_per_s: 50.0,
            users_per_region: 4,
            seed: rand::random(),
            target: None,
            hang: false,
            skew_ms: 5_000,
            slow: LinkSetting {
                delay_ms: 150,
                jitter_ms: 50,
                loss: 0.02,
                cut: false,
            },
            crash_every: Duration::from_secs(5),
            converge_timeout: Duration::from_secs(120),
        }
    }
}

/// The end of a drill: the report and the folder it was written to.
pub struct DrillOutcome {
    pub report: Report,
    pub dir: PathBuf,
}

/// Runs one drill against the deployment of `opts.cluster`: workload, faults, invariants,
/// report. `shutdown` ends it early (the faults in place are undone first).
pub async fn run(opts: DrillOptions, shutdown: CancellationToken) -> Result<DrillOutcome, DrillError> {
    scenario::run(opts, shutdown).await
}
