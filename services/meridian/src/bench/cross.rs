//! X1, cross-region one-to-one: senders homed in one region (`--region`), receivers homed in
//! another (`--peer-region`), each receiver's WebSocket at its own region. A message goes
//! sender -> its region's stream -> the receiving region's mirror of it -> that region's
//! applier -> the receiver's socket, so the latency measured (send to live delivery at the
//! receiving region, one process, one clock) includes one region-to-region hop and
//! everything either region does. While a step runs, the receiving region's
//! `/v1/admin/regions` is sampled for the mirror lag of the sending region's stream.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::Rng;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::connections::{connect_all, Shared};
use super::report::{MirrorLag, StepResult};
use super::target::{provision, Target};
use super::workloads::{measured_step, Step};
use super::{BenchError, BenchOptions};

/// How often the mirror lag is sampled during a step.
const LAG_SAMPLE_EVERY: Duration = Duration::from_millis(250);

pub(super) async fn x1(
    from: &Arc<Target>,
    to: &Arc<Target>,
    opts: &BenchOptions,
    run_id: &str,
    stop: &CancellationToken,
) -> Result<Vec<StepResult>, BenchError> {
    let pairs = (opts.users / 2).max(1);
    eprintln!(
        "X1: {pairs} senders homed in {}, {pairs} receivers homed in {}...",
        from.region, to.region
    );
    let senders = provision(from, &format!("{run_id}x1s"), pairs).await?;
    let receivers = provision(to, &format!("{run_id}x1r"), pairs).await?;
    let shared = Shared::new();
    let conn_stop = stop.child_token();
    let send_conns = connect_all(from, &senders, &shared, &conn_stop).await?;
    let _receive_conns = connect_all(to, &receivers, &shared, &conn_stop).await?;
    // Sender i writes to receiver i. The sending region learns of a receiver through its
    // mirror of the receiving region's stream, so creation is retried until it does.
    let deadline = Instant::now() + Duration::from_secs(60);
    let created: Vec<Result<String, BenchError>> =
        futures::stream::iter(send_conns.iter().zip(&receivers).map(|(s, (r, _))| {
            let client = s.client.clone();
            let r = r.clone();
            async move {
                loop {
                    match client.create_direct(&r).await {
                        Ok(c) => return Ok(c.conversation_id),
                        Err(_) if Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(200)).await
                        }
                        Err(e) => return Err(BenchError::from(e)),
                    }
                }
            }
        }))
        .buffered(32)
        .collect()
        .await;
    let cids: Vec<String> = created.into_iter().collect::<Result<_, _>>()?;
    eprintln!("X1: {} conversations ready", cids.len());
    // Both regions' processes count towards the CPU per delivery.
    let measured = Arc::new(from.with_pids_of(to));
    let mut rows = Vec::new();
    for &rate in opts.rates.iter().take_while(|_| !stop.is_cancelled()) {
        let step = Step {
            workload: "X1",
            name: format!("{}>{} {rate}/s", from.region, to.region),
            tag: format!("{run_id}x1r{rate}_"),
            rate,
            over_http: opts.over_http,
        };
        let sampling = stop.child_token();
        let sampler = tokio::spawn(sample_mirror_lag(to.clone(), from.clone(), sampling.clone()));
        let mut row = measured_step(&measured, &send_conns, &shared, opts, stop, step, |rng| {
            let i = rng.gen_range(0..pairs);
            (i, cids[i].clone(), 1)
        })
        .await;
        sampling.cancel();
        row.mirror_lag = sampler.await.ok().flatten();
        if let Some(lag) = &row.mirror_lag {
            println!(
                "     p999 {:.1} ms; mirror of {} in {}: {} samples, origin-mirror gap max {} mean {:.1} events, \
                 JetStream lag max {} mean {:.1} events, active age max {} ms",
                row.p999_ms,
                from.region,
                to.region,
                lag.samples,
                lag.max_gap_events,
                lag.mean_gap_events,
                lag.max_events,
                lag.mean_events,
                lag.active_age_max_ms
            );
        } else {
            println!(
                "     p999 {:.1} ms; no mirror lag reported by {}",
                row.p999_ms, to.region
            );
        }
        rows.push(row);
    }
    conn_stop.cancel();
    Ok(rows)
}

/// Samples, until `stop`, the mirror of `origin`'s stream at `at` from `/v1/admin/regions`:
/// the lag JetStream reports for it, how long since it heard from its origin, and the gap
/// between the origin's last sequence and the mirror's, both read at the same moment (what
/// is in flight between the regions; JetStream's own figure is refreshed less often).
/// `None` when no sample named the mirror.
async fn sample_mirror_lag(
    at: Arc<Target>,
    origin: Arc<Target>,
    stop: CancellationToken,
) -> Option<MirrorLag> {
    let mut lags = Vec::new();
    let mut gaps = Vec::new();
    let mut active_age_max_ms = 0u64;
    loop {
        let (here, there) = tokio::join!(
            at.admin_get("/v1/admin/regions"),
            origin.admin_get("/v1/admin/regions")
        );
        if let Ok(v) = here {
            if let Some(s) = mirror_entry(&v, &origin.region) {
                if let Some(lag) = s["mirror_lag"].as_u64() {
                    lags.push(lag);
                }
                active_age_max_ms = active_age_max_ms.max(s["active_age_ms"].as_u64().unwrap_or(0));
                let origin_last = there
                    .ok()
                    .and_then(|o| mirror_entry(&o, &origin.region).and_then(|e| e["last_seq"].as_u64()));
                if let (Some(o), Some(m)) = (origin_last, s["last_seq"].as_u64()) {
                    gaps.push(o.saturating_sub(m));
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(LAG_SAMPLE_EVERY) => {}
        }
    }
    if lags.is_empty() {
        return None;
    }
    let mean = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64;
    Some(MirrorLag {
        samples: lags.len() as u64,
        max_events: lags.iter().copied().max().unwrap_or(0),
        mean_events: mean(&lags),
        active_age_max_ms,
        max_gap_events: gaps.iter().copied().max().unwrap_or(0),
        mean_gap_events: mean(&gaps),
    })
}

/// The entry of `origin`'s stream (its own, or a mirror of it) in a `/v1/admin/regions` answer: the stream whose name is
/// `SYNC_<ORIGIN>` after the deployment's prefix.
fn mirror_entry<'a>(v: &'a Value, origin: &str) -> Option<&'a Value> {
    let suffix = format!("SYNC_{}", origin.to_ascii_uppercase());
    let by_name: HashMap<&String, &Value> = v["regions"]
        .as_array()?
        .iter()
        .filter_map(|r| r["streams"].as_object())
        .flat_map(|m| m.iter())
        .collect();
    by_name
        .into_iter()
        .find(|(name, _)| name.ends_with(&suffix))
        .map(|(_, s)| s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_origin_stream_among_the_regions_streams() {
        let v = serde_json::json!({"regions": [{"region": "eu", "streams": {
            "SYNC_EU": {"mirror_lag": 0, "apply_lag": 0},
            "SYNC_US": {"mirror_lag": 7, "active_age_ms": 12, "apply_lag": 1},
        }}]});
        assert_eq!(mirror_entry(&v, "us").unwrap()["mirror_lag"], 7);
        assert!(mirror_entry(&v, "ap").is_none());
    }
}
