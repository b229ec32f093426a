//! The health of every stream this region applies, its own and its mirrors of the other
//! regions' streams, for `GET /v1/admin/regions` and `/readyz`.
//!
//! Per stream: how far the stream is (`last_seq`), how far the applier is (`applied`, the
//! store's checkpoint counted in the stream's current instance) and the difference
//! (`apply_lag`); for a mirror also `mirror_lag` (messages the origin has that the mirror has
//! not: the origin's last sequence, asked of the origin over the link, minus the mirror's; see
//! `meridian_bus::MirrorHealth::lag`) and `active_age_ms` (time since the mirror last heard
//! from its origin). A mirror whose link is cut still reports lag 0 and no error (docs/design.md
//! §3): only its active age grows, so health is judged by that age against
//! `GatewayConfig::mirror_unhealthy_after_s`.

use std::time::Duration;

use serde::Serialize;

use crate::error::ApiResult;
use crate::state::{applied_in, AppState};

/// One applied stream as the operator sees it.
#[derive(Debug, Clone, Serialize)]
pub struct StreamHealth {
    pub stream: String,
    /// The region whose events the stream holds.
    pub origin: String,
    /// Whether this is a mirror of another region's stream (false: the region's own).
    pub mirror: bool,
    /// The stream's last sequence; `None` when the bus could not say.
    pub last_seq: Option<u64>,
    pub applied: u64,
    pub apply_lag: Option<u64>,
    /// Messages the origin holds that the mirror does not yet (0 for the own stream).
    pub mirror_lag: u64,
    /// Milliseconds since the mirror last heard from its origin; `None` for the own stream
    /// and for a mirror never active.
    pub active_age_ms: Option<u64>,
    /// What JetStream reports wrong with the mirror, or why its state could not be read.
    pub error: Option<String>,
}

/// Every stream this region applies, its own first, then each mirror.
pub async fn streams(s: &AppState) -> ApiResult<Vec<StreamHealth>> {
    let own = s.bus.stream();
    let mut out = vec![applied_state(s, &own, s.cfg.region.as_str(), false).await?];
    match s.bus.mirror_health().await {
        Ok(mirrors) => {
            for m in mirrors {
                let mut h = applied_state(s, &m.stream, m.region.as_str(), true).await?;
                h.mirror_lag = m.lag;
                h.active_age_ms = m
                    .active_age
                    .map(|a| u64::try_from(a.as_millis()).unwrap_or(u64::MAX));
                h.error = m.error.or(h.error);
                if h.last_seq.is_none() {
                    h.last_seq = Some(m.last_seq);
                    h.apply_lag = Some(m.last_seq.saturating_sub(h.applied));
                }
                out.push(h);
            }
        }
        // JetStream did not answer: every mirror is of unknown health, so each is reported
        // with the error (and /readyz fails naming it).
        Err(e) => {
            for origin in &s.bus.config().mirrors {
                let mut h =
                    applied_state(s, &s.bus.config().stream_name(origin), origin.as_str(), true).await?;
                h.error = Some(e.to_string());
                out.push(h);
            }
        }
    }
    Ok(out)
}

/// A stream's position against the store's checkpoint of it.
async fn applied_state(s: &AppState, stream: &str, origin: &str, mirror: bool) -> ApiResult<StreamHealth> {
    let cp = s.store.stream_checkpoint(stream).await?;
    let (state, error) = match s.bus.stream_state(stream).await {
        Ok(st) => (Some(st), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let applied = state.as_ref().map_or(cp.seq, |st| applied_in(&cp, st));
    let last_seq = state.map(|st| st.last_seq);
    Ok(StreamHealth {
        stream: stream.to_string(),
        origin: origin.to_string(),
        mirror,
        last_seq,
        applied,
        apply_lag: last_seq.map(|l| l.saturating_sub(applied)),
        mirror_lag: 0,
        active_age_ms: None,
        error,
    })
}

/// Why the mirrors make this region unready: each mirror that reports an error, was never
/// active, or has not heard from its origin for longer than `unhealthy_after`.
pub fn mirror_problems(streams: &[StreamHealth], unhealthy_after: Duration) -> Vec<String> {
    let bound_ms = u64::try_from(unhealthy_after.as_millis()).unwrap_or(u64::MAX);
    streams
        .iter()
        .filter(|h| h.mirror)
        .filter_map(|h| {
            let name = format!("mirror {} of region {}", h.stream, h.origin);
            if let Some(e) = &h.error {
                return Some(format!("{name}: {e}"));
            }
            match h.active_age_ms {
                None => Some(format!("{name}: never active")),
                Some(age) if age > bound_ms => Some(format!(
                    "{name}: inactive for {age} ms (unhealthy after {bound_ms} ms)"
                )),
                Some(_) => None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mirror(active_age_ms: Option<u64>, error: Option<&str>) -> StreamHealth {
        StreamHealth {
            stream: "SYNC_EU".into(),
            origin: "eu".into(),
            mirror: true,
            last_seq: Some(5),
            applied: 5,
            apply_lag: Some(0),
            mirror_lag: 0,
            active_age_ms,
            error: error.map(str::to_string),
        }
    }

    #[test]
    fn a_mirror_is_unhealthy_when_inactive_past_the_bound_never_active_or_failing() {
        let bound = Duration::from_secs(30);
        assert!(mirror_problems(&[mirror(Some(1_000), None)], bound).is_empty());
        assert!(mirror_problems(&[mirror(Some(30_000), None)], bound).is_empty());
        let late = mirror_problems(&[mirror(Some(30_001), None)], bound);
        assert_eq!(late.len(), 1);
        assert!(late[0].contains("SYNC_EU") && late[0].contains("eu"), "{late:?}");
        assert_eq!(mirror_problems(&[mirror(None, None)], bound).len(), 1);
        assert_eq!(mirror_problems(&[mirror(Some(1), Some("boom"))], bound).len(), 1);
        // The own stream is never judged as a mirror.
        let mut own = mirror(None, None);
        own.mirror = false;
        assert!(mirror_problems(&[own], bound).is_empty());
    }
}
