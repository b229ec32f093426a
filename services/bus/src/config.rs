//! Bus configuration and the nats-server configuration the launcher and tests write.

use std::path::Path;

use meridian_model::RegionId;
use serde::{Deserialize, Serialize};

use crate::BusError;

/// How durable an acknowledged publish is (docs/design.md §6). `geo` is not here yet: it
/// needs mirrors, which a later issue adds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Acked once the region's JetStream holds the event; JetStream writes it to its files
    /// before acking but fsyncs lazily (every 2 minutes by default), so it survives any
    /// process crash, not a power loss.
    #[default]
    Process,
    /// Acked only after an fsync. This is a server setting (`jetstream { sync_interval:
    /// always }`), not a stream or publish option, which is why it lives in
    /// [`nats_server_config`]. Publishing in batches ([`crate::Bus::publish_events`]) lets one
    /// fsync cover many events.
    Disk,
}

/// Renders the nats-server configuration for one region's server: client port on loopback,
/// JetStream with its file store under `store_dir`, and for [`Durability::Disk`] an fsync
/// before every ack.
pub fn nats_server_config(store_dir: &Path, port: u16, durability: Durability, server_name: &str) -> String {
    let mut out = String::new();
    out.push_str("# Written by Meridian (meridian_bus::nats_server_config); regenerate rather than edit.\n");
    out.push_str(&format!("server_name: {}\n", quote(server_name)));
    out.push_str("host: \"127.0.0.1\"\n");
    out.push_str(&format!("port: {port}\n"));
    out.push_str("jetstream {\n");
    out.push_str(&format!("  store_dir: {}\n", quote(&store_dir.to_string_lossy())));
    if durability == Durability::Disk {
        out.push_str("  # durability=disk: fsync every write before the PubAck goes out.\n");
        out.push_str("  sync_interval: always\n");
    }
    out.push_str("}\n");
    out
}

/// A double-quoted nats-server config string (the format takes JSON-style escapes).
fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' => q.push_str("\\n"),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

/// How a role reaches its region's JetStream.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BusConfig {
    /// e.g. "nats://127.0.0.1:4222".
    pub nats_url: String,
    /// The region this process belongs to: it publishes to `SYNC_<region>` only.
    pub region: RegionId,
    /// Prepended to stream names and subjects: "" in production, unique per test so tests
    /// can share one server without seeing each other. Only `[A-Za-z0-9_]`.
    #[serde(default)]
    pub prefix: String,
    /// JetStream's duplicate window: a retried publish with the same event id inside it is
    /// dropped by the server. At least 120 s, so a publisher retrying through a NATS restart
    /// (bounded by `publish_timeout_s`) stays inside it.
    #[serde(default = "default_duplicate_window_s")]
    pub duplicate_window_s: u64,
    /// How long the stream keeps events. Mirrors and a restarted applier catch up from it.
    #[serde(default = "default_max_age_s")]
    pub max_age_s: u64,
    /// Size cap of the stream in bytes; -1 for none.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: i64,
    /// How long a publish keeps retrying through a NATS outage before it gives up with
    /// [`BusError::Unavailable`]; also bounds the initial connect.
    #[serde(default = "default_publish_timeout_s")]
    pub publish_timeout_s: u64,
}

fn default_duplicate_window_s() -> u64 {
    300
}
fn default_max_age_s() -> u64 {
    30 * 24 * 3600
}
fn default_max_bytes() -> i64 {
    -1
}
fn default_publish_timeout_s() -> u64 {
    30
}

/// JetStream rejects a duplicate window longer than the stream's max age.
const MIN_DUPLICATE_WINDOW_S: u64 = 120;

impl BusConfig {
    pub fn new(nats_url: impl Into<String>, region: RegionId) -> Self {
        Self {
            nats_url: nats_url.into(),
            region,
            prefix: String::new(),
            duplicate_window_s: default_duplicate_window_s(),
            max_age_s: default_max_age_s(),
            max_bytes: default_max_bytes(),
            publish_timeout_s: default_publish_timeout_s(),
        }
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), BusError> {
        if self.nats_url.trim().is_empty() {
            return Err(BusError::config("nats_url", "must not be empty"));
        }
        if !self
            .prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(BusError::config("prefix", "may only contain [A-Za-z0-9_]"));
        }
        if self.duplicate_window_s < MIN_DUPLICATE_WINDOW_S {
            return Err(BusError::config(
                "duplicate_window_s",
                format!("must be at least {MIN_DUPLICATE_WINDOW_S} (retries through a NATS restart must stay inside it)"),
            ));
        }
        if self.max_age_s == 0 {
            return Err(BusError::config("max_age_s", "must be positive"));
        }
        if self.max_age_s < self.duplicate_window_s {
            return Err(BusError::config(
                "max_age_s",
                "must be at least duplicate_window_s (JetStream rejects a longer window)",
            ));
        }
        if self.max_bytes == 0 || self.max_bytes < -1 {
            return Err(BusError::config(
                "max_bytes",
                "must be positive, or -1 for no limit",
            ));
        }
        if self.publish_timeout_s == 0 {
            return Err(BusError::config("publish_timeout_s", "must be positive"));
        }
        if self.publish_timeout_s >= self.duplicate_window_s {
            return Err(BusError::config(
                "publish_timeout_s",
                "must be shorter than duplicate_window_s, or a late retry could be stored twice",
            ));
        }
        Ok(())
    }

    /// The stream `region` publishes to: `{PREFIX}SYNC_{REGION}`, upper-cased with '-' as
    /// '_' (stream names may not contain '.', and upper case keeps them apart from subjects).
    pub fn stream_name(&self, region: &RegionId) -> String {
        format!("{}SYNC_{}", self.prefix, region)
            .to_uppercase()
            .replace('-', "_")
    }

    /// Subjects `region`'s stream captures.
    pub fn stream_subjects(&self, region: &RegionId) -> String {
        format!("{}sync.{}.>", self.prefix, region)
    }

    /// The subject events of `region` are published on.
    pub fn events_subject(&self, region: &RegionId) -> String {
        format!("{}sync.{}.events", self.prefix, region)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BusConfig {
        BusConfig::new("nats://127.0.0.1:4222", RegionId::parse("us-east-1").unwrap())
    }

    #[test]
    fn defaults_validate_and_name_the_stream() {
        let c = cfg();
        c.validate().unwrap();
        assert_eq!(c.stream_name(&c.region), "SYNC_US_EAST_1");
        let mut p = cfg();
        p.prefix = "t1x2_".into();
        assert_eq!(p.stream_name(&p.region), "T1X2_SYNC_US_EAST_1");
        assert_eq!(p.events_subject(&p.region), "t1x2_sync.us-east-1.events");
    }

    #[test]
    fn validation_names_the_field() {
        let field = |c: BusConfig| match c.validate() {
            Err(BusError::Config { field, .. }) => field,
            other => panic!("expected a config error, got {other:?}"),
        };
        let mut c = cfg();
        c.duplicate_window_s = 119;
        assert_eq!(field(c), "duplicate_window_s");
        let mut c = cfg();
        c.prefix = "a.b".into();
        assert_eq!(field(c), "prefix");
        let mut c = cfg();
        c.max_bytes = 0;
        assert_eq!(field(c), "max_bytes");
        let mut c = cfg();
        c.publish_timeout_s = 0;
        assert_eq!(field(c), "publish_timeout_s");
        let mut c = cfg();
        c.nats_url = " ".into();
        assert_eq!(field(c), "nats_url");
    }

    #[test]
    fn deserializes_with_defaults() {
        let c: BusConfig = serde_json::from_str(r#"{"nats_url":"nats://x:1","region":"eu"}"#).unwrap();
        assert_eq!(c.duplicate_window_s, 300);
        assert_eq!(c.publish_timeout_s, 30);
        assert_eq!(c.max_bytes, -1);
        assert_eq!(c.prefix, "");
        let d: Durability = serde_json::from_str(r#""disk""#).unwrap();
        assert_eq!(d, Durability::Disk);
    }

    #[test]
    fn server_config_turns_on_fsync_for_disk() {
        let p = Path::new("/tmp/js \"x\"");
        let process = nats_server_config(p, 4333, Durability::Process, "eu");
        assert!(process.contains("port: 4333"));
        assert!(process.contains(r#"store_dir: "/tmp/js \"x\"""#));
        assert!(!process.contains("sync_interval"));
        let disk = nats_server_config(p, 4333, Durability::Disk, "eu");
        assert!(disk.contains("sync_interval: always"));
    }
}
