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

use crate::{nats_server_auth_config, nats_server_config, BusConfig, Durability};
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
    child: Option<Child>,
    /// Kills the server if this test process dies without running `Drop` (SIGKILL,
    /// abort), so no server outlives its test.
    watchdog: Option<Child>,
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
        use rand::distributions::{Alphanumeric, DistString as _};
        let binary = binary();
        let password = Alphanumeric.sample_string(&mut rand::thread_rng(), 32);
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
                child: None,
                watchdog: None,
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
    /// directory.
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
        Ok(cfg)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
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
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.stop_watchdog();
    }

    /// `kill` (SIGKILL), then start again on the same port with the same store.
    pub fn restart(&mut self) -> io::Result<()> {
        self.kill();
        self.spawn()
    }

    /// Graceful stop (SIGTERM, then SIGKILL after 5 s). `restart` starts it again.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
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
        let mut conf = nats_server_config(
            &self.store_dir(),
            self.port,
            self.durability,
            &format!("test-{}", self.port),
        );
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
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("spawn {}: {e}", self.binary.display())))?;
        let pid = child.id();
        self.child = Some(child);
        self.watchdog = spawn_watchdog(pid);
        match self.wait_ready() {
            Ok(()) => Ok(()),
            Err(e) => {
                let tail = self.log_tail(20);
                self.kill();
                Err(io::Error::new(e.kind(), format!("{e}; nats-server log:\n{tail}")))
            }
        }
    }

    /// Polls `/healthz` until the server, JetStream included, reports ok: after a restart
    /// that means its streams have been recovered from disk.
    fn wait_ready(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    return Err(io::Error::other(format!("nats-server exited early: {status}")));
                }
            }
            if healthz(self.monitor_port) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("nats-server not healthy within {READY_TIMEOUT:?}"),
                ));
            }
            pause();
        }
    }

    fn stop_watchdog(&mut self) {
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
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
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/1.0 200")
}

/// The harness is synchronous on purpose (callers use it from `Drop` and outside any runtime,
/// and it is what every test's setup calls), so it polls with a short blocking sleep. Only
/// start-up and stop wait here; tests run their async work on multi-threaded runtimes, so a
/// blocked worker during a restart does not stall the code under test.
#[allow(clippy::disallowed_methods)]
fn pause() {
    std::thread::sleep(Duration::from_millis(20));
}

fn free_port() -> io::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
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
