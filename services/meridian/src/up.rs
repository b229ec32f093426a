//! `meridian up`: a whole local deployment in the foreground. Per region it runs one
//! nats-server and one region process (`meridian region --config ...`: gateway + applier +
//! sweeper over the embedded store), restarts whichever dies, and stops them in order.
//!
//! # Ports
//! Region `i` (0-based, in `--regions` order) owns the block `port_base + 10*i ..+10`:
//! `+0` is its nats-server client port and `+1` its gateway; the other eight are reserved
//! (monitoring, mirror links) so adding them later moves no existing port. With the default
//! base 7000, `us` listens on 7001 and `eu` on 7011.
//!
//! # Files (under the data dir; nothing is removed on exit, so a restart keeps all data)
//! - `jwt_secret` (0600): the HS256 key, generated once so tokens survive restarts.
//! - `cluster.json`: endpoints and pids, written (atomically) once every region is ready and
//!   again whenever a process is restarted. A stale one is removed at start, so its presence
//!   means "this run is ready".
//! - `<region>/nats.conf`, `nats.log`, `jetstream/`: the region's nats-server.
//! - `<region>/region.toml` (0600: it holds the keys), `region.log`, `store/`: the region
//!   process and its embedded store.
//!
//! # Processes
//! Children get their own process group, so a terminal's Ctrl-C reaches only the launcher,
//! which then stops them in order: every region process first (SIGTERM, 10 s, SIGKILL),
//! then every nats-server the same way. On Linux each child also gets `PR_SET_PDEATHSIG`,
//! so even a SIGKILLed launcher leaves no orphans; `kill_on_drop` covers the remaining
//! paths (a panicking task).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meridian_bus::{nats_server_config, Durability};
use meridian_model::RegionId;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::RegionConfig;

/// Ports per region block (see the module docs).
pub const PORTS_PER_REGION: u16 = 10;
/// How long a stopping process gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a region may take to answer `/readyz` with 200 at first start.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a nats-server may take to accept connections (JetStream recovers its streams
/// from disk before it listens, so a big store takes a while).
const NATS_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Restart delay after a crash: short, so a killed process is back within ~2 s, doubling
/// while a process keeps dying young so a crash loop does not spin.
const RESTART_DELAY_MIN: Duration = Duration::from_millis(200);
const RESTART_DELAY_MAX: Duration = Duration::from_secs(2);
/// A process that ran this long before dying is restarted with the minimum delay again.
const HEALTHY_RUN: Duration = Duration::from_secs(10);
/// Poll interval for readiness checks.
const POLL: Duration = Duration::from_millis(100);
const JWT_SECRET_BYTES: usize = 32;
const MIN_ADMIN_KEY: usize = 16;

/// What `meridian up` was asked for.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub regions: Vec<RegionId>,
    pub data_dir: PathBuf,
    pub admin_key: String,
    pub port_base: u16,
    /// The nats-server binary; `None`: `$MERIDIAN_NATS_SERVER`, else `.tools/bin/nats-server`
    /// in the repository holding the running executable or the working directory.
    pub nats_server: Option<PathBuf>,
    /// The `meridian` binary started as `<exe> region --config ...`; `None`: this executable.
    pub exe: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error("{option}: {reason}")]
    Invalid { option: &'static str, reason: String },
    #[error(
        "nats-server not found ({tried}); run deploy/install-nats.sh, or pass --nats-server PATH \
         or set MERIDIAN_NATS_SERVER"
    )]
    NatsMissing { tried: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("the generated region file {path} is invalid: {source}")]
    Config {
        path: String,
        #[source]
        source: crate::config::ConfigError,
    },
    #[error("{what} of region {region} did not start: {reason}\n--- last lines of {log} ---\n{tail}")]
    Start {
        region: String,
        what: &'static str,
        reason: String,
        log: String,
        tail: String,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> UpError {
    let context = context.into();
    move |source| UpError::Io { context, source }
}

/// Runs the deployment until `shutdown`, then stops it in order. Returns an error only when
/// it cannot start; once running, failures are handled by restarting.
pub async fn run(opts: UpOptions, shutdown: CancellationToken) -> Result<(), UpError> {
    let layout = Layout::new(&opts)?;
    let nats_bin = resolve_nats_server(opts.nats_server.as_deref())?;
    let exe = match opts.exe.clone() {
        Some(exe) => exe,
        None => std::env::current_exe().map_err(io_err("cannot find the meridian executable"))?,
    };
    for plan in &layout.regions {
        for (port, what) in [(plan.nats_port, "nats-server"), (plan.gateway_port, "gateway")] {
            check_port_free(port, what, &plan.region)?;
        }
    }
    let jwt_secret_file = layout.data_dir.join("jwt_secret");
    let jwt_secret = load_or_create_jwt_secret(&jwt_secret_file)?;
    let cluster_path = layout.data_dir.join("cluster.json");
    // A cluster.json from an earlier run names dead pids; whoever waits for it must only
    // see this run's.
    match std::fs::remove_file(&cluster_path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(io_err(format!("cannot remove stale {}", cluster_path.display()))(
                e,
            ))
        }
    }
    let endpoints: BTreeMap<String, String> = layout
        .regions
        .iter()
        .map(|p| (p.region.to_string(), p.endpoint()))
        .collect();
    for plan in &layout.regions {
        plan.write_files(&jwt_secret, &opts.admin_key, &endpoints)?;
    }
    let launcher = Arc::new(Launcher { nats_bin, exe });

    println!(
        "meridian up: {} region(s) in {} (nats-server: {})",
        layout.regions.len(),
        layout.data_dir.display(),
        launcher.nats_bin.display()
    );
    let mut running = Vec::new();
    match start_all(&layout, &launcher, &mut running, &shutdown).await {
        Ok(true) => {}
        Ok(false) => {
            println!("meridian up: interrupted while starting; stopping");
            stop_all(running).await;
            return Ok(());
        }
        Err(e) => {
            stop_all(running).await;
            return Err(e);
        }
    }

    let cluster = Arc::new(Cluster {
        path: cluster_path,
        doc: tokio::sync::Mutex::new(ClusterDoc {
            admin_key: opts.admin_key.clone(),
            jwt_secret_file: jwt_secret_file.display().to_string(),
            data_dir: layout.data_dir.display().to_string(),
            launcher_pid: std::process::id(),
            regions: running
                .iter()
                .map(|r| {
                    let entry = RegionEntry {
                        endpoint: r.plan.endpoint(),
                        nats: r.plan.nats_url(),
                        pids: Pids {
                            nats: r.nats.as_ref().map_or(0, |p| p.pid),
                            region: r.region.as_ref().map_or(0, |p| p.pid),
                        },
                    };
                    (r.plan.region.to_string(), entry)
                })
                .collect(),
        }),
    });
    if let Err(e) = cluster.write().await {
        stop_all(running).await;
        return Err(e);
    }
    print_ready(&layout, &opts.admin_key, &cluster.path);

    let supervisors: Vec<_> = running
        .into_iter()
        .map(|r| tokio::spawn(supervise(r, launcher.clone(), cluster.clone(), shutdown.clone())))
        .collect();
    // Each supervisor stops its region process on shutdown and hands back its nats-server,
    // so every region process is gone before the first nats-server is asked to stop.
    let mut nats = Vec::new();
    for s in supervisors {
        match s.await {
            Ok(Some(p)) => nats.push(p),
            Ok(None) => {}
            // Its children were killed when the panicking task dropped them.
            Err(e) => tracing::error!(error = %e, "a region supervisor panicked"),
        }
    }
    futures::future::join_all(nats.into_iter().map(Proc::stop)).await;
    println!("meridian up: stopped");
    Ok(())
}

/// Where everything goes, checked before anything starts.
struct Layout {
    data_dir: PathBuf,
    regions: Vec<Arc<RegionPlan>>,
}

struct RegionPlan {
    region: RegionId,
    dir: PathBuf,
    nats_port: u16,
    gateway_port: u16,
}

impl Layout {
    fn new(opts: &UpOptions) -> Result<Layout, UpError> {
        let invalid = |option, reason: String| Err(UpError::Invalid { option, reason });
        if opts.regions.is_empty() {
            return invalid("--regions", "name at least one region".into());
        }
        for (i, r) in opts.regions.iter().enumerate() {
            if opts.regions[..i].contains(r) {
                return invalid("--regions", format!("{r} is listed twice"));
            }
        }
        if opts.admin_key.chars().count() < MIN_ADMIN_KEY {
            return invalid(
                "--admin-key",
                format!(
                    "must be at least {MIN_ADMIN_KEY} characters (got {}); admin calls carry it \
                     in X-Admin-Key",
                    opts.admin_key.chars().count()
                ),
            );
        }
        let blocks = u32::try_from(opts.regions.len()).unwrap_or(u32::MAX);
        let last_port = u32::from(opts.port_base) + u32::from(PORTS_PER_REGION) * blocks - 1;
        if opts.port_base < 1024 || last_port > u32::from(u16::MAX) {
            return invalid(
                "--port-base",
                format!(
                    "{} regions need ports {}..={last_port}, which must lie in 1024..=65535",
                    opts.regions.len(),
                    opts.port_base
                ),
            );
        }
        std::fs::create_dir_all(&opts.data_dir)
            .map_err(io_err(format!("cannot create {}", opts.data_dir.display())))?;
        // Absolute, so the region processes find their store whatever their cwd.
        let data_dir = opts
            .data_dir
            .canonicalize()
            .map_err(io_err(format!("cannot resolve {}", opts.data_dir.display())))?;
        // The store URL ends its path at '?' (options follow), and the nats config quotes
        // paths, so only '?' is a problem.
        if data_dir.to_string_lossy().contains('?') {
            return invalid(
                "--data-dir",
                format!("{} must not contain '?'", data_dir.display()),
            );
        }
        let regions = opts
            .regions
            .iter()
            .enumerate()
            .map(|(i, region)| {
                let base = opts.port_base + PORTS_PER_REGION * i as u16;
                Arc::new(RegionPlan {
                    region: region.clone(),
                    dir: data_dir.join(region.as_str()),
                    nats_port: base,
                    gateway_port: base + 1,
                })
            })
            .collect();
        Ok(Layout { data_dir, regions })
    }
}

impl RegionPlan {
    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.gateway_port)
    }
    fn nats_url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.nats_port)
    }
    fn nats_conf(&self) -> PathBuf {
        self.dir.join("nats.conf")
    }
    fn nats_log(&self) -> PathBuf {
        self.dir.join("nats.log")
    }
    fn region_toml(&self) -> PathBuf {
        self.dir.join("region.toml")
    }
    fn region_log(&self) -> PathBuf {
        self.dir.join("region.log")
    }

    /// Writes nats.conf and region.toml, regenerated on every start so a changed port base
    /// or key takes effect; the data directories they point at are kept.
    fn write_files(
        &self,
        jwt_secret: &str,
        admin_key: &str,
        endpoints: &BTreeMap<String, String>,
    ) -> Result<(), UpError> {
        std::fs::create_dir_all(&self.dir)
            .map_err(io_err(format!("cannot create {}", self.dir.display())))?;
        let conf = nats_server_config(
            &self.dir.join("jetstream"),
            self.nats_port,
            Durability::Process,
            &format!("meridian-{}", self.region),
        );
        write_file(&self.nats_conf(), conf.as_bytes(), 0o644)?;

        let mut gateway = toml::Table::new();
        gateway.insert("listen".into(), format!("127.0.0.1:{}", self.gateway_port).into());
        gateway.insert("jwt_secret".into(), jwt_secret.into());
        gateway.insert("admin_key".into(), admin_key.into());
        let endpoints: toml::Table = endpoints
            .iter()
            .map(|(r, e)| (r.clone(), toml::Value::from(e.as_str())))
            .collect();
        gateway.insert("region_endpoints".into(), endpoints.into());
        let mut bus = toml::Table::new();
        bus.insert("nats_url".into(), self.nats_url().into());
        let mut doc = toml::Table::new();
        doc.insert("region".into(), self.region.as_str().into());
        let store = format!("embedded://{}", self.dir.join("store").display());
        doc.insert("store".into(), store.into());
        doc.insert("bus".into(), bus.into());
        doc.insert("gateway".into(), gateway.into());
        // Every applier field at its default; listed so the file shows where to tune it.
        doc.insert("applier".into(), toml::Table::new().into());
        let body = toml::to_string(&doc).map_err(|e| UpError::Invalid {
            option: "region file",
            reason: e.to_string(),
        })?;
        let text = format!(
            "# Written by `meridian up` at every start; edit the flags, not this file.\n\
             # Run by hand with: meridian region --config {}\n{body}",
            self.region_toml().display()
        );
        let path = self.region_toml();
        // Checked here so a bad flag fails in the launcher with the field named, instead of
        // as a crash loop of the region process.
        RegionConfig::from_toml(&text, &path.display().to_string(), Vec::new()).map_err(|source| {
            UpError::Config {
                path: path.display().to_string(),
                source,
            }
        })?;
        write_file(&path, text.as_bytes(), 0o600)
    }
}

/// Writes `path` (via a temporary file and a rename, so no reader sees half of it) with
/// `mode` permissions from the start.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), UpError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let result = (|| {
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(contents)?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(io_err(format!("cannot write {}", path.display())))
}

fn check_port_free(port: u16, what: &str, region: &RegionId) -> Result<(), UpError> {
    std::net::TcpListener::bind(("127.0.0.1", port))
        .map(drop)
        .map_err(|e| UpError::Invalid {
            option: "--port-base",
            reason: format!(
                "port {port} ({what} of region {region}) is not free: {e}; is another `meridian up` \
                 running? Stop it or choose another --port-base"
            ),
        })
}

/// Finds nats-server: the flag, then `$MERIDIAN_NATS_SERVER`, then `.tools/bin/nats-server`
/// in an ancestor of the executable (`target/{debug,release}/meridian` sits two levels under
/// the repository) or of the working directory.
pub fn resolve_nats_server(flag: Option<&Path>) -> Result<PathBuf, UpError> {
    let named = flag.map(|p| (p.to_path_buf(), "--nats-server")).or_else(|| {
        std::env::var_os("MERIDIAN_NATS_SERVER")
            .filter(|v| !v.is_empty())
            .map(|v| (PathBuf::from(v), "MERIDIAN_NATS_SERVER"))
    });
    if let Some((path, source)) = named {
        return if path.is_file() {
            Ok(path)
        } else {
            Err(UpError::NatsMissing {
                tried: format!("{source} names {}, which is not a file", path.display()),
            })
        };
    }
    let mut starts = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        starts.push(exe);
    }
    if let Ok(cwd) = std::env::current_dir() {
        starts.push(cwd);
    }
    let mut tried = Vec::new();
    for start in &starts {
        for dir in start.ancestors().skip(1) {
            let candidate = dir.join(".tools/bin/nats-server");
            if candidate.is_file() {
                return Ok(candidate);
            }
            if dir.join("Cargo.toml").is_file() && dir.join("deploy").is_dir() {
                // The repository root: looking further up would find someone else's.
                tried.push(candidate.display().to_string());
                break;
            }
        }
    }
    if tried.is_empty() {
        tried.push("no repository with .tools/bin/nats-server above the executable or cwd".into());
    }
    Err(UpError::NatsMissing {
        tried: tried.join(", "),
    })
}

/// Reads the HS256 key, or makes one: it must outlive runs so issued tokens stay valid.
fn load_or_create_jwt_secret(path: &Path) -> Result<String, UpError> {
    match std::fs::read_to_string(path) {
        Ok(s) => {
            let s = s.trim().to_string();
            if s.len() < 32 {
                return Err(UpError::Invalid {
                    option: "jwt_secret",
                    reason: format!(
                        "{} holds fewer than 32 characters; delete it to have a new key generated \
                         (tokens issued with the old one stop working)",
                        path.display()
                    ),
                });
            }
            Ok(s)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            use rand::RngCore as _;
            let mut key = [0u8; JWT_SECRET_BYTES];
            rand::rngs::OsRng.fill_bytes(&mut key);
            let secret = hex::encode(key);
            write_file(path, format!("{secret}\n").as_bytes(), 0o600)?;
            Ok(secret)
        }
        Err(e) => Err(io_err(format!("cannot read {}", path.display()))(e)),
    }
}

/// Environment overrides of fields the launcher decides; inherited, they would move a
/// region away from the ports and files the launcher watches and publishes.
const OWNED_OVERRIDES: &[&str] = &[
    "MERIDIAN__REGION",
    "MERIDIAN__STORE",
    "MERIDIAN__BUS__NATS_URL",
    "MERIDIAN__BUS__REGION",
    "MERIDIAN__GATEWAY__REGION",
    "MERIDIAN__GATEWAY__LISTEN",
    "MERIDIAN__GATEWAY__JWT_SECRET",
    "MERIDIAN__GATEWAY__ADMIN_KEY",
    "MERIDIAN__GATEWAY__REGION_ENDPOINTS",
    "MERIDIAN__APPLIER__REGION",
];

/// Spawns the children.
struct Launcher {
    nats_bin: PathBuf,
    exe: PathBuf,
}

impl Launcher {
    fn spawn_nats(&self, plan: &Arc<RegionPlan>) -> Result<Proc, UpError> {
        let mut cmd = child_command(&self.nats_bin, &plan.nats_log(), "nats-server")?;
        cmd.arg("-c").arg(plan.nats_conf());
        Proc::spawn(cmd, "nats-server", plan)
    }

    fn spawn_region(&self, plan: &Arc<RegionPlan>) -> Result<Proc, UpError> {
        let mut cmd = child_command(&self.exe, &plan.region_log(), "region")?;
        cmd.arg("region").arg("--config").arg(plan.region_toml());
        for (key, _) in std::env::vars_os() {
            let Some(k) = key.to_str() else { continue };
            if OWNED_OVERRIDES.iter().any(|o| o.eq_ignore_ascii_case(k)) {
                cmd.env_remove(&key);
            }
        }
        Proc::spawn(cmd, "region", plan)
    }
}

/// A command with stdin closed, output appended to `log` (after a marker line so restarts
/// are easy to find), its own process group, and ties to the launcher's life.
fn child_command(program: &Path, log: &Path, what: &str) -> Result<Command, UpError> {
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
fn die_with_parent(cmd: &mut Command) {
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
fn die_with_parent(_cmd: &mut Command) {}

/// One running child.
struct Proc {
    what: &'static str,
    plan: Arc<RegionPlan>,
    child: Child,
    pid: u32,
    started: Instant,
}

impl Proc {
    fn spawn(mut cmd: Command, what: &'static str, plan: &Arc<RegionPlan>) -> Result<Proc, UpError> {
        let child = cmd.spawn().map_err(io_err(format!(
            "cannot start {what} for region {} ({:?})",
            plan.region,
            cmd.as_std().get_program()
        )))?;
        let pid = child.id().unwrap_or(0);
        Ok(Proc {
            what,
            plan: plan.clone(),
            child,
            pid,
            started: Instant::now(),
        })
    }

    fn log(&self) -> PathBuf {
        if self.what == "nats-server" {
            self.plan.nats_log()
        } else {
            self.plan.region_log()
        }
    }

    fn start_error(&self, reason: String) -> UpError {
        UpError::Start {
            region: self.plan.region.to_string(),
            what: self.what,
            reason,
            log: self.log().display().to_string(),
            tail: log_tail(&self.log(), 30),
        }
    }

    /// SIGTERM, up to `STOP_GRACE` for an ordered exit, then SIGKILL.
    async fn stop(mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // The child is not reaped yet (we hold it), so the pid cannot have been reused.
        // SAFETY: kill(2) with a pid we own and a valid signal number.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
        }
        match tokio::time::timeout(STOP_GRACE, self.child.wait()).await {
            Ok(status) => {
                let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                tracing::info!(region = %self.plan.region, what = self.what, pid = self.pid, %status, "stopped");
            }
            Err(_) => {
                tracing::warn!(region = %self.plan.region, what = self.what, pid = self.pid, "did not stop within {STOP_GRACE:?}; killing");
                let _ = self.child.kill().await;
            }
        }
    }
}

async fn wait_opt(p: &mut Option<Proc>) -> io::Result<ExitStatus> {
    match p {
        Some(p) => p.child.wait().await,
        None => futures::future::pending().await,
    }
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The processes of one region.
struct RegionProcs {
    plan: Arc<RegionPlan>,
    nats: Option<Proc>,
    region: Option<Proc>,
}

/// Starts every nats-server, then every region process, then waits for each to be ready.
/// Started processes are pushed to `running` as they start, so the caller can stop them on
/// error. `Ok(false)`: shutdown was requested meanwhile.
async fn start_all(
    layout: &Layout,
    launcher: &Launcher,
    running: &mut Vec<RegionProcs>,
    shutdown: &CancellationToken,
) -> Result<bool, UpError> {
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
        });
    }
    for r in running.iter_mut() {
        let nats = r.nats.as_mut().expect("just started");
        match wait_nats_ready(nats, shutdown).await {
            Ok(true) => {}
            Ok(false) => return Ok(false),
            Err(reason) => return Err(nats.start_error(reason)),
        }
        let region = launcher.spawn_region(&r.plan)?;
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

/// Waits until the nats-server accepts connections. `Ok(false)`: shutdown meanwhile.
async fn wait_nats_ready(nats: &mut Proc, shutdown: &CancellationToken) -> Result<bool, String> {
    let deadline = Instant::now() + NATS_READY_TIMEOUT;
    loop {
        match nats.child.try_wait() {
            Ok(Some(status)) => return Err(format!("exited with {status}")),
            Ok(None) => {}
            Err(e) => return Err(format!("cannot watch it: {e}")),
        }
        let connect = TcpStream::connect(("127.0.0.1", nats.plan.nats_port));
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

/// Stops region processes first, then nats-servers.
async fn stop_all(running: Vec<RegionProcs>) {
    let mut nats = Vec::new();
    let mut regions = Vec::new();
    for r in running {
        nats.extend(r.nats);
        regions.extend(r.region);
    }
    futures::future::join_all(regions.into_iter().map(Proc::stop)).await;
    futures::future::join_all(nats.into_iter().map(Proc::stop)).await;
}

/// `cluster.json`: what a client or a test needs to find the deployment.
#[derive(Serialize)]
struct ClusterDoc {
    admin_key: String,
    jwt_secret_file: String,
    data_dir: String,
    launcher_pid: u32,
    regions: BTreeMap<String, RegionEntry>,
}

#[derive(Serialize)]
struct RegionEntry {
    endpoint: String,
    nats: String,
    pids: Pids,
}

#[derive(Serialize)]
struct Pids {
    nats: u32,
    region: u32,
}

struct Cluster {
    path: PathBuf,
    doc: tokio::sync::Mutex<ClusterDoc>,
}

impl Cluster {
    async fn write(&self) -> Result<(), UpError> {
        let doc = self.doc.lock().await;
        let mut text = serde_json::to_string_pretty(&*doc).expect("plain data serializes");
        text.push('\n');
        // Under the lock: two supervisors restarting at once must not interleave renames
        // with stale contents. 0600: the file holds the admin key.
        write_file(&self.path, text.as_bytes(), 0o600)
    }

    async fn set_pid(&self, region: &RegionId, what: &str, pid: u32) {
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

fn print_ready(layout: &Layout, admin_key: &str, cluster: &Path) {
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
    let first = &layout.regions[0];
    let _ = writeln!(out, "  cluster  {}", cluster.display());
    let _ = writeln!(
        out,
        "  logs     {}/<region>/{{region,nats}}.log",
        layout.data_dir.display()
    );
    let _ = writeln!(out, "\nProvision a user:");
    let _ = writeln!(
        out,
        "  curl -sX PUT {}/v1/admin/users/ann -H 'X-Admin-Key: {admin_key}' -d '{{\"home_region\": \"{}\"}}'",
        first.endpoint(),
        first.region
    );
    let _ = writeln!(
        out,
        "\nCtrl-C stops everything (region processes first, then nats-servers)."
    );
    println!("{out}");
}

type ReadyWatch = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Keeps one region's processes running until `shutdown`, restarting whichever dies (the
/// nats-server first), then stops the region process and returns the nats-server for the
/// caller to stop after every region process is gone.
async fn supervise(
    mut r: RegionProcs,
    launcher: Arc<Launcher>,
    cluster: Arc<Cluster>,
    shutdown: CancellationToken,
) -> Option<Proc> {
    let region = r.plan.region.clone();
    let mut nats_restart = Restart::default();
    let mut region_restart = Restart::default();
    // Resolves when a restarted region answers /readyz again; only for the operator's log.
    let mut ready_watch: Option<ReadyWatch> = None;
    loop {
        let now = Instant::now();
        if r.nats.is_none() && now >= nats_restart.due {
            match launcher.spawn_nats(&r.plan) {
                Ok(mut p) => {
                    tracing::warn!(%region, pid = p.pid, "nats-server restarted");
                    cluster.set_pid(&region, p.what, p.pid).await;
                    // The region process reconnects on its own; waiting here just keeps a
                    // region restart from racing a server that is still recovering.
                    match wait_nats_ready(&mut p, &shutdown).await {
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
        if r.region.is_none() && r.nats.is_some() && now >= region_restart.due && !shutdown.is_cancelled() {
            match launcher.spawn_region(&r.plan) {
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
        let next_due = [
            r.nats.is_none().then_some(nats_restart.due),
            // Without its nats-server the region waits for that one's restart, not its own
            // (a past due time here would spin the loop).
            (r.region.is_none() && r.nats.is_some()).then_some(region_restart.due),
        ]
        .into_iter()
        .flatten()
        .min();
        tokio::select! {
            _ = shutdown.cancelled() => break,
            status = wait_opt(&mut r.nats) => {
                let p = r.nats.take().expect("waited on a running process");
                nats_restart.exited(&p, &status);
            }
            status = wait_opt(&mut r.region) => {
                let p = r.region.take().expect("waited on a running process");
                region_restart.exited(&p, &status);
                ready_watch = None;
            }
            _ = async { ready_watch.as_mut().expect("guarded").await }, if ready_watch.is_some() => {
                ready_watch = None;
            }
            _ = tokio::time::sleep_until(next_due.unwrap_or(now)), if next_due.is_some() => {}
        }
    }
    if let Some(p) = r.region.take() {
        p.stop().await;
    }
    r.nats
}

/// When to restart a process that died.
struct Restart {
    due: Instant,
    delay: Duration,
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
    fn exited(&mut self, p: &Proc, status: &io::Result<ExitStatus>) {
        let ran = p.started.elapsed();
        self.delay = if ran >= HEALTHY_RUN {
            RESTART_DELAY_MIN
        } else {
            (self.delay * 2).min(RESTART_DELAY_MAX)
        };
        self.due = Instant::now() + self.delay;
        tracing::warn!(
            region = %p.plan.region,
            what = p.what,
            pid = p.pid,
            status = %status.as_ref().map_or_else(|e| e.to_string(), |s| s.to_string()),
            ran_s = ran.as_secs_f64(),
            log = %p.log().display(),
            "exited unexpectedly; restarting in {:?}", self.delay
        );
    }

    fn failed_again(&mut self) {
        self.delay = (self.delay * 2).min(RESTART_DELAY_MAX);
        self.due = Instant::now() + self.delay;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(dir: &Path) -> UpOptions {
        UpOptions {
            regions: vec![RegionId::parse("us").unwrap(), RegionId::parse("eu").unwrap()],
            data_dir: dir.to_path_buf(),
            admin_key: "admin-key-admin-key".into(),
            port_base: 7000,
            nats_server: None,
            exe: None,
        }
    }

    #[test]
    fn ports_follow_the_documented_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(&opts(dir.path())).unwrap();
        let ports: Vec<_> = layout
            .regions
            .iter()
            .map(|p| (p.nats_port, p.gateway_port))
            .collect();
        assert_eq!(ports, vec![(7000, 7001), (7010, 7011)]);
        assert!(layout.data_dir.is_absolute());
    }

    #[test]
    fn bad_options_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = |o: UpOptions| Layout::new(&o).err().expect("invalid").to_string();
        let mut o = opts(dir.path());
        o.admin_key = "short".into();
        assert!(err(o).contains("--admin-key"));
        let mut o = opts(dir.path());
        o.port_base = 65530;
        assert!(err(o).contains("--port-base"));
        let mut o = opts(dir.path());
        o.regions.push(RegionId::parse("us").unwrap());
        assert!(err(o).contains("listed twice"));
    }

    #[test]
    fn generated_region_file_loads_and_secret_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(&opts(dir.path())).unwrap();
        let secret_path = layout.data_dir.join("jwt_secret");
        let secret = load_or_create_jwt_secret(&secret_path).unwrap();
        assert_eq!(secret.len(), 2 * JWT_SECRET_BYTES);
        assert_eq!(load_or_create_jwt_secret(&secret_path).unwrap(), secret);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&secret_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let endpoints = BTreeMap::from([("us".to_string(), "http://127.0.0.1:7001".to_string())]);
        let plan = &layout.regions[0];
        plan.write_files(&secret, "admin-key-admin-key", &endpoints)
            .unwrap();
        let cfg = RegionConfig::load(&plan.region_toml(), Vec::new()).unwrap();
        assert_eq!(cfg.gateway.listen.port(), 7001);
        assert_eq!(cfg.bus.nats_url, "nats://127.0.0.1:7000");
        assert_eq!(cfg.gateway.jwt_secret, secret);
        assert!(cfg.store.starts_with("embedded:///"));
        let conf = std::fs::read_to_string(plan.nats_conf()).unwrap();
        assert!(conf.contains("port: 7000"));
    }
}
