//! `meridian up`: a whole local deployment in the foreground. Per region it runs one
//! nats-server and one region process (`meridian region --config ...`: gateway + applier +
//! sweeper over the embedded store), restarts whichever dies, and stops them in order.
//!
//! # Regions linked (two or more)
//! Every region's JetStream is its own domain (the region id) and holds a mirror of every
//! other region's stream (`mirrors` in its region.toml lists the other regions), so every
//! region applies every region's events. The nats-servers are linked the way production
//! links them (regions/README.md): a hub nats-server without JetStream listens for leafnodes,
//! and each region's nats-server has a leafnode remote to it. That remote goes through a WAN
//! link proxy run inside this process (`meridian_chaos::LinkProxy`, one per region): with
//! `--wan-delay D` each region-to-hub link adds `D/2` each way, so the one-way latency between
//! two regions is `D` (and a round trip `2D`); `--wan-jitter J` adds up to `J/2` per link,
//! and `--wan-loss P` loses a chunk with probability `1 - sqrt(1 - P)` per link, about `P`
//! region to region (a lost chunk costs a 200 ms retransmission timeout; see the chaos
//! crate). With one region there is no hub, no proxy and no mirror.
//!
//! # Ports
//! Region `i` (0-based, in `--regions` order) owns the block `port_base + 10*i ..+10`:
//! `+0` is its nats-server client port, `+1` its gateway and `+2` its WAN link proxy (the
//! address its nats-server's leafnode remote dials; only with two or more regions); the other
//! seven are reserved (monitoring, more links) so adding them later moves no existing port.
//! The block after the last region's, `port_base + 10*n`, is the launcher's: with two or
//! more regions `+0` is the hub's client port and `+1` its leafnode port; `+2` is the
//! control API (always, one region too). With the default base 7000 and `--regions
//! us,eu,ap`: us 7000/7001/7002, eu 7010/7011/7012, ap 7020/7021/7022, the hub 7030
//! (clients) and 7031 (leafnodes), and the control API 7032.
//!
//! # Control API (the drills' hands; docs/api.md has the shapes)
//! `http://127.0.0.1:<port_base + 10*n + 2>`, named `control` in cluster.json, every call
//! with `X-Admin-Key` (the deployment's admin key, compared in constant time; 401 without):
//! - `GET /control`: per region the pid and state (`running`, `stopped` by SIGSTOP, `down`)
//!   of its nats-server and region process, whether it is held, its clock offset and its
//!   link's shape; the hub's pid and state.
//! - `POST /control/signal {target: "<r>/nats"|"<r>/region"|"hub", signal: KILL|TERM|STOP|CONT}`:
//!   the supervisor that holds the process sends it, so the pid is never stale (a child is
//!   reaped only by its supervisor); a killed process is restarted as any other that dies.
//! - `POST /control/hold {region, hold}`: a held region's supervisor restarts nothing of
//!   it; released, it restarts what is down, nats-server first.
//! - `PUT /control/links/<r> {delay_ms?, jitter_ms?, loss?, cut?}`: the region's WAN link
//!   proxy (`LinkHandle::set_shape`, `cut`, `heal`); the values are that one link's, one way.
//! - `PUT /control/clock/<r> {offset_ms}`: kept for every later start of the region
//!   process, which gets it as `MERIDIAN__GATEWAY__CLOCK_OFFSET_MS` (set by the launcher
//!   whatever it inherited; its initial value is the launcher's own, else 0); the running
//!   one is restarted now (SIGTERM, then its supervisor starts it again). The offset is
//!   checked against the region file first, so a bad one is a 400, not a crash loop.
//!
//! The control server is a task of the launcher and stops first at shutdown; then the
//! supervisors stop, so no call starts a process while the deployment is stopping.
//!
//! # Files (under the data dir; nothing is removed on exit, so a restart keeps all data)
//! The data dir is created 0700 (an existing one open to other users is refused): it holds
//! the keys and every message. The admin key is never printed or written anywhere but the
//! region files (0600), which the region processes need it in.
//! - `jwt_secret` (0600): the HS256 key, generated once so tokens survive restarts; a key
//!   file others can read is refused (see `load_or_create_jwt_secret`).
//! - `cluster.json` (0600): endpoints, pids, each region's streams (its own, then its
//!   mirrors) and link proxy, the hub, and the control API's URL; written (atomically) once every region is ready and
//!   again whenever a process is restarted. A stale one is removed at start, so its presence
//!   means "this run is ready".
//! - `<region>/nats.conf` (with the nkey user the server accepts: public key only, and the
//!   leafnode remote with this run's leaf password), `nats.log`, `jetstream/`: the region's
//!   nats-server, which refuses clients without credentials.
//! - `<region>/nats-region.nk` (0600): the region process's nkey seed, new every start.
//! - `<region>/region.toml` (0600: it holds the keys), `region.log`, `store/`: the region
//!   process and its embedded store.
//! - `hub/nats.conf` (0600: the leaf passwords, new every start), `hub/nats.log`: the hub.
//!
//! # Processes
//! Children get their own process group, so a terminal's Ctrl-C reaches only the launcher,
//! which then stops them in order: the control API first, then every region process
//! (SIGTERM and SIGCONT, 10 s, SIGKILL),
//! then every region's nats-server the same way, then the hub, and last the link proxies (so
//! nothing sees its link cut while it shuts down). On Linux each child also gets
//! `PR_SET_PDEATHSIG`, so even a SIGKILLed launcher leaves no orphans; `kill_on_drop` covers
//! the remaining paths (a panicking task).

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
    nats_hub_config, nats_server_auth_config, nats_server_config, BusRole, Durability, HubSpec, LeafRemote,
    NatsServerSpec, RoleCredentials,
};
use meridian_chaos::{LinkConfig, LinkHandle, LinkProxy};
use meridian_model::RegionId;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::RegionConfig;

mod control;
mod plan;
mod process;
mod supervise;

use control::*;
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
/// How long the regions' links to the hub may take to come up at start.
const LINK_TIMEOUT: Duration = Duration::from_secs(30);
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
    /// What the links between regions do to their traffic (two or more regions).
    pub wan: WanOptions,
    /// Every region's durability level (docs/design.md §6): `disk` and `geo` render
    /// `sync_interval: always` into its nats.conf; the region file's `gateway.durability`
    /// says the level its sends get by default.
    pub durability: Durability,
}

/// The WAN between regions, as seen region to region (each region's link to the hub carries
/// half; see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct WanOptions {
    /// One-way latency between two regions.
    pub delay: Duration,
    /// Extra one-way latency, up to this much, per chunk.
    pub jitter: Duration,
    /// Probability (0.0..=1.0) that a chunk between two regions is lost and retransmitted.
    pub loss: f64,
}

impl WanOptions {
    /// The link of one region to the hub: half the delay and jitter, and the loss that, met
    /// twice, gives `loss`.
    fn link(&self, listen: std::net::SocketAddr, upstream: std::net::SocketAddr) -> LinkConfig {
        let mut link = LinkConfig::new(listen, upstream);
        link.delay = self.delay / 2;
        link.jitter = self.jitter / 2;
        link.loss = self.link_loss();
        link
    }

    /// Lost on one link with this probability, a chunk crossing two links is lost with
    /// probability `loss`.
    fn link_loss(&self) -> f64 {
        1.0 - (1.0 - self.loss.clamp(0.0, 1.0)).sqrt()
    }

    fn is_none(&self) -> bool {
        *self == WanOptions::default()
    }
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
            .field("wan", &self.wan)
            .field("durability", &self.durability)
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
    #[error("linking the regions: {reason}")]
    Link { reason: String },
    #[error("the generated region file {path} is invalid: {source}")]
    Config {
        path: String,
        #[source]
        source: crate::config::ConfigError,
    },
    #[error("{what} of {owner} did not start: {reason}\n--- last lines of {log} ---\n{tail}")]
    Start {
        /// "region us", "the hub".
        owner: String,
        what: &'static str,
        reason: String,
        log: String,
        tail: String,
    },
}

/// Parses a duration flag: a number with a unit, `us`, `ms` or `s` (`40ms`, `1.5s`), or `0`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("{text:?} has no unit; write e.g. 40ms or 1.5s"))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a number"))?;
    let seconds = match unit {
        "us" => number / 1e6,
        "ms" => number / 1e3,
        "s" => number,
        "m" | "min" => number * 60.0,
        "h" => number * 3600.0,
        _ => return Err(format!("{text:?}: unit {unit:?} is not one of us, ms, s, m, h")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
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
        for (port, what) in [(plan.nats_port, "nats-server"), (plan.gateway_port, "gateway")]
            .into_iter()
            .chain(plan.link_port.map(|p| (p, "WAN link proxy")))
        {
            check_port_free(port, what, &format!("region {}", plan.region))?;
        }
    }
    if let Some(hub) = &layout.hub {
        check_port_free(hub.port, "client port", "hub")?;
        check_port_free(hub.leaf_port, "leafnode port", "hub")?;
    }
    check_port_free(layout.control_port, "control API", "the launcher")?;
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
    // One leafnode login per region, new every start like the nkeys.
    let leaf_logins: Vec<LeafLogin> = layout
        .regions
        .iter()
        .map(|p| LeafLogin::generate(&p.region))
        .collect();
    // Per region, the streams its applier applies: its own, then its mirrors.
    let mut streams = BTreeMap::new();
    let mut configs = Vec::new();
    for (plan, login) in layout.regions.iter().zip(&leaf_logins) {
        let cfg = plan.write_files(&jwt_secret, &opts.admin_key, &endpoints, login)?;
        let applied: Vec<String> = std::iter::once(&cfg.region)
            .chain(&cfg.bus.mirrors)
            .map(|r| cfg.bus.stream_name(r))
            .collect();
        streams.insert(cfg.region.to_string(), applied);
        configs.push(cfg);
    }
    if let Some(hub) = &layout.hub {
        hub.write_conf(&leaf_logins)?;
    }
    let launcher = Arc::new(Launcher { nats_bin, exe });

    println!(
        "meridian up: {} region(s) in {} (nats-server: {})",
        layout.regions.len(),
        layout.data_dir.display(),
        launcher.nats_bin.display()
    );
    // The links stop last, after every process that uses them: their own token.
    let links_stop = CancellationToken::new();
    let (links, link_handles) = match start_links(&layout, opts.wan, &links_stop).await {
        Ok(links) => links,
        Err(e) => {
            links_stop.cancel();
            return Err(e);
        }
    };
    let mut running = Vec::new();
    let mut hub = None;
    let prepare = link_streams(&layout, &configs, &leaf_logins);
    match start_all(&layout, &launcher, &mut hub, &mut running, prepare, &shutdown).await {
        Ok(true) => {}
        Ok(false) => {
            println!("meridian up: interrupted while starting; stopping");
            stop_all(running, hub).await;
            stop_links(links, links_stop).await;
            return Ok(());
        }
        Err(e) => {
            stop_all(running, hub).await;
            stop_links(links, links_stop).await;
            return Err(e);
        }
    }

    // Bound before cluster.json names it, so whoever reads the file finds it listening.
    let control_addr = (std::net::Ipv4Addr::LOCALHOST, layout.control_port);
    let control_listener = match tokio::net::TcpListener::bind(control_addr).await {
        Ok(l) => l,
        Err(e) => {
            stop_all(running, hub).await;
            stop_links(links, links_stop).await;
            return Err(UpError::Invalid {
                option: "--port-base",
                reason: format!(
                    "port {} (control API of the launcher) is not free: {e}",
                    layout.control_port
                ),
            });
        }
    };
    let cluster = Arc::new(Cluster {
        path: cluster_path,
        doc: tokio::sync::Mutex::new(ClusterDoc {
            jwt_secret_file: jwt_secret_file.display().to_string(),
            data_dir: layout.data_dir.display().to_string(),
            launcher_pid: std::process::id(),
            control: format!("http://127.0.0.1:{}", layout.control_port),
            region_order: layout.regions.iter().map(|p| p.region.to_string()).collect(),
            hub: layout.hub.as_ref().map(|h| HubEntry {
                nats: h.nats_url(),
                leaf_port: h.leaf_port,
                pid: hub.as_ref().map_or(0, |p| p.pid),
            }),
            regions: running
                .iter()
                .map(|r| {
                    let entry = RegionEntry {
                        endpoint: r.plan.endpoint(),
                        nats: r.plan.nats_url(),
                        streams: streams.remove(r.plan.region.as_str()).unwrap_or_default(),
                        link_proxy: r.plan.link_port.map(|p| format!("127.0.0.1:{p}")),
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
        stop_all(running, hub).await;
        stop_links(links, links_stop).await;
        return Err(e);
    }
    print_ready(&layout, &cluster.path);

    // The supervisors stop after the control API, so a call in flight is carried out (or
    // refused) by a supervisor still there to answer it, and none starts a process after.
    let supervisors_stop = CancellationToken::new();
    let mut control = ControlState {
        admin_key: opts.admin_key.clone(),
        regions: BTreeMap::new(),
        hub: None,
    };
    let hub_supervisor = layout.hub.clone().map(|plan| {
        let (controlled, supervised) = control_channel(ProcStatus::of(&hub));
        control.hub = Some(controlled);
        tokio::spawn(supervise_hub(
            hub.take(),
            supervised,
            plan,
            launcher.clone(),
            cluster.clone(),
            supervisors_stop.clone(),
        ))
    });
    let supervisors: Vec<_> = running
        .into_iter()
        .map(|r| {
            let (controlled, supervised) = control_channel(RegionStatus::of(&r));
            let name = r.plan.region.to_string();
            let entry = ControlledRegion {
                plan: r.plan.clone(),
                supervisor: controlled,
                link: link_handles.get(&name).cloned(),
            };
            control.regions.insert(name, entry);
            tokio::spawn(supervise(
                r,
                supervised,
                launcher.clone(),
                cluster.clone(),
                supervisors_stop.clone(),
            ))
        })
        .collect();
    let mut control_server = tokio::spawn(control::serve(control_listener, control, shutdown.clone()));
    // The control API stops first (it ends on `shutdown`), then the supervisors.
    shutdown.cancelled().await;
    if tokio::time::timeout(CONTROL_STOP_TIMEOUT, &mut control_server)
        .await
        .is_err()
    {
        tracing::warn!(
            "the control API did not finish its calls within {CONTROL_STOP_TIMEOUT:?}; dropping them"
        );
        control_server.abort();
    }
    supervisors_stop.cancel();
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
    if let Some(s) = hub_supervisor {
        match s.await {
            Ok(Some(p)) => p.stop().await,
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "the hub supervisor panicked"),
        }
    }
    stop_links(links, links_stop).await;
    println!("meridian up: stopped");
    Ok(())
}

/// The link proxies' tasks, and their handles by region (for the control API).
type Links = (Vec<tokio::task::JoinHandle<()>>, BTreeMap<String, LinkHandle>);

/// Binds and starts each region's link proxy (region nats-server -> hub leafnode port).
async fn start_links(layout: &Layout, wan: WanOptions, stop: &CancellationToken) -> Result<Links, UpError> {
    let mut handles = BTreeMap::new();
    let Some(hub) = &layout.hub else {
        return Ok((Vec::new(), handles));
    };
    let mut links = Vec::new();
    for plan in &layout.regions {
        let Some(port) = plan.link_port else { continue };
        let localhost = std::net::Ipv4Addr::LOCALHOST;
        let cfg = wan.link((localhost, port).into(), (localhost, hub.leaf_port).into());
        let proxy = LinkProxy::bind(cfg).await.map_err(|e| UpError::Invalid {
            option: "--port-base",
            reason: format!("WAN link proxy of region {}: {e}", plan.region),
        })?;
        println!(
            "  {}: WAN link proxy on 127.0.0.1:{port} -> hub leafnode port {} ({})",
            plan.region,
            hub.leaf_port,
            if wan.is_none() {
                "no added delay".to_string()
            } else {
                format!(
                    "{:?} one way to the hub, jitter up to {:?}, loss {:.4}",
                    wan.delay / 2,
                    wan.jitter / 2,
                    wan.link_loss()
                )
            }
        );
        handles.insert(plan.region.to_string(), proxy.handle());
        links.push(tokio::spawn(proxy.run(stop.clone())));
    }
    Ok((links, handles))
}

/// Before any region process starts (and creates its mirrors): creates each region's own
/// stream, then waits until every region's JetStream answers for it through the hub. A mirror
/// created while its origin stream is missing or its link is still connecting does not attach
/// until nats-server retries it, 10 s or more later (and longer after each failure), so the
/// first minutes of a fresh deployment would not replicate; in this order every mirror
/// attaches at once. Nothing to do for a lone region.
async fn link_streams(
    layout: &Layout,
    configs: &[RegionConfig],
    logins: &[LeafLogin],
) -> Result<(), UpError> {
    let (Some(hub), Some(login)) = (&layout.hub, logins.first()) else {
        return Ok(());
    };
    let link_err = |reason: String| UpError::Link { reason };
    for cfg in configs {
        // The region's own login: its permissions allow creating its stream.
        let bus = meridian_bus::Bus::connect(cfg.bus.clone()).await.map_err(|e| {
            link_err(format!(
                "cannot connect to region {}'s nats-server: {e}",
                cfg.region
            ))
        })?;
        bus.ensure_stream()
            .await
            .map_err(|e| link_err(format!("cannot create region {}'s stream: {e}", cfg.region)))?;
    }
    // The hub's client port takes the leaf logins; from there `$JS.<domain>.API` of every
    // region is reachable exactly when that region's link is up.
    let hub_client =
        async_nats::ConnectOptions::with_user_and_password(login.user.clone(), login.password.clone())
            .connect(hub.nats_url())
            .await
            .map_err(|e| link_err(format!("cannot connect to the hub: {e}")))?;
    let deadline = Instant::now() + LINK_TIMEOUT;
    for cfg in configs {
        let stream = cfg.bus.stream_name(&cfg.region);
        let subject = format!("$JS.{}.API.STREAM.INFO.{stream}", cfg.bus.domain());
        loop {
            let answer =
                tokio::time::timeout(POLL * 10, hub_client.request(subject.clone(), "".into())).await;
            let last = match answer {
                Ok(Ok(msg)) => match serde_json::from_slice::<serde_json::Value>(&msg.payload) {
                    Ok(info) if info.get("error").is_none() => break,
                    Ok(info) => info["error"].to_string(),
                    Err(e) => e.to_string(),
                },
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no answer".to_string(),
            };
            if Instant::now() > deadline {
                return Err(link_err(format!(
                    "region {}'s stream {stream} is not reachable through the hub within \
                     {LINK_TIMEOUT:?}: {last}",
                    cfg.region
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }
    Ok(())
}

async fn stop_links(links: Vec<tokio::task::JoinHandle<()>>, stop: CancellationToken) {
    stop.cancel();
    futures::future::join_all(links).await;
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
            wan: WanOptions::default(),
            durability: Durability::Process,
        }
    }

    #[test]
    fn durations_parse_with_their_unit() {
        assert_eq!(parse_duration("40ms"), Ok(Duration::from_millis(40)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["40", "ms", "4d", "-1ms", "1e3ms"] {
            assert!(parse_duration(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn linked_regions_get_a_hub_block_and_link_ports() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(dir.path());
        o.regions.push(RegionId::parse("ap").unwrap());
        let layout = Layout::new(&o).unwrap();
        let links: Vec<_> = layout.regions.iter().map(|p| p.link_port).collect();
        assert_eq!(links, vec![Some(7002), Some(7012), Some(7022)]);
        let hub = layout
            .hub
            .as_ref()
            .expect("three regions are linked through a hub");
        assert_eq!((hub.port, hub.leaf_port), (7030, 7031));
        assert_eq!(layout.control_port, 7032, "the control API follows the hub");
        let mirrors: Vec<String> = layout.regions[1].mirrors.iter().map(|r| r.to_string()).collect();
        assert_eq!(mirrors, vec!["us", "ap"]);

        o.regions.truncate(1);
        let layout = Layout::new(&o).unwrap();
        assert!(layout.hub.is_none() && layout.regions[0].link_port.is_none());
        assert_eq!(
            layout.control_port, 7012,
            "one region: the block after it all the same"
        );
        assert!(layout.regions[0].mirrors.is_empty());
        o.wan.delay = Duration::from_millis(40);
        let err = Layout::new(&o)
            .err()
            .expect("a WAN needs two regions")
            .to_string();
        assert!(err.contains("--wan-delay"), "{err}");
    }

    #[test]
    fn each_link_carries_half_the_wan() {
        let wan = WanOptions {
            delay: Duration::from_millis(40),
            jitter: Duration::from_millis(10),
            loss: 0.0199,
        };
        let a = "127.0.0.1:1".parse().unwrap();
        let link = wan.link(a, a);
        assert_eq!(
            (link.delay, link.jitter),
            (Duration::from_millis(20), Duration::from_millis(5))
        );
        // Two links in a row lose a chunk with probability 1 - (1 - p)^2 = wan.loss.
        let both = 1.0 - (1.0 - link.loss).powi(2);
        assert!((both - wan.loss).abs() < 1e-9, "{both}");
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
        let mut o = opts(dir.path());
        o.regions.truncate(1);
        o.durability = Durability::Geo;
        assert!(err(o).contains("--durability"));
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
        let login = LeafLogin::generate(&plan.region);
        let written = plan
            .write_files(&secret, "admin-key-admin-key", &endpoints, &login)
            .unwrap();
        let cfg = RegionConfig::load(&plan.region_toml(), Vec::new()).unwrap();
        assert_eq!(written.bus.mirrors, cfg.bus.mirrors);
        // Linked: us mirrors eu, in its own JetStream domain, and its leafnode remote dials
        // its link proxy with this run's login.
        assert_eq!(cfg.bus.mirrors, vec![RegionId::parse("eu").unwrap()]);
        assert_eq!(cfg.bus.domain.as_deref(), Some("us"));
        assert_eq!(cfg.gateway.listen.port(), 7001);
        assert_eq!(cfg.bus.nats_url, "nats://127.0.0.1:7000");
        assert_eq!(cfg.gateway.jwt_secret, secret);
        assert!(cfg.store.starts_with("embedded:///"));
        let conf = std::fs::read_to_string(plan.nats_conf()).unwrap();
        assert!(conf.contains("port: 7000"));
        assert!(
            conf.contains(&format!("{}:{}@127.0.0.1:7002", login.user, login.password)),
            "{conf}"
        );
        assert_eq!(mode(&plan.nats_conf()), 0o600);
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

    #[test]
    fn item4_durability_renders_the_fsync_setting_and_the_gateways_level() {
        for (level, fsyncs) in [
            (Durability::Process, false),
            (Durability::Disk, true),
            (Durability::Geo, true),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let mut o = opts(dir.path());
            o.durability = level;
            let layout = Layout::new(&o).unwrap();
            let secret = load_or_create_jwt_secret(&layout.data_dir.join("jwt_secret")).unwrap();
            let endpoints = BTreeMap::from([("us".to_string(), "http://127.0.0.1:7001".to_string())]);
            for plan in &layout.regions {
                let login = LeafLogin::generate(&plan.region);
                plan.write_files(&secret, "admin-key-admin-key", &endpoints, &login)
                    .unwrap();
                let conf = std::fs::read_to_string(plan.nats_conf()).unwrap();
                assert_eq!(conf.contains("sync_interval: always"), fsyncs, "{level}: {conf}");
                let cfg = RegionConfig::load(&plan.region_toml(), Vec::new()).unwrap();
                assert_eq!(cfg.gateway.durability, level);
            }
        }
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
