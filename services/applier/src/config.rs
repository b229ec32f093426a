use meridian_model::RegionId;
use serde::{Deserialize, Serialize};

use crate::ApplierError;

/// How a region applies its streams.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ApplierConfig {
    /// The region doing the applying: it fans out to the inboxes of the users it serves.
    pub region: RegionId,
    /// Most events per store transaction.
    #[serde(default = "default_batch_max")]
    pub batch_max: usize,
    /// A store transaction stops taking events of a batch once its writes hold this many
    /// bytes; the rest of the batch follows in the next transactions.
    #[serde(default = "default_batch_max_bytes")]
    pub batch_max_bytes: usize,
    /// A store transaction stops taking events of a batch once it has appended this many
    /// inbox entries (a message to a group of n appends n).
    #[serde(default = "default_batch_max_inbox_appends")]
    pub batch_max_inbox_appends: usize,
    /// How long to wait for the first event of a batch before looking again; a lone event
    /// is applied as soon as it arrives, this only bounds the idle poll.
    #[serde(default = "default_batch_wait_ms")]
    pub batch_wait_ms: u64,
    /// Groups with more members than this use read diffusion (docs/design.md §2).
    #[serde(default = "default_read_diffusion_threshold")]
    pub read_diffusion_threshold: usize,
    /// Read diffusion gives a member at most one "conversation advanced" entry per window.
    #[serde(default = "default_coalesce_window_ms")]
    pub coalesce_window_ms: u64,
    /// The durable consumer name on every stream the applier reads.
    #[serde(default = "default_durable_name")]
    pub durable_name: String,
    /// Streams to apply; empty means the region's own stream only.
    #[serde(default)]
    pub streams: Vec<String>,
    /// Retention of the streams this region holds (see `retention`): an event is trimmed
    /// once this region has applied it, every other region's mirror holds it (for the
    /// region's own stream), and it is older than this many seconds, and never sooner than
    /// the bus's duplicate window (a retried publish must still meet its original). 0 keeps
    /// every event until the stream's `max_age_s`.
    #[serde(default = "default_retain_applied_s")]
    pub retain_applied_s: u64,
}

fn default_batch_max() -> usize {
    512
}
fn default_batch_max_bytes() -> usize {
    8 * 1024 * 1024
}
fn default_batch_max_inbox_appends() -> usize {
    20_000
}
fn default_batch_wait_ms() -> u64 {
    20
}
fn default_read_diffusion_threshold() -> usize {
    500
}
fn default_coalesce_window_ms() -> u64 {
    1_000
}
fn default_retain_applied_s() -> u64 {
    300
}
fn default_durable_name() -> String {
    "applier".into()
}

impl ApplierConfig {
    pub fn new(region: RegionId) -> Self {
        Self {
            region,
            batch_max: default_batch_max(),
            batch_max_bytes: default_batch_max_bytes(),
            batch_max_inbox_appends: default_batch_max_inbox_appends(),
            batch_wait_ms: default_batch_wait_ms(),
            read_diffusion_threshold: default_read_diffusion_threshold(),
            coalesce_window_ms: default_coalesce_window_ms(),
            durable_name: default_durable_name(),
            streams: Vec::new(),
            retain_applied_s: default_retain_applied_s(),
        }
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), ApplierError> {
        if !(1..=10_000).contains(&self.batch_max) {
            return Err(ApplierError::config("batch_max", "must be 1-10000"));
        }
        // Below a few large messages per transaction the fsync per commit dominates; above
        // a GiB one batch could hold the process's memory.
        if !(64 * 1024..=1024 * 1024 * 1024).contains(&self.batch_max_bytes) {
            return Err(ApplierError::config(
                "batch_max_bytes",
                "must be 65536-1073741824 (64 KiB to 1 GiB)",
            ));
        }
        // At least one group message's fan-out should fit (read diffusion starts above
        // `read_diffusion_threshold` members).
        if !(1_000..=1_000_000).contains(&self.batch_max_inbox_appends) {
            return Err(ApplierError::config(
                "batch_max_inbox_appends",
                "must be 1000-1000000",
            ));
        }
        // Zero would spin: every empty poll would return at once.
        if !(1..=60_000).contains(&self.batch_wait_ms) {
            return Err(ApplierError::config("batch_wait_ms", "must be 1-60000"));
        }
        if self.read_diffusion_threshold == 0 {
            return Err(ApplierError::config(
                "read_diffusion_threshold",
                "must be positive",
            ));
        }
        if self.retain_applied_s > 365 * 24 * 3600 {
            return Err(ApplierError::config(
                "retain_applied_s",
                "must be 0 (keep until max_age_s) or at most a year",
            ));
        }
        if !is_name(&self.durable_name) {
            return Err(ApplierError::config(
                "durable_name",
                "must be 1-64 characters of [A-Za-z0-9_-]",
            ));
        }
        for (i, s) in self.streams.iter().enumerate() {
            if !is_name(s) {
                return Err(ApplierError::config(
                    "streams",
                    format!("{s:?} is not a stream name"),
                ));
            }
            if self.streams[..i].contains(s) {
                return Err(ApplierError::config("streams", format!("{s} is listed twice")));
            }
        }
        Ok(())
    }
}

/// JetStream stream and consumer names: no '.', '*', '>' or whitespace; we keep to a
/// conservative alphabet.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(c: &ApplierConfig) -> &'static str {
        match c.validate() {
            Err(ApplierError::Config { field, .. }) => field,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_validate() {
        let c = ApplierConfig::new(RegionId::parse("eu").unwrap());
        c.validate().unwrap();
        let parsed: ApplierConfig = serde_json::from_str(r#"{"region":"eu"}"#).unwrap();
        assert_eq!(parsed.batch_max, 512);
        assert_eq!(parsed.batch_wait_ms, 20);
        assert_eq!(parsed.batch_max_bytes, 8 * 1024 * 1024);
        assert_eq!(parsed.batch_max_inbox_appends, 20_000);
        assert_eq!(parsed.durable_name, "applier");
        assert_eq!(parsed.retain_applied_s, 300);
        assert!(parsed.streams.is_empty());
    }

    #[test]
    fn bad_fields_are_named() {
        let base = ApplierConfig::new(RegionId::parse("eu").unwrap());
        let mut c = base.clone();
        c.batch_max = 0;
        assert_eq!(field(&c), "batch_max");
        let mut c = base.clone();
        c.batch_max_bytes = 1024;
        assert_eq!(field(&c), "batch_max_bytes");
        let mut c = base.clone();
        c.batch_max_inbox_appends = 0;
        assert_eq!(field(&c), "batch_max_inbox_appends");
        let mut c = base.clone();
        c.batch_wait_ms = 0;
        assert_eq!(field(&c), "batch_wait_ms");
        let mut c = base.clone();
        c.durable_name = "a.b".into();
        assert_eq!(field(&c), "durable_name");
        let mut c = base.clone();
        c.streams = vec!["SYNC_EU".into(), "SYNC_EU".into()];
        assert_eq!(field(&c), "streams");
        let mut c = base.clone();
        c.retain_applied_s = 400 * 24 * 3600;
        assert_eq!(field(&c), "retain_applied_s");
        let mut c = base;
        c.read_diffusion_threshold = 0;
        assert_eq!(field(&c), "read_diffusion_threshold");
    }
}
