//! The fence after a hang (docs/design.md §7): a region that cannot tell whether another
//! region took its users over while it was cut off refuses their writes.
//!
//! A failover reaches a region only through its mirrors of the other regions' streams. The
//! region refuses every write of a user homed here (`503 region_unsure`) when
//! - it stalled: its JetStream took longer than [`STALL`] to answer (or failed), or the
//!   gateway went longer than [`STALL`] past its judging interval without judging (its
//!   process was paused: SIGSTOP, a frozen VM) — however short the stall, a failover may
//!   have been given meanwhile; or
//! - it is cut off from every other region (at least two) for longer than
//!   `GatewayConfig::fence_after_s`: it may be the minority side that the others failed over;
//!
//! and then until every mirror has heard from its origin since the stall was noticed and
//! the applier has applied it up to what the origin held then (`last_seq + mirror_lag`):
//! only then would a failover given while it was away have been applied, turning the
//! user's calls into `421 wrong_region`. A cut link between two regions alone does not
//! fence (each keeps serving its users, as docs/design.md §5 promises); failing over a
//! region that is only cut off, not stalled, gives its users two writers until the link
//! heals, which the merge rules reconcile.
//!
//! The judgement is cached for [`FENCE_RECHECK`] so a busy gateway asks JetStream a few
//! times a second, not once per send; [`watch`] judges every [`JUDGE_EVERY`] meanwhile.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use axum::http::StatusCode;

use crate::error::{ApiError, ApiResult};
use crate::health::{self, StreamHealth};
use crate::state::AppState;

/// How long one judgement holds.
pub const FENCE_RECHECK: Duration = Duration::from_millis(250);
/// How often [`watch`] judges, whether or not anyone writes.
pub const JUDGE_EVERY: Duration = Duration::from_secs(1);
/// A JetStream answer or a judging interval late by this much means the region stalled.
pub const STALL: Duration = Duration::from_secs(2);

#[derive(Default)]
pub struct Fence {
    state: tokio::sync::Mutex<FenceState>,
}

#[derive(Default)]
struct FenceState {
    judged_at: Option<Instant>,
    /// When the last stall was noticed: a recovering mirror is back once it has heard from
    /// its origin since then.
    stalled_at: Option<Instant>,
    /// Why writes are refused now; empty: they are not.
    unsure: Vec<String>,
    /// Mirrors that were quiet and have come back: the position their origin had when they
    /// did (None: not yet seen back), to be applied before the region is sure again.
    recovering: HashMap<String, Option<u64>>,
    /// Mirrors this gateway has seen healthy. One never healthy since the gateway started
    /// does not fence (a region starting before its peers would refuse everything until
    /// every mirror attached): the fence guards against a region losing contact, and a
    /// gateway that restarts while its region is cut off is not covered (docs/design.md §7).
    seen_healthy: HashSet<String>,
}

impl Fence {
    /// Ok when this region may accept writes of `user`, a user it serves. Only users homed
    /// here are fenced: they are the ones another region can take over while this one is
    /// cut off. Users served here for a failed region stay served: that region moves them
    /// back only by failback, which it gives only once caught up with this region.
    pub async fn check(&self, s: &AppState, user: &meridian_store::directory::UserView) -> ApiResult<()> {
        if user.home_region != s.cfg.region {
            return Ok(());
        }
        let reasons = self.unsure(s).await;
        if reasons.is_empty() {
            return Ok(());
        }
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "region_unsure",
            format!(
                "this region cannot tell whether its users were failed over to another region while it was cut off: {}",
                reasons.join("; ")
            ),
        )
        .with("reasons", reasons)
        .retry_after(1))
    }

    /// Why this region cannot tell whether it still serves its users (empty: it can).
    pub async fn unsure(&self, s: &AppState) -> Vec<String> {
        if s.bus.config().mirrors.is_empty() {
            return Vec::new();
        }
        let mut st = self.state.lock().await;
        if st.judged_at.is_some_and(|t| t.elapsed() < FENCE_RECHECK) {
            return st.unsure.clone();
        }
        let bound = Duration::from_secs(s.cfg.fence_after_s);
        let mut reasons = Vec::new();
        if let Some(gap) = st
            .judged_at
            .map(|t| t.elapsed())
            .filter(|g| *g > JUDGE_EVERY + STALL)
        {
            reasons.push(format!(
                "this region did not judge for {} ms (paused)",
                gap.as_millis()
            ));
        }
        let asked = Instant::now();
        let streams = match health::streams(s).await {
            Ok(v) => v,
            Err(e) => {
                reasons.push(format!("reading the streams failed: {}", e.message));
                Vec::new()
            }
        };
        // This region itself stalled: its own JetStream did not answer.
        if let Some(e) = streams.iter().find(|h| !h.mirror).and_then(|h| h.error.as_ref()) {
            reasons.push(format!("this region's own stream did not answer: {e}"));
        }
        // ... or answered only after longer than the bound: it was stopped meanwhile (a
        // request to a paused server waits and is answered when it resumes).
        if asked.elapsed() > STALL {
            reasons.push(format!(
                "this region's JetStream took {} ms to answer",
                asked.elapsed().as_millis()
            ));
        }
        if !reasons.is_empty() {
            tracing::warn!(
                ?reasons,
                "this region stalled: fencing its users' writes until every mirror has caught up"
            );
            st.mark_recovering(s);
        }
        let quiet = health::mirror_problems(&streams, bound);
        let mirrors: Vec<&StreamHealth> = streams.iter().filter(|h| h.mirror).collect();
        // Cut off from every other region (and there are at least two): this region may be
        // the minority side that the others failed over.
        let isolated = mirrors.len() >= 2
            && mirrors
                .iter()
                .all(|h| quiet.iter().any(|q| q.contains(&h.stream)));
        for h in mirrors {
            let problem = quiet.iter().find(|q| q.contains(&h.stream));
            if problem.is_none() {
                st.seen_healthy.insert(h.stream.clone());
            }
            match (problem, st.recovering.get(&h.stream).copied()) {
                (Some(problem), Some(_)) => {
                    st.recovering.insert(h.stream.clone(), None);
                    reasons.push(format!("{problem}, since this region stalled"));
                }
                (Some(problem), None) => {
                    if h.active_age_ms.is_none() && h.error.is_none() && st.seen_healthy.contains(&h.stream) {
                        // Healthy before, "never active" now: this region's JetStream
                        // restarted (a failover may have been given while it was down).
                        reasons.push(format!("{problem}: this region's JetStream restarted"));
                        st.mark_recovering(s);
                    } else if isolated && st.seen_healthy.contains(&h.stream) {
                        st.recovering.insert(h.stream.clone(), None);
                        reasons.push(format!("{problem}, and every other region is quiet too"));
                    }
                }
                (None, Some(None)) if !heard_since(h, st.stalled_at) => {
                    reasons.push(format!(
                        "mirror {} of region {} has not heard from its origin since this region stalled",
                        h.stream, h.origin
                    ));
                }
                (None, Some(target)) => {
                    let target = target.unwrap_or(h.last_seq.unwrap_or(0) + h.mirror_lag);
                    if h.applied >= target && h.mirror_lag == 0 {
                        st.recovering.remove(&h.stream);
                    } else {
                        st.recovering.insert(h.stream.clone(), Some(target));
                        reasons.push(format!(
                            "mirror {} of region {} is back and applied to {} of {}",
                            h.stream, h.origin, h.applied, target
                        ));
                    }
                }
                (None, None) => {}
            }
        }
        st.judged_at = Some(Instant::now());
        st.unsure = reasons.clone();
        reasons
    }
}

impl FenceState {
    /// Every mirror, heard from yet or not: after a stall each must be back and caught up.
    fn mark_recovering(&mut self, s: &AppState) {
        self.stalled_at = Some(Instant::now());
        for origin in &s.bus.config().mirrors {
            self.recovering.insert(s.bus.config().stream_name(origin), None);
        }
    }
}

/// Whether mirror `h` heard from its origin after `since` (its last contact is younger).
fn heard_since(h: &StreamHealth, since: Option<Instant>) -> bool {
    match (h.active_age_ms, since) {
        (Some(age), Some(t)) => u128::from(age) < t.elapsed().as_millis(),
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// Judges the fence every [`JUDGE_EVERY`] until `shutdown`, so a region notices a stall
/// or a quiet mirror even while none of its users writes (a late judgement is itself the
/// sign of a paused process, see [`Fence::unsure`]).
pub async fn watch(s: std::sync::Arc<AppState>, shutdown: tokio_util::sync::CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(JUDGE_EVERY) => {
                let _ = s.fence.unsure(&s).await;
            }
        }
    }
}
