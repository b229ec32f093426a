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
//! The data dir is created 0700 (an existing one open to other users is refused): it holds
//! the keys and every message. The admin key is never printed or written anywhere but the
//! region files (0600), which the region processes need it in.
//! - `jwt_secret` (0600): the HS256 key, generated once so tokens survive restarts; a key
//!   file others can read is refused (see `load_or_create_jwt_secret`).
//! - `cluster.json` (0600): endpoints and pids, written (atomically) once every region is
//!   ready and again whenever a process is restarted. A stale one is removed at start, so its
//!   presence means "this run is ready".
//! - `<region>/nats.conf` (with the nkey user the server accepts: public key only), `nats.log`,
//!   `jetstream/`: the region's nats-server, which refuses clients without credentials.
//! - `<region>/nats-region.nk` (0600): the region process's nkey seed, new every start.
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

use meridian_bus::{
    nats_server_auth_config, nats_server_config, BusRole, Durability, NatsServerSpec, RoleCredentials,
};
use meridian_model::RegionId;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::RegionConfig;

mod plan;
mod process;
mod supervise;

use plan::*;
use process::*;
use supervise::*;

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
#[derive(Clone)]
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

impl std::fmt::Debug for UpOptions {
    // Written out so the admin key never reaches a log line or a panic message.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpOptions")
            .field("regions", &self.regions)
            .field("data_dir", &self.data_dir)
            .field("admin_key", &"<redacted>")
            .field("port_base", &self.port_base)
            .field("nats_server", &self.nats_server)
            .field("exe", &self.exe)
            .finish()
    }
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
    print_ready(&layout, &cluster.path);

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
    fn debug_output_hides_the_admin_key() {
        let shown = format!("{:?}", opts(Path::new("/x")));
        assert!(
            !shown.contains("admin-key-admin-key") && shown.contains("<redacted>"),
            "{shown}"
        );
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
        assert_eq!(mode(&secret_path), 0o600);

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
        // The server accepts only the region's nkey user, whose seed the region file names.
        assert!(conf.contains("authorization {") && conf.contains("nkey: \"U"));
        assert_eq!(cfg.bus.role, Some(BusRole::Region));
        let seed_file = cfg
            .bus
            .nkey_seed_file
            .clone()
            .expect("the region file names the seed");
        assert_eq!(mode(&seed_file), 0o600);
        let seed = std::fs::read_to_string(&seed_file).unwrap();
        assert!(seed.starts_with("SU") && !conf.contains(seed.trim()));
    }

    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn set_mode(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn item8_data_dir_is_created_0700_and_an_open_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(&dir.path().join("new/data"));
        let layout = Layout::new(&o).unwrap();
        assert_eq!(mode(&layout.data_dir), 0o700, "a new data dir");
        set_mode(&layout.data_dir, 0o755);
        o.data_dir = layout.data_dir.clone();
        Layout::new(&o).unwrap();
        assert_eq!(mode(&layout.data_dir), 0o700, "an empty one is made private");
        std::fs::write(layout.data_dir.join("jwt_secret"), "x").unwrap();
        set_mode(&layout.data_dir, 0o755);
        let err = Layout::new(&o)
            .err()
            .expect("an open data dir is refused")
            .to_string();
        assert!(
            err.contains("--data-dir") && err.contains(&layout.data_dir.display().to_string()),
            "{err}"
        );
        assert_eq!(mode(&layout.data_dir), 0o755, "refused, not changed");
    }

    #[test]
    fn item8_jwt_secret_readable_by_others_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwt_secret");
        let secret = load_or_create_jwt_secret(&path).unwrap();
        set_mode(&path, 0o644);
        let err = load_or_create_jwt_secret(&path)
            .expect_err("a key others can read is refused")
            .to_string();
        assert!(
            err.contains(&path.display().to_string()) && err.contains("chmod 600"),
            "{err}"
        );
        set_mode(&path, 0o600);
        assert_eq!(load_or_create_jwt_secret(&path).unwrap(), secret);
    }
}
