//! `meridian up` as an operator runs it: real nats-server and region processes. The
//! durability drill: a client keeps sending (retrying each message with the same
//! client_msg_id until it is accepted) while the region process and then the nats-server are
//! killed with SIGKILL; the launcher restarts them, and every accepted message ends up in the
//! history and in the recipient's inbox exactly once, the inbox without gaps. Then SIGTERM
//! stops the whole deployment, leaving no process behind.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use meridian_store::testing::dir_bytes;
use reqwest::StatusCode;
use serde_json::{json, Value};

const ADMIN_KEY: &str = "up-test-admin-key-0123456789";
const MESSAGES: usize = 200;
/// Kill the region process once this many messages were accepted, the nats-server at the
/// second mark: both outages then fall inside the send loop.
const KILL_REGION_AT: usize = 40;
const KILL_NATS_AT: usize = 110;

/// A `meridian up` process; dropping it SIGKILLs the launcher (its children die with it,
/// PR_SET_PDEATHSIG) and any pid cluster.json still names, so a failed test leaves nothing.
struct Up {
    child: Child,
    dir: tempfile::TempDir,
}

impl Up {
    fn start(port_base: u16) -> Result<Up> {
        Up::start_with(port_base, &["--regions", "us"])
    }

    /// `meridian up` with `args` (at least `--regions`) besides the key, ports and data dir.
    fn start_with(port_base: u16, args: &[&str]) -> Result<Up> {
        let dir = tempfile::Builder::new().prefix("meridian-up-").tempdir()?;
        let log = std::fs::File::create(dir.path().join("up.log"))?;
        let child = Command::new(env!("CARGO_BIN_EXE_meridian"))
            .arg("up")
            .args(args)
            .args(["--admin-key", ADMIN_KEY, "--port-base"])
            .arg(port_base.to_string())
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn meridian up")?;
        Ok(Up { child, dir })
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn cluster(&self) -> Option<Value> {
        let text = std::fs::read_to_string(self.data().join("cluster.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn pid(&self, which: &str) -> Result<i32> {
        let c = self.cluster().context("cluster.json missing")?;
        let pid = c["regions"]["us"]["pids"][which]
            .as_i64()
            .context("pid missing")?;
        Ok(pid as i32)
    }

    /// Waits for cluster.json (written once the region answers /readyz).
    async fn wait_cluster(&mut self, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = self.cluster() {
                return Ok(c);
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("meridian up exited early with {status}");
            }
            ensure!(Instant::now() < deadline, "no cluster.json within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until cluster.json names a `which` pid other than `old`.
    async fn wait_new_pid(&self, which: &str, old: i32, timeout: Duration) -> Result<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(pid) = self.pid(which) {
                if pid != old && pid != 0 {
                    return Ok(pid);
                }
            }
            ensure!(
                Instant::now() < deadline,
                "{which} not restarted within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn tail(&self, rel: &str, lines: usize) -> String {
        let text = std::fs::read_to_string(self.dir.path().join(rel)).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Up {
    /// The regions cluster.json names (us before it exists).
    fn regions(&self) -> Vec<String> {
        match self.cluster().as_ref().and_then(|c| c["regions"].as_object()) {
            Some(r) => r.keys().cloned().collect(),
            None => vec!["us".to_string()],
        }
    }

    /// Every pid cluster.json names: each region's processes, and the hub's.
    fn pids(&self) -> Vec<i32> {
        let cluster = self.cluster().unwrap_or(Value::Null);
        let mut pids: Vec<i32> = self
            .regions()
            .iter()
            .flat_map(|r| ["region", "nats"].map(|w| cluster["regions"][r]["pids"][w].as_i64()))
            .chain([cluster["hub"]["pid"].as_i64()])
            .flatten()
            .map(|p| p as i32)
            .collect();
        pids.retain(|p| *p > 0);
        pids
    }

    /// SIGTERM to the launcher, then waits (bounded) for it to exit.
    async fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        signal(self.child.id() as i32, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            ensure!(
                Instant::now() < deadline,
                "meridian up did not exit after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The ends of every log, for a failed test's output.
    fn print_logs(&self) {
        let mut files = vec!["up.log".to_string(), "data/hub/nats.log".to_string()];
        for r in self.regions() {
            files.push(format!("data/{r}/region.log"));
            files.push(format!("data/{r}/nats.log"));
        }
        for f in files {
            eprintln!("--- {f} ---\n{}", self.tail(&f, 40));
        }
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_logs();
        }
        let pids = self.pids();
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in pids {
            if alive(pid) {
                signal(pid, libc::SIGKILL);
            }
        }
    }
}

fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: kill(2) with a plain pid and a valid signal number.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Whether `pid` is a live process (a zombie counts as gone: it has exited).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

/// A port block in 20000-40000 whose nats and gateway ports are free right now, and the
/// block after it (the launcher's control API).
fn port_base() -> u16 {
    port_base_for(2)
}

/// A run of `blocks` port blocks in 20000-40000 whose first three ports (nats, gateway, link
/// proxy; the hub's client and leaf ports) are free right now.
fn port_base_for(blocks: u16) -> u16 {
    use std::hash::{BuildHasher as _, Hasher as _};
    // RandomState is seeded from the OS per process: concurrent test runs pick apart.
    let mut seed = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    for _ in 0..50 {
        let base = 20_000 + (seed % (2_000 - u64::from(blocks))) as u16 * 10;
        let ports = (0..blocks).flat_map(|b| (0..3).map(move |p| base + 10 * b + p));
        if ports
            .into_iter()
            .all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        {
            return base;
        }
        seed = seed.rotate_left(17).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    panic!("no free port block found");
}

struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    async fn call(&self, req: reqwest::RequestBuilder) -> Result<(StatusCode, Value)> {
        let resp = req.send().await?;
        let status = resp.status();
        let text = resp.text().await?;
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).with_context(|| format!("{status}: {text}"))?
        };
        Ok((status, body))
    }

    async fn admin_put_user(&self, user: &str) -> Result<()> {
        self.admin_put_user_in(user, "us").await
    }

    async fn admin_put_user_in(&self, user: &str, home: &str) -> Result<()> {
        let req = self
            .http
            .put(format!("{}/v1/admin/users/{user}", self.base))
            .header("X-Admin-Key", ADMIN_KEY)
            .json(&json!({"home_region": home}));
        let (st, body) = self.call(req).await?;
        ensure!(st == StatusCode::OK, "provision {user}: {st} {body}");
        Ok(())
    }

    /// Opens (or finds) the caller's direct conversation with `with`.
    async fn create_direct(&self, token: &str, with: &str) -> Result<(StatusCode, Value)> {
        let req = self
            .http
            .post(format!("{}/v1/conversations", self.base))
            .bearer_auth(token)
            .json(&json!({"kind": "direct", "members": [with]}));
        self.call(req).await
    }

    async fn token(&self, user: &str, device: &str) -> Result<String> {
        let req = self
            .http
            .post(format!("{}/v1/admin/tokens", self.base))
            .header("X-Admin-Key", ADMIN_KEY)
            .json(&json!({"user_id": user, "device_id": device, "ttl_s": 3600}));
        let (st, body) = self.call(req).await?;
        ensure!(st == StatusCode::OK, "token for {user}: {st} {body}");
        Ok(body["token"].as_str().context("token")?.to_string())
    }

    /// Sends one message, retrying with the same client_msg_id through the outages the drill
    /// causes (refused connections, timeouts, 5xx, 421/429) until it is accepted.
    async fn send_until_accepted(
        &self,
        token: &str,
        cid: &str,
        n: usize,
        deadline: Instant,
    ) -> Result<String> {
        let url = format!("{}/v1/conversations/{cid}/messages", self.base);
        let body = json!({"client_msg_id": format!("m-{n}"), "type": "text", "body": {"text": format!("message {n}")}});
        let mut pause = Duration::from_millis(20);
        loop {
            let outcome = self
                .call(self.http.post(&url).bearer_auth(token).json(&body))
                .await;
            match outcome {
                Ok((StatusCode::ACCEPTED, b)) => {
                    return Ok(b["message_id"].as_str().context("message_id")?.to_string());
                }
                Ok((st, b))
                    if st.is_server_error()
                        || st == StatusCode::MISDIRECTED_REQUEST
                        || st == StatusCode::TOO_MANY_REQUESTS =>
                {
                    eprintln!("send m-{n}: {st} {b}; retrying");
                }
                Ok((st, b)) => bail!("send m-{n}: unexpected {st} {b}"),
                // Connection refused or reset, or a timeout: the region is restarting.
                Err(e) => eprintln!("send m-{n}: {e}; retrying"),
            }
            ensure!(Instant::now() < deadline, "m-{n} not accepted in time");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// The whole history of `cid`, oldest first, paging forward.
    async fn history(&self, token: &str, cid: &str) -> Result<Vec<Value>> {
        let url = format!("{}/v1/conversations/{cid}/messages", self.base);
        let mut after = String::new();
        let mut all = Vec::new();
        loop {
            let req = self
                .http
                .get(&url)
                .bearer_auth(token)
                .query(&[("after", after.as_str()), ("limit", "200")]);
            let (st, body) = self.call(req).await?;
            ensure!(st == StatusCode::OK, "history: {st} {body}");
            all.extend(body["messages"].as_array().context("messages")?.iter().cloned());
            match body["next_cursor"].as_str() {
                Some(c) => after = c.to_string(),
                None => return Ok(all),
            }
        }
    }

    /// Every search result for `q`, newest first, paging with next_cursor.
    async fn search(&self, token: &str, q: &str) -> Result<Vec<Value>> {
        let url = format!("{}/v1/search", self.base);
        let mut cursor: Option<String> = None;
        let mut all = Vec::new();
        for _ in 0..1_000 {
            let mut query = vec![("q", q.to_string()), ("limit", "100".to_string())];
            if let Some(c) = &cursor {
                query.push(("cursor", c.clone()));
            }
            let (st, body) = self
                .call(self.http.get(&url).bearer_auth(token).query(&query))
                .await?;
            ensure!(st == StatusCode::OK, "search: {st} {body}");
            all.extend(body["messages"].as_array().context("messages")?.iter().cloned());
            match body["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => return Ok(all),
            }
        }
        bail!("search paging did not end")
    }

    async fn sync(&self, token: &str) -> Result<Vec<Value>> {
        let req = self
            .http
            .get(format!("{}/v1/sync", self.base))
            .bearer_auth(token)
            .query(&[("after", "0"), ("limit", "1000")]);
        let (st, body) = self.call(req).await?;
        ensure!(st == StatusCode::OK, "sync: {st} {body}");
        ensure!(body["has_more"] != true, "more than one sync page: {body}");
        Ok(body["entries"].as_array().context("entries")?.clone())
    }
}

/// Counts each message id in `ids`; fails unless every accepted id occurs exactly once and
/// nothing else does.
fn exactly_once<'a>(ids: impl Iterator<Item = &'a str>, accepted: &BTreeSet<String>) -> Result<()> {
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for id in ids {
        *seen.entry(id).or_default() += 1;
    }
    let doubled: Vec<_> = seen.iter().filter(|(_, &n)| n > 1).collect();
    ensure!(doubled.is_empty(), "duplicated: {doubled:?}");
    let missing: Vec<_> = accepted
        .iter()
        .filter(|id| !seen.contains_key(id.as_str()))
        .collect();
    ensure!(missing.is_empty(), "accepted but missing: {missing:?}");
    let extra: Vec<_> = seen.keys().filter(|id| !accepted.contains(**id)).collect();
    ensure!(extra.is_empty(), "never accepted: {extra:?}");
    Ok(())
}

/// The files of a deployment (relative to the test dir) that hold the admin key.
fn files_with_admin_key(up: &Up, files: &[&str]) -> Vec<String> {
    files
        .iter()
        .filter(|f| std::fs::read_to_string(up.dir.path().join(f)).is_ok_and(|t| t.contains(ADMIN_KEY)))
        .map(|f| f.to_string())
        .collect()
}

fn mode(path: &std::path::Path) -> Result<u32> {
    use std::os::unix::fs::PermissionsExt as _;
    Ok(std::fs::metadata(path)
        .with_context(|| path.display().to_string())?
        .permissions()
        .mode()
        & 0o777)
}

/// `meridian up` prints the admin key nowhere (terminal, logs, cluster.json), keeps its data
/// dir and secrets private, and its nats-server refuses a client without credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item8_up_never_prints_the_admin_key_and_keeps_its_files_private() -> Result<()> {
    const OUTPUT: [&str; 4] = [
        "up.log",
        "data/cluster.json",
        "data/us/region.log",
        "data/us/nats.log",
    ];
    let mut up = Up::start(port_base())?;
    let cluster = up.wait_cluster(Duration::from_secs(60)).await?;
    // The ready banner follows cluster.json.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !up.tail("up.log", 50).contains("Meridian is up.") {
        ensure!(Instant::now() < deadline, "no ready banner");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let leaked = files_with_admin_key(&up, &OUTPUT);
    ensure!(leaked.is_empty(), "the admin key is in {leaked:?}");

    let data = up.data();
    let modes = [
        (data.clone(), 0o700),
        (data.join("jwt_secret"), 0o600),
        (data.join("cluster.json"), 0o600),
        (data.join("us/region.toml"), 0o600),
        (data.join("us/nats-region.nk"), 0o600),
    ];
    for (path, want) in modes {
        let got = mode(&path)?;
        ensure!(
            got == want,
            "{} has mode {got:04o}, not {want:04o}",
            path.display()
        );
    }

    // Item 7 through `up`: its nats-server refuses a client without credentials.
    let nats_url = cluster["regions"]["us"]["nats"].as_str().context("nats url")?;
    let mut anonymous = meridian_bus::BusConfig::new(nats_url, meridian_model::RegionId::parse("us")?);
    anonymous.publish_timeout_s = 2;
    match meridian_bus::Bus::connect(anonymous).await {
        Err(meridian_bus::BusError::Unauthorized(_)) => {}
        Err(e) => bail!("expected the login to be refused, got {e}"),
        Ok(_) => bail!("a client without credentials connected to up's nats-server"),
    }

    // Admin calls carry the key; nothing may log it on their way.
    let api = Api {
        http: reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()?,
        base: cluster["regions"]["us"]["endpoint"]
            .as_str()
            .context("endpoint")?
            .to_string(),
    };
    api.admin_put_user("ann").await?;
    api.token("ann", "laptop").await?;

    up.terminate().await?;
    let leaked = files_with_admin_key(&up, &OUTPUT);
    ensure!(leaked.is_empty(), "after a run, the admin key is in {leaked:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_survives_kill_9_of_region_and_nats_and_stops_cleanly() -> Result<()> {
    let started = Instant::now();
    let port_base = port_base();
    eprintln!("port base {port_base}");
    let mut up = Up::start(port_base)?;
    let cluster = up.wait_cluster(Duration::from_secs(60)).await?;
    let base = cluster["regions"]["us"]["endpoint"]
        .as_str()
        .context("endpoint")?
        .to_string();
    let secret = std::fs::read_to_string(cluster["jwt_secret_file"].as_str().context("secret file")?)?;
    assert!(
        secret.trim().len() >= 64,
        "jwt_secret holds 32 random bytes as hex"
    );

    let api = Arc::new(Api {
        http: reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()?,
        base,
    });
    api.admin_put_user("ann").await?;
    api.admin_put_user("bob").await?;
    let ann = api.token("ann", "laptop").await?;
    let bob = api.token("bob", "phone").await?;
    let (st, body) = api.create_direct(&ann, "bob").await?;
    ensure!(st == StatusCode::CREATED, "create conversation: {st} {body}");
    let cid = body["conversation_id"]
        .as_str()
        .context("conversation_id")?
        .to_string();

    // The sender: one message after another, each retried until accepted.
    let acked = Arc::new(AtomicUsize::new(0));
    let sender = {
        let (api, ann, cid, acked) = (api.clone(), ann.clone(), cid.clone(), acked.clone());
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(40);
            let mut ids = Vec::with_capacity(MESSAGES);
            for n in 0..MESSAGES {
                ids.push(api.send_until_accepted(&ann, &cid, n, deadline).await?);
                acked.fetch_add(1, Ordering::SeqCst);
                // Paced so the kills land mid-stream.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            anyhow::Ok(ids)
        })
    };
    let wait_acked = |n: usize| {
        let acked = acked.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            while acked.load(Ordering::SeqCst) < n {
                ensure!(
                    Instant::now() < deadline,
                    "sending stalled below {n} accepted messages"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            anyhow::Ok(())
        }
    };

    wait_acked(KILL_REGION_AT).await?;
    let region_pid = up.pid("region")?;
    signal(region_pid, libc::SIGKILL);
    let killed = Instant::now();
    let new_region = up
        .wait_new_pid("region", region_pid, Duration::from_secs(10))
        .await?;
    eprintln!(
        "region {region_pid} killed; restarted as {new_region} after {:?}",
        killed.elapsed()
    );
    ensure!(
        killed.elapsed() < Duration::from_secs(3),
        "restart took {:?}",
        killed.elapsed()
    );

    wait_acked(KILL_NATS_AT).await?;
    let nats_pid = up.pid("nats")?;
    signal(nats_pid, libc::SIGKILL);
    let new_nats = up.wait_new_pid("nats", nats_pid, Duration::from_secs(10)).await?;
    eprintln!("nats {nats_pid} killed; restarted as {new_nats}");

    let ids = sender.await??;
    let accepted: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(
        accepted.len(),
        MESSAGES,
        "every client_msg_id got its own message id"
    );
    eprintln!("{MESSAGES} messages accepted after {:?}", started.elapsed());

    // The applier may still be catching up: poll until complete, then check exactly-once.
    let deadline = Instant::now() + Duration::from_secs(20);
    let history = loop {
        let h = api.history(&bob, &cid).await?;
        if h.len() >= MESSAGES || Instant::now() > deadline {
            break h;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    exactly_once(
        history.iter().map(|m| m["message_id"].as_str().unwrap_or("?")),
        &accepted,
    )
    .context("history")?;

    // Issue 12 item 4: the region process was killed while indexing (the index commits
    // once a second, so what it added since its last commit was lost with it); after the
    // restart search finds every accepted message, once.
    let found = loop {
        let found = api.search(&bob, "message").await?;
        if found.len() >= MESSAGES || Instant::now() > deadline {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    exactly_once(
        found.iter().map(|m| m["message_id"].as_str().unwrap_or("?")),
        &accepted,
    )
    .context("search after kill -9")?;

    let entries = loop {
        let e = api.sync(&bob).await?;
        let messages = e.iter().filter(|e| e["kind"] == "message").count();
        if messages >= MESSAGES || Instant::now() > deadline {
            break e;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for (i, e) in entries.iter().enumerate() {
        ensure!(
            e["seq"] == i as u64 + 1,
            "inbox seqs not consecutive from 1 at {i}: {e}"
        );
    }
    exactly_once(
        entries
            .iter()
            .filter(|e| e["kind"] == "message")
            .map(|e| e["message_id"].as_str().unwrap_or("?")),
        &accepted,
    )
    .context("bob's inbox")?;

    // SIGTERM: an ordered stop, exit 0, no process left.
    let pids = [up.pid("region")?, up.pid("nats")?];
    let status = up.terminate().await?;
    assert!(status.success(), "meridian up exited with {status}");
    for pid in pids {
        assert!(!alive(pid), "process {pid} outlived meridian up");
    }
    let log = up.tail("up.log", 200);
    assert!(log.contains("meridian up: stopped"), "{log}");
    eprintln!("drill finished in {:?}", started.elapsed());
    Ok(())
}

/// Users in the burst test's group, and its messages: 150 messages of 60 KB into a group of
/// 300 took the region process to 4.8 GB and the store to 1.85 GB (issue 8, item 5).
const BURST_MEMBERS: usize = 300;
const BURST_MESSAGES: usize = 150;
const BURST_TEXT_BYTES: usize = 60_000;
/// The watchdog kills the region process past this, so an unbounded apply fails the test
/// instead of exhausting a shared machine.
const WATCHDOG_RSS_KIB: u64 = 3 * 1024 * 1024;

/// A `Vm*` line of /proc/<pid>/status, in KiB.
fn vm_kib(pid: i32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item5_burst_of_large_messages_into_a_large_group_stays_bounded() -> Result<()> {
    let mut up = Up::start(port_base())?;
    let cluster = up.wait_cluster(Duration::from_secs(60)).await?;
    let api = Arc::new(Api {
        http: reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()?,
        base: cluster["regions"]["us"]["endpoint"]
            .as_str()
            .context("endpoint")?
            .to_string(),
    });
    let users: Vec<String> = (0..BURST_MEMBERS).map(|i| format!("burst-{i:03}")).collect();
    for u in &users {
        api.admin_put_user(u).await?;
    }
    let owner = api.token(&users[0], "laptop").await?;
    let req = api
        .http
        .post(format!("{}/v1/conversations", api.base))
        .bearer_auth(&owner)
        .json(&json!({"kind": "group", "name": "burst", "members": &users[1..]}));
    let (st, body) = api.call(req).await?;
    ensure!(st == StatusCode::CREATED, "create group: {st} {body}");
    let cid = body["conversation_id"]
        .as_str()
        .context("conversation_id")?
        .to_string();

    let region = up.pid("region")?;
    let store_dir = up.data().join("us/store");
    let store_before = dir_bytes(&store_dir);
    let rss_before = vm_kib(region, "VmRSS").context("region VmRSS")?;
    eprintln!("region {region}: {rss_before} KiB resident, store {store_before} bytes before the burst");

    // Samples the region's resident set while the burst is applied; past the bound it kills
    // the process (the launcher restarts it; the pid check below then fails the test).
    let watchdog_stop = tokio_util::sync::CancellationToken::new();
    let watchdog = {
        let stop = watchdog_stop.clone();
        tokio::spawn(async move {
            let mut peak_rss = 0;
            while !stop.is_cancelled() {
                let rss = vm_kib(region, "VmRSS").unwrap_or(0);
                peak_rss = peak_rss.max(rss);
                if rss > WATCHDOG_RSS_KIB {
                    eprintln!("watchdog: region at {rss} KiB resident; killing it");
                    signal(region, libc::SIGKILL);
                    return (peak_rss, true);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (peak_rss, false)
        })
    };

    // The burst: every message at once (the per-user rate limit's burst allows 150).
    let text = "x".repeat(BURST_TEXT_BYTES);
    let sent = Instant::now();
    let sends = (0..BURST_MESSAGES).map(|n| {
        let (api, owner, cid, text) = (api.clone(), owner.clone(), cid.clone(), text.clone());
        async move {
            let req = api
                .http
                .post(format!("{}/v1/conversations/{cid}/messages", api.base))
                .bearer_auth(&owner)
                .json(&json!({"client_msg_id": format!("b-{n}"), "type": "text", "body": {"text": text}}));
            let (st, body) = api.call(req).await?;
            ensure!(st == StatusCode::ACCEPTED, "send b-{n}: {st} {body}");
            Ok::<_, anyhow::Error>(body["message_id"].as_str().context("message_id")?.to_string())
        }
    });
    let ids = futures::future::try_join_all(sends).await?;
    eprintln!("{BURST_MESSAGES} messages accepted in {:?}", sent.elapsed());
    let accepted: BTreeSet<String> = ids.into_iter().collect();
    ensure!(
        accepted.len() == BURST_MESSAGES,
        "every send got its own message id"
    );

    // Every message applied: the history holds them all (polled, bounded).
    let deadline = Instant::now() + Duration::from_secs(300);
    let history = loop {
        let h = match api.history(&owner, &cid).await {
            Ok(h) => h,
            // The region may be down (killed by the watchdog): the pid check names that.
            Err(e) => {
                eprintln!("history: {e}");
                Vec::new()
            }
        };
        if h.len() >= BURST_MESSAGES || Instant::now() > deadline || watchdog.is_finished() {
            break h;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    watchdog_stop.cancel();
    let (peak_sampled, killed) = watchdog.await?;
    let hwm = vm_kib(region, "VmHWM");
    let store_after = dir_bytes(&store_dir);
    eprintln!(
        "burst applied after {:?}: region peak {hwm:?} KiB (sampled {peak_sampled} KiB), \
         store grew {} bytes for {} bytes of text",
        sent.elapsed(),
        store_after.saturating_sub(store_before),
        BURST_MESSAGES * BURST_TEXT_BYTES
    );
    ensure!(
        !killed,
        "the region passed {WATCHDOG_RSS_KIB} KiB resident and was killed"
    );
    ensure!(
        up.pid("region")? == region,
        "the region process was restarted during the burst"
    );
    let hwm = hwm.context("region VmHWM")?;
    ensure!(
        hwm < 512 * 1024,
        "region peak resident set {hwm} KiB, bound 512 MiB"
    );
    let growth = store_after.saturating_sub(store_before);
    ensure!(
        growth < 100 * 1024 * 1024,
        "store grew {growth} bytes, bound 100 MB"
    );

    exactly_once(
        history.iter().map(|m| m["message_id"].as_str().unwrap_or("?")),
        &accepted,
    )
    .context("history")?;
    ensure!(
        history
            .iter()
            .all(|m| m["body"]["text"].as_str().map(str::len) == Some(BURST_TEXT_BYTES)),
        "a history body lost its text"
    );
    // Every message in the inbox of a few members, with its body.
    for who in [
        &users[0],
        &users[1],
        &users[BURST_MEMBERS / 2],
        &users[BURST_MEMBERS - 1],
    ] {
        let token = api.token(who, "phone").await?;
        let entries = api.sync(&token).await?;
        let messages: Vec<&Value> = entries.iter().filter(|e| e["kind"] == "message").collect();
        exactly_once(
            messages.iter().map(|e| e["message_id"].as_str().unwrap_or("?")),
            &accepted,
        )
        .with_context(|| format!("inbox of {who}"))?;
        ensure!(
            messages
                .iter()
                .all(|e| e["body"]["text"].as_str().map(str::len) == Some(BURST_TEXT_BYTES)),
            "an inbox entry of {who} lost its body"
        );
    }
    Ok(())
}

/// Polls `check` every 10 ms (often enough to time a WAN crossing) until it succeeds, for at most `bound`; an error from `check`
/// means "not yet", and the last one is named if time runs out.
async fn poll<T, F, Fut>(what: &str, bound: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let deadline = Instant::now() + bound;
    let mut last;
    loop {
        match check().await {
            Ok(v) => return Ok(v),
            Err(e) => last = format!("{e:#}"),
        }
        ensure!(
            Instant::now() < deadline,
            "{what}: not within {bound:?}; last: {last}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The digest every region reports, when they are all equal.
async fn equal_digests(regions: &[&Api]) -> Result<String> {
    let mut digests = Vec::new();
    for region in regions {
        let req = region
            .http
            .get(format!("{}/v1/admin/digest", region.base))
            .header("X-Admin-Key", ADMIN_KEY);
        let (st, body) = region.call(req).await?;
        ensure!(st == StatusCode::OK, "digest: {st} {body}");
        digests.push(body["digest"].as_str().context("digest")?.to_string());
    }
    ensure!(digests.iter().all(|d| *d == digests[0]), "{digests:?}");
    Ok(digests.swap_remove(0))
}

/// Three regions linked through the hub over a 40 ms WAN: a user provisioned in us is known
/// to eu (which answers 421 naming us), a message sent in us by its user reaches an eu user
/// reading in eu no sooner than the WAN allows, and once traffic stops the three digests
/// are equal. A SIGKILLed hub is restarted and replication resumes through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item2_three_regions_over_a_wan_replicate_and_pin_users() -> Result<()> {
    let started = Instant::now();
    let port_base = port_base_for(4);
    eprintln!("port base {port_base}");
    let mut up = Up::start_with(
        port_base,
        &[
            "--regions",
            "us,eu,ap",
            "--wan-delay",
            "40ms",
            "--wan-jitter",
            "5ms",
            "--wan-loss",
            "0.01",
        ],
    )?;
    let result = three_regions_replicate(&mut up, started).await;
    if result.is_err() {
        up.print_logs();
    }
    result
}

async fn three_regions_replicate(up: &mut Up, started: Instant) -> Result<()> {
    const REGIONS: [&str; 3] = ["us", "eu", "ap"];
    /// `--wan-delay` below.
    const WAN_DELAY: Duration = Duration::from_millis(40);
    let cluster = up.wait_cluster(Duration::from_secs(60)).await?;
    eprintln!("ready after {:?}", started.elapsed());
    ensure!(cluster["hub"]["pid"].as_i64() > Some(0), "hub pid: {cluster}");
    ensure!(cluster["hub"]["nats"].is_string(), "hub url: {cluster}");
    for r in REGIONS {
        let streams: Vec<&str> = cluster["regions"][r]["streams"]
            .as_array()
            .context("streams")?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let own = format!("SYNC_{}", r.to_uppercase());
        ensure!(
            streams.first() == Some(&own.as_str()),
            "{r} applies its own stream first: {streams:?}"
        );
        let mut all = streams.clone();
        all.sort_unstable();
        ensure!(
            all == ["SYNC_AP", "SYNC_EU", "SYNC_US"],
            "{r} applies every stream: {streams:?}"
        );
        ensure!(
            cluster["regions"][r]["link_proxy"].is_string(),
            "{r} link: {cluster}"
        );
    }
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()?;
    let api = |r: &str| -> Result<Api> {
        Ok(Api {
            http: http.clone(),
            base: cluster["regions"][r]["endpoint"]
                .as_str()
                .context("endpoint")?
                .to_string(),
        })
    };
    let (us, eu, ap) = (api("us")?, api("eu")?, api("ap")?);

    us.admin_put_user_in("ann", "us").await?;
    eu.admin_put_user_in("bob", "eu").await?;
    let ann = us.token("ann", "laptop").await?;
    let bob = eu.token("bob", "phone").await?;

    // eu learns of Ann through the mirror of us's stream, and sends her home.
    let wrong = poll("eu answers 421 for ann", Duration::from_secs(15), || async {
        let (st, body) = eu
            .call(eu.http.get(format!("{}/v1/sync", eu.base)).bearer_auth(&ann))
            .await?;
        ensure!(st == StatusCode::MISDIRECTED_REQUEST, "{st} {body}");
        Ok(body)
    })
    .await?;
    ensure!(
        wrong["error"] == "wrong_region" && wrong["region"] == "us" && wrong["endpoint"] == us.base.as_str(),
        "421 names us and its endpoint: {wrong}"
    );

    // Ann (us) writes to Bob (eu) once us knows Bob.
    let cid = poll(
        "ann opens a conversation with bob",
        Duration::from_secs(15),
        || async {
            let (st, body) = us.create_direct(&ann, "bob").await?;
            ensure!(st.is_success(), "{st} {body}");
            Ok(body["conversation_id"]
                .as_str()
                .context("conversation_id")?
                .to_string())
        },
    )
    .await?;
    let sending = Instant::now();
    let sent = us
        .send_until_accepted(&ann, &cid, 0, Instant::now() + Duration::from_secs(15))
        .await?;
    let read = poll(
        "bob reads ann's message in eu",
        Duration::from_secs(15),
        || async {
            let history = eu.history(&bob, &cid).await?;
            ensure!(
                history.iter().any(|m| m["message_id"] == sent.as_str()),
                "{history:?}"
            );
            Ok(history)
        },
    )
    .await?;
    ensure!(read.len() == 1, "one message: {read:?}");
    // The message crossed the WAN: us's link to the hub, then the hub's to eu, 20 ms each.
    let crossed = sending.elapsed();
    ensure!(
        crossed >= WAN_DELAY,
        "in eu {crossed:?} after sending, under the WAN's one-way {WAN_DELAY:?}"
    );
    eprintln!("sent in us, read in eu {crossed:?} later");

    // Traffic has stopped: every region converges on the same state.
    let all = [&us, &eu, &ap];
    let digest = poll("equal digests in us, eu and ap", Duration::from_secs(20), || {
        equal_digests(&all)
    })
    .await?;
    eprintln!(
        "digest {digest} in every region, {:?} after start",
        started.elapsed()
    );

    // The hub dies: the launcher restarts it, the regions' leafnodes reconnect through their
    // links, and what us accepts afterwards still reaches eu.
    let hub = cluster["hub"]["pid"].as_i64().context("hub pid")? as i32;
    signal(hub, libc::SIGKILL);
    let killed = Instant::now();
    poll("the hub restarted", Duration::from_secs(15), || async {
        let pid = up.cluster().and_then(|c| c["hub"]["pid"].as_i64()).unwrap_or(0) as i32;
        ensure!(pid != hub && pid > 0 && alive(pid), "hub pid {pid}");
        Ok(pid)
    })
    .await?;
    let second = us
        .send_until_accepted(&ann, &cid, 1, Instant::now() + Duration::from_secs(15))
        .await?;
    poll(
        "bob reads in eu what ann sent after the hub restarted",
        Duration::from_secs(30),
        || async {
            let history = eu.history(&bob, &cid).await?;
            ensure!(
                history.iter().any(|m| m["message_id"] == second.as_str()),
                "{history:?}"
            );
            Ok(())
        },
    )
    .await?;
    poll(
        "equal digests after the hub restarted",
        Duration::from_secs(20),
        || equal_digests(&all),
    )
    .await?;
    eprintln!("hub killed; replicating again {:?} later", killed.elapsed());

    // SIGTERM stops everything, the hub included.
    let pids = up.pids();
    ensure!(
        pids.len() == 2 * REGIONS.len() + 1,
        "every process is named: {pids:?}"
    );
    let status = up.terminate().await?;
    ensure!(status.success(), "meridian up exited with {status}");
    let left: Vec<i32> = pids.into_iter().filter(|p| alive(*p)).collect();
    ensure!(left.is_empty(), "processes left behind: {left:?}");
    eprintln!("whole test {:?}", started.elapsed());
    Ok(())
}
