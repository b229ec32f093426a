//! The deployment the generator drives: read from a running deployment's `cluster.json`, or
//! one it starts for the run ([`OwnDeployment`]); its admin calls, its users' SDK clients, and
//! the CPU and memory of its processes.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use meridian_client::{Client, RetryPolicy};
use meridian_model::RegionId;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::{setup_err, BenchError};
use crate::up::{self, UpOptions};

/// What the generator knows about the deployment.
pub(super) struct Target {
    /// The region driven: users the generator provisions here are homed here.
    pub(super) region: String,
    pub(super) endpoint: String,
    admin_key: String,
    pub(super) pids: Vec<u32>,
    /// One connection pool for admin calls and every user's SDK client.
    http: reqwest::Client,
}

impl Target {
    pub(super) fn load(path: &Path, region: &str, admin_key: &str) -> Result<Target, BenchError> {
        let v = read_cluster(path)?;
        let r = &v["regions"][region];
        let endpoint = r["endpoint"]
            .as_str()
            .ok_or_else(|| BenchError::Cluster(path.display().to_string(), format!("no region {region}")))?
            .to_string();
        let pids = r["pids"]
            .as_object()
            .map(|m| m.values().filter_map(|p| p.as_u64()).map(|p| p as u32).collect())
            .unwrap_or_default();
        Ok(Target {
            region: region.to_string(),
            endpoint,
            admin_key: admin_key.to_string(),
            pids,
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(256)
                .build()
                .map_err(setup_err)?,
        })
    }

    /// The first region of the deployment other than `region`, by name.
    pub(super) fn other_region(path: &Path, region: &str) -> Result<String, BenchError> {
        let v = read_cluster(path)?;
        v["regions"]
            .as_object()
            .and_then(|m| m.keys().find(|r| *r != region).cloned())
            .ok_or_else(|| {
                BenchError::Cluster(
                    path.display().to_string(),
                    format!("no region other than {region}: x1 needs two"),
                )
            })
    }

    /// This target, measuring the processes of `other` as well (a workload spanning both).
    pub(super) fn with_pids_of(&self, other: &Target) -> Target {
        Target {
            region: self.region.clone(),
            endpoint: self.endpoint.clone(),
            admin_key: self.admin_key.clone(),
            pids: self.pids.iter().chain(&other.pids).copied().collect(),
            http: self.http.clone(),
        }
    }

    /// An admin GET.
    pub(super) async fn admin_get(&self, path: &str) -> Result<Value, BenchError> {
        self.admin(reqwest::Method::GET, path, None).await
    }

    async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, BenchError> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.endpoint))
            .header("X-Admin-Key", &self.admin_key);
        if let Some(body) = &body {
            req = req.json(body);
        }
        let resp = req.send().await.map_err(setup_err)?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            return Err(BenchError::Setup(format!("{path}: {status} {v}")));
        }
        Ok(v)
    }

    /// Provisions `user`, homed in this target's region, and returns a token.
    pub(super) async fn user(&self, user: &str) -> Result<String, BenchError> {
        self.admin(
            reqwest::Method::PUT,
            &format!("/v1/admin/users/{user}"),
            Some(json!({"home_region": self.region})),
        )
        .await?;
        // The user exists once the applier has caught up; a loaded deployment may answer
        // the PUT before that, so the token is retried for a while.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let minted = self
                .admin(
                    reqwest::Method::POST,
                    "/v1/admin/tokens",
                    Some(json!({"user_id": user, "device_id": "bench", "ttl_s": 86400})),
                )
                .await;
            match minted {
                Ok(t) => return Ok(t["token"].as_str().unwrap_or_default().to_string()),
                Err(e) if Instant::now() < deadline && e.to_string().contains("user_not_found") => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits (bounded) until the region has applied everything in its stream, so one
    /// workload's backlog does not count against the next.
    pub(super) async fn wait_idle(&self, limit: Duration) -> Option<u64> {
        let deadline = Instant::now() + limit;
        loop {
            let lag = match self.http.get(format!("{}/readyz", self.endpoint)).send().await {
                Ok(r) => r.json::<Value>().await.ok().and_then(|v| v["apply_lag"].as_u64()),
                Err(_) => None,
            };
            if lag == Some(0) || Instant::now() > deadline {
                return lag;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// `token`'s user as the SDK client, on the shared pool. A 429 is waited out and retried,
    /// as a real client would (up to 30 times); nothing else is retried, so an overloaded
    /// server shows up as send errors rather than as retries hidden in the latency.
    pub(super) fn client(&self, token: &str) -> Client {
        Client::with_http(&self.endpoint, token, self.http.clone()).with_retry(RetryPolicy {
            attempts: 1,
            rate_limited_retries: 30,
            max_rate_limited_wait: Duration::from_secs(60),
            ..RetryPolicy::default()
        })
    }

    /// utime + stime of every deployment process, in seconds.
    pub(super) fn cpu_seconds(&self) -> f64 {
        let tick = 100.0; // USER_HZ on Linux
        self.pids.iter().filter_map(|p| proc_cpu_ticks(*p)).sum::<u64>() as f64 / tick
    }

    /// Resident memory of every deployment process, in KiB.
    pub(super) fn rss_kib(&self) -> u64 {
        self.pids.iter().filter_map(|p| proc_rss_kib(*p)).sum()
    }
}

fn read_cluster(path: &Path) -> Result<Value, BenchError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| BenchError::Cluster(path.display().to_string(), e.to_string()))?;
    serde_json::from_str(&text).map_err(|e| BenchError::Cluster(path.display().to_string(), e.to_string()))
}

fn proc_cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn proc_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Provisions `n` users named `{prefix}{i}` with bounded concurrency.
pub(super) async fn provision(
    target: &Arc<Target>,
    prefix: &str,
    n: usize,
) -> Result<Vec<(String, String)>, BenchError> {
    let names: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    let results = futures::stream::iter(names.into_iter().map(|u| {
        let t = target.clone();
        async move { t.user(&u).await.map(|tok| (u, tok)) }
    }))
    .buffered(32)
    .collect::<Vec<_>>()
    .await;
    results.into_iter().collect()
}

/// A deployment of `regions` started for the run (`meridian bench` without `--cluster`), in a
/// temporary directory; its processes are children, measured by pid like any others.
pub struct OwnDeployment {
    /// Its cluster.json, for [`super::BenchOptions::cluster`].
    pub cluster: std::path::PathBuf,
    /// The admin key it was started with.
    pub admin_key: String,
    _dir: tempfile::TempDir,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), up::UpError>>,
}

/// The first of `count` consecutive loopback ports that are all free right now, at a random
/// place in 20000..60000 (a base derived from the pid made neighbouring processes' blocks
/// overlap: a two-region deployment's hub took a one-region deployment's ports). Another
/// process can still take one before `up` binds it; `up` then fails naming the port.
fn free_port_run(count: u16) -> Result<u16, BenchError> {
    for _ in 0..64 {
        let base = 20_000 + (rand::random::<u16>() % 4_000) * 10;
        let free = (base..base + count).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
        if free {
            return Ok(base);
        }
    }
    Err(BenchError::Setup(format!(
        "no run of {count} free ports found in 20000..60000"
    )))
}

impl OwnDeployment {
    /// Starts it through `meridian up`'s code and waits (up to 2 minutes) for its
    /// cluster.json. `shutdown` stops it too.
    pub async fn start(shutdown: &CancellationToken, regions: &[&str]) -> Result<OwnDeployment, BenchError> {
        let dir = tempfile::tempdir().map_err(|e| BenchError::Setup(format!("temporary data dir: {e}")))?;
        let port_base = free_port_run(up::PORTS_PER_REGION * (regions.len() as u16 + 1))?;
        let admin_key = format!("bench-{:016x}", rand::random::<u64>());
        let up_opts = UpOptions {
            regions: regions
                .iter()
                .map(|r| RegionId::parse(*r))
                .collect::<Result<_, _>>()
                .map_err(setup_err)?,
            data_dir: dir.path().to_path_buf(),
            admin_key: admin_key.clone(),
            port_base,
            nats_server: None,
            exe: None,
            wan: Default::default(),
            durability: Default::default(),
        };
        let stop = shutdown.child_token();
        let task = tokio::spawn(up::run(up_opts, stop.clone()));
        let cluster = dir.path().join("cluster.json");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while !cluster.exists() {
            if task.is_finished() || tokio::time::Instant::now() > deadline {
                stop.cancel();
                let r = task.await;
                return Err(BenchError::Setup(format!(
                    "the deployment for the bench did not start: {r:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(OwnDeployment {
            cluster,
            admin_key,
            _dir: dir,
            stop,
            task,
        })
    }

    /// Stops it in order and removes its directory.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}
