//! `meridian bench`: the load generator, run against a deployment's `cluster.json`.
//!
//! Open loop: sends leave at a fixed aggregate rate whether or not earlier ones were
//! delivered, so a slow server shows up as latency and loss instead of a politely lower
//! send rate (closed-loop generators hide exactly the overload they are meant to find).
//! Each message body is exactly 100 bytes of JSON and carries its send time; latency is
//! receipt time at the receiving client's WebSocket minus send time (one process, one clock).
//! After each step the generator waits up to 10 s for stragglers and counts what never
//! arrived. Server CPU comes from `/proc/<pid>/stat` of every process in `cluster.json`.
//!
//! Workloads: W1 one-to-one at rising rates; W2 group fan-out (a group of 50 with 10
//! senders, and one of 1,000 members — above the read-diffusion threshold); W3 offline
//! users receive, then connect and sync; W4 idle WebSockets and server memory per connection.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use rand::Rng;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("cannot read {0}: {1}")]
    Cluster(String, String),
    #[error("setup: {0}")]
    Setup(String),
    #[error("cancelled")]
    Cancelled,
}

fn setup_err(e: impl std::fmt::Display) -> BenchError {
    BenchError::Setup(e.to_string())
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The deployment's cluster.json.
    pub cluster: PathBuf,
    /// Which region to drive.
    pub region: String,
    /// Workloads to run: "w1", "w2", "w3", "w4".
    pub workloads: Vec<String>,
    /// W1 rates (aggregate msg/s) and step length.
    pub rates: Vec<u64>,
    pub step: Duration,
    pub users: usize,
    /// W1 sends over HTTP instead of the WebSocket.
    pub over_http: bool,
    /// W4 idle connections.
    pub idle_connections: usize,
    /// Where to write the JSON report.
    pub out: PathBuf,
    /// How long to wait for stragglers after a step.
    pub drain: Duration,
    /// A CI-sized run: W2 with small groups.
    pub smoke: bool,
    /// The deployment's admin key (cluster.json does not hold it).
    pub admin_key: String,
}

impl BenchOptions {
    /// The full run of the issue: W1 at 1k..20k msg/s in 30 s steps, W2, W3, W4 with 50k.
    pub fn full(cluster: PathBuf, out: PathBuf) -> Self {
        Self {
            cluster,
            region: "us".into(),
            workloads: vec!["w1".into(), "w2".into(), "w3".into(), "w4".into()],
            rates: vec![1_000, 2_000, 5_000, 10_000, 20_000],
            step: Duration::from_secs(30),
            users: 200,
            over_http: false,
            idle_connections: 50_000,
            out,
            drain: Duration::from_secs(10),
            smoke: false,
            admin_key: String::new(),
        }
    }
}

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
    pub max_ms: f64,
    pub server_cpu_s: f64,
    pub cpu_s_per_1k: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_per_conn_kib: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub machine: String,
    pub cores: usize,
    pub command: String,
    pub endpoint: String,
    pub steps: Vec<StepResult>,
}

/// What the generator knows about the deployment.
struct Target {
    endpoint: String,
    admin_key: String,
    pids: Vec<u32>,
    http: reqwest::Client,
}

impl Target {
    fn load(path: &Path, region: &str, admin_key: &str) -> Result<Target, BenchError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| BenchError::Cluster(path.display().to_string(), e.to_string()))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| BenchError::Cluster(path.display().to_string(), e.to_string()))?;
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
            endpoint,
            admin_key: admin_key.to_string(),
            pids,
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(256)
                .build()
                .map_err(setup_err)?,
        })
    }

    async fn admin(&self, method: reqwest::Method, path: &str, body: Value) -> Result<Value, BenchError> {
        let resp = self
            .http
            .request(method, format!("{}{path}", self.endpoint))
            .header("X-Admin-Key", &self.admin_key)
            .json(&body)
            .send()
            .await
            .map_err(setup_err)?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            return Err(BenchError::Setup(format!("{path}: {status} {v}")));
        }
        Ok(v)
    }

    /// Provisions `user` and returns a token.
    async fn user(&self, user: &str) -> Result<String, BenchError> {
        self.admin(
            reqwest::Method::PUT,
            &format!("/v1/admin/users/{user}"),
            json!({"home_region": "us"}),
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
                    json!({"user_id": user, "device_id": "bench", "ttl_s": 86400}),
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
    async fn wait_idle(&self, limit: Duration) -> Option<u64> {
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

    /// A client call; a 429 is waited out (Retry-After) and retried, as a real client would.
    async fn user_call(
        &self,
        token: &str,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> Result<Value, BenchError> {
        let mut attempt = 0;
        loop {
            let resp = self
                .http
                .request(method.clone(), format!("{}{path}", self.endpoint))
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .map_err(setup_err)?;
            let status = resp.status();
            if status.as_u16() == 429 && attempt < 30 {
                let wait = resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(1);
                attempt += 1;
                tokio::time::sleep(Duration::from_secs(wait)).await;
                continue;
            }
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            if !status.is_success() {
                return Err(BenchError::Setup(format!("{path}: {status} {v}")));
            }
            return Ok(v);
        }
    }

    /// utime + stime of every deployment process, in seconds.
    fn cpu_seconds(&self) -> f64 {
        let tick = 100.0; // USER_HZ on Linux
        self.pids.iter().filter_map(|p| proc_cpu_ticks(*p)).sum::<u64>() as f64 / tick
    }

    /// Resident memory of every deployment process, in KiB.
    fn rss_kib(&self) -> u64 {
        self.pids.iter().filter_map(|p| proc_rss_kib(*p)).sum()
    }
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

/// A message body of exactly 100 bytes of JSON carrying its send time (µs since `base`).
fn body_100(sent_us: u64, id: &str) -> Value {
    let head = format!("{sent_us:016}|{id}|");
    // `{"text":"` + text + `"}` is 11 bytes of framing.
    let pad = 100usize.saturating_sub(11 + head.len());
    let v = json!({"text": format!("{head}{}", "x".repeat(pad))});
    debug_assert_eq!(v.to_string().len(), 100);
    v
}

fn parse_body(text: &str) -> Option<(u64, &str)> {
    let mut parts = text.splitn(3, '|');
    let sent = parts.next()?.parse().ok()?;
    Some((sent, parts.next()?))
}

/// What the receivers saw during one step.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    /// Receipts per message id (by the intended recipient only).
    seen: HashMap<String, u32>,
}

struct Shared {
    base: Instant,
    tally: Mutex<Tally>,
    /// Only messages of the current step are counted.
    step_tag: Mutex<String>,
    received: AtomicU64,
}

impl Shared {
    fn new() -> Arc<Shared> {
        Arc::new(Shared {
            base: Instant::now(),
            tally: Mutex::default(),
            step_tag: Mutex::default(),
            received: AtomicU64::new(0),
        })
    }

    /// `me` received message `id`, sent at `sent_us`, at `now_us`.
    fn record(&self, id: &str, me: &str, sent_us: u64, now_us: u64) {
        self.received.fetch_add(1, Ordering::Relaxed);
        let mut tally = self.tally.lock().unwrap_or_else(|p| p.into_inner());
        tally.latencies_us.push(now_us.saturating_sub(sent_us));
        *tally.seen.entry(format!("{id}>{me}")).or_default() += 1;
    }

    fn now_us(&self) -> u64 {
        self.base.elapsed().as_micros() as u64
    }
}

/// One connected bench user: a WebSocket with a writer channel and a reader task.
struct Conn {
    user: String,
    token: String,
    tx: mpsc::Sender<String>,
}

async fn connect(
    target: &Target,
    user: String,
    token: String,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> Result<Conn, BenchError> {
    let url = format!(
        "{}/v1/ws?token={token}",
        target.endpoint.replacen("http", "ws", 1)
    );
    let (socket, _) = tokio_tungstenite::connect_async(url).await.map_err(setup_err)?;
    let (mut write, mut read) = socket.split();
    let (tx, mut rx) = mpsc::channel::<String>(4096);
    // Start live from the current head: everything before the bench is not ours.
    let head = target
        .user_call(
            &token,
            reqwest::Method::GET,
            "/v1/sync?after=0&limit=1",
            Value::Null,
        )
        .await
        .map(|v| v["head"].as_u64().unwrap_or(0))
        .unwrap_or(0);
    write
        .send(WsMessage::text(json!({"op": "hello", "after": head}).to_string()))
        .await
        .map_err(setup_err)?;
    let stop_w = stop.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop_w.cancelled() => break,
                frame = rx.recv() => match frame {
                    Some(f) => if write.send(WsMessage::text(f)).await.is_err() { break },
                    None => break,
                },
            }
        }
        let _ = write.close().await;
    });
    let me = user.clone();
    let endpoint = target.endpoint.clone();
    let http = target.http.clone();
    let token_r = token.clone();
    tokio::spawn(async move {
        let mut cursors: HashMap<String, String> = HashMap::new();
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => break,
                m = read.next() => m,
            };
            let Some(Ok(WsMessage::Text(t))) = msg else {
                if msg.is_none() || matches!(msg, Some(Err(_))) {
                    break;
                }
                continue;
            };
            let now = shared.now_us();
            let Ok(v) = serde_json::from_str::<Value>(t.as_str()) else {
                continue;
            };
            match v["op"].as_str() {
                Some("entry") if v["kind"] == "message" && v["sender"] != me.as_str() => {
                    let Some((sent, id)) = v["body"]["text"].as_str().and_then(parse_body) else {
                        continue;
                    };
                    let tag = shared.step_tag.lock().map(|t| t.clone()).unwrap_or_default();
                    if !id.starts_with(&tag) {
                        continue;
                    }
                    shared.record(id, &me, sent, now);
                }
                Some("entry") if v["kind"] == "conversation_advanced" => {
                    // Read diffusion: the inbox only says the group moved on; pull the
                    // storage timeline after what this client has seen, like an app would.
                    let cid = v["conversation_id"].as_str().unwrap_or_default().to_string();
                    let after = cursors.get(&cid).cloned().unwrap_or_default();
                    let path = format!("{endpoint}/v1/conversations/{cid}/messages?after={after}&limit=200");
                    let Ok(resp) = http.get(path).bearer_auth(&token_r).send().await else {
                        continue;
                    };
                    let Ok(page) = resp.json::<Value>().await else {
                        continue;
                    };
                    let now = shared.now_us();
                    let tag = shared.step_tag.lock().map(|t| t.clone()).unwrap_or_default();
                    for m in page["messages"].as_array().into_iter().flatten() {
                        if let Some(c) = m["cursor"].as_str() {
                            cursors.insert(cid.clone(), c.to_string());
                        }
                        if m["sender"] == me.as_str() {
                            continue;
                        }
                        let Some((sent, id)) = m["body"]["text"].as_str().and_then(parse_body) else {
                            continue;
                        };
                        if !id.starts_with(&tag) {
                            continue;
                        }
                        shared.record(id, &me, sent, now);
                    }
                }
                _ => {}
            }
        }
    });
    Ok(Conn { user, token, tx })
}

/// One WebSocket per user, opened 32 at a time, in `users` order.
async fn connect_all(
    target: &Target,
    users: &[(String, String)],
    shared: &Arc<Shared>,
    stop: &CancellationToken,
) -> Result<Vec<Conn>, BenchError> {
    futures::stream::iter(
        users
            .iter()
            .map(|(u, t)| connect(target, u.clone(), t.clone(), shared.clone(), stop.clone())),
    )
    .buffered(32)
    .collect::<Vec<_>>()
    .await
    .into_iter()
    .collect()
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
}

/// Runs the selected workloads, printing progress and a table, and writes the JSON report.
pub async fn run(
    opts: BenchOptions,
    command: String,
    stop: CancellationToken,
) -> Result<BenchReport, BenchError> {
    let target = Arc::new(Target::load(&opts.cluster, &opts.region, &opts.admin_key)?);
    let mut report = BenchReport {
        machine: machine_description(),
        cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        command,
        endpoint: target.endpoint.clone(),
        steps: Vec::new(),
    };
    let run_id = format!(
        "b{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    );
    println!(
        "meridian bench against {} ({} server processes)",
        target.endpoint,
        target.pids.len()
    );
    print_header();
    for w in &opts.workloads {
        match target.wait_idle(Duration::from_secs(300)).await {
            Some(0) => {}
            lag => eprintln!("{w}: starting with an apply backlog of {lag:?} events"),
        }
        let rows = match w.as_str() {
            "w1" => w1(&target, &opts, &run_id, &stop).await?,
            "w2" => w2(&target, &opts, &run_id, &stop).await?,
            "w3" => w3(&target, &opts, &run_id, &stop).await?,
            "w4" => w4(&target, &opts, &run_id, &stop).await?,
            other => {
                return Err(BenchError::Setup(format!(
                    "unknown workload {other:?} (w1, w2, w3, w4)"
                )))
            }
        };
        report.steps.extend(rows);
        if stop.is_cancelled() {
            break;
        }
    }
    let json = serde_json::to_string_pretty(&report).map_err(setup_err)?;
    std::fs::write(&opts.out, json)
        .map_err(|e| BenchError::Setup(format!("writing {}: {e}", opts.out.display())))?;
    println!("report written to {}", opts.out.display());
    Ok(report)
}

fn machine_description() -> String {
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

fn print_header() {
    println!(
        "{:<4} {:<14} {:>8} {:>8} {:>10} {:>7} {:>5} {:>8} {:>8} {:>8} {:>9}",
        "wl", "step", "sent", "deliv", "deliv/s", "undeliv", "dups", "p50 ms", "p99 ms", "max ms", "cpu/1k s"
    );
}

fn print_row(r: &StepResult) {
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

/// Provisions `n` users named `{prefix}{i}` with bounded concurrency.
async fn provision(
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

/// What the sending side of a step did.
struct StepOutcome {
    sent: u64,
    send_errors: u64,
    /// Receipts expected (messages times recipients).
    expected: u64,
    /// How long sending took.
    window: Duration,
}

/// Collects a step's tally into a row.
fn finish_step(
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
        max_ms: lat.last().map_or(0.0, |m| *m as f64 / 1000.0),
        server_cpu_s: cpu_s,
        cpu_s_per_1k: if unique > 0 {
            cpu_s / (unique as f64 / 1000.0)
        } else {
            0.0
        },
        memory_per_conn_kib: None,
    }
}

/// Sends `count` messages at `rate`/s from random senders, open loop, and waits for delivery.
/// `pick` chooses (sender index, conversation id, expected recipients).
#[allow(clippy::too_many_arguments)]
async fn open_loop(
    target: &Arc<Target>,
    conns: &[Conn],
    shared: &Arc<Shared>,
    tag: &str,
    rate: u64,
    duration: Duration,
    over_http: bool,
    drain: Duration,
    stop: &CancellationToken,
    mut pick: impl FnMut(&mut rand::rngs::ThreadRng) -> (usize, String, u64),
) -> StepOutcome {
    // Each step starts from an idle server: an overloaded step's backlog is its own result.
    if let Some(lag) = target
        .wait_idle(Duration::from_secs(300))
        .await
        .filter(|l| *l > 0)
    {
        eprintln!("  .. {tag}: starting with an apply backlog of {lag} events");
    }
    *shared.step_tag.lock().unwrap_or_else(|p| p.into_inner()) = tag.to_string();
    let total = (rate as f64 * duration.as_secs_f64()) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let started = Instant::now();
    let mut sent = 0u64;
    let mut errors = 0u64;
    let mut expected = 0u64;
    let mut last_progress = Instant::now();
    let http_errors = Arc::new(AtomicU64::new(0));
    while sent < total && !stop.is_cancelled() {
        // Open loop: the n-th message is due at n * interval, however the server is doing.
        let due = started + interval.mul_f64(sent as f64);
        let now = Instant::now();
        if due > now {
            tokio::time::sleep(due - now).await;
        }
        let (from, cid, recipients) = pick(&mut rand::thread_rng());
        let id = format!("{tag}{sent}");
        let body = body_100(shared.now_us(), &id);
        if over_http {
            let t = target.clone();
            let token = conns[from].token.clone();
            let errs = http_errors.clone();
            tokio::spawn(async move {
                let path = format!("/v1/conversations/{cid}/messages");
                let req = json!({"client_msg_id": id, "type": "text", "body": body});
                if t.user_call(&token, reqwest::Method::POST, &path, req)
                    .await
                    .is_err()
                {
                    errs.fetch_add(1, Ordering::Relaxed);
                }
            });
        } else {
            let frame = json!({"op": "send", "ref": id, "conversation_id": cid, "client_msg_id": id, "type": "text", "body": body});
            if conns[from].tx.try_send(frame.to_string()).is_err() {
                errors += 1;
            }
        }
        sent += 1;
        expected += recipients;
        if last_progress.elapsed() > Duration::from_secs(5) {
            last_progress = Instant::now();
            eprintln!(
                "  .. {tag}: {sent}/{total} sent, {} received, {:.0}s",
                shared.received.load(Ordering::Relaxed),
                started.elapsed().as_secs_f64()
            );
        }
    }
    let send_window = started.elapsed();
    // Stragglers: wait until everything arrived or `drain` passed.
    let deadline = Instant::now() + drain;
    while Instant::now() < deadline && !stop.is_cancelled() {
        let got = shared.tally.lock().map(|t| t.seen.len() as u64).unwrap_or(0);
        if got >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    StepOutcome {
        sent,
        send_errors: errors + http_errors.load(Ordering::Relaxed),
        expected,
        window: send_window,
    }
}

async fn w1(
    target: &Arc<Target>,
    opts: &BenchOptions,
    run_id: &str,
    stop: &CancellationToken,
) -> Result<Vec<StepResult>, BenchError> {
    eprintln!(
        "W1: provisioning {} users and their direct conversations...",
        opts.users
    );
    let users = provision(target, &format!("{run_id}w1u"), opts.users).await?;
    let shared = Shared::new();
    let conn_stop = stop.child_token();
    let conns = connect_all(target, &users, &shared, &conn_stop).await?;
    // Every pair gets its direct conversation up front (a send needs one to exist).
    let n = conns.len();
    let pairs: Vec<(usize, usize)> = (0..n).flat_map(|a| (a + 1..n).map(move |b| (a, b))).collect();
    type Created = Result<((usize, usize), String), BenchError>;
    let cids: Vec<Created> = futures::stream::iter(pairs.into_iter().map(|(a, b)| {
        let t = target.clone();
        let token = conns[a].token.clone();
        let other = conns[b].user.clone();
        async move {
            let v = t
                .user_call(
                    &token,
                    reqwest::Method::POST,
                    "/v1/conversations",
                    json!({"kind": "direct", "members": [other]}),
                )
                .await?;
            Ok((
                (a, b),
                v["conversation_id"].as_str().unwrap_or_default().to_string(),
            ))
        }
    }))
    .buffer_unordered(64)
    .collect()
    .await;
    let mut direct = HashMap::new();
    for c in cids {
        let (k, cid) = c?;
        direct.insert(k, cid);
    }
    eprintln!("W1: {} conversations ready", direct.len());
    let mut rows = Vec::new();
    for &rate in &opts.rates {
        let tag = format!("{run_id}w1r{rate}_");
        let cpu0 = target.cpu_seconds();
        let outcome = open_loop(
            target,
            &conns,
            &shared,
            &tag,
            rate,
            opts.step,
            opts.over_http,
            opts.drain,
            stop,
            |rng| {
                let a = rng.gen_range(0..n);
                let mut b = rng.gen_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let key = (a.min(b), a.max(b));
                (a, direct[&key].clone(), 1)
            },
        )
        .await;
        let cpu = target.cpu_seconds() - cpu0;
        let step = format!("{rate}/s{}", if opts.over_http { " http" } else { "" });
        let row = finish_step(&shared, "W1", step, rate, outcome, cpu);
        print_row(&row);
        rows.push(row);
        if stop.is_cancelled() {
            break;
        }
    }
    conn_stop.cancel();
    Ok(rows)
}

async fn w2(
    target: &Arc<Target>,
    opts: &BenchOptions,
    run_id: &str,
    stop: &CancellationToken,
) -> Result<Vec<StepResult>, BenchError> {
    let mut rows = Vec::new();
    // (members, senders, message rates): deliveries/s = rate x (members - 1).
    let plan: Vec<(usize, usize, Vec<u64>)> = if opts.smoke {
        vec![(10, 3, vec![20])]
    } else {
        vec![(50, 10, vec![200, 1_000, 2_000]), (1_000, 10, vec![10, 50])]
    };
    for (size, senders, rates) in plan {
        eprintln!("W2: group of {size} ({senders} senders), rates {rates:?} msg/s...");
        let users = provision(target, &format!("{run_id}w2g{size}u"), size).await?;
        let shared = Shared::new();
        let conn_stop = stop.child_token();
        let conns = connect_all(target, &users, &shared, &conn_stop).await?;
        let members: Vec<&str> = users[1..].iter().map(|(u, _)| u.as_str()).collect();
        let g = target
            .user_call(
                &users[0].1,
                reqwest::Method::POST,
                "/v1/conversations",
                json!({"kind": "group", "name": "bench", "members": members}),
            )
            .await?;
        let cid = g["conversation_id"].as_str().unwrap_or_default().to_string();
        for rate in rates {
            let tag = format!("{run_id}w2g{size}r{rate}_");
            let cpu0 = target.cpu_seconds();
            let outcome = open_loop(
                target,
                &conns,
                &shared,
                &tag,
                rate,
                opts.step,
                false,
                opts.drain,
                stop,
                |rng| (rng.gen_range(0..senders), cid.clone(), size as u64 - 1),
            )
            .await;
            let cpu = target.cpu_seconds() - cpu0;
            let row = finish_step(&shared, "W2", format!("group {size} @{rate}"), rate, outcome, cpu);
            print_row(&row);
            rows.push(row);
            if stop.is_cancelled() {
                break;
            }
        }
        conn_stop.cancel();
    }
    Ok(rows)
}

/// W3: 100 offline users receive 20 messages each, then connect and sync everything.
async fn w3(
    target: &Arc<Target>,
    _opts: &BenchOptions,
    run_id: &str,
    _stop: &CancellationToken,
) -> Result<Vec<StepResult>, BenchError> {
    eprintln!("W3: 100 offline users x 20 messages...");
    let users = provision(target, &format!("{run_id}w3u"), 101).await?;
    let (sender, sender_tok) = users[0].clone();
    let receivers = &users[1..];
    let started = Instant::now();
    let cpu0 = target.cpu_seconds();
    let mut sent = 0u64;
    let mut errors = 0u64;
    for (u, _) in receivers {
        let conv = target
            .user_call(
                &sender_tok,
                reqwest::Method::POST,
                "/v1/conversations",
                json!({"kind": "direct", "members": [u]}),
            )
            .await?;
        let cid = conv["conversation_id"].as_str().unwrap_or_default().to_string();
        let sends = futures::stream::iter((0..20).map(|i| {
            let path = format!("/v1/conversations/{cid}/messages");
            let req = json!({"client_msg_id": format!("{run_id}w3{u}m{i}"), "type": "text", "body": body_100(0, &format!("{u}m{i}"))});
            let t = target.clone();
            let tok = sender_tok.clone();
            async move { t.user_call(&tok, reqwest::Method::POST, &path, req).await }
        }))
        .buffer_unordered(20)
        .collect::<Vec<_>>()
        .await;
        for s in sends {
            if s.is_ok() {
                sent += 1
            } else {
                errors += 1
            }
        }
    }
    let _ = sender;
    // Now each receiver comes online and pulls its inbox.
    let mut delivered = 0u64;
    let mut duplicates = 0u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    for (u, tok) in receivers {
        loop {
            let mut ids = HashMap::<String, u32>::new();
            let mut after = 0u64;
            loop {
                let page = target
                    .user_call(
                        tok,
                        reqwest::Method::GET,
                        &format!("/v1/sync?after={after}&limit=1000"),
                        Value::Null,
                    )
                    .await?;
                let entries = page["entries"].as_array().cloned().unwrap_or_default();
                for e in &entries {
                    after = e["seq"].as_u64().unwrap_or(after);
                    if e["kind"] == "message" {
                        *ids.entry(e["message_id"].as_str().unwrap_or_default().to_string())
                            .or_default() += 1;
                    }
                }
                if !page["has_more"].as_bool().unwrap_or(false) {
                    break;
                }
            }
            if ids.len() >= 20 || Instant::now() > deadline {
                delivered += ids.len() as u64;
                duplicates += ids.values().map(|c| (*c as u64).saturating_sub(1)).sum::<u64>();
                let _ = u;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let elapsed = started.elapsed();
    let cpu = target.cpu_seconds() - cpu0;
    let row = StepResult {
        workload: "W3".into(),
        step: "100x20 offline".into(),
        target_rate: 0,
        sent,
        send_errors: errors,
        delivered,
        delivered_per_s: delivered as f64 / elapsed.as_secs_f64(),
        undelivered: 2_000u64.saturating_sub(delivered),
        duplicates,
        p50_ms: 0.0,
        p99_ms: 0.0,
        max_ms: 0.0,
        server_cpu_s: cpu,
        cpu_s_per_1k: if delivered > 0 {
            cpu / (delivered as f64 / 1000.0)
        } else {
            0.0
        },
        memory_per_conn_kib: None,
    };
    print_row(&row);
    Ok(vec![row])
}

/// W4: `idle_connections` idle WebSockets; server memory per connection. Connections are
/// spread over several loopback source addresses, since one address has ~28k ephemeral ports.
async fn w4(
    target: &Arc<Target>,
    opts: &BenchOptions,
    run_id: &str,
    stop: &CancellationToken,
) -> Result<Vec<StepResult>, BenchError> {
    let n = opts.idle_connections;
    eprintln!("W4: opening {n} idle WebSockets...");
    // Spread over users, one per 16 sockets: a gateway refuses a user's 17th socket (its
    // default `max_sockets_per_user`), each user's requests (upgrades included) are rate
    // limited, and a real fleet is many users with a few devices each.
    let users = provision(target, &format!("{run_id}w4u"), n.div_ceil(16).max(1)).await?;
    let rss0 = target.rss_kib();
    let host = target.endpoint.trim_start_matches("http://").to_string();
    let addr: std::net::SocketAddr = tokio::net::lookup_host(&host)
        .await
        .map_err(setup_err)?
        .next()
        .ok_or_else(|| setup_err("no address"))?;
    let mut sockets = Vec::with_capacity(n);
    let mut failed = 0u64;
    // Why connections failed, by reason: the machine's limits (ports, descriptors) show here.
    let mut failures: std::collections::BTreeMap<String, u64> = Default::default();
    const GIVE_UP_AFTER: usize = 50;
    let mut consecutive_failures = 0;
    let started = Instant::now();
    for i in 0..n {
        if stop.is_cancelled() {
            break;
        }
        let src = std::net::Ipv4Addr::new(127, 0, 1 + (i / 20_000) as u8, 1);
        let sock = match tokio::net::TcpSocket::new_v4() {
            Ok(sock) => sock,
            Err(e) => {
                // Out of descriptors here: the rest would fail the same way.
                let rest = (n - i) as u64;
                failed += rest;
                *failures.entry(format!("generator socket: {e}")).or_default() += rest;
                break;
            }
        };
        let token = &users[i % users.len()].1;
        let url = format!("ws://{host}/v1/ws?token={token}");
        // A server out of descriptors leaves connections unaccepted in its backlog: without
        // a deadline the generator would wait on them forever.
        let open = async {
            sock.bind(std::net::SocketAddr::from((src, 0)))
                .map_err(|e| format!("bind: {e}"))?;
            let stream = sock.connect(addr).await.map_err(|e| format!("connect: {e}"))?;
            tokio_tungstenite::client_async(url, stream)
                .await
                .map_err(|e| format!("handshake: {e}"))
        };
        let why = match tokio::time::timeout(Duration::from_secs(5), open).await {
            Ok(Ok((ws, _))) => {
                sockets.push(ws);
                consecutive_failures = 0;
                continue;
            }
            Ok(Err(why)) => why,
            Err(_) => "no answer within 5 s".to_string(),
        };
        failed += 1;
        consecutive_failures += 1;
        if consecutive_failures >= GIVE_UP_AFTER {
            // A limit was reached (descriptors, ports): the rest would fail the same way.
            let rest = (n - i) as u64;
            failed += rest - 1;
            *failures
                .entry(format!("{why} (and every later one)"))
                .or_default() += rest;
            break;
        }
        *failures.entry(why).or_default() += 1;
        if i % 5_000 == 4_999 {
            eprintln!("  .. {} open, {failed} failed", sockets.len());
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss1 = target.rss_kib();
    let open = sockets.len() as u64;
    let per_conn = if open > 0 {
        (rss1.saturating_sub(rss0)) as f64 / open as f64
    } else {
        0.0
    };
    drop(sockets);
    let row = StepResult {
        workload: "W4".into(),
        step: format!("{open} idle"),
        target_rate: n as u64,
        sent: n as u64,
        send_errors: failed,
        delivered: open,
        delivered_per_s: open as f64 / started.elapsed().as_secs_f64(),
        undelivered: failed,
        duplicates: 0,
        p50_ms: 0.0,
        p99_ms: 0.0,
        max_ms: 0.0,
        server_cpu_s: 0.0,
        cpu_s_per_1k: 0.0,
        memory_per_conn_kib: Some(per_conn),
    };
    print_row(&row);
    println!(
        "W4: server RSS {} MiB -> {} MiB for {open} connections",
        rss0 / 1024,
        rss1 / 1024
    );
    for (why, count) in &failures {
        println!("W4: {count} failed: {why}");
    }
    Ok(vec![row])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_exactly_100_bytes_and_parse_back() {
        for (t, id) in [(0u64, "a"), (1_732_600_000_000_000, "b1234w1r20000_599999")] {
            let b = body_100(t, id);
            assert_eq!(b.to_string().len(), 100, "{b}");
            assert_eq!(parse_body(b["text"].as_str().unwrap()), Some((t, id)));
        }
    }

    #[test]
    fn percentiles() {
        let v: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
