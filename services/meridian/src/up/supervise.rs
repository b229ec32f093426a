//! After start: `cluster.json`, the ready banner, and restarting whichever child dies.

use super::*;

/// `cluster.json`: what a client or a test needs to find the deployment. Not the admin key:
/// whoever runs `meridian up` chose it, and a file that names it is one more place to leak
/// it from.
#[derive(Serialize)]
pub(super) struct ClusterDoc {
    pub(super) jwt_secret_file: String,
    pub(super) data_dir: String,
    pub(super) launcher_pid: u32,
    /// The operator control API (`http://127.0.0.1:<port>`).
    pub(super) control: String,
    /// With two or more regions: the hub their nats-servers link through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) hub: Option<HubEntry>,
    pub(super) regions: BTreeMap<String, RegionEntry>,
    /// The regions in `--regions` order (`regions` is keyed, so sorted by name).
    pub(super) region_order: Vec<String>,
}

#[derive(Serialize)]
pub(super) struct HubEntry {
    pub(super) nats: String,
    pub(super) leaf_port: u16,
    pub(super) pid: u32,
}

#[derive(Serialize)]
pub(super) struct RegionEntry {
    pub(super) endpoint: String,
    pub(super) nats: String,
    /// The streams the region applies: its own, then its mirrors of the other regions'.
    pub(super) streams: Vec<String>,
    /// The address of the region's WAN link proxy to the hub (two or more regions).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) link_proxy: Option<String>,
    pub(super) pids: Pids,
}

#[derive(Serialize)]
pub(super) struct Pids {
    pub(super) nats: u32,
    pub(super) region: u32,
}

pub(super) struct Cluster {
    pub(super) path: PathBuf,
    pub(super) doc: tokio::sync::Mutex<ClusterDoc>,
}

impl Cluster {
    pub(super) async fn write(&self) -> Result<(), UpError> {
        let doc = self.doc.lock().await;
        let mut text = serde_json::to_string_pretty(&*doc).expect("plain data serializes");
        text.push('\n');
        // Under the lock: two supervisors restarting at once must not interleave renames
        // with stale contents. 0600: it names the key file and the processes.
        write_file(&self.path, text.as_bytes(), 0o600)
    }

    pub(super) async fn set_hub_pid(&self, pid: u32) {
        if let Some(hub) = self.doc.lock().await.hub.as_mut() {
            hub.pid = pid;
        }
        if let Err(e) = self.write().await {
            tracing::error!(error = %e, "cannot rewrite cluster.json");
        }
    }

    pub(super) async fn set_pid(&self, region: &RegionId, what: &str, pid: u32) {
        {
            let mut doc = self.doc.lock().await;
            if let Some(entry) = doc.regions.get_mut(region.as_str()) {
                if what == "nats-server" {
                    entry.pids.nats = pid;
                } else {
                    entry.pids.region = pid;
                }
            }
        }
        if let Err(e) = self.write().await {
            tracing::error!(error = %e, "cannot rewrite cluster.json");
        }
    }
}

/// The ready banner. It shows how to call the admin API but never the admin key: the
/// banner ends up in terminals' scrollback, CI logs and screenshots.
pub(super) fn print_ready(layout: &Layout, cluster: &Path) {
    let mut out = String::from("\nMeridian is up.\n");
    for p in &layout.regions {
        let _ = writeln!(
            out,
            "  {:<8} {}   (nats {})",
            p.region.as_str(),
            p.endpoint(),
            p.nats_url()
        );
    }
    if let Some(hub) = &layout.hub {
        let _ = writeln!(
            out,
            "  hub      {}   (leafnodes on port {}; each region links to it through its WAN link proxy)",
            hub.nats_url(),
            hub.leaf_port
        );
    }
    let _ = writeln!(out, "  cluster  {}", cluster.display());
    if let Some(first) = layout.regions.first() {
        let _ = writeln!(
            out,
            "  console  {}/console   (every region's gateway serves it; sign in with the admin key)",
            first.endpoint()
        );
    }
    let _ = writeln!(
        out,
        "  logs     {}/<region>/{{region,nats}}.log",
        layout.data_dir.display()
    );
    let _ = writeln!(
        out,
        "\nADMIN_KEY below: the key given with --admin-key or MERIDIAN_ADMIN_KEY."
    );
    match &layout.regions[..] {
        [home, away, ..] => walk_through_regions(&mut out, home, away, &layout.regions),
        [only] => {
            let _ = writeln!(out, "Provision a user:");
            let _ = writeln!(
                out,
                "  curl -sX PUT {}/v1/admin/users/ann -H \"X-Admin-Key: $ADMIN_KEY\" -d '{{\"home_region\": \"{}\"}}'",
                only.endpoint(),
                only.region
            );
        }
        [] => {}
    }
    let _ = writeln!(
        out,
        "\nCtrl-C stops everything (region processes first, then nats-servers{}).",
        if layout.hub.is_some() {
            ", the hub, the links"
        } else {
            ""
        }
    );
    println!("{out}");
}

/// The multi-region walk-through: a user of `home` and one of `away`, a 421, a message
/// across, and the digests that show every region holds everything.
fn walk_through_regions(out: &mut String, home: &RegionPlan, away: &RegionPlan, all: &[Arc<RegionPlan>]) {
    let (h, a) = (home.region.as_str(), away.region.as_str());
    let (hv, av) = (
        h.to_uppercase().replace('-', "_"),
        a.to_uppercase().replace('-', "_"),
    );
    let token = "python3 -c 'import json,sys; print(json.load(sys.stdin)[\"token\"])'";
    let lines = [
        format!("{hv}={}; {av}={}", home.endpoint(), away.endpoint()),
        "ADMIN=\"X-Admin-Key: $ADMIN_KEY\"".to_string(),
        format!("# Ann lives in {h}, Bob in {a}; any region can provision anyone."),
        format!("curl -sX PUT ${hv}/v1/admin/users/ann -H \"$ADMIN\" -d '{{\"home_region\": \"{h}\"}}'"),
        format!("curl -sX PUT ${av}/v1/admin/users/bob -H \"$ADMIN\" -d '{{\"home_region\": \"{a}\"}}'"),
        format!("ANN=$(curl -sX POST ${hv}/v1/admin/tokens -H \"$ADMIN\" -d '{{\"user_id\": \"ann\", \"device_id\": \"laptop\"}}' | {token})"),
        format!("BOB=$(curl -sX POST ${av}/v1/admin/tokens -H \"$ADMIN\" -d '{{\"user_id\": \"bob\", \"device_id\": \"phone\"}}' | {token})"),
        format!("# {a} does not serve Ann: 421 wrong_region, naming {h} and its endpoint."),
        format!("curl -s ${av}/v1/sync -H \"Authorization: Bearer $ANN\""),
        format!("# Ann writes to Bob in {h}; Bob reads it in {a}."),
        format!("CID=$(curl -sX POST ${hv}/v1/conversations -H \"Authorization: Bearer $ANN\" -d '{{\"kind\": \"direct\", \"members\": [\"bob\"]}}' | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"conversation_id\"])')"),
        format!("curl -sX POST ${hv}/v1/conversations/$CID/messages -H \"Authorization: Bearer $ANN\" -d '{{\"client_msg_id\": \"m-1\", \"type\": \"text\", \"body\": {{\"text\": \"hi Bob\"}}}}'"),
        format!("curl -s ${av}/v1/conversations/$CID/messages -H \"Authorization: Bearer $BOB\""),
        "# Every region holds everything: once traffic stops, the digests are equal.".to_string(),
        format!(
            "for e in {}; do curl -s $e/v1/admin/digest -H \"$ADMIN\"; echo; done",
            all.iter().map(|p| p.endpoint()).collect::<Vec<_>>().join(" ")
        ),
        format!("curl -s ${hv}/v1/admin/regions -H \"$ADMIN\"   # mirror lag and apply lag per stream"),
    ];
    let _ = writeln!(out, "Walk through the regions:");
    for line in lines {
        let _ = writeln!(out, "  {line}");
    }
}

pub(super) type ReadyWatch = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Keeps one region's processes running until `shutdown`, restarting whichever dies (the
/// nats-server first) unless the control API holds the region, and carries out the control
/// API's commands; then stops the region process and returns the nats-server for the
/// caller to stop after every region process is gone.
pub(super) async fn supervise(
    mut r: RegionProcs,
    mut control: RegionSupervised,
    launcher: Arc<Launcher>,
    cluster: Arc<Cluster>,
    shutdown: CancellationToken,
) -> Option<Proc> {
    let region = r.plan.region.clone();
    let mut nats_restart = Restart::default();
    let mut region_restart = Restart::default();
    // The region process was stopped to be restarted (a new clock offset): not a crash.
    let mut region_restart_asked = false;
    // Resolves when a restarted region answers /readyz again; only for the operator's log.
    let mut ready_watch: Option<ReadyWatch> = None;
    loop {
        let now = Instant::now();
        if !r.held && r.nats.is_none() && now >= nats_restart.due {
            match launcher.spawn_nats(&r.plan) {
                Ok(mut p) => {
                    tracing::warn!(%region, pid = p.pid, "nats-server restarted");
                    cluster.set_pid(&region, p.what, p.pid).await;
                    // The region process reconnects on its own; waiting here just keeps a
                    // region restart from racing a server that is still recovering.
                    match wait_nats_ready(&mut p, r.plan.nats_port, &shutdown).await {
                        Ok(_) => {}
                        Err(reason) => tracing::warn!(%region, %reason, "restarted nats-server not ready"),
                    }
                    r.nats = Some(p);
                }
                Err(e) => {
                    tracing::error!(%region, error = %e, "cannot restart nats-server");
                    nats_restart.failed_again();
                }
            }
        }
        // The region process needs its nats-server; with both down, nats goes first.
        if !r.held
            && r.region.is_none()
            && r.nats.is_some()
            && now >= region_restart.due
            && !shutdown.is_cancelled()
        {
            match launcher.spawn_region(&r.plan, r.clock_offset_ms) {
                Ok(p) => {
                    tracing::warn!(%region, pid = p.pid, "region process restarted");
                    cluster.set_pid(&region, p.what, p.pid).await;
                    let (port, region, pid) = (r.plan.gateway_port, region.clone(), p.pid);
                    ready_watch = Some(Box::pin(async move {
                        while http_status(port, "/readyz").await != Some(200) {
                            tokio::time::sleep(POLL).await;
                        }
                        tracing::info!(%region, pid, "region process ready again");
                    }));
                    r.region = Some(p);
                }
                Err(e) => {
                    tracing::error!(%region, error = %e, "cannot restart the region process");
                    region_restart.failed_again();
                }
            }
        }
        control.publish(RegionStatus::of(&r));
        let next_due = [
            r.nats.is_none().then_some(nats_restart.due),
            // Without its nats-server the region waits for that one's restart, not its own
            // (a past due time here would spin the loop).
            (r.region.is_none() && r.nats.is_some()).then_some(region_restart.due),
        ]
        .into_iter()
        .flatten()
        .min()
        // Held: nothing is due until the hold is released (a command wakes the loop).
        .filter(|_| !r.held);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            status = wait_opt(&mut r.nats) => {
                let p = r.nats.take().expect("waited on a running process");
                nats_restart.exited(&p, &status);
            }
            status = wait_opt(&mut r.region) => {
                let p = r.region.take().expect("waited on a running process");
                if std::mem::take(&mut region_restart_asked) {
                    tracing::info!(%region, pid = p.pid, "region process stopped to restart with a new clock offset");
                    region_restart.due = Instant::now();
                } else {
                    region_restart.exited(&p, &status);
                }
                ready_watch = None;
            }
            Some(command) = control.commands.recv() => match command {
                RegionCommand::Signal(which, req) => {
                    let slot = match which {
                        Which::Nats => &mut r.nats,
                        Which::Region => &mut r.region,
                    };
                    let pid = signal_proc(slot, req.sig);
                    control.publish(RegionStatus::of(&r));
                    let _ = req.reply.send(pid);
                }
                RegionCommand::Hold { hold, reply } => {
                    if r.held && !hold {
                        // Released: what is down comes back now, nats first (the loop's order).
                        nats_restart.due = Instant::now();
                        region_restart.due = Instant::now();
                    }
                    r.held = hold;
                    tracing::warn!(%region, held = hold, "hold changed by the control API");
                    control.publish(RegionStatus::of(&r));
                    let _ = reply.send(());
                }
                RegionCommand::ClockOffset { offset_ms, reply } => {
                    r.clock_offset_ms = offset_ms;
                    let pid = signal_proc(&mut r.region, Sig::Term);
                    if pid.is_some() {
                        region_restart_asked = true;
                        // A SIGSTOPped process handles its SIGTERM only once it runs again.
                        signal_proc(&mut r.region, Sig::Cont);
                    }
                    tracing::warn!(%region, offset_ms, restarting = ?pid, "clock offset changed by the control API");
                    control.publish(RegionStatus::of(&r));
                    let _ = reply.send(pid);
                }
            },
            _ = async { ready_watch.as_mut().expect("guarded").await }, if ready_watch.is_some() => {
                ready_watch = None;
            }
            _ = tokio::time::sleep_until(next_due.unwrap_or(now)), if next_due.is_some() => {}
        }
    }
    // Calls still queued get "shutting down" rather than waiting out the region's stop.
    drop(control);
    if let Some(p) = r.region.take() {
        p.stop().await;
    }
    r.nats
}

/// Keeps the hub running until `shutdown`, restarting it when it dies (the regions'
/// leafnode remotes reconnect on their own), then returns it for the caller to stop after
/// every region's nats-server.
pub(super) async fn supervise_hub(
    mut hub: Option<Proc>,
    mut control: HubSupervised,
    plan: Arc<HubPlan>,
    launcher: Arc<Launcher>,
    cluster: Arc<Cluster>,
    shutdown: CancellationToken,
) -> Option<Proc> {
    let mut restart = Restart::default();
    loop {
        let now = Instant::now();
        if hub.is_none() && now >= restart.due {
            match launcher.spawn_hub(&plan) {
                Ok(mut p) => {
                    tracing::warn!(pid = p.pid, "hub nats-server restarted");
                    cluster.set_hub_pid(p.pid).await;
                    if let Err(reason) = wait_nats_ready(&mut p, plan.port, &shutdown).await {
                        tracing::warn!(%reason, "restarted hub not ready");
                    }
                    hub = Some(p);
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot restart the hub");
                    restart.failed_again();
                }
            }
        }
        control.publish(ProcStatus::of(&hub));
        let next_due = hub.is_none().then_some(restart.due);
        tokio::select! {
            _ = shutdown.cancelled() => break,
            status = wait_opt(&mut hub) => {
                let p = hub.take().expect("waited on a running process");
                restart.exited(&p, &status);
            }
            Some(req) = control.commands.recv() => {
                let pid = signal_proc(&mut hub, req.sig);
                control.publish(ProcStatus::of(&hub));
                let _ = req.reply.send(pid);
            }
            _ = tokio::time::sleep_until(next_due.unwrap_or(now)), if next_due.is_some() => {}
        }
    }
    hub
}

/// When to restart a process that died.
pub(super) struct Restart {
    pub(super) due: Instant,
    pub(super) delay: Duration,
}

impl Default for Restart {
    fn default() -> Self {
        Restart {
            due: Instant::now(),
            delay: RESTART_DELAY_MIN,
        }
    }
}

impl Restart {
    pub(super) fn exited(&mut self, p: &Proc, status: &io::Result<ExitStatus>) {
        let ran = p.started.elapsed();
        self.delay = if ran >= HEALTHY_RUN {
            RESTART_DELAY_MIN
        } else {
            (self.delay * 2).min(RESTART_DELAY_MAX)
        };
        self.due = Instant::now() + self.delay;
        tracing::warn!(
            owner = %p.owner,
            what = p.what,
            pid = p.pid,
            status = %status.as_ref().map_or_else(|e| e.to_string(), |s| s.to_string()),
            ran_s = ran.as_secs_f64(),
            log = %p.log.display(),
            "exited unexpectedly; restarting in {:?}", self.delay
        );
    }

    pub(super) fn failed_again(&mut self) {
        self.delay = (self.delay * 2).min(RESTART_DELAY_MAX);
        self.due = Instant::now() + self.delay;
    }
}
