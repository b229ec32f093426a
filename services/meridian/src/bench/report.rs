//! The report: a row per step (percentiles from the step's tally), the table printed while
//! the run goes on, and the JSON report written at its end.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use super::connections::Shared;
use super::{setup_err, BenchError};

/// One row of the report.
#[derive(Debug, Clone, Serialize)]
pub struct StepResult {
    pub workload: String,
    pub step: String,
    pub target_rate: u64,
    pub sent: u64,
    pub send_errors: u64,
    pub delivered: u64,
    pub delivered_per_s: f64,
    pub undelivered: u64,
    pub duplicates: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub server_cpu_s: f64,
    pub cpu_s_per_1k: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_per_conn_kib: Option<f64>,
    /// X1: the receiving region's mirror of the sending region's stream during the step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mirror_lag: Option<MirrorLag>,
}

/// Mirror lag sampled from `/v1/admin/regions` during a step: what JetStream reports (events
/// the mirror is behind its origin, how long since it last heard from the origin) and the
/// sequence gap between origin and mirror read at the same moment.
#[derive(Debug, Clone, Serialize)]
pub struct MirrorLag {
    pub samples: u64,
    pub max_events: u64,
    pub mean_events: f64,
    pub active_age_max_ms: u64,
    /// The origin's last sequence minus the mirror's, read at the same moment.
    pub max_gap_events: u64,
    pub mean_gap_events: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub machine: String,
    pub cores: usize,
    pub command: String,
    pub endpoint: String,
    pub steps: Vec<StepResult>,
}

impl BenchReport {
    /// Writes the report as pretty JSON.
    pub(super) fn write(&self, out: &Path) -> Result<(), BenchError> {
        let json = serde_json::to_string_pretty(self).map_err(setup_err)?;
        std::fs::write(out, json).map_err(|e| BenchError::Setup(format!("writing {}: {e}", out.display())))
    }
}

pub(super) fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

pub(super) fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
        })
        .and_then(|k| k.parse::<u64>().ok())
        .map(|k| k / 1024 / 1024)
        .unwrap_or(0);
    format!(
        "{cpu}, {} cores, {mem} GiB",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    )
}

pub(super) fn print_header() {
    println!(
        "{:<4} {:<14} {:>8} {:>8} {:>10} {:>7} {:>5} {:>8} {:>8} {:>8} {:>9}",
        "wl", "step", "sent", "deliv", "deliv/s", "undeliv", "dups", "p50 ms", "p99 ms", "max ms", "cpu/1k s"
    );
}

pub(super) fn print_row(r: &StepResult) {
    println!(
        "{:<4} {:<14} {:>8} {:>8} {:>10.0} {:>7} {:>5} {:>8.1} {:>8.1} {:>8.1} {:>9.3}{}",
        r.workload,
        r.step,
        r.sent,
        r.delivered,
        r.delivered_per_s,
        r.undelivered,
        r.duplicates,
        r.p50_ms,
        r.p99_ms,
        r.max_ms,
        r.cpu_s_per_1k,
        r.memory_per_conn_kib
            .map(|m| format!("  {m:.1} KiB/conn"))
            .unwrap_or_default()
    );
}

/// What the sending side of a step did.
pub(super) struct StepOutcome {
    pub(super) sent: u64,
    pub(super) send_errors: u64,
    /// Receipts expected (messages times recipients).
    pub(super) expected: u64,
    /// How long sending took.
    pub(super) window: Duration,
}

/// Server CPU seconds per 1,000 deliveries (0 when nothing was delivered).
pub(super) fn cpu_s_per_1k(cpu_s: f64, delivered: u64) -> f64 {
    if delivered > 0 {
        cpu_s / (delivered as f64 / 1000.0)
    } else {
        0.0
    }
}

/// Collects a step's tally into a row.
pub(super) fn finish_step(
    shared: &Shared,
    workload: &str,
    step: String,
    target_rate: u64,
    out: StepOutcome,
    cpu_s: f64,
) -> StepResult {
    let StepOutcome {
        sent,
        send_errors,
        expected,
        window: elapsed,
    } = out;
    let mut tally = shared.tally.lock().unwrap_or_else(|p| p.into_inner());
    let mut lat = std::mem::take(&mut tally.latencies_us);
    let seen = std::mem::take(&mut tally.seen);
    lat.sort_unstable();
    let unique = seen.len() as u64;
    let duplicates: u64 = seen.values().map(|c| (*c as u64).saturating_sub(1)).sum();
    StepResult {
        workload: workload.into(),
        step,
        target_rate,
        sent,
        send_errors,
        delivered: unique,
        delivered_per_s: unique as f64 / elapsed.as_secs_f64().max(0.001),
        undelivered: expected.saturating_sub(unique),
        duplicates,
        p50_ms: percentile(&lat, 0.50),
        p99_ms: percentile(&lat, 0.99),
        p999_ms: percentile(&lat, 0.999),
        max_ms: lat.last().map_or(0.0, |m| *m as f64 / 1000.0),
        server_cpu_s: cpu_s,
        cpu_s_per_1k: cpu_s_per_1k(cpu_s, unique),
        memory_per_conn_kib: None,
        mirror_lag: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
