//! The child processes: spawning with the launcher's ties, readiness, ordered stop.

use super::*;

/// Environment overrides of fields the launcher decides; inherited, they would move a
/// region away from the ports and files the launcher watches and publishes.
pub(super) const OWNED_OVERRIDES: &[&str] = &[
    "MERIDIAN__REGION",
    "MERIDIAN__STORE",
    "MERIDIAN__BUS__NATS_URL",
    "MERIDIAN__BUS__REGION",
    "MERIDIAN__BUS__ROLE",
    "MERIDIAN__BUS__NKEY_SEED_FILE",
    "MERIDIAN__BUS__NKEY_SEED_ENV",
    "MERIDIAN__BUS__DOMAIN",
    "MERIDIAN__BUS__MIRRORS",
    "MERIDIAN__GATEWAY__REGION",
    "MERIDIAN__GATEWAY__LISTEN",
    "MERIDIAN__GATEWAY__JWT_SECRET",
    "MERIDIAN__GATEWAY__ADMIN_KEY",
    "MERIDIAN__GATEWAY__REGION_ENDPOINTS",
    "MERIDIAN__APPLIER__REGION",
];

/// Spawns the children.
pub(super) struct Launcher {
    pub(super) nats_bin: PathBuf,
    pub(super) exe: PathBuf,
}

impl Launcher {
    pub(super) fn spawn_nats(&self, plan: &RegionPlan) -> Result<Proc, UpError> {
        let mut cmd = child_command(&self.nats_bin, &plan.nats_log(), "nats-server")?;
        cmd.arg("-c").arg(plan.nats_conf());
        Proc::spawn(
            cmd,
            "nats-server",
            &format!("region {}", plan.region),
            plan.nats_log(),
        )
    }

    pub(super) fn spawn_hub(&self, hub: &HubPlan) -> Result<Proc, UpError> {
        let mut cmd = child_command(&self.nats_bin, &hub.log(), "hub nats-server")?;
        cmd.arg("-c").arg(hub.conf());
        Proc::spawn(cmd, HUB, "the hub", hub.log())
    }

    /// The region process, its HLC's wall clock `clock_offset_ms` off (the control API's
    /// clock skew; 0 unless asked).
    pub(super) fn spawn_region(&self, plan: &RegionPlan, clock_offset_ms: i64) -> Result<Proc, UpError> {
        let mut cmd = child_command(&self.exe, &plan.region_log(), "region")?;
        cmd.arg("region").arg("--config").arg(plan.region_toml());
        for (key, _) in std::env::vars_os() {
            let Some(k) = key.to_str() else { continue };
            if OWNED_OVERRIDES.iter().any(|o| o.eq_ignore_ascii_case(k))
                // Set below, whatever the launcher inherited; any other spelling would
                // compete with it.
                || k.eq_ignore_ascii_case(CLOCK_OFFSET_ENV)
            {
                cmd.env_remove(&key);
            }
        }
        // After the removals: this one is the launcher's to decide (and to change).
        cmd.env(CLOCK_OFFSET_ENV, clock_offset_ms.to_string());
        Proc::spawn(
            cmd,
            "region",
            &format!("region {}", plan.region),
            plan.region_log(),
        )
    }
}

/// A command with stdin closed, output appended to `log` (after a marker line so restarts
/// are easy to find), its own process group, and ties to the launcher's life.
pub(super) fn child_command(program: &Path, log: &Path, what: &str) -> Result<Command, UpError> {
    use std::io::Write as _;
    let open = || {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        writeln!(f, "--- meridian up: starting {what} (unix time {now}) ---")?;
        Ok::<_, io::Error>((f.try_clone()?, f))
    };
    let (out, err) = open().map_err(io_err(format!("cannot open {}", log.display())))?;
    let mut cmd = Command::new(program);
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .kill_on_drop(true);
    die_with_parent(&mut cmd);
    Ok(cmd)
}

/// Has the kernel SIGKILL the child when the launcher dies, however it dies. The signal is
/// tied to the thread that forks; that is a tokio worker, and those live as long as the
/// runtime, which outlives every child we start.
#[cfg(target_os = "linux")]
pub(super) fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: between fork and exec the closure only makes async-signal-safe system calls
    // (prctl, getppid) and builds errors without allocating.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The launcher died before prctl took effect: nobody would ever stop us.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
pub(super) fn die_with_parent(_cmd: &mut Command) {}

/// What the hub's [`Proc`] is (a region's are "nats-server" and "region").
pub(super) const HUB: &str = "hub";

/// One running child.
pub(super) struct Proc {
    /// "nats-server" or "region" (of a region), or [`HUB`].
    pub(super) what: &'static str,
    /// Whose it is, for messages: "region us", "the hub".
    pub(super) owner: String,
    pub(super) log: PathBuf,
    pub(super) child: Child,
    pub(super) pid: u32,
    pub(super) started: Instant,
    /// SIGSTOPped through the control API (and not SIGCONTinued since).
    pub(super) stopped: bool,
}

impl Proc {
    pub(super) fn spawn(
        mut cmd: Command,
        what: &'static str,
        owner: &str,
        log: PathBuf,
    ) -> Result<Proc, UpError> {
        let child = cmd.spawn().map_err(io_err(format!(
            "cannot start {what} of {owner} ({:?})",
            cmd.as_std().get_program()
        )))?;
        let pid = child.id().unwrap_or(0);
        Ok(Proc {
            what,
            owner: owner.to_string(),
            log,
            child,
            pid,
            started: Instant::now(),
            stopped: false,
        })
    }

    pub(super) fn start_error(&self, reason: String) -> UpError {
        UpError::Start {
            owner: self.owner.clone(),
            what: self.what,
            reason,
            log: self.log.display().to_string(),
            tail: log_tail(&self.log, 30),
        }
    }

    /// SIGTERM, up to `STOP_GRACE` for an ordered exit, then SIGKILL.
    pub(super) async fn stop(mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // The child is not reaped yet (we hold it), so the pid cannot have been reused.
        // SIGCONT after the SIGTERM: a SIGSTOPped child (the control API) handles its
        // SIGTERM only once it runs again.
        // SAFETY: kill(2) with a pid we own and valid signal numbers.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
            libc::kill(self.pid as libc::pid_t, libc::SIGCONT);
        }
        match tokio::time::timeout(STOP_GRACE, self.child.wait()).await {
            Ok(status) => {
                let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                tracing::info!(owner = %self.owner, what = self.what, pid = self.pid, %status, "stopped");
            }
            Err(_) => {
                tracing::warn!(owner = %self.owner, what = self.what, pid = self.pid, "did not stop within {STOP_GRACE:?}; killing");
                let _ = self.child.kill().await;
            }
        }
    }
}

pub(super) async fn wait_opt(p: &mut Option<Proc>) -> io::Result<ExitStatus> {
    match p {
        Some(p) => p.child.wait().await,
        None => futures::future::pending().await,
    }
}

pub(super) fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The processes of one region.
pub(super) struct RegionProcs {
    pub(super) plan: Arc<RegionPlan>,
    pub(super) nats: Option<Proc>,
    pub(super) region: Option<Proc>,
    /// Held through the control API: its supervisor restarts nothing of the region.
    pub(super) held: bool,
    /// What the region process's HLC adds to the wall clock, at every (re)start.
    pub(super) clock_offset_ms: i64,
}

/// Starts the hub (if any) and every nats-server, runs `prepare` once they all accept
/// connections, then starts every region process and waits for each to be ready. Started
/// processes are put in `hub` and `running` as they start, so the caller can stop them on
/// error. `Ok(false)`: shutdown was requested meanwhile.
pub(super) async fn start_all(
    layout: &Layout,
    launcher: &Launcher,
    hub: &mut Option<Proc>,
    running: &mut Vec<RegionProcs>,
    prepare: impl Future<Output = Result<(), UpError>>,
    shutdown: &CancellationToken,
) -> Result<bool, UpError> {
    if let Some(plan) = &layout.hub {
        let p = hub.insert(launcher.spawn_hub(plan)?);
        println!(
            "  hub: nats-server pid {} on {}, leafnodes on port {} (log {})",
            p.pid,
            plan.nats_url(),
            plan.leaf_port,
            plan.log().display()
        );
        match wait_nats_ready(p, plan.port, shutdown).await {
            Ok(true) => {}
            Ok(false) => return Ok(false),
            Err(reason) => return Err(p.start_error(reason)),
        }
    }
    for plan in &layout.regions {
        let nats = launcher.spawn_nats(plan)?;
        println!(
            "  {}: nats-server pid {} on {} (log {})",
            plan.region,
            nats.pid,
            plan.nats_url(),
            plan.nats_log().display()
        );
        running.push(RegionProcs {
            plan: plan.clone(),
            nats: Some(nats),
            region: None,
            held: false,
            clock_offset_ms: inherited_clock_offset(),
        });
    }
    for r in running.iter_mut() {
        let nats = r.nats.as_mut().expect("just started");
        match wait_nats_ready(nats, r.plan.nats_port, shutdown).await {
            Ok(true) => {}
            Ok(false) => return Ok(false),
            Err(reason) => return Err(nats.start_error(reason)),
        }
    }
    tokio::select! {
        _ = shutdown.cancelled() => return Ok(false),
        prepared = prepare => prepared?,
    }
    for r in running.iter_mut() {
        let region = launcher.spawn_region(&r.plan, r.clock_offset_ms)?;
        println!(
            "  {}: region pid {}, gateway {} (log {})",
            r.plan.region,
            region.pid,
            r.plan.endpoint(),
            r.plan.region_log().display()
        );
        r.region = Some(region);
    }
    for r in running.iter_mut() {
        let region = r.region.as_mut().expect("just started");
        let started = Instant::now();
        println!(
            "  {}: waiting for {}/readyz ...",
            r.plan.region,
            r.plan.endpoint()
        );
        let mut next_note = started + Duration::from_secs(5);
        loop {
            match region.child.try_wait() {
                Ok(Some(status)) => return Err(region.start_error(format!("exited with {status}"))),
                Ok(None) => {}
                Err(e) => return Err(region.start_error(format!("cannot watch it: {e}"))),
            }
            if http_status(r.plan.gateway_port, "/readyz").await == Some(200) {
                println!(
                    "  {}: ready in {:.1} s",
                    r.plan.region,
                    started.elapsed().as_secs_f64()
                );
                break;
            }
            if started.elapsed() > READY_TIMEOUT {
                return Err(region.start_error(format!("not ready within {READY_TIMEOUT:?}")));
            }
            if Instant::now() >= next_note {
                println!(
                    "  {}: still starting ({:.0} s; see {})",
                    r.plan.region,
                    started.elapsed().as_secs_f64(),
                    r.plan.region_log().display()
                );
                next_note += Duration::from_secs(5);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(false),
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }
    Ok(true)
}

/// Waits until the nats-server accepts connections on `port`. `Ok(false)`: shutdown meanwhile.
pub(super) async fn wait_nats_ready(
    nats: &mut Proc,
    port: u16,
    shutdown: &CancellationToken,
) -> Result<bool, String> {
    let deadline = Instant::now() + NATS_READY_TIMEOUT;
    loop {
        match nats.child.try_wait() {
            Ok(Some(status)) => return Err(format!("exited with {status}")),
            Ok(None) => {}
            Err(e) => return Err(format!("cannot watch it: {e}")),
        }
        let connect = TcpStream::connect(("127.0.0.1", port));
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), connect).await {
            return Ok(true);
        }
        if Instant::now() > deadline {
            return Err(format!("not accepting connections within {NATS_READY_TIMEOUT:?}"));
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(false),
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

/// The status code of `GET path` on the local `port`, or `None` when there is no answer.
/// A hand-written HTTP/1.1 request: the launcher needs one status line, not an HTTP client.
pub async fn http_status(port: u16, path: &str) -> Option<u16> {
    let request = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await.ok()?;
        let mut buf = [0u8; 32];
        let mut n = 0;
        // "HTTP/1.1 200" is 12 bytes; a response can arrive in pieces.
        while n < 12 {
            match stream.read(&mut buf[n..]).await.ok()? {
                0 => break,
                read => n += read,
            }
        }
        let line = std::str::from_utf8(&buf[..n]).ok()?;
        let rest = line
            .strip_prefix("HTTP/1.1 ")
            .or_else(|| line.strip_prefix("HTTP/1.0 "))?;
        rest.get(..3)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(3), request)
        .await
        .ok()
        .flatten()
}

/// Stops region processes first, then the regions' nats-servers, then the hub.
pub(super) async fn stop_all(running: Vec<RegionProcs>, hub: Option<Proc>) {
    let mut nats = Vec::new();
    let mut regions = Vec::new();
    for r in running {
        nats.extend(r.nats);
        regions.extend(r.region);
    }
    futures::future::join_all(regions.into_iter().map(Proc::stop)).await;
    futures::future::join_all(nats.into_iter().map(Proc::stop)).await;
    if let Some(hub) = hub {
        hub.stop().await;
    }
}
