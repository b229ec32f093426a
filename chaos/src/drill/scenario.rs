//! The faults of each scenario on a timeline, around one workload; then the check and the
//! report.
//!
//! Every scenario is warm-up, fault window(s), tail: the workload runs throughout, so the
//! report shows throughput and latency before, during and after. Whatever a fault put in
//! place (a hold, a cut, a slow link, a stopped process, a skewed clock) is undone on every
//! exit path, a cancelled or failed drill included, so a drill never leaves a running
//! deployment broken.

use std::collections::BTreeMap;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::check;
use super::check::CheckOutcome;
use super::control::{Deployment, LinkSetting};
use super::record::WorkloadRecord;
use super::report::{Fault, ProgressCounts, ProgressLine, Report, Verdict, REPORT_SVG};
use super::workload::{Workload, WorkloadConfig};
use super::{now_ms, DrillError, DrillOptions, DrillOutcome, Scenario};

/// The workload's whole record, written next to the report when the drill fails.
pub const RECORD_JSON: &str = "record.json";
/// How long a fault's recovery is waited for before it is reported as not recovered.
const RECOVERY_LIMIT: Duration = Duration::from_secs(120);
/// How often readiness is polled while waiting for recovery.
const POLL: Duration = Duration::from_millis(250);

/// What must be undone when the drill ends.
#[derive(Clone, Debug)]
enum Undo {
    Hold(String),
    Stopped(String),
    Link(String, LinkSetting),
    Clock(String),
}

struct Drill {
    d: Deployment,
    opts: DrillOptions,
    workload: Workload,
    faults: Vec<Fault>,
    undo: Vec<Undo>,
    started: Instant,
    progress: ProgressLine,
    phase: String,
    shutdown: CancellationToken,
}

pub(super) async fn run(opts: DrillOptions, shutdown: CancellationToken) -> Result<DrillOutcome, DrillError> {
    let d = Deployment::load(&opts.cluster, &opts.admin_key)?;
    let targets = d.targets();
    if matches!(
        opts.scenario,
        Scenario::RegionLoss | Scenario::Partition | Scenario::SlowLink
    ) && targets.len() < 2
    {
        return Err(DrillError::Setup(format!(
            "{} needs two or more regions; the deployment has {}",
            opts.scenario,
            targets.len()
        )));
    }
    let started_at_ms = now_ms();
    let run_id = format!("d{:x}", started_at_ms % 0xff_ffff_ffff);
    let workload = Workload::start(
        WorkloadConfig {
            regions: targets.clone(),
            admin_key: opts.admin_key.clone(),
            users_per_region: opts.users_per_region,
            rate_per_s: opts.rate_per_s,
            seed: opts.seed,
            run_id,
        },
        shutdown.child_token(),
    )
    .await?;
    let mut drill = Drill {
        progress: ProgressLine::stderr(opts.duration),
        d,
        opts,
        workload,
        faults: Vec::new(),
        undo: Vec::new(),
        started: Instant::now(),
        phase: "warm-up".into(),
        shutdown,
    };
    let timeline = drill.timeline().await;
    // Undone in every case, before anything else: a failed drill must not leave a fault.
    drill.undo_all().await;
    let record = drill.workload.stop().await;
    timeline?;

    drill
        .progress
        .update("converging and checking", &ProgressCounts::default());
    drill.progress.finish();
    let outcome = check::check(
        &record,
        &targets,
        &drill.opts.admin_key,
        drill.opts.converge_timeout,
    )
    .await;
    let ended_at_ms = now_ms();
    let dir = drill.opts.out.join(format!(
        "{}-{}",
        drill.opts.scenario,
        utc_stamp(started_at_ms / 1000)
    ));
    std::fs::create_dir_all(&dir)?;
    if !outcome.passed() {
        // The whole record, as evidence beyond the violations' lines: every send, receipt
        // and inbox span (large for a long drill, so only when something is wrong).
        let text = serde_json::to_vec(&record).map_err(std::io::Error::other)?;
        std::fs::write(dir.join(RECORD_JSON), text)?;
    }
    let report = report_of(
        &drill.opts,
        targets.iter().map(|t| t.region.clone()).collect(),
        ended_at_ms,
        drill.faults,
        record,
        outcome,
    );
    report.write(&dir)?;
    Ok(DrillOutcome { report, dir })
}

impl Drill {
    async fn timeline(&mut self) -> Result<(), DrillError> {
        let total = self.opts.duration;
        let warm = (total / 7).max(Duration::from_secs(3));
        self.wait_until(warm).await?;
        match self.opts.scenario {
            Scenario::RegionLoss => self.region_loss().await?,
            Scenario::Partition => self.partition().await?,
            Scenario::SlowLink => self.slow_link().await?,
            Scenario::CrashSoak => self.crash_soak().await?,
            Scenario::ClockSkew => self.clock_skew().await?,
        }
        self.phase = "tail".into();
        self.wait_until(total).await
    }

    fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The region a fault hits: `--target`, else the second region.
    fn target(&self) -> Result<String, DrillError> {
        match &self.opts.target {
            Some(t) => {
                self.d.endpoint(t)?;
                Ok(t.clone())
            }
            None => Ok(self.d.regions[1.min(self.d.regions.len() - 1)].region.clone()),
        }
    }

    /// Runs the workload until `at` after the start, printing progress once a second.
    async fn wait_until(&mut self, at: Duration) -> Result<(), DrillError> {
        loop {
            let left = at.saturating_sub(self.elapsed());
            if left.is_zero() {
                return Ok(());
            }
            self.tick();
            tokio::select! {
                _ = self.shutdown.cancelled() => return Err(DrillError::Cancelled),
                _ = tokio::time::sleep(left.min(Duration::from_secs(1))) => {}
            }
        }
    }

    fn tick(&mut self) {
        let p = self.workload.progress();
        let counts = ProgressCounts {
            acked: p.acked,
            errors: p.errors,
            delivered: p.delivered,
            last_p99_ms: p.last_p99_ms,
        };
        self.progress.update(&self.phase, &counts);
    }

    /// Opens a fault; its index in `faults`.
    fn fault(&mut self, kind: &str, target: &str, detail: String) -> usize {
        self.phase = format!("fault: {kind} {target}");
        self.faults.push(Fault {
            kind: kind.to_string(),
            target: target.to_string(),
            detail,
            start_ms: now_ms(),
            end_ms: None,
            recovery_s: None,
        });
        self.faults.len() - 1
    }

    /// Closes a fault now, then waits (bounded) until every region is ready again, mirrors
    /// included, and records that wait as the fault's recovery time.
    async fn end_fault(&mut self, i: usize) -> Result<(), DrillError> {
        self.faults[i].end_ms = Some(now_ms());
        self.phase = format!("recovering: {} {}", self.faults[i].kind, self.faults[i].target);
        self.faults[i].recovery_s = self.recovered().await?;
        Ok(())
    }

    /// Seconds until the deployment is whole again: every region has applied every event
    /// each region's own stream held when the fault ended (those positions are taken from
    /// each region as soon as it answers: a region brought back answers once restarted), and
    /// every region answers `/readyz` 200 (store and NATS reachable, every mirror active).
    /// None past the limit.
    async fn recovered(&mut self) -> Result<Option<f64>, DrillError> {
        let from = Instant::now();
        let regions: Vec<String> = self.d.regions.iter().map(|r| r.region.clone()).collect();
        let mut marks: BTreeMap<String, u64> = BTreeMap::new();
        while from.elapsed() < RECOVERY_LIMIT {
            if marks.len() < regions.len() {
                for r in &regions {
                    if marks.contains_key(r) {
                        continue;
                    }
                    if let Ok(positions) = self.d.stream_positions(r).await {
                        if let Some(own) = positions.iter().find(|p| p.origin == *r).and_then(|p| p.last_seq)
                        {
                            marks.insert(r.clone(), own);
                        }
                    }
                }
            } else if self.caught_up(&regions, &marks).await && self.d.all_ready().await {
                return Ok(Some(from.elapsed().as_secs_f64()));
            }
            self.tick();
            tokio::select! {
                _ = self.shutdown.cancelled() => return Err(DrillError::Cancelled),
                _ = tokio::time::sleep(POLL) => {}
            }
        }
        Ok(None)
    }

    /// Whether every region has applied every stream up to `marks` (origin -> seq).
    async fn caught_up(&self, regions: &[String], marks: &BTreeMap<String, u64>) -> bool {
        for r in regions {
            let Ok(positions) = self.d.stream_positions(r).await else {
                return false;
            };
            for (origin, mark) in marks {
                match positions.iter().find(|p| p.origin == *origin) {
                    Some(p) if p.applied >= *mark => {}
                    _ => return false,
                }
            }
        }
        true
    }

    /// A whole region lost: held (so the launcher does not restart it), killed or hung,
    /// failed over to the first other region, brought back, caught up, failed back.
    async fn region_loss(&mut self) -> Result<(), DrillError> {
        let total = self.opts.duration;
        let lost = self.target()?;
        let acting = self
            .d
            .regions
            .iter()
            .find(|r| r.region != lost)
            .map(|r| r.region.clone())
            .expect("two or more regions");
        self.d.hold(&lost, true).await?;
        self.undo.push(Undo::Hold(lost.clone()));
        let (signal, how) = if self.opts.hang {
            ("STOP", "hung (SIGSTOP) nats-server and region process")
        } else {
            ("KILL", "killed (SIGKILL) nats-server and region process")
        };
        let i = self.fault("region-loss", &lost, how.to_string());
        // The region process first: killing its nats-server first would let it see the
        // disconnect and react, which is not what losing a machine room looks like.
        for what in ["region", "nats"] {
            let target = format!("{lost}/{what}");
            self.d.signal(&target, signal).await?;
            if self.opts.hang {
                self.undo.push(Undo::Stopped(target));
            }
        }

        // Fail over, retried while the acting region cannot yet publish it (bounded).
        let failover_from = Instant::now();
        let f = self.fault("failover", &lost, format!("users of {lost} served by {acting}"));
        loop {
            match self.d.failover(&lost, &acting).await {
                Ok(a) if a.status == 200 => break,
                Ok(a) if failover_from.elapsed() > RECOVERY_LIMIT => {
                    return Err(DrillError::Fault(format!(
                        "failover of {lost} to {acting} refused: {} {}",
                        a.status, a.body
                    )))
                }
                Err(e) if failover_from.elapsed() > RECOVERY_LIMIT => return Err(e),
                _ => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
        self.faults[f].detail = format!(
            "users of {lost} served by {acting} (accepted after {:.1} s)",
            failover_from.elapsed().as_secs_f64()
        );
        self.phase = format!("failed over: {lost} -> {acting}");

        // Down for a third of the drill, then back.
        let back_at = self.elapsed() + total * 3 / 10;
        self.wait_until(back_at).await?;
        if self.opts.hang {
            for what in ["nats", "region"] {
                let target = format!("{lost}/{what}");
                self.d.signal(&target, "CONT").await?;
                self.undo
                    .retain(|u| !matches!(u, Undo::Stopped(t) if *t == target));
            }
        }
        self.d.hold(&lost, false).await?;
        self.undo.retain(|u| !matches!(u, Undo::Hold(r) if *r == lost));
        let back = Instant::now();
        self.end_fault(i).await?;

        // Failback, retried while the home region has not caught up (409 not_caught_up).
        self.phase = format!("failing back: {lost}");
        let from = Instant::now();
        loop {
            match self.d.failback(&lost).await {
                Ok(a) if a.status == 200 => break,
                Ok(a) if from.elapsed() > RECOVERY_LIMIT => {
                    return Err(DrillError::Fault(format!(
                        "failback of {lost} refused: {} {}",
                        a.status, a.body
                    )))
                }
                Err(e) if from.elapsed() > RECOVERY_LIMIT => return Err(e),
                _ => {
                    self.tick();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        // The failover's recovery: from the region's return to its users being home.
        self.faults[f].end_ms = Some(now_ms());
        self.faults[f].recovery_s = Some(back.elapsed().as_secs_f64());
        Ok(())
    }

    /// The target region's WAN link cut (with the hub topology, from every other region).
    async fn partition(&mut self) -> Result<(), DrillError> {
        let region = self.target()?;
        let before = self.d.link(&region).await?;
        let i = self.fault("partition", &region, format!("WAN link of {region} cut"));
        self.undo.push(Undo::Link(region.clone(), before));
        self.d
            .set_link(&region, LinkSetting { cut: true, ..before })
            .await?;
        let heal_at = self.elapsed() + self.opts.duration * 4 / 10;
        self.wait_until(heal_at).await?;
        self.d.set_link(&region, before).await?;
        self.undo
            .retain(|u| !matches!(u, Undo::Link(r, _) if *r == region));
        self.end_fault(i).await
    }

    /// Every region-to-region path slowed: each region's link to the hub gets half the
    /// delay and jitter, and the loss that, met twice, gives the asked loss.
    async fn slow_link(&mut self) -> Result<(), DrillError> {
        let slow = self.opts.slow;
        let per_link = LinkSetting {
            delay_ms: slow.delay_ms / 2,
            jitter_ms: slow.jitter_ms / 2,
            loss: 1.0 - (1.0 - slow.loss.clamp(0.0, 1.0)).sqrt(),
            cut: false,
        };
        let regions: Vec<String> = self
            .d
            .regions
            .iter()
            .filter(|r| r.has_link)
            .map(|r| r.region.clone())
            .collect();
        let i = self.fault(
            "slow-link",
            "all",
            format!(
                "region to region: +{} ms, jitter {} ms, loss {:.1} %",
                slow.delay_ms,
                slow.jitter_ms,
                slow.loss * 100.0
            ),
        );
        for r in &regions {
            let before = self.d.link(r).await?;
            self.undo.push(Undo::Link(r.clone(), before));
            self.d.set_link(r, per_link).await?;
        }
        let until = self.elapsed() + self.opts.duration / 2;
        self.wait_until(until).await?;
        for u in std::mem::take(&mut self.undo) {
            match u {
                Undo::Link(r, before) => self.d.set_link(&r, before).await?,
                other => self.undo.push(other),
            }
        }
        self.end_fault(i).await
    }

    /// kill -9 of a random process (a region process, a nats-server, the hub) every few
    /// seconds; each fault lasts until the launcher has it running again, and its recovery
    /// time runs from the kill until its region serves again.
    async fn crash_soak(&mut self) -> Result<(), DrillError> {
        let mut rng = StdRng::seed_from_u64(self.opts.seed);
        let procs = self.d.processes();
        let tail = (self.opts.duration / 8).max(Duration::from_secs(5));
        let stop_at = self.opts.duration.saturating_sub(tail);
        let mean = self.opts.crash_every.max(Duration::from_millis(500));
        while self.elapsed() < stop_at {
            let target = procs[rng.gen_range(0..procs.len())].clone();
            let old = self.d.signal(&target, "KILL").await?;
            let i = self.fault("crash", &target, format!("SIGKILL pid {old}"));
            // Back when the launcher runs it again (a new pid).
            let from = Instant::now();
            loop {
                match self.d.pid(&target).await {
                    Ok(Some(pid)) if pid != old => break,
                    _ if from.elapsed() > RECOVERY_LIMIT => {
                        return Err(DrillError::Fault(format!(
                            "{target} not restarted within {RECOVERY_LIMIT:?}"
                        )))
                    }
                    _ => {
                        self.tick();
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            self.faults[i].end_ms = Some(now_ms());
            // Recovered when its region serves again (`/readyz?scope=local`: store and own
            // stream); a killed hub is recovered once it runs. Replication catching up is
            // not waited for here, or a slow mirror re-attach would space the crashes out;
            // the invariants at the end check that it did.
            if let Some((region, _)) = target.split_once('/') {
                while !self.d.ready(region, true).await && from.elapsed() < RECOVERY_LIMIT {
                    self.tick();
                    tokio::time::sleep(POLL).await;
                }
            }
            self.faults[i].recovery_s = Some(from.elapsed().as_secs_f64());
            let pause = mean.mul_f64(rng.gen_range(0.5..1.5));
            let next = (self.elapsed() + pause).min(stop_at);
            self.wait_until(next).await?;
        }
        Ok(())
    }

    /// The target region's clock (the HLC's physical source in its region process) off by
    /// `skew_ms` for half the drill.
    async fn clock_skew(&mut self) -> Result<(), DrillError> {
        let region = self.target()?;
        let skew = self.opts.skew_ms;
        let i = self.fault(
            "clock-skew",
            &region,
            format!(
                "clock {} by {} ms",
                if skew >= 0 { "ahead" } else { "behind" },
                skew.abs()
            ),
        );
        self.undo.push(Undo::Clock(region.clone()));
        self.d.set_clock(&region, skew).await?;
        let until = self.elapsed() + self.opts.duration / 2;
        self.wait_until(until).await?;
        self.d.set_clock(&region, 0).await?;
        self.undo.retain(|u| !matches!(u, Undo::Clock(r) if *r == region));
        self.end_fault(i).await
    }

    /// Undoes whatever faults are still in place; errors are reported, not returned: every
    /// undo is tried.
    async fn undo_all(&mut self) {
        for u in std::mem::take(&mut self.undo).into_iter().rev() {
            let result = match &u {
                Undo::Stopped(target) => self.d.signal(target, "CONT").await.map(drop),
                Undo::Hold(region) => self.d.hold(region, false).await,
                Undo::Link(region, shape) => self.d.set_link(region, *shape).await,
                Undo::Clock(region) => self.d.set_clock(region, 0).await,
            };
            if let Err(e) = result {
                eprintln!("drill: could not undo {u:?}: {e}");
            }
        }
    }
}

/// The report of a finished drill: pass when the checker found nothing.
fn report_of(
    opts: &DrillOptions,
    regions: Vec<String>,
    ended_at_ms: u64,
    faults: Vec<Fault>,
    record: WorkloadRecord,
    outcome: CheckOutcome,
) -> Report {
    let clean = outcome.violations.is_empty()
        && outcome.lost == 0
        && outcome.duplicated == 0
        && outcome.digests_equal;
    let delivered = record.receipts.len() as u64;
    let duration_s = record.samples.last().map_or(0.0, |s| s.t_s);
    Report {
        scenario: opts.scenario.as_str().to_string(),
        verdict: if clean { Verdict::Pass } else { Verdict::Fail },
        started_at_ms: record.started_at_ms,
        ended_at_ms,
        duration_s,
        regions,
        acked: outcome.acked,
        lost: outcome.lost,
        duplicated: outcome.duplicated,
        delivered,
        faults,
        converge_s: outcome.converge_s,
        digests_equal: outcome.digests_equal,
        digests: outcome.digests,
        violations: outcome.violations,
        samples: record.samples,
        counts: record.counts,
        picture: REPORT_SVG.to_string(),
    }
}

/// `yyyymmddThhmmssZ` of a unix time (UTC), for run folder names.
pub(crate) fn utc_stamp(unix_s: u64) -> String {
    let days = (unix_s / 86_400) as i64;
    let secs = unix_s % 86_400;
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_stamps() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        // 2026-11-29T20:30:15Z
        assert_eq!(utc_stamp(1_795_984_215), "20261129T203015Z");
        // A leap day.
        assert_eq!(utc_stamp(951_782_400), "20000229T000000Z");
    }
}
