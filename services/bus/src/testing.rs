//! Real nats-server processes for tests (feature `testing`). No mocks: the behaviour under
//! test (dedup across restarts, redelivery after kill -9) is the server's.
//!
//! The binary is `$MERIDIAN_NATS_SERVER`, or `<repo>/.tools/bin/nats-server` as installed by
//! `deploy/install-nats.sh`.
//!
//! Every server requires a login, as production does (issue 8, item 7): [`NatsServer::url`]
//! carries the harness's own login, allowed every subject, so a test can set up and inspect
//! anything; [`NatsServer::start_with_roles`] adds the nkey users `meridian up` configures,
//! with their permissions, and [`NatsServer::role_config`] connects as one of them.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use meridian_model::RegionId;

mod cluster;
pub use cluster::{NatsCluster, NatsClusterBuilder, NatsHub};

use crate::{nats_server_auth_config, nats_server_config, BusConfig, Durability, LeafRemote, NatsServerSpec};
use crate::{NatsLogin, NatsUser, RoleCredentials, ServerTls};

/// The harness's own user (every subject allowed).
const HARNESS_USER: &str = "meridian-test";

const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A nats-server with JetStream, its store in a temporary directory. Dropping it kills the
/// process (and removes the directory).
pub struct NatsServer {
    binary: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    monitor_port: u16,
    durability: Durability,
    /// The harness user's password, random per server.
    password: String,
    /// Role users the server accepts besides the harness's own.
    roles: Vec<RoleCredentials>,
    tls: Option<ServerTls>,
    /// Set for a region server of a [`NatsCluster`]: its place among the linked regions.
    link: Option<RegionLink>,
    process: Process,
}

/// How a region's server of a [`NatsCluster`] is linked to the others.
#[derive(Clone)]
struct RegionLink {
    region: RegionId,
    /// The regions whose streams this region mirrors (every other one).
    mirrors: Vec<RegionId>,
    /// The leafnode URL of the hub (or of whatever stands between, see
    /// [`NatsClusterBuilder::leaf_address`]), with this region's leaf login.
    leaf_url: String,
}

impl NatsServer {
    /// Starts a server with `Durability::Process` on a free port.
    pub fn start() -> io::Result<NatsServer> {
        Self::start_with(Durability::Process)
    }

    /// Starts a server with the given durability on a free port.
    pub fn start_with(durability: Durability) -> io::Result<NatsServer> {
        Self::start_with_roles(durability, Vec::new())
    }

    /// Starts a server that also accepts the nkey users of `roles`, each with its role's
    /// permissions (the users `meridian up` configures).
    pub fn start_with_roles(durability: Durability, roles: Vec<RoleCredentials>) -> io::Result<NatsServer> {
        Self::start_with_tls(durability, roles, None)
    }

    /// [`NatsServer::start_with_roles`], with TLS on the client port when `tls` is given.
    pub fn start_with_tls(
        durability: Durability,
        roles: Vec<RoleCredentials>,
        tls: Option<ServerTls>,
    ) -> io::Result<NatsServer> {
        Self::start_full(durability, roles, tls, None)
    }

    fn start_full(
        durability: Durability,
        roles: Vec<RoleCredentials>,
        tls: Option<ServerTls>,
        link: Option<RegionLink>,
    ) -> io::Result<NatsServer> {
        let binary = binary();
        let password = random_secret();
        let mut last_err = None;
        // Another process can grab a port between probing it and the server binding it;
        // that shows as an early exit, and a fresh pair of ports fixes it.
        for _ in 0..3 {
            let mut server = NatsServer {
                binary: binary.clone(),
                dir: tempfile::Builder::new().prefix("meridian-nats-").tempdir()?,
                port: free_port()?,
                monitor_port: free_port()?,
                durability,
                password: password.clone(),
                roles: roles.clone(),
                tls: tls.clone(),
                link: link.clone(),
                process: Process::default(),
            };
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("nats-server did not start")))
    }

    /// The server's URL with the harness's login, which may use every subject. [`Bus`]
    /// takes the login from the URL; other clients need [`NatsServer::harness_login`].
    ///
    /// [`Bus`]: crate::Bus
    pub fn url(&self) -> String {
        format!("nats://{HARNESS_USER}:{}@127.0.0.1:{}", self.password, self.port)
    }

    /// The server's URL without a login: a client connecting with only this is refused.
    pub fn address(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The harness's user name and password.
    pub fn harness_login(&self) -> (String, String) {
        (HARNESS_USER.to_string(), self.password.clone())
    }

    /// A [`BusConfig`] logging in as `creds` (one of the roles this server was started
    /// with): its prefix, region and role, and its seed in a 0600 file in the server's
    /// directory. For a region of a [`NatsCluster`], `mirrors` lists every other region.
    pub fn role_config(&self, creds: &RoleCredentials) -> io::Result<BusConfig> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let path = self.dir.path().join(format!(
            "{}{}-{}.nk",
            creds.prefix,
            creds.region,
            creds.role.as_str()
        ));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        f.write_all(creds.seed.as_bytes())?;
        let mut cfg = BusConfig::new(self.address(), creds.region.clone());
        cfg.prefix = creds.prefix.clone();
        cfg.role = Some(creds.role);
        cfg.nkey_seed_file = Some(path);
        cfg.mirrors = self.mirrors();
        Ok(cfg)
    }

    /// A [`BusConfig`] for `region` under `prefix` logging in as the harness (every subject
    /// allowed); for a region of a [`NatsCluster`], with `mirrors` set to every other region.
    pub fn bus_config(&self, region: &RegionId, prefix: &str) -> BusConfig {
        let mut cfg = BusConfig::new(self.url(), region.clone());
        cfg.prefix = prefix.to_string();
        cfg.mirrors = self.mirrors();
        cfg
    }

    /// The regions this server's region mirrors: every other region of its cluster, none
    /// for a server on its own.
    pub fn mirrors(&self) -> Vec<RegionId> {
        self.link.as_ref().map(|l| l.mirrors.clone()).unwrap_or_default()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("jetstream")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats-server.log")
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("nats-server.conf")
    }

    /// SIGKILL, as a crash would: no flush, no goodbye to clients.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// SIGSTOP: the process hangs (a frozen VM, a partition that drops nothing): its
    /// connections stay open and say nothing. [`NatsServer::sigcont`] wakes it.
    pub fn sigstop(&self) {
        self.process.signal("-STOP");
    }

    /// SIGCONT after [`NatsServer::sigstop`].
    pub fn sigcont(&self) {
        self.process.signal("-CONT");
    }

    /// `kill` (SIGKILL), then start again on the same port with the same store.
    pub fn restart(&mut self) -> io::Result<()> {
        self.kill();
        self.spawn()
    }

    /// Graceful stop (SIGTERM, then SIGKILL after 5 s). `restart` starts it again.
    pub fn stop(&mut self) {
        self.process.terminate();
    }

    /// Graceful stop, delete the JetStream store, then start again on the same port: the
    /// server comes back without any of its streams, as after losing its disk.
    pub fn restart_empty(&mut self) -> io::Result<()> {
        self.stop();
        match fs::remove_dir_all(self.store_dir()) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        self.spawn()
    }

    /// The last lines of the server's log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn spawn(&mut self) -> io::Result<()> {
        let mut conf = nats_server_config(&NatsServerSpec {
            store_dir: self.store_dir(),
            port: self.port,
            durability: self.durability,
            server_name: format!("test-{}", self.port),
            domain: self
                .link
                .as_ref()
                .map(|l| l.region.to_string())
                .unwrap_or_default(),
            leaf_remotes: self
                .link
                .iter()
                .map(|l| LeafRemote {
                    url: l.leaf_url.clone(),
                })
                .collect(),
        });
        conf.push_str(&format!("http: \"127.0.0.1:{}\"\n", self.monitor_port));
        let mut users = vec![NatsUser {
            login: NatsLogin::Password {
                user: HARNESS_USER.to_string(),
                password: self.password.clone(),
            },
            permissions: None,
        }];
        users.extend(self.roles.iter().map(|r| r.user.clone()));
        conf.push_str(&nats_server_auth_config(&users, self.tls.as_ref()));
        fs::write(self.config_path(), conf)?;
        self.process = Process::spawn(
            &self.binary,
            &self.config_path(),
            &self.log_path(),
            self.monitor_port,
        )?;
        Ok(())
    }

    /// Waits (bounded by `timeout`) until this server's leafnode link to the hub is up.
    pub fn wait_linked(&self, timeout: Duration) -> io::Result<()> {
        wait_leafnodes(self.monitor_port, 1, timeout)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A nats-server process and its watchdog; the default is "not running".
#[derive(Default)]
struct Process {
    child: Option<Child>,
    /// Kills the server if this test process dies without running `Drop` (SIGKILL,
    /// abort), so no server outlives its test.
    watchdog: Option<Child>,
}

impl Process {
    /// Starts nats-server on `config` (output appended to `log`) and waits for
    /// `/healthz`: JetStream included, so after a restart its streams have been recovered
    /// from disk. On failure the process is gone and the error carries the log's tail.
    fn spawn(binary: &Path, config: &Path, log: &Path, monitor_port: u16) -> io::Result<Process> {
        let out = fs::OpenOptions::new().create(true).append(true).open(log)?;
        let child = Command::new(binary)
            .arg("-c")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("spawn {}: {e}", binary.display())))?;
        let watchdog = spawn_watchdog(child.id());
        let mut process = Process {
            child: Some(child),
            watchdog,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        let failed = loop {
            if let Some(status) = process.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                break io::Error::other(format!("nats-server exited early: {status}"));
            }
            if healthz(monitor_port) {
                return Ok(process);
            }
            if Instant::now() > deadline {
                break io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("nats-server not healthy within {READY_TIMEOUT:?}"),
                );
            }
            pause();
        };
        process.kill();
        let text = fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        Err(io::Error::new(
            failed.kind(),
            format!("{failed}; nats-server log:\n{tail}"),
        ))
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL the process and wait for it; stop its watchdog.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }

    /// SIGTERM, wait up to 5 s for the process to exit, then kill what is left.
    fn terminate(&mut self) {
        // A stopped process does not act on SIGTERM until it is continued.
        self.signal("-CONT");
        self.signal("-TERM");
        if let Some(child) = self.child.as_mut() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                pause();
            }
        }
        self.kill();
    }

    fn signal(&self, sig: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .arg(sig)
                .arg(child.id().to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Polls the monitor port's `/leafz` until at least `count` leafnode connections are up.
fn wait_leafnodes(monitor_port: u16, count: usize, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let body = http_get(monitor_port, "/leafz").unwrap_or_default();
        let up = body
            .split("\"leafnodes\":")
            .nth(1)
            .and_then(|rest| {
                let digits: String = rest
                    .trim_start()
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                digits.parse::<usize>().ok()
            })
            .unwrap_or(0);
        if up >= count {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{up} of {count} leafnode links up after {timeout:?}"),
            ));
        }
        pause();
    }
}

fn random_secret() -> String {
    use rand::distributions::{Alphanumeric, DistString as _};
    Alphanumeric.sample_string(&mut rand::thread_rng(), 32)
}

/// A shell loop that SIGKILLs `pid` once this test process is gone, and exits by itself
/// when `pid` is.
fn spawn_watchdog(pid: u32) -> Option<Child> {
    let me = std::process::id();
    let script = format!(
        "while kill -0 {me} 2>/dev/null && kill -0 {pid} 2>/dev/null; do sleep 1; done; kill -9 {pid} 2>/dev/null; exit 0"
    );
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()
}

fn healthz(port: u16) -> bool {
    http_get(port, "/healthz").is_some()
}

/// The body of a 200 answer to `GET path` on the monitor port; `None` for anything else.
fn http_get(port: u16, path: &str) -> Option<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .ok()?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    if !(text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/1.0 200")) {
        return None;
    }
    Some(
        text.split_once("\r\n\r\n")
            .map_or(String::new(), |(_, b)| b.to_string()),
    )
}

/// The harness is synchronous on purpose (callers use it from `Drop` and outside any runtime,
/// and it is what every test's setup calls), so it polls with a short blocking sleep. Only
/// start-up and stop wait here; tests run their async work on multi-threaded runtimes, so a
/// blocked worker during a restart does not stall the code under test.
#[allow(clippy::disallowed_methods)]
fn pause() {
    std::thread::sleep(Duration::from_millis(20));
}

/// A loopback port free right now for a server the test starts next, picked at random
/// *below* Linux's ephemeral range (32768–60999). A port from `bind(0)` is an ephemeral one,
/// which any outgoing connection (a leafnode link, a client) may take before the server
/// binds it: seen in a three-node region whose second node lost its route port to the first
/// node's link to the hub and exited on "address already in use". Tests sharing the machine
/// still race for the same random port, but 1 in 22,000 instead of the kernel's next one.
pub fn free_port() -> io::Result<u16> {
    for _ in 0..1000 {
        let port = 10_000 + rand::random::<u16>() % 22_000;
        let free = ["127.0.0.1", "0.0.0.0"]
            .iter()
            .all(|host| TcpListener::bind((*host, port)).is_ok());
        if free {
            return Ok(port);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        "no free port in 10000..32000 after 1000 tries",
    ))
}

/// The nats-server binary: `$MERIDIAN_NATS_SERVER`, else the repo's `.tools/bin/nats-server`.
/// Panics with the fix when neither exists.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("MERIDIAN_NATS_SERVER").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let p = repo_root().join(".tools/bin/nats-server");
    if !p.exists() {
        panic!(
            "nats-server not found at {}: run deploy/install-nats.sh (or set MERIDIAN_NATS_SERVER)",
            p.display()
        );
    }
    p
}

/// The workspace root, from this crate's manifest directory (services/bus).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A prefix no other test (in this or a concurrent test process) uses: only `[a-z0-9_]`,
/// so it is valid in subjects and, upper-cased, in stream names.
pub fn unique_prefix() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "t{}x{}x{}_",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        nanos
    )
}
