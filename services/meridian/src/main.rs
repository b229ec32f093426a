//! The `meridian` binary: parses arguments and calls the library (`meridian::up`,
//! `meridian::region`). SIGTERM or SIGINT stops the running command in order; a second one
//! exits at once.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use std::time::Duration;

use meridian::bench::{self, BenchOptions};
use meridian::config::RegionConfig;
use meridian::logging::{self, LogFormat, LOG_FORMAT_ENV};
use meridian::region::{self, Roles};
use meridian::up::{self, UpOptions};
use meridian_model::RegionId;

// glibc malloc/free were ~15 % of the region process in the W1 profile (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "meridian", version, about = "Meridian: a multi-region IM backend")]
struct Cli {
    /// Log lines as text or as JSON objects (for log shippers); processes `up` starts
    /// inherit it. The level filter is RUST_LOG (default info).
    #[arg(long, global = true, env = LOG_FORMAT_ENV, value_enum, ignore_case = true, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a local deployment in the foreground: per region a nats-server and a region
    /// process over the embedded store, restarted when they die. Region i uses ports
    /// PORT_BASE+10*i (nats) and PORT_BASE+10*i+1 (gateway).
    Up(UpArgs),
    /// Run every role of a region (gateway, applier, inbox sweeper) in this process; the
    /// only choice with the embedded store, which one process opens at a time.
    Region(RoleArgs),
    /// Run only the gateway of a region (needs a shared store: tikv://).
    Gateway(RoleArgs),
    /// Run only the applier (and inbox sweeper) of a region (needs a shared store: tikv://).
    Applier(RoleArgs),
    /// The load generator: drive a deployment (its cluster.json) or one it starts, print a
    /// table while it runs and write a JSON report (docs/benchmarks.md explains the workloads).
    Bench(BenchArgs),
    /// Make a production region's NATS users: an nkey seed per role (gateway, applier, region;
    /// 0600, for bus.nkey_seed_file) and the nats-server authorization block with each role's
    /// permissions, plus a tls block with --tls-cert/--tls-key, to include from the server's
    /// configuration.
    NatsAuth(NatsAuthArgs),
    /// Operator commands against a running deployment (its cluster.json; the admin key in
    /// MERIDIAN_ADMIN_KEY): region failover and failback, search reindex, waiting and
    /// printing progress.
    #[command(subcommand)]
    Admin(AdminCmd),
    /// A chaos drill (chaos/README.md): a workload in every region, one scenario's faults
    /// (region-loss, partition, slow-link, crash-soak, clock-skew), the invariants checked at
    /// the end, and report.json + report.svg in --out. Against --cluster (its admin key in
    /// MERIDIAN_ADMIN_KEY), or a deployment of --regions it starts itself. Exits 1 when an
    /// invariant is violated.
    Drill(DrillArgs),
}

#[derive(Args)]
struct DrillArgs {
    /// region-loss, partition, slow-link, crash-soak or clock-skew.
    scenario: meridian_chaos::drill::Scenario,
    /// A running deployment's cluster.json (started by `meridian up`, whose control API the
    /// drill uses); without it, a deployment of --regions is started for the drill.
    #[arg(long)]
    cluster: Option<PathBuf>,
    /// The regions of the deployment the drill starts (without --cluster).
    #[arg(long, value_delimiter = ',', default_value = "us,eu,ap")]
    regions: Vec<String>,
    /// How long the workload runs, faults included (e.g. 60s, 10m).
    #[arg(long, value_parser = up::parse_duration, default_value = "60s")]
    duration: Duration,
    /// Where the run's folder (<scenario>-<UTC time>/report.json, report.svg) goes
    /// [default: with --cluster, the deployment's <data dir>/drills, which its console
    /// lists; else ./drills].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Sends per second, all regions together.
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    /// Simulated users per region (each with one device and a WebSocket).
    #[arg(long, default_value_t = 4)]
    users_per_region: usize,
    /// The region the fault hits (region-loss, partition, clock-skew) [default: the second].
    #[arg(long)]
    target: Option<String>,
    /// region-loss: hang the region with SIGSTOP instead of killing it.
    #[arg(long)]
    hang: bool,
    /// clock-skew: the target region's clock offset in ms (negative: behind).
    #[arg(long, default_value_t = 5_000, allow_hyphen_values = true)]
    skew_ms: i64,
    /// slow-link: one-way delay added between two regions.
    #[arg(long, value_parser = up::parse_duration, default_value = "150ms")]
    delay: Duration,
    /// slow-link: extra one-way delay, up to this much per chunk.
    #[arg(long, value_parser = up::parse_duration, default_value = "50ms")]
    jitter: Duration,
    /// slow-link: probability (0.0-1.0) a chunk between two regions is lost (and costs a
    /// retransmission timeout).
    #[arg(long, default_value_t = 0.02)]
    loss: f64,
    /// crash-soak: mean time between two kills.
    #[arg(long, value_parser = up::parse_duration, default_value = "5s")]
    crash_every: Duration,
    /// How long the regions get to converge after the workload stops.
    #[arg(long, value_parser = up::parse_duration, default_value = "120s")]
    converge_timeout: Duration,
    /// Seed of the workload and the crash schedule [default: random, written in the report].
    #[arg(long)]
    seed: Option<u64>,
}

#[derive(Subcommand)]
enum AdminCmd {
    /// Move a failed region's users to the acting region `--to`.
    Failover(MoveArgs),
    /// Bring a region's users home; retried while the home region is not caught up.
    Failback(MoveArgs),
    /// Rebuild a region's search index from its store; waits until it has caught up.
    Reindex(ReindexArgs),
}

#[derive(Args)]
struct ReindexArgs {
    /// The deployment's cluster.json (regions and their endpoints).
    #[arg(long)]
    cluster: PathBuf,
    /// The region whose index is rebuilt.
    #[arg(long)]
    region: String,
    /// Give up waiting after this many seconds (the rebuild goes on).
    #[arg(long, default_value_t = 600)]
    wait_secs: u64,
}

#[derive(Args)]
struct MoveArgs {
    /// The deployment's cluster.json (regions and their endpoints).
    #[arg(long)]
    cluster: PathBuf,
    /// The region whose users move.
    #[arg(long)]
    region: String,
    /// Failover: the acting region.
    #[arg(long)]
    to: Option<String>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120)]
    wait_secs: u64,
}

#[derive(Args)]
struct NatsAuthArgs {
    #[arg(long)]
    region: String,
    /// The regions whose streams this region mirrors (its region file's `bus.mirrors`),
    /// comma-separated: the applier's user may manage those mirrors, the gateway's read them.
    #[arg(long, value_delimiter = ',')]
    mirrors: Vec<String>,
    /// Where the files go (created 0700; existing credentials are not overwritten).
    #[arg(long)]
    out: PathBuf,
    /// The server's TLS certificate (PEM).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The server's TLS key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA whose client certificates the server requires (mutual TLS).
    #[arg(long, requires = "tls_cert")]
    tls_ca: Option<PathBuf>,
}

#[derive(Args)]
struct BenchArgs {
    /// A running deployment's cluster.json (its admin key in MERIDIAN_ADMIN_KEY: the file does
    /// not hold it); without it, a one-region deployment is started in a temporary directory
    /// for the run.
    #[arg(long)]
    cluster: Option<PathBuf>,
    /// Workloads: w1 (one-to-one), w2 (groups), w3 (offline then sync), w4 (idle sockets),
    /// x1 (one-to-one across regions: senders in --region, receivers in --peer-region).
    #[arg(long, value_delimiter = ',', default_value = "w1,w2,w3,w4")]
    workloads: Vec<String>,
    /// The region driven (x1: where the senders are homed).
    #[arg(long, default_value = "us")]
    region: String,
    /// x1: where the receivers are homed [default: the first other region of cluster.json].
    #[arg(long)]
    peer_region: Option<String>,
    /// W1 and X1 aggregate send rates, msg/s.
    #[arg(long, value_delimiter = ',', default_value = "1000,2000,5000,10000,20000")]
    rates: Vec<u64>,
    /// Seconds per W1/W2 step.
    #[arg(long, default_value_t = 30)]
    step_secs: u64,
    /// W1 users online.
    #[arg(long, default_value_t = 200)]
    users: usize,
    /// W1 sends over HTTP instead of the WebSocket.
    #[arg(long)]
    http: bool,
    /// W4 idle WebSockets.
    #[arg(long, default_value_t = 50_000)]
    idle: usize,
    /// Seconds to wait for stragglers after each step.
    #[arg(long, default_value_t = 10)]
    drain_secs: u64,
    /// Where the JSON report goes.
    #[arg(long, default_value = "bench.json")]
    out: PathBuf,
    /// A quick run for CI: every workload, tiny sizes.
    #[arg(long)]
    smoke: bool,
    /// Workload acks: the durability levels to send at (Meridian-Durability), one row each;
    /// --users / 2 closed-loop senders for --step-secs per level.
    #[arg(long, value_delimiter = ',', default_value = "process")]
    ack_levels: Vec<String>,
}

#[derive(Args)]
struct UpArgs {
    /// Regions to run, comma-separated (e.g. us,eu).
    #[arg(long, value_delimiter = ',', required = true)]
    regions: Vec<String>,
    /// Where every region keeps its data, logs and config; kept across runs.
    #[arg(long)]
    data_dir: PathBuf,
    /// The key admin calls carry in X-Admin-Key (at least 16 characters). Prefer the
    /// variable: a flag is shown to every user of the machine by `ps`. Never printed.
    #[arg(long, env = "MERIDIAN_ADMIN_KEY", hide_env_values = true)]
    admin_key: String,
    /// First port of the first region's block of 10.
    #[arg(long, default_value_t = 7000)]
    port_base: u16,
    /// The nats-server binary [default: $MERIDIAN_NATS_SERVER, else .tools/bin/nats-server
    /// of this repository, installed by deploy/install-nats.sh]
    #[arg(long)]
    nats_server: Option<PathBuf>,
    /// One-way latency between two regions (e.g. 40ms): a proxy per region delays its
    /// nats-server's link to the hub by half of it each way. Needs two or more regions.
    #[arg(long, value_parser = up::parse_duration, default_value = "0ms")]
    wan_delay: std::time::Duration,
    /// Extra one-way latency between two regions, up to this much per chunk (e.g. 5ms).
    #[arg(long, value_parser = up::parse_duration, default_value = "0ms")]
    wan_jitter: std::time::Duration,
    /// Probability (0.0-1.0) that a chunk between two regions is lost and costs a TCP
    /// retransmission timeout (200 ms).
    #[arg(long, default_value_t = 0.0)]
    wan_loss: f64,
    /// Durability level of every region (docs/design.md §6): process (acked once JetStream
    /// holds the event), disk (acked after fsync: sync_interval always, group commit), geo
    /// (also held by another region's mirror). A send may ask for more with the header
    /// Meridian-Durability.
    #[arg(long, default_value = "process")]
    durability: meridian_bus::Durability,
}

#[derive(Args)]
struct RoleArgs {
    /// The region file (regions/<region>.toml); MERIDIAN__<TABLE>__<FIELD> variables
    /// override its fields.
    #[arg(long)]
    config: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before any thread starts: the region processes `meridian up` spawns inherit it.
    std::env::set_var(LOG_FORMAT_ENV, cli.log_format.as_str());
    raise_fd_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The cause chain on one line is the message; a backtrace (anyhow's Debug output
            // when RUST_BACKTRACE is set) would bury it for an operator.
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // Region processes under `up` write to log files: no colour codes there.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::util::SubscriberInitExt::init(logging::subscriber(
        cli.log_format,
        logging::env_filter(),
        std::io::stderr,
        ansi,
    ));

    // Exports spans over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set; a no-op otherwise.
    let telemetry = match meridian_telemetry::init() {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::warn!(error = %e, "trace export disabled");
            None
        }
    };
    let shutdown = CancellationToken::new();
    let signals = tokio::spawn(watch_signals(shutdown.clone()));
    let result = match cli.command {
        Cmd::Up(args) => run_up(args, shutdown.clone()).await,
        Cmd::Region(args) => run_roles(&args.config, Roles::ALL, "region", shutdown.clone()).await,
        Cmd::Gateway(args) => {
            let roles = Roles {
                gateway: true,
                applier: false,
            };
            run_roles(&args.config, roles, "gateway", shutdown.clone()).await
        }
        Cmd::Applier(args) => {
            let roles = Roles {
                gateway: false,
                applier: true,
            };
            run_roles(&args.config, roles, "applier", shutdown.clone()).await
        }
        Cmd::Bench(args) => run_bench(args, shutdown.clone()).await,
        Cmd::NatsAuth(args) => run_nats_auth(args),
        Cmd::Admin(cmd) => run_admin(cmd).await,
        Cmd::Drill(args) => run_drill(args, shutdown.clone()).await,
    };
    signals.abort();
    // Last in the ordered stop: flush the spans the roles ended (blocking, hence the thread).
    if let Some(t) = telemetry {
        let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
    }
    result
}

async fn run_up(args: UpArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let regions = args
        .regions
        .iter()
        .map(|r| RegionId::parse(r.trim()).with_context(|| format!("--regions: {r:?}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let opts = UpOptions {
        regions,
        data_dir: args.data_dir,
        admin_key: args.admin_key,
        port_base: args.port_base,
        nats_server: args.nats_server,
        exe: None,
        wan: up::WanOptions {
            delay: args.wan_delay,
            jitter: args.wan_jitter,
            loss: args.wan_loss,
        },
        durability: args.durability,
    };
    up::run(opts, shutdown).await.context("meridian up")
}

async fn run_drill(args: DrillArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    use meridian_chaos::drill::{self, DrillOptions, LinkSetting};
    if !(0.0..=1.0).contains(&args.loss) {
        bail!("--loss: {} is not a probability (0.0-1.0)", args.loss);
    }
    if !(args.rate > 0.0 && args.rate.is_finite()) {
        bail!("--rate: must be a positive number of sends per second");
    }
    if args.users_per_region < 2 {
        bail!("--users-per-region: at least 2 (users write to each other)");
    }
    // Without a deployment to drill, start one (stopped in order after the report).
    let (cluster, admin_key, own) = match args.cluster {
        Some(c) => {
            // From the environment only: a flag would be shown to every user by `ps`.
            let key = std::env::var("MERIDIAN_ADMIN_KEY").context(
                "set MERIDIAN_ADMIN_KEY to the deployment's admin key (cluster.json does not hold it)",
            )?;
            (c, key, None)
        }
        None => {
            let regions: Vec<&str> = args.regions.iter().map(|r| r.trim()).collect();
            eprintln!("starting a deployment of {} for the drill", regions.join(","));
            let own = bench::OwnDeployment::start(&shutdown, &regions).await?;
            (own.cluster.clone(), own.admin_key.clone(), Some(own))
        }
    };
    let out = match args.out {
        Some(out) => out,
        None if own.is_none() => drills_dir_of(&cluster)?,
        None => PathBuf::from("drills"),
    };
    let mut opts = DrillOptions::new(args.scenario, cluster, admin_key);
    opts.duration = args.duration;
    opts.out = out;
    opts.rate_per_s = args.rate;
    opts.users_per_region = args.users_per_region;
    opts.target = args.target;
    opts.hang = args.hang;
    opts.skew_ms = args.skew_ms;
    opts.slow = LinkSetting {
        delay_ms: args.delay.as_millis() as u64,
        jitter_ms: args.jitter.as_millis() as u64,
        loss: args.loss,
        cut: false,
    };
    opts.crash_every = args.crash_every;
    opts.converge_timeout = args.converge_timeout;
    if let Some(seed) = args.seed {
        opts.seed = seed;
    }
    let result = drill::run(opts, shutdown.clone()).await;
    if let Some(own) = own {
        own.stop().await;
    }
    let outcome = result.context("drill")?;
    println!("{}", outcome.report.summary(&outcome.dir));
    if outcome.report.verdict != drill::report::Verdict::Pass {
        bail!("the drill found violations (report in {})", outcome.dir.display());
    }
    Ok(())
}

/// `<data dir>/drills` of the deployment of `cluster` (the folder its console lists).
fn drills_dir_of(cluster: &Path) -> anyhow::Result<PathBuf> {
    let text = std::fs::read_to_string(cluster).with_context(|| format!("reading {}", cluster.display()))?;
    let doc: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", cluster.display()))?;
    let data_dir = doc["data_dir"]
        .as_str()
        .with_context(|| format!("{} names no data_dir; pass --out", cluster.display()))?;
    Ok(Path::new(data_dir).join("drills"))
}

async fn run_admin(cmd: AdminCmd) -> anyhow::Result<()> {
    // From the environment only, as `meridian bench` reads it.
    let admin_key = || {
        std::env::var("MERIDIAN_ADMIN_KEY")
            .context("set MERIDIAN_ADMIN_KEY to the deployment's admin key (cluster.json does not hold it)")
    };
    let (what, args) = match cmd {
        AdminCmd::Failover(a) => (meridian::admin::Move::Failover, a),
        AdminCmd::Failback(a) => (meridian::admin::Move::Failback, a),
        AdminCmd::Reindex(a) => {
            let opts = meridian::admin::ReindexOptions {
                cluster: a.cluster,
                admin_key: admin_key()?,
                region: a.region,
                wait: Duration::from_secs(a.wait_secs),
            };
            meridian::admin::reindex(&opts, |line| println!("{line}")).await?;
            return Ok(());
        }
    };
    let opts = meridian::admin::MoveOptions {
        cluster: args.cluster,
        admin_key: admin_key()?,
        region: args.region,
        to: args.to,
        wait: Duration::from_secs(args.wait_secs),
    };
    meridian::admin::run(what, &opts, |line| println!("{line}")).await?;
    Ok(())
}

fn run_nats_auth(args: NatsAuthArgs) -> anyhow::Result<()> {
    let region =
        RegionId::parse(args.region.trim()).with_context(|| format!("--region: {:?}", args.region))?;
    let tls = match (args.tls_cert, args.tls_key) {
        (Some(cert_file), Some(key_file)) => Some(meridian_bus::ServerTls {
            cert_file,
            key_file,
            ca_file: args.tls_ca,
        }),
        _ => None,
    };
    let mirrors = args
        .mirrors
        .iter()
        .map(|m| RegionId::parse(m.trim()).with_context(|| format!("--mirrors: {m:?}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if mirrors.contains(&region) {
        anyhow::bail!("--mirrors: a region does not mirror itself ({region})");
    }
    for path in meridian::nats_auth::write(&region, &mirrors, &args.out, tls.as_ref())? {
        println!("wrote {}", path.display());
    }
    Ok(())
}

async fn run_bench(args: BenchArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let mut opts = BenchOptions::full(PathBuf::new(), args.out);
    opts.workloads = args.workloads;
    opts.region = args.region;
    opts.peer_region = args.peer_region;
    opts.rates = args.rates;
    opts.step = Duration::from_secs(args.step_secs);
    opts.users = args.users;
    opts.over_http = args.http;
    opts.idle_connections = args.idle;
    opts.drain = Duration::from_secs(args.drain_secs);
    opts.ack_levels = args.ack_levels;
    if args.smoke {
        opts.rates = vec![200];
        opts.step = Duration::from_secs(3);
        opts.users = 20;
        opts.idle_connections = 200;
        opts.drain = Duration::from_secs(10);
        opts.smoke = true;
    }
    // Without a deployment to drive, start one (its processes are children, measured by pid).
    let own = match args.cluster {
        Some(c) => {
            // From the environment only: a flag would land in the report's command line.
            opts.admin_key = std::env::var("MERIDIAN_ADMIN_KEY").context(
                "set MERIDIAN_ADMIN_KEY to the deployment's admin key (cluster.json does not hold it)",
            )?;
            opts.cluster = c;
            None
        }
        None => {
            // x1 needs a second region; its own deployment has us and eu.
            let regions: &[&str] = if opts.workloads.iter().any(|w| w == "x1") {
                &["us", "eu"]
            } else {
                &["us"]
            };
            let own = bench::OwnDeployment::start(&shutdown, regions).await?;
            opts.cluster = own.cluster.clone();
            opts.admin_key = own.admin_key.clone();
            Some(own)
        }
    };
    let result = bench::run(opts, command, shutdown.clone()).await.context("bench");
    if let Some(own) = own {
        own.stop().await;
    }
    let report = result?;
    let lost: u64 = report.steps.iter().map(|s| s.undelivered + s.duplicates).sum();
    if args.smoke && lost > 0 {
        bail!("smoke run lost or duplicated {lost} deliveries");
    }
    Ok(())
}

async fn run_roles(
    config: &Path,
    roles: Roles,
    command: &str,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let cfg = RegionConfig::load(config, std::env::vars())
        .with_context(|| format!("loading region file {}", config.display()))?;
    if roles != Roles::ALL && !cfg.store.starts_with("tikv://") {
        bail!(
            "`meridian {command}` runs one role, which needs a store shared between processes \
             (tikv://...); {} uses {:?}, which one process opens at a time: run \
             `meridian region --config {}` instead",
            config.display(),
            cfg.store,
            config.display()
        );
    }
    let region = cfg.region.clone();
    region::run(cfg, roles, shutdown)
        .await
        .with_context(|| format!("region {region}"))
}

/// The first SIGTERM/SIGINT cancels `shutdown` (ordered stop); a second exits at once, for
/// when the ordered stop hangs and the operator insists.
async fn watch_signals(shutdown: CancellationToken) {
    let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot install signal handlers; stop with SIGKILL");
            return;
        }
    };
    for n in 0.. {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        if n == 0 {
            tracing::info!("stopping (a second signal exits at once)");
            shutdown.cancel();
        } else {
            tracing::warn!("second signal: exiting without finishing the ordered stop");
            std::process::exit(130);
        }
    }
}

/// Lifts the open-file limit: every WebSocket is a descriptor, and the default limits
/// (often 1024 soft, 20k hard) would cap a gateway, or the bench, far below its capacity.
/// Privileged processes may raise the hard limit too (up to the kernel's `nr_open`).
fn raise_fd_limit() {
    let nr_open: libc::rlim_t = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20);
    let want = nr_open.min(1 << 20);
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if lim.rlim_max < want {
            let raised = libc::rlimit {
                rlim_cur: want,
                rlim_max: want,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return;
            }
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
