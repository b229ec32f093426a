//! The deployment a drill acts on: its cluster.json, the launcher's control API (signals,
//! holds, link shapes, clock offsets; docs/api.md "Operator control API") and the admin
//! calls a drill makes (failover, failback, readiness).

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::record::{admin_call, RegionTarget};
use super::DrillError;

/// How long one control or admin call may take. A SIGSTOPped region does not answer at all:
/// its calls must fail, not hang the drill.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// What a WAN link does to traffic (one region's link to the hub).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LinkSetting {
    pub delay_ms: u64,
    pub jitter_ms: u64,
    pub loss: f64,
    #[serde(default)]
    pub cut: bool,
}

/// One region of the deployment, as cluster.json names it.
#[derive(Clone, Debug)]
pub struct DeployedRegion {
    pub region: String,
    pub endpoint: String,
    /// Whether the region has a WAN link proxy (two or more regions).
    pub has_link: bool,
}

/// Where one region is in one stream it applies.
#[derive(Clone, Debug)]
pub struct StreamPosition {
    /// The region whose events the stream holds.
    pub origin: String,
    pub last_seq: Option<u64>,
    pub applied: u64,
}

/// A running deployment (`meridian up`) and the calls a drill makes to it.
pub struct Deployment {
    pub regions: Vec<DeployedRegion>,
    pub has_hub: bool,
    control: String,
    admin_key: String,
    http: reqwest::Client,
}

/// The answer of a call: status and JSON body (Null when there was none).
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

impl Deployment {
    /// Reads cluster.json. The admin key is not in it (see `meridian up`).
    pub fn load(cluster: &Path, admin_key: &str) -> Result<Deployment, DrillError> {
        let at = cluster.display();
        let text =
            std::fs::read_to_string(cluster).map_err(|e| DrillError::Setup(format!("reading {at}: {e}")))?;
        let doc: Value = serde_json::from_str(&text).map_err(|e| DrillError::Setup(format!("{at}: {e}")))?;
        let control = doc["control"]
            .as_str()
            .ok_or_else(|| {
                DrillError::Setup(format!(
                    "{at} names no control API (\"control\"): the deployment was not started by a \
                     `meridian up` that serves one"
                ))
            })?
            .trim_end_matches('/')
            .to_string();
        let mut regions = Vec::new();
        if let Some(map) = doc["regions"].as_object() {
            for (region, entry) in map {
                let endpoint = entry["endpoint"]
                    .as_str()
                    .ok_or_else(|| DrillError::Setup(format!("{at}: region {region} has no endpoint")))?;
                regions.push(DeployedRegion {
                    region: region.clone(),
                    endpoint: endpoint.trim_end_matches('/').to_string(),
                    has_link: entry["link_proxy"].is_string(),
                });
            }
        }
        if regions.is_empty() {
            return Err(DrillError::Setup(format!("{at} names no region")));
        }
        // cluster.json is a map (sorted); the drill's "first region" is the launcher's.
        if let Some(order) = doc["region_order"].as_array() {
            let order: Vec<&str> = order.iter().filter_map(Value::as_str).collect();
            regions.sort_by_key(|r| order.iter().position(|o| *o == r.region).unwrap_or(usize::MAX));
        }
        let http = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .build()
            .map_err(|e| DrillError::Setup(format!("http client: {e}")))?;
        Ok(Deployment {
            regions,
            has_hub: doc["hub"].is_object(),
            control,
            admin_key: admin_key.to_string(),
            http,
        })
    }

    /// The regions as the workload and the checker address them.
    pub fn targets(&self) -> Vec<RegionTarget> {
        self.regions
            .iter()
            .map(|r| RegionTarget {
                region: r.region.clone(),
                endpoint: r.endpoint.clone(),
            })
            .collect()
    }

    pub fn endpoint(&self, region: &str) -> Result<&str, DrillError> {
        self.regions
            .iter()
            .find(|r| r.region == region)
            .map(|r| r.endpoint.as_str())
            .ok_or_else(|| DrillError::Setup(format!("no region {region} in the deployment")))
    }

    /// Every process a crash may hit: each region's region process and nats-server, and the
    /// hub.
    pub fn processes(&self) -> Vec<String> {
        let mut all = Vec::new();
        for r in &self.regions {
            all.push(format!("{}/region", r.region));
            all.push(format!("{}/nats", r.region));
        }
        if self.has_hub {
            all.push("hub".to_string());
        }
        all
    }

    /// An admin call (`X-Admin-Key`) to `base` (a region's gateway or the control API).
    async fn call(
        &self,
        method: reqwest::Method,
        base: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Answer, DrillError> {
        let (status, body) =
            admin_call(&self.http, base, &self.admin_key, method, path, body.as_ref()).await?;
        Ok(Answer { status, body })
    }

    /// [`Deployment::call`] that must answer 200; its body.
    async fn call_ok(
        &self,
        method: reqwest::Method,
        base: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, DrillError> {
        let a = self.call(method, base, path, body).await?;
        if a.status != 200 {
            return Err(DrillError::Call(format!("{base}{path}: {} {}", a.status, a.body)));
        }
        Ok(a.body)
    }

    async fn control(&self, method: reqwest::Method, path: &str, body: Value) -> Result<Value, DrillError> {
        self.call_ok(method, &self.control, path, Some(body)).await
    }

    /// The launcher's view: every process's pid and state, holds, links, clock offsets.
    pub async fn status(&self) -> Result<Value, DrillError> {
        self.call_ok(reqwest::Method::GET, &self.control, "/control", None)
            .await
    }

    /// The pid of a process ("us/region", "us/nats", "hub") when it runs.
    pub async fn pid(&self, target: &str) -> Result<Option<u64>, DrillError> {
        let s = self.status().await?;
        let entry = match target.split_once('/') {
            Some((region, what)) => &s["regions"][region][what],
            None => &s[target],
        };
        Ok((entry["state"] == "running")
            .then(|| entry["pid"].as_u64())
            .flatten())
    }

    /// Sends `signal` (KILL, TERM, STOP, CONT) to a process; its pid.
    pub async fn signal(&self, target: &str, signal: &str) -> Result<u64, DrillError> {
        let v = self
            .control(
                reqwest::Method::POST,
                "/control/signal",
                json!({"target": target, "signal": signal}),
            )
            .await?;
        Ok(v["pid"].as_u64().unwrap_or(0))
    }

    /// While held, the launcher restarts nothing of the region.
    pub async fn hold(&self, region: &str, hold: bool) -> Result<(), DrillError> {
        self.control(
            reqwest::Method::POST,
            "/control/hold",
            json!({"region": region, "hold": hold}),
        )
        .await
        .map(drop)
    }

    pub async fn link(&self, region: &str) -> Result<LinkSetting, DrillError> {
        let s = self.status().await?;
        serde_json::from_value(s["regions"][region]["link"].clone())
            .map_err(|e| DrillError::Call(format!("the link of {region}: {e}")))
    }

    pub async fn set_link(&self, region: &str, shape: LinkSetting) -> Result<(), DrillError> {
        self.control(
            reqwest::Method::PUT,
            &format!("/control/links/{region}"),
            serde_json::to_value(shape).expect("plain data"),
        )
        .await
        .map(drop)
    }

    /// Restarts the region's process with its HLC's physical source `offset_ms` off.
    pub async fn set_clock(&self, region: &str, offset_ms: i64) -> Result<(), DrillError> {
        self.control(
            reqwest::Method::PUT,
            &format!("/control/clock/{region}"),
            json!({"offset_ms": offset_ms}),
        )
        .await
        .map(drop)
    }

    /// `POST /v1/admin/failover`, answered by the acting region `to`.
    pub async fn failover(&self, region: &str, to: &str) -> Result<Answer, DrillError> {
        let body = json!({"region": region, "to": to});
        self.call(
            reqwest::Method::POST,
            self.endpoint(to)?,
            "/v1/admin/failover",
            Some(body),
        )
        .await
    }

    /// `POST /v1/admin/failback`, answered by the home region (409 while not caught up).
    pub async fn failback(&self, region: &str) -> Result<Answer, DrillError> {
        let body = json!({"region": region});
        self.call(
            reqwest::Method::POST,
            self.endpoint(region)?,
            "/v1/admin/failback",
            Some(body),
        )
        .await
    }

    /// Whether a region answers `/readyz` with 200: store and NATS reachable, apply lag
    /// under bound and every mirror healthy (`local`: its own stream only).
    pub async fn ready(&self, region: &str, local: bool) -> bool {
        let Ok(base) = self.endpoint(region) else {
            return false;
        };
        let url = format!("{base}/readyz{}", if local { "?scope=local" } else { "" });
        matches!(self.http.get(url).send().await, Ok(r) if r.status().as_u16() == 200)
    }

    /// Every stream `region` applies, as `(origin region, stream's last seq, applied seq)`,
    /// from its `/v1/admin/regions`.
    pub async fn stream_positions(&self, region: &str) -> Result<Vec<StreamPosition>, DrillError> {
        let base = self.endpoint(region)?;
        let body = self
            .call_ok(reqwest::Method::GET, base, "/v1/admin/regions", None)
            .await?;
        let streams = body["regions"]
            .as_array()
            .and_then(|all| all.iter().find(|r| r["region"] == region))
            .and_then(|r| r["streams"].as_object())
            .ok_or_else(|| DrillError::Call(format!("{base}: no streams of {region} in {body}")))?;
        Ok(streams
            .values()
            .map(|h| StreamPosition {
                origin: h["origin"].as_str().unwrap_or_default().to_string(),
                last_seq: h["last_seq"].as_u64(),
                applied: h["applied"].as_u64().unwrap_or(0),
            })
            .collect())
    }

    /// Whether every region is ready, mirrors included.
    pub async fn all_ready(&self) -> bool {
        for r in &self.regions {
            if !self.ready(&r.region, false).await {
                return false;
            }
        }
        true
    }
}
