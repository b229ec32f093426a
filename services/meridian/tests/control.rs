//! The operator control API of `meridian up` (docs/api.md, "Operator control API of the
//! local launcher"), against a real two-region deployment: nats-servers, a hub, the link
//! proxies and the region processes. One deployment for the whole walk, since starting one
//! costs most of the time: a key is required; bad calls get 4xx JSON; a SIGKILLed region
//! process comes back with a new pid; a held region stays down until released; SIGSTOP shows
//! as stopped; a cut link stops the mirror hearing from its origin and a healed, slowed one
//! carries messages again no faster than its new delay; a clock offset restarts the region
//! process with its HLC ahead by the offset. SIGTERM then stops everything.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context as _, Result};
use reqwest::StatusCode;
use serde_json::{json, Value};

const KEY: &str = "control-test-admin-key-0123";

/// A running `meridian up`; dropping it kills the launcher (its children die with it) and
/// prints the logs' ends when the test failed.
struct Deployment {
    launcher: Child,
    dir: tempfile::TempDir,
}

impl Deployment {
    fn start(port_base: u16, regions: &str) -> Result<Deployment> {
        let dir = tempfile::Builder::new().prefix("meridian-control-").tempdir()?;
        let log = std::fs::File::create(dir.path().join("up.log"))?;
        let launcher = Command::new(env!("CARGO_BIN_EXE_meridian"))
            .args(["up", "--regions", regions, "--admin-key", KEY])
            .args(["--port-base", &port_base.to_string()])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn meridian up")?;
        Ok(Deployment { launcher, dir })
    }

    fn cluster_file(&self) -> PathBuf {
        self.dir.path().join("data/cluster.json")
    }

    /// cluster.json, once the deployment is ready.
    async fn ready(&mut self, bound: Duration) -> Result<Value> {
        let deadline = Instant::now() + bound;
        loop {
            if let Ok(text) = std::fs::read_to_string(self.cluster_file()) {
                if let Ok(v) = serde_json::from_str(&text) {
                    return Ok(v);
                }
            }
            if let Some(status) = self.launcher.try_wait()? {
                bail!("meridian up exited early with {status}");
            }
            ensure!(Instant::now() < deadline, "not ready within {bound:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn log_ends(&self) {
        for rel in [
            "up.log",
            "data/us/region.log",
            "data/eu/region.log",
            "data/us/nats.log",
            "data/eu/nats.log",
        ] {
            let text = std::fs::read_to_string(self.dir.path().join(rel)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!(
                "--- {rel} ---\n{}",
                lines[lines.len().saturating_sub(30)..].join("\n")
            );
        }
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.log_ends();
        }
        let _ = self.launcher.kill();
        let _ = self.launcher.wait();
    }
}

/// A base whose blocks (two regions, then the hub's and the control API's) look free.
fn free_port_base() -> u16 {
    let pid = u64::from(std::process::id());
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()));
    let mut pick = pid.wrapping_mul(0x9E37_79B9) ^ nanos;
    for _ in 0..50 {
        // Below Linux's ephemeral ports (32768 up), so no outgoing connection holds one.
        let base = 20_000 + (pick % 1_200) as u16 * 10;
        let free = (0..3u16)
            .flat_map(|block| (0..3u16).map(move |p| base + 10 * block + p))
            .all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
        if free {
            return base;
        }
        pick = pick.rotate_left(13).wrapping_add(0x5851_F42D);
    }
    panic!("no free port block");
}

/// Status and JSON body of a call (the body `null` when empty).
async fn call(req: reqwest::RequestBuilder) -> Result<(StatusCode, Value)> {
    let resp = req.send().await?;
    let status = resp.status();
    let text = resp.text().await?;
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).with_context(|| format!("{status}: not JSON: {text}"))?
    };
    Ok((status, body))
}

/// Retries `check` (an error means "not yet") every 50 ms for at most `bound`.
async fn eventually<T, F, Fut>(what: &str, bound: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let deadline = Instant::now() + bound;
    loop {
        let last = match check().await {
            Ok(v) => return Ok(v),
            Err(e) => format!("{e:#}"),
        };
        ensure!(
            Instant::now() < deadline,
            "{what}: not within {bound:?}; last: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

struct Control {
    http: reqwest::Client,
    url: String,
}

impl Control {
    async fn get(&self) -> Result<Value> {
        let (st, body) = call(
            self.http
                .get(format!("{}/control", self.url))
                .header("X-Admin-Key", KEY),
        )
        .await?;
        ensure!(st == StatusCode::OK, "GET /control: {st} {body}");
        Ok(body)
    }

    async fn post(&self, path: &str, body: Value) -> Result<(StatusCode, Value)> {
        let url = format!("{}{path}", self.url);
        call(self.http.post(url).header("X-Admin-Key", KEY).json(&body)).await
    }

    async fn put(&self, path: &str, body: Value) -> Result<(StatusCode, Value)> {
        let url = format!("{}{path}", self.url);
        call(self.http.put(url).header("X-Admin-Key", KEY).json(&body)).await
    }

    /// POST /control/signal, which must answer 200; the pid signalled.
    async fn signal(&self, target: &str, signal: &str) -> Result<u64> {
        let (st, body) = self
            .post("/control/signal", json!({"target": target, "signal": signal}))
            .await?;
        ensure!(st == StatusCode::OK, "{signal} {target}: {st} {body}");
        ensure!(body["target"] == target && body["signal"] == signal, "{body}");
        body["pid"].as_u64().context("pid")
    }

    async fn hold(&self, region: &str, hold: bool) -> Result<()> {
        let (st, body) = self
            .post("/control/hold", json!({"region": region, "hold": hold}))
            .await?;
        ensure!(
            st == StatusCode::OK && body["held"] == hold,
            "hold {region} {hold}: {st} {body}"
        );
        Ok(())
    }

    /// `regions.<region>.<which>` of GET /control: (pid, state).
    async fn proc(&self, region: &str, which: &str) -> Result<(Option<u64>, String)> {
        let s = self.get().await?;
        let p = &s["regions"][region][which];
        Ok((
            p["pid"].as_u64(),
            p["state"].as_str().context("state")?.to_string(),
        ))
    }

    /// Waits until the region process of `region` runs with a pid other than `old`, and its
    /// gateway answers /readyz with 200; the new pid.
    async fn back_up(&self, region: &str, old: u64, endpoint: &str, bound: Duration) -> Result<u64> {
        let pid = eventually(&format!("{region}'s region process restarted"), bound, || async {
            let (pid, state) = self.proc(region, "region").await?;
            ensure!(
                pid.is_some_and(|p| p != old) && state == "running",
                "{pid:?} {state}"
            );
            pid.context("pid")
        })
        .await?;
        eventually(&format!("{region} ready again"), bound, || async {
            let st = self.http.get(format!("{endpoint}/readyz")).send().await?.status();
            ensure!(st == StatusCode::OK, "/readyz {st}");
            Ok(())
        })
        .await?;
        Ok(pid)
    }
}

/// A 4xx JSON error with this status and code.
fn is_error(answer: &(StatusCode, Value), status: StatusCode, code: &str) -> Result<()> {
    let (st, body) = answer;
    ensure!(
        *st == status && body["error"] == code && body["message"].is_string(),
        "expected {status} {code}, got {st} {body}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_api_kills_holds_shapes_links_and_skews_clocks() -> Result<()> {
    let started = Instant::now();
    let mut up = Deployment::start(free_port_base(), "us,eu")?;
    let cluster = up.ready(Duration::from_secs(90)).await?;
    eprintln!("ready after {:?}", started.elapsed());
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(45))
        .build()?;
    let ctl = Control {
        http: http.clone(),
        url: cluster["control"]
            .as_str()
            .context("cluster.json names the control API")?
            .to_string(),
    };
    let endpoint = |r: &str| {
        cluster["regions"][r]["endpoint"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let (us, eu) = (endpoint("us"), endpoint("eu"));

    // Without the key, or with another, nothing: 401 JSON, on unknown paths too.
    for key in [None, Some("not-the-admin-key-at-all")] {
        for path in ["/control", "/control/nothing-here"] {
            let mut req = http.get(format!("{}{path}", ctl.url));
            if let Some(k) = key {
                req = req.header("X-Admin-Key", k);
            }
            is_error(&call(req).await?, StatusCode::UNAUTHORIZED, "unauthorized")?;
        }
    }

    // The state matches cluster.json.
    let state = ctl.get().await?;
    for r in ["us", "eu"] {
        for (which, key) in [("nats", "nats"), ("region", "region")] {
            let p = &state["regions"][r][which];
            ensure!(
                p["state"] == "running" && p["pid"] == cluster["regions"][r]["pids"][key],
                "{r}/{which}: {state} vs {cluster}"
            );
        }
        ensure!(
            state["regions"][r]["held"] == false && state["regions"][r]["clock_offset_ms"] == 0,
            "{state}"
        );
        ensure!(
            state["regions"][r]["link"] == json!({"delay_ms": 0, "jitter_ms": 0, "loss": 0.0, "cut": false}),
            "{state}"
        );
    }
    ensure!(
        state["hub"]["state"] == "running" && state["hub"]["pid"] == cluster["hub"]["pid"],
        "{state}"
    );

    // Bad calls: unknown targets 404, bad bodies 400, all JSON.
    let not_found = StatusCode::NOT_FOUND;
    let bad = StatusCode::BAD_REQUEST;
    for target in ["ap/region", "us/applier", "us", "hubs"] {
        let answer = ctl
            .post("/control/signal", json!({"target": target, "signal": "KILL"}))
            .await?;
        is_error(&answer, not_found, "unknown_target")?;
    }
    is_error(
        &ctl.post("/control/hold", json!({"region": "ap", "hold": true}))
            .await?,
        not_found,
        "unknown_target",
    )?;
    is_error(
        &ctl.put("/control/links/ap", json!({"cut": true})).await?,
        not_found,
        "unknown_target",
    )?;
    is_error(
        &ctl.put("/control/clock/ap", json!({"offset_ms": 1})).await?,
        not_found,
        "unknown_target",
    )?;
    for body in [
        json!({"target": "us/region", "signal": "HUP"}),
        json!({"target": "us/region"}),
        json!("KILL"),
    ] {
        is_error(&ctl.post("/control/signal", body).await?, bad, "invalid_request")?;
    }
    for body in [
        json!({"loss": 1.5}),
        json!({"delay_ms": -1}),
        json!({"delay_ms": 172_800_000u64}),
        json!({"cut": "yes"}),
    ] {
        is_error(&ctl.put("/control/links/us", body).await?, bad, "invalid_request")?;
    }
    // Beyond what the region file allows (a week): refused before anything restarts.
    let far = ctl
        .put("/control/clock/us", json!({"offset_ms": 700_000_000_000i64}))
        .await?;
    is_error(&far, bad, "invalid_request")?;
    ensure!(
        far.1["message"]
            .as_str()
            .is_some_and(|m| m.contains("clock_offset_ms")),
        "{far:?}"
    );
    let not_json = call(
        http.post(format!("{}/control/hold", ctl.url))
            .header("X-Admin-Key", KEY)
            .body("hold us"),
    )
    .await?;
    is_error(&not_json, bad, "invalid_request")?;
    is_error(
        &call(
            http.delete(format!("{}/control", ctl.url))
                .header("X-Admin-Key", KEY),
        )
        .await?,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    )?;
    // Nothing of that changed anything.
    ensure!(ctl.get().await? == state, "a refused call changed the state");

    // SIGKILL of us's region process: the pid the supervisor held, restarted with a new one.
    let first = ctl.signal("us/region", "KILL").await?;
    ensure!(
        Some(first) == cluster["regions"]["us"]["pids"]["region"].as_u64(),
        "{first}"
    );
    let killed = Instant::now();
    let second = ctl.back_up("us", first, &us, Duration::from_secs(30)).await?;
    eprintln!(
        "killed us region {first}: back as {second} after {:?}",
        killed.elapsed()
    );

    // Held, a killed region stays down, and a signal finds nothing to signal.
    ctl.hold("us", true).await?;
    ensure!(ctl.signal("us/region", "KILL").await? == second);
    eventually("us region down", Duration::from_secs(10), || async {
        let (pid, state) = ctl.proc("us", "region").await?;
        ensure!(pid.is_none() && state == "down", "{pid:?} {state}");
        Ok(())
    })
    .await?;
    // Longer than the supervisor's restart delays (at most 2 s) several times over.
    let watch_until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < watch_until {
        let s = ctl.get().await?;
        ensure!(
            s["regions"]["us"]["region"]["state"] == "down" && s["regions"]["us"]["held"] == true,
            "a held region was restarted: {s}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    is_error(
        &ctl.post(
            "/control/signal",
            json!({"target": "us/region", "signal": "TERM"}),
        )
        .await?,
        StatusCode::CONFLICT,
        "not_running",
    )?;
    ctl.hold("us", false).await?;
    let third = ctl.back_up("us", second, &us, Duration::from_secs(30)).await?;
    eprintln!("released: us region back as {third}");

    // SIGSTOP shows as stopped, SIGCONT as running again; the same process throughout.
    let eu_nats = ctl.signal("eu/nats", "STOP").await?;
    ensure!(ctl.proc("eu", "nats").await? == (Some(eu_nats), "stopped".into()));
    ensure!(ctl.signal("eu/nats", "CONT").await? == eu_nats);
    ensure!(ctl.proc("eu", "nats").await? == (Some(eu_nats), "running".into()));

    // A user each side and a conversation between them.
    let admin = |req: reqwest::RequestBuilder| req.header("X-Admin-Key", KEY);
    for (endpoint, user, home) in [(&us, "ann", "us"), (&eu, "bob", "eu")] {
        let (st, body) = call(
            admin(http.put(format!("{endpoint}/v1/admin/users/{user}"))).json(&json!({"home_region": home})),
        )
        .await?;
        ensure!(st == StatusCode::OK, "provision {user}: {st} {body}");
    }
    let token = |endpoint: String, user: &'static str| {
        let http = http.clone();
        async move {
            let (st, body) = call(
                http.post(format!("{endpoint}/v1/admin/tokens"))
                    .header("X-Admin-Key", KEY)
                    .json(&json!({"user_id": user, "device_id": "d1", "ttl_s": 3600})),
            )
            .await?;
            ensure!(st == StatusCode::OK, "token {user}: {st} {body}");
            Ok::<_, anyhow::Error>(body["token"].as_str().context("token")?.to_string())
        }
    };
    let ann = token(us.clone(), "ann").await?;
    let bob = token(eu.clone(), "bob").await?;
    let cid = eventually(
        "ann opens a conversation with bob",
        Duration::from_secs(20),
        || async {
            let (st, body) = call(
                http.post(format!("{us}/v1/conversations"))
                    .bearer_auth(&ann)
                    .json(&json!({"kind": "direct", "members": ["bob"]})),
            )
            .await?;
            ensure!(st.is_success(), "{st} {body}");
            Ok(body["conversation_id"].as_str().context("cid")?.to_string())
        },
    )
    .await?;
    // Sends message `n` until accepted (through restarts and fences); the 202's body.
    let send = |n: u32| {
        let (http, us, ann, cid) = (http.clone(), us.clone(), ann.clone(), cid.clone());
        async move {
            let body = json!({"client_msg_id": format!("m-{n}"), "type": "text", "body": {"text": format!("message {n}")}});
            eventually(&format!("m-{n} accepted"), Duration::from_secs(30), || async {
                let (st, b) = call(
                    http.post(format!("{us}/v1/conversations/{cid}/messages"))
                        .bearer_auth(&ann)
                        .json(&body),
                )
                .await?;
                ensure!(st == StatusCode::ACCEPTED, "{st} {b}");
                Ok(b)
            })
            .await
        }
    };
    let in_eu = |message_id: String| {
        let (http, eu, bob, cid) = (http.clone(), eu.clone(), bob.clone(), cid.clone());
        async move {
            eventually("bob reads it in eu", Duration::from_secs(30), || async {
                let (st, b) = call(
                    http.get(format!("{eu}/v1/conversations/{cid}/messages"))
                        .bearer_auth(&bob),
                )
                .await?;
                ensure!(st == StatusCode::OK, "{st} {b}");
                let found = b["messages"]
                    .as_array()
                    .context("messages")?
                    .iter()
                    .any(|m| m["message_id"] == message_id.as_str());
                ensure!(found, "not yet: {b}");
                Ok(())
            })
            .await
        }
    };

    // Cut us's link: eu's mirror of us stops hearing from it.
    let (st, link) = ctl.put("/control/links/us", json!({"cut": true})).await?;
    ensure!(st == StatusCode::OK && link["cut"] == true, "{st} {link}");
    ensure!(ctl.get().await?["regions"]["us"]["link"]["cut"] == true);
    eventually("eu's mirror of us ages", Duration::from_secs(20), || async {
        let (st, b) = call(admin(http.get(format!("{eu}/v1/admin/regions")))).await?;
        ensure!(st == StatusCode::OK, "{st} {b}");
        let age = b["regions"][0]["streams"]["SYNC_US"]["active_age_ms"].as_u64();
        ensure!(age.is_some_and(|a| a >= 2_000), "active_age_ms {age:?}: {b}");
        Ok(())
    })
    .await?;
    // Heal it slowed down: 150 ms one way on us's link, the rest unchanged.
    let slow = Duration::from_millis(150);
    let (st, link) = ctl
        .put("/control/links/us", json!({"cut": false, "delay_ms": 150}))
        .await?;
    ensure!(
        st == StatusCode::OK && link == json!({"delay_ms": 150, "jitter_ms": 0, "loss": 0.0, "cut": false}),
        "{st} {link}"
    );
    ensure!(ctl.get().await?["regions"]["us"]["link"] == link);
    let sending = Instant::now();
    let healed = send(1).await?;
    in_eu(healed["message_id"].as_str().context("message_id")?.to_string()).await?;
    let crossed = sending.elapsed();
    ensure!(
        crossed >= slow,
        "crossed in {crossed:?}, under the link's {slow:?}"
    );
    eprintln!("after the heal a message crossed in {crossed:?}");
    let (st, link) = ctl.put("/control/links/us", json!({"delay_ms": 0})).await?;
    ensure!(st == StatusCode::OK && link["delay_ms"] == 0, "{st} {link}");

    // Clock skew: us's region process restarts with its HLC two minutes ahead.
    let offset: u64 = 120_000;
    let (st, body) = ctl.put("/control/clock/us", json!({"offset_ms": offset})).await?;
    ensure!(
        st == StatusCode::OK && body["restarting_pid"] == third && body["clock_offset_ms"] == offset,
        "{st} {body}"
    );
    let fourth = ctl.back_up("us", third, &us, Duration::from_secs(30)).await?;
    ensure!(ctl.get().await?["regions"]["us"]["clock_offset_ms"] == offset);
    let before = now_ms();
    let skewed = send(2).await?;
    let accepted_at = skewed["accepted_at"].as_u64().context("accepted_at")?;
    ensure!(
        accepted_at >= before + offset,
        "accepted_at {accepted_at} not {offset} ms ahead of {before}: {skewed}"
    );
    eprintln!(
        "us restarted as {fourth} with offset {offset}: accepted_at {} ms ahead",
        accepted_at - before
    );

    // SIGTERM stops everything, the control API first.
    // SAFETY: kill(2) with our child's pid.
    unsafe {
        libc::kill(up.launcher.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(40);
    let status = loop {
        if let Some(status) = up.launcher.try_wait()? {
            break status;
        }
        ensure!(Instant::now() < deadline, "meridian up did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    ensure!(status.success(), "meridian up exited with {status}");
    ensure!(
        http.get(format!("{}/control", ctl.url)).send().await.is_err(),
        "the control API outlived the launcher"
    );
    eprintln!("whole test {:?}", started.elapsed());
    Ok(())
}
