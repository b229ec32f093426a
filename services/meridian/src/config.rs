//! The region file (`regions/<r>.toml`): one table per role, plus environment overrides.
//!
//! The top-level `region` is copied into every role table, so a file names its region once.
//! Any field can be overridden from the environment as `MERIDIAN__<TABLE>__<FIELD>=value`
//! (for example `MERIDIAN__GATEWAY__LISTEN=0.0.0.0:8080`, `MERIDIAN__STORE=tikv://pd:2379`);
//! values are parsed as TOML when they parse, else taken as strings.

use std::path::Path;

use meridian_applier::ApplierConfig;
use meridian_bus::BusConfig;
use meridian_gateway::GatewayConfig;
use meridian_model::RegionId;
use meridian_push::{PushConfig, WEBHOOK_URL_ENV};
use meridian_search::SearchConfig;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid config field {field}: {reason}")]
    Invalid { field: String, reason: String },
}

/// Secrets in the example region files start with this; a config holding it is rejected.
pub const PLACEHOLDER: &str = "REPLACE_ME";

/// Everything one region process needs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    pub region: RegionId,
    /// Store URL: `embedded://DIR` (fjall), `embedded://DIR?engine=redb`, or `tikv://pd,...`.
    pub store: String,
    /// Inbox entries older than this are swept (docs/design.md §2: 7 days by default).
    #[serde(default = "default_inbox_ttl_s")]
    pub inbox_ttl_s: u64,
    #[serde(default = "default_sweep_interval_s")]
    pub sweep_interval_s: u64,
    pub bus: BusConfig,
    pub gateway: GatewayConfig,
    #[serde(default = "default_applier")]
    pub applier: ApplierConfig,
    /// Offline push; on when the file has a `[push]` table or MERIDIAN_PUSH_WEBHOOK_URL is
    /// set (which `meridian up` passes on to its region processes).
    #[serde(default)]
    pub push: Option<PushConfig>,
    /// Full-text search (`[search]`, all optional): the index runs beside the applier.
    #[serde(default)]
    pub search: SearchConfig,
}

fn default_inbox_ttl_s() -> u64 {
    7 * 24 * 3600
}
fn default_sweep_interval_s() -> u64 {
    60
}
fn default_applier() -> ApplierConfig {
    // Replaced by the region-injected table in `from_toml`; present so serde has a default.
    ApplierConfig::new(RegionId::parse("unset").expect("valid region id"))
}

impl RegionConfig {
    /// Reads a region file and applies `MERIDIAN__...` overrides from `env`.
    pub fn load(path: &Path, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text, &path.display().to_string(), env)
    }

    pub fn from_toml(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let parse_err = |message: String| ConfigError::Parse {
            path: origin.to_string(),
            message,
        };
        let mut doc: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| parse_err(e.to_string()))?;
        let mut webhook = None;
        for (key, value) in env {
            if key == WEBHOOK_URL_ENV {
                webhook = Some(value);
                continue;
            }
            let Some(path) = key.strip_prefix("MERIDIAN__") else {
                continue;
            };
            let parts: Vec<String> = path.split("__").map(|p| p.to_ascii_lowercase()).collect();
            let parsed = format!("v = {value}")
                .parse::<toml::Table>()
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or(toml::Value::String(value));
            set_path(&mut doc, &parts, parsed);
        }
        let region = doc.get("region").cloned().ok_or_else(|| ConfigError::Invalid {
            field: "region".into(),
            reason: "missing".into(),
        })?;
        if webhook.as_deref().is_some_and(|w| !w.trim().is_empty()) {
            doc.entry("push")
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        }
        if let Some(toml::Value::Table(t)) = doc.get_mut("push") {
            t.entry("region").or_insert(region.clone());
        }
        for table in ["bus", "gateway", "applier"] {
            let t = doc
                .entry(table)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let toml::Value::Table(t) = t {
                t.entry("region").or_insert(region.clone());
            }
        }
        // The `[console]` table configures the gateway's console, which serves it.
        if let Some(console) = doc.remove("console") {
            if let Some(toml::Value::Table(g)) = doc.get_mut("gateway") {
                g.insert("console".into(), console);
            }
        }
        let mut cfg: RegionConfig = toml::Value::Table(doc)
            .try_into()
            .map_err(|e: toml::de::Error| parse_err(e.to_string()))?;
        cfg.push = cfg.push.map(|p| p.with_webhook_override(webhook));
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the whole file; the error names the bad field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &str, reason: String| ConfigError::Invalid {
            field: field.to_string(),
            reason,
        };
        for (table, r) in [
            ("bus.region", &self.bus.region),
            ("gateway.region", &self.gateway.region),
            ("applier.region", &self.applier.region),
        ] {
            if *r != self.region {
                return Err(invalid(table, format!("{r} differs from region {}", self.region)));
            }
        }
        if !(self.store.starts_with("embedded://") || self.store.starts_with("tikv://")) {
            return Err(invalid(
                "store",
                format!("{:?} is neither embedded://DIR nor tikv://PD,...", self.store),
            ));
        }
        if self.inbox_ttl_s < 60 {
            return Err(invalid("inbox_ttl_s", "must be at least 60".into()));
        }
        if self.sweep_interval_s == 0 {
            return Err(invalid("sweep_interval_s", "must be positive".into()));
        }
        // The example files in regions/ ship keys as placeholders that must fail here, before
        // anything connects, with the field and its override variable named.
        for (field, value, var) in [
            (
                "gateway.jwt_secret",
                &self.gateway.jwt_secret,
                "MERIDIAN__GATEWAY__JWT_SECRET",
            ),
            (
                "gateway.admin_key",
                &self.gateway.admin_key,
                "MERIDIAN__GATEWAY__ADMIN_KEY",
            ),
        ] {
            if value.starts_with(PLACEHOLDER) {
                return Err(invalid(
                    field,
                    format!("is still the example placeholder; set it in the file or with {var}"),
                ));
            }
        }
        self.bus.validate().map_err(|e| invalid("bus", e.to_string()))?;
        self.gateway
            .validate()
            .map_err(|e| invalid("gateway", e.to_string()))?;
        if let Some(p) = &self.push {
            if p.region != self.region {
                return Err(invalid(
                    "push.region",
                    format!("{} differs from region {}", p.region, self.region),
                ));
            }
            p.validate().map_err(|e| invalid("push", e.to_string()))?;
        }
        self.applier
            .validate()
            .map_err(|e| invalid("applier", e.to_string()))?;
        self.search.validate().map_err(|e| match e {
            meridian_search::SearchError::Config { field, reason } => {
                invalid(&format!("search.{field}"), reason)
            }
            other => invalid("search", other.to_string()),
        })?;
        Ok(())
    }
}

impl RegionConfig {
    /// Where the search index lives: `search.index_dir`, else beside an embedded store
    /// (`<store dir>.search`); `None` with a TiKV store and no directory set.
    pub fn search_index_dir(&self) -> Option<std::path::PathBuf> {
        if let Some(d) = &self.search.index_dir {
            return Some(d.clone());
        }
        let dir = self.store.strip_prefix("embedded://")?;
        let dir = dir.split('?').next().unwrap_or(dir).trim_end_matches('/');
        Some(std::path::PathBuf::from(format!("{dir}.search")))
    }
}

/// Checks that region files make one deployment: region ids and JetStream domains differ,
/// each region mirrors exactly the others (so every region applies every region's events),
/// and each knows every region's endpoint (for `421 wrong_region`). The error names the
/// file's region and field. Adding a region means adding its file and listing it in the
/// others' `mirrors` and `region_endpoints`; this says which file was missed.
pub fn validate_region_set(regions: &[RegionConfig]) -> Result<(), ConfigError> {
    use std::collections::BTreeSet;
    let invalid = |cfg: &RegionConfig, field: &str, reason: String| ConfigError::Invalid {
        field: format!("{field} (region {})", cfg.region),
        reason,
    };
    let ids: BTreeSet<&RegionId> = regions.iter().map(|c| &c.region).collect();
    if ids.len() != regions.len() {
        return Err(ConfigError::Invalid {
            field: "region".into(),
            reason: "two region files name the same region".into(),
        });
    }
    let mut domains = BTreeSet::new();
    for cfg in regions {
        let domain = cfg.bus.domain.clone().unwrap_or_else(|| cfg.region.to_string());
        if !domains.insert(domain.clone()) {
            return Err(invalid(
                cfg,
                "bus.domain",
                format!("{domain} is another region's domain too"),
            ));
        }
        let mirrored: BTreeSet<&RegionId> = cfg.bus.mirrors.iter().collect();
        let others: BTreeSet<&RegionId> = ids.iter().copied().filter(|r| **r != cfg.region).collect();
        if mirrored != others || mirrored.len() != cfg.bus.mirrors.len() {
            return Err(invalid(
                cfg,
                "bus.mirrors",
                format!("lists {mirrored:?}; it must list each other region once: {others:?}"),
            ));
        }
        let missing: Vec<&str> = ids
            .iter()
            .map(|r| r.as_str())
            .filter(|r| !cfg.gateway.region_endpoints.contains_key(*r))
            .collect();
        if !missing.is_empty() {
            return Err(invalid(
                cfg,
                "gateway.region_endpoints",
                format!("has no endpoint for {missing:?}"),
            ));
        }
    }
    Ok(())
}

fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) {
    match path {
        [] => {}
        [last] => {
            table.insert(last.clone(), value);
        }
        [first, rest @ ..] => {
            let child = table
                .entry(first.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !child.is_table() {
                *child = toml::Value::Table(toml::Table::new());
            }
            if let toml::Value::Table(t) = child {
                set_path(t, rest, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
region = "us"
store = "embedded://.data/us"
[bus]
nats_url = "nats://127.0.0.1:4222"
[gateway]
listen = "127.0.0.1:8080"
jwt_secret = "0123456789abcdef0123456789abcdef"
admin_key = "admin-key-admin-key"
"#;

    #[test]
    fn region_is_injected_and_env_overrides_apply() {
        let env = vec![
            (
                "MERIDIAN__GATEWAY__LISTEN".to_string(),
                "0.0.0.0:9999".to_string(),
            ),
            ("MERIDIAN__APPLIER__BATCH_MAX".to_string(), "64".to_string()),
            ("UNRELATED".to_string(), "x".to_string()),
        ];
        let cfg = RegionConfig::from_toml(FILE, "test", env).unwrap();
        assert_eq!(cfg.gateway.region.as_str(), "us");
        assert_eq!(cfg.applier.region.as_str(), "us");
        assert_eq!(cfg.gateway.listen.port(), 9999);
        assert_eq!(cfg.applier.batch_max, 64);
    }

    #[test]
    fn the_console_table_and_its_env_override_reach_the_gateway() {
        let cfg = RegionConfig::from_toml(
            &format!("{FILE}[console]\ndrills_dir = \"/srv/drills\"\n"),
            "test",
            vec![],
        )
        .unwrap();
        assert_eq!(
            cfg.gateway.console.drills_dir.as_deref(),
            Some(Path::new("/srv/drills"))
        );
        let env = vec![(
            "MERIDIAN__CONSOLE__DRILLS_DIR".to_string(),
            "/tmp/runs".to_string(),
        )];
        let cfg = RegionConfig::from_toml(FILE, "test", env).unwrap();
        assert_eq!(
            cfg.gateway.console.drills_dir.as_deref(),
            Some(Path::new("/tmp/runs"))
        );
        assert!(RegionConfig::from_toml(FILE, "test", vec![])
            .unwrap()
            .gateway
            .console
            .drills_dir
            .is_none());
        let err = RegionConfig::from_toml(&format!("{FILE}[console]\ndrill_dir = \"x\"\n"), "test", vec![])
            .unwrap_err()
            .to_string();
        assert!(err.contains("drill_dir"), "{err}");
    }

    #[test]
    fn search_is_on_beside_an_embedded_store_and_its_bad_fields_are_named() {
        let cfg = RegionConfig::from_toml(FILE, "test", vec![]).unwrap();
        assert!(cfg.search.enabled);
        let dir = cfg.search_index_dir().unwrap();
        assert!(dir.to_string_lossy().ends_with(".search"), "{}", dir.display());
        let env = vec![(
            "MERIDIAN__SEARCH__COMMIT_INTERVAL_MS".to_string(),
            "0".to_string(),
        )];
        let err = RegionConfig::from_toml(FILE, "test", env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("search.commit_interval_ms"), "{err}");
        let env = vec![(
            "MERIDIAN__SEARCH__INDEX_DIR".to_string(),
            "/srv/index".to_string(),
        )];
        let cfg = RegionConfig::from_toml(FILE, "test", env).unwrap();
        assert_eq!(
            cfg.search_index_dir().unwrap(),
            std::path::PathBuf::from("/srv/index")
        );
    }

    #[test]
    fn errors_name_the_field() {
        let env = vec![("MERIDIAN__GATEWAY__JWT_SECRET".to_string(), "short".to_string())];
        let err = RegionConfig::from_toml(FILE, "test", env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("jwt_secret"), "{err}");
        let err = RegionConfig::from_toml(&FILE.replace("embedded://", "s3://"), "test", vec![])
            .unwrap_err()
            .to_string();
        assert!(err.contains("store"), "{err}");
        let placeholder = FILE.replace("admin-key-admin-key", "REPLACE_ME-with-a-long-random-key");
        let err = RegionConfig::from_toml(&placeholder, "test", vec![])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("gateway.admin_key") && err.contains("MERIDIAN__GATEWAY__ADMIN_KEY"),
            "{err}"
        );
        let env = vec![(
            "MERIDIAN__GATEWAY__ADMIN_KEY".to_string(),
            "a-real-admin-key-123".to_string(),
        )];
        RegionConfig::from_toml(&placeholder, "test", env).unwrap();
        let err = RegionConfig::from_toml(&FILE.replace("listen", "lisen"), "test", vec![])
            .unwrap_err()
            .to_string();
        assert!(err.contains("lisen"), "{err}");
    }
}
