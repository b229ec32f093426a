//! `meridian bench`: the load generator, run against a deployment's `cluster.json`.
//!
//! Open loop: sends leave at a fixed aggregate rate whether or not earlier ones were
//! delivered, so a slow server shows up as latency and loss instead of a politely lower
//! send rate (closed-loop generators hide exactly the overload they are meant to find).
//! Each message body is exactly 100 bytes of JSON and carries its send time; latency is
//! receipt time at the receiving client's WebSocket minus send time (one process, one clock).
//! After each step the generator waits up to 10 s for stragglers and counts what never
//! arrived. Server CPU comes from `/proc/<pid>/stat` of every process in `cluster.json`.
//!
//! Workloads: W1 one-to-one at rising rates; W2 group fan-out (a group of 50 with 10
//! senders, and one of 1,000 members — above the read-diffusion threshold); W3 offline
//! users receive, then connect and sync; W4 idle WebSockets and server memory per connection;
//! X1 one-to-one across regions (senders homed in `region`, receivers in `peer_region`) with
//! the receiving region's mirror lag.
//! "acks": closed-loop senders at each durability level, latency to the 202.

//!
//! # Layout
//! - this file: [`BenchOptions`] and [`run`].
//! - `target`: the deployment driven (a cluster.json, or [`OwnDeployment`]), its users' SDK
//!   clients, its processes' CPU and memory.
//! - `connections`: the generator's WebSockets and what they record.
//! - `report`: rows, percentiles, the printed table and the JSON report.
//! - `workloads`: W1-W4 and the open loop they share.
//! - `cross`: X1, on two regions.

mod connections;
mod cross;
mod report;
mod target;
mod workloads;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use report::{BenchReport, MirrorLag, StepResult};
pub use target::OwnDeployment;

use report::{machine_description, print_header};
use target::Target;
use workloads::{acks, w1, w2, w3, w4};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("cannot read {0}: {1}")]
    Cluster(String, String),
    #[error("setup: {0}")]
    Setup(String),
    #[error("cancelled")]
    Cancelled,
    #[error("call: {0}")]
    Call(#[from] meridian_client::ClientError),
}

fn setup_err(e: impl std::fmt::Display) -> BenchError {
    BenchError::Setup(e.to_string())
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The deployment's cluster.json.
    pub cluster: PathBuf,
    /// Which region to drive (X1: where the senders are homed).
    pub region: String,
    /// X1: where the receivers are homed; unset, the first other region of cluster.json.
    pub peer_region: Option<String>,
    /// Workloads to run: "w1", "w2", "w3", "w4", "x1".
    pub workloads: Vec<String>,
    /// W1 rates (aggregate msg/s) and step length.
    pub rates: Vec<u64>,
    pub step: Duration,
    pub users: usize,
    /// W1 sends over HTTP instead of the WebSocket.
    pub over_http: bool,
    /// W4 idle connections.
    pub idle_connections: usize,
    /// Where to write the JSON report.
    pub out: PathBuf,
    /// How long to wait for stragglers after a step.
    pub drain: Duration,
    /// A CI-sized run: W2 with small groups.
    pub smoke: bool,
    /// The deployment's admin key (cluster.json does not hold it).
    pub admin_key: String,
    /// Workload "acks": the durability levels to send at, one row each.
    pub ack_levels: Vec<String>,
}

impl BenchOptions {
    /// The full run of the issue: W1 at 1k..20k msg/s in 30 s steps, W2, W3, W4 with 50k.
    pub fn full(cluster: PathBuf, out: PathBuf) -> Self {
        Self {
            cluster,
            region: "us".into(),
            peer_region: None,
            workloads: vec!["w1".into(), "w2".into(), "w3".into(), "w4".into()],
            rates: vec![1_000, 2_000, 5_000, 10_000, 20_000],
            step: Duration::from_secs(30),
            users: 200,
            over_http: false,
            idle_connections: 50_000,
            out,
            drain: Duration::from_secs(10),
            smoke: false,
            admin_key: String::new(),
            ack_levels: vec!["process".into()],
        }
    }
}

/// Runs the selected workloads, printing progress and a table, and writes the JSON report.
pub async fn run(
    opts: BenchOptions,
    command: String,
    stop: CancellationToken,
) -> Result<BenchReport, BenchError> {
    let target = Arc::new(Target::load(&opts.cluster, &opts.region, &opts.admin_key)?);
    let mut report = BenchReport {
        machine: machine_description(),
        cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        command,
        endpoint: target.endpoint.clone(),
        steps: Vec::new(),
    };
    let run_id = format!(
        "b{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    );
    println!(
        "meridian bench against {} ({} server processes)",
        target.endpoint,
        target.pids.len()
    );
    print_header();
    for w in &opts.workloads {
        match target.wait_idle(Duration::from_secs(300)).await {
            Some(0) => {}
            lag => eprintln!("{w}: starting with an apply backlog of {lag:?} events"),
        }
        let rows = match w.as_str() {
            "w1" => w1(&target, &opts, &run_id, &stop).await?,
            "w2" => w2(&target, &opts, &run_id, &stop).await?,
            "w3" => w3(&target, &opts, &run_id, &stop).await?,
            "w4" => w4(&target, &opts, &run_id, &stop).await?,
            "x1" => {
                let peer = match &opts.peer_region {
                    Some(p) => p.clone(),
                    None => Target::other_region(&opts.cluster, &opts.region)?,
                };
                let to = Arc::new(Target::load(&opts.cluster, &peer, &opts.admin_key)?);
                cross::x1(&target, &to, &opts, &run_id, &stop).await?
            }
            "acks" => acks(&target, &opts, &run_id, &stop).await?,
            other => {
                return Err(BenchError::Setup(format!(
                    "unknown workload {other:?} (w1, w2, w3, w4, x1, acks)"
                )))
            }
        };
        report.steps.extend(rows);
        if stop.is_cancelled() {
            break;
        }
    }
    report.write(&opts.out)?;
    println!("report written to {}", opts.out.display());
    Ok(report)
}
