//! The end-to-end harness: each test gets its own nats-server process, its own store
//! directory and a region (gateway + applier + sweeper) started in-process on port 0 from
//! the same code the binary runs, plus small HTTP and WebSocket clients. The region logs in
//! to NATS as the `region` nkey user with that role's permissions, as under `meridian up`,
//! so every end-to-end test also checks those permissions suffice.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::{SinkExt, StreamExt};
use meridian::config::RegionConfig;
use meridian::region::{self, Roles, RunningRegion};
use meridian_bus::testing::NatsServer;
use meridian_bus::{BusRole, Durability, RoleCredentials};
use meridian_gateway::GatewayConfig;
use meridian_model::RegionId;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

pub mod regions;
pub use regions::{RegionNode, TestRegions};

pub const ADMIN_KEY: &str = "test-admin-key-0123456789";
pub const JWT_SECRET: &str = "test-jwt-secret-0123456789abcdef0123";

/// Search as the tests run it: commits every 50 ms, so results follow sends quickly.
pub fn fast_search() -> meridian_search::SearchConfig {
    meridian_search::SearchConfig {
        commit_interval_ms: 50,
        poll_interval_ms: 10,
        writer_memory_mb: 16,
        ..Default::default()
    }
}

pub struct TestRegion {
    pub nats: NatsServer,
    pub cfg: RegionConfig,
    pub base: String,
    pub http: reqwest::Client,
    region: Option<RunningRegion>,
    _dir: tempfile::TempDir,
}

impl TestRegion {
    pub async fn start() -> Result<TestRegion> {
        Self::start_with(|_| {}).await
    }

    /// Starts a region after `tweak` adjusts its config.
    pub async fn start_with(tweak: impl FnOnce(&mut RegionConfig)) -> Result<TestRegion> {
        let region = RegionId::parse("us")?;
        let creds =
            RoleCredentials::generate(BusRole::Region, &meridian_bus::testing::unique_prefix(), &region);
        let nats = NatsServer::start_with_roles(Durability::Process, vec![creds.clone()])
            .context("starting nats-server")?;
        let dir = tempfile::tempdir()?;
        let mut bus = nats.role_config(&creds)?;
        bus.publish_timeout_s = 20;
        let mut cfg = RegionConfig {
            region: region.clone(),
            store: format!("embedded://{}", dir.path().join("store").display()),
            inbox_ttl_s: 7 * 24 * 3600,
            sweep_interval_s: 60,
            bus,
            gateway: GatewayConfig::new(region.clone(), JWT_SECRET, ADMIN_KEY),
            applier: meridian_applier::ApplierConfig::new(region),
            push: None,
            search: fast_search(),
        };
        tweak(&mut cfg);
        cfg.validate()?;
        let running = region::start(cfg.clone(), Roles::ALL).await?;
        let addr = running.gateway_addr.context("gateway address")?;
        // A restart binds the same port, so clients reconnect to the same URL.
        cfg.gateway.listen = addr;
        let base = format!("http://{addr}");
        Ok(TestRegion {
            nats,
            cfg,
            base,
            http: reqwest::Client::new(),
            region: Some(running),
            _dir: dir,
        })
    }

    /// Stops the region in order and starts it again on the same store, stream and port.
    pub async fn restart(&mut self) -> Result<()> {
        if let Some(r) = self.region.take() {
            r.stop().await?;
        }
        let running = region::start(self.cfg.clone(), Roles::ALL).await?;
        self.base = format!("http://{}", running.gateway_addr.context("gateway address")?);
        self.region = Some(running);
        Ok(())
    }

    /// Stops the region in order, keeping its store, stream and port for [`TestRegion::restart`]
    /// (which then only starts it).
    pub async fn stop_region(&mut self) -> Result<()> {
        if let Some(r) = self.region.take() {
            r.stop().await?;
        }
        Ok(())
    }

    pub fn running(&self) -> &RunningRegion {
        self.region.as_ref().expect("region is running")
    }

    pub async fn stop(mut self) -> Result<()> {
        if let Some(r) = self.region.take() {
            r.stop().await?;
        }
        Ok(())
    }

    /// An admin request.
    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value)> {
        admin_call(&self.http, &self.base, method, path, body).await
    }

    /// Provisions `user` homed here and returns a session for `device`.
    pub async fn user(&self, user: &str, device: &str) -> Result<Session> {
        let (st, body) = self
            .admin(
                reqwest::Method::PUT,
                &format!("/v1/admin/users/{user}"),
                Some(json!({"home_region": "us"})),
            )
            .await?;
        if st != 200 {
            bail!("provisioning {user}: {st} {body}");
        }
        self.session(user, device).await
    }

    /// A token for an existing user.
    pub async fn session(&self, user: &str, device: &str) -> Result<Session> {
        self.session_with_ttl(user, device, 3600).await
    }

    /// A token for an existing user that expires after `ttl_s` seconds.
    pub async fn session_with_ttl(&self, user: &str, device: &str, ttl_s: u64) -> Result<Session> {
        let (st, body) = self
            .admin(
                reqwest::Method::POST,
                "/v1/admin/tokens",
                Some(json!({"user_id": user, "device_id": device, "ttl_s": ttl_s})),
            )
            .await?;
        if st != 200 {
            bail!("token for {user}: {st} {body}");
        }
        Ok(Session {
            http: self.http.clone(),
            base: self.base.clone(),
            token: body["token"].as_str().context("token")?.to_string(),
            user: user.to_string(),
        })
    }
}

/// An admin request (`X-Admin-Key`) to the gateway at `base`.
pub async fn admin_call(
    http: &reqwest::Client,
    base: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, Value)> {
    let mut req = http
        .request(method, format!("{base}{path}"))
        .header("X-Admin-Key", ADMIN_KEY);
    if let Some(b) = body {
        req = req.json(&b);
    }
    answer(req.send().await?).await
}

/// Status and JSON body (`Value::Null` for an empty body; a non-JSON body is an error, since
/// every answer of the API is JSON).
pub async fn answer(resp: reqwest::Response) -> Result<(u16, Value)> {
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await?;
    if bytes.is_empty() {
        return Ok((status, Value::Null));
    }
    let v = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "status {status}: body is not JSON: {}",
            String::from_utf8_lossy(&bytes)
        )
    })?;
    Ok((status, v))
}

/// A user's client.
#[derive(Clone)]
pub struct Session {
    pub http: reqwest::Client,
    pub base: String,
    pub token: String,
    pub user: String,
}

impl Session {
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value)> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        answer(req.send().await?).await
    }
    pub async fn get(&self, path: &str) -> Result<(u16, Value)> {
        self.call(reqwest::Method::GET, path, None).await
    }
    pub async fn post(&self, path: &str, body: Value) -> Result<(u16, Value)> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }
    pub async fn put(&self, path: &str, body: Value) -> Result<(u16, Value)> {
        self.call(reqwest::Method::PUT, path, Some(body)).await
    }
    pub async fn patch(&self, path: &str, body: Value) -> Result<(u16, Value)> {
        self.call(reqwest::Method::PATCH, path, Some(body)).await
    }
    pub async fn delete(&self, path: &str) -> Result<(u16, Value)> {
        self.call(reqwest::Method::DELETE, path, None).await
    }

    /// Opens a direct conversation with `other`; returns its id.
    pub async fn direct(&self, other: &str) -> Result<String> {
        let (st, body) = self
            .post("/v1/conversations", json!({"kind": "direct", "members": [other]}))
            .await?;
        if st != 201 && st != 200 {
            bail!("direct conversation: {st} {body}");
        }
        Ok(body["conversation_id"]
            .as_str()
            .context("conversation_id")?
            .to_string())
    }

    /// Sends a text message; returns the 202 body.
    pub async fn send(&self, cid: &str, client_msg_id: &str, text: &str) -> Result<Value> {
        let (st, body) = self
            .post(
                &format!("/v1/conversations/{cid}/messages"),
                json!({"client_msg_id": client_msg_id, "type": "text", "body": {"text": text}}),
            )
            .await?;
        if st != 202 {
            bail!("send: {st} {body}");
        }
        Ok(body)
    }

    /// Every inbox entry after `after`, following `has_more`.
    pub async fn sync_all(&self, after: u64) -> Result<Vec<Value>> {
        let mut out = Vec::new();
        let mut after = after;
        loop {
            let (st, body) = self.get(&format!("/v1/sync?after={after}&limit=1000")).await?;
            if st != 200 {
                bail!("sync: {st} {body}");
            }
            let entries = body["entries"].as_array().cloned().unwrap_or_default();
            if let Some(last) = entries.last() {
                after = last["seq"].as_u64().context("seq")?;
            }
            out.extend(entries);
            if !body["has_more"].as_bool().unwrap_or(false) {
                return Ok(out);
            }
        }
    }

    /// Polls sync until at least `n` entries exist after 0 (the applier runs asynchronously).
    pub async fn wait_entries(&self, n: usize) -> Result<Vec<Value>> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let all = self.sync_all(0).await?;
            if all.len() >= n {
                return Ok(all);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{} has {} inbox entries, expected {n}", self.user, all.len());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn ws(&self) -> Result<Ws> {
        match self.try_ws().await? {
            Ok(ws) => Ok(ws),
            Err((status, body)) => bail!("websocket refused: {status} {body}"),
        }
    }

    /// Opens a WebSocket, or returns the HTTP status and JSON body it was refused with.
    pub async fn try_ws(&self) -> Result<Result<Ws, (u16, Value)>> {
        use tokio_tungstenite::tungstenite::Error;
        let url = format!(
            "{}/v1/ws?token={}",
            self.base.replacen("http", "ws", 1),
            self.token
        );
        match tokio_tungstenite::connect_async(url).await {
            Ok((socket, _)) => Ok(Ok(Ws { socket })),
            Err(Error::Http(resp)) => {
                let status = resp.status().as_u16();
                let body = resp
                    .body()
                    .as_deref()
                    .map(serde_json::from_slice)
                    .transpose()?
                    .unwrap_or(Value::Null);
                Ok(Err((status, body)))
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// A WebSocket client speaking the JSON frames.
pub struct Ws {
    socket: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
}

impl Ws {
    pub async fn send(&mut self, frame: Value) -> Result<()> {
        self.socket.send(Message::text(frame.to_string())).await?;
        Ok(())
    }

    /// The next JSON frame, within `wait`.
    pub async fn next(&mut self, wait: Duration) -> Result<Value> {
        loop {
            let msg = tokio::time::timeout(wait, self.socket.next())
                .await
                .context("no frame in time")?
                .context("socket closed")??;
            match msg {
                Message::Text(t) => return Ok(serde_json::from_str(t.as_str())?),
                Message::Close(_) => bail!("socket closed"),
                _ => continue,
            }
        }
    }

    /// Sends a text frame as is.
    pub async fn send_text(&mut self, text: String) -> Result<()> {
        self.socket.send(Message::text(text)).await?;
        Ok(())
    }

    /// Reads until the server closes the socket, within `wait`; returns the close code and
    /// reason. Text frames on the way are skipped.
    pub async fn closed(&mut self, wait: Duration) -> Result<(u16, String)> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let msg = tokio::time::timeout(left, self.socket.next())
                .await
                .context("the socket was not closed in time")?
                .context("the socket ended without a close frame")??;
            if let Message::Close(frame) = msg {
                let frame = frame.context("a close frame without a code")?;
                return Ok((u16::from(frame.code), frame.reason.as_str().to_string()));
            }
        }
    }

    /// The next frame whose `op` is `op`, skipping others.
    pub async fn next_op(&mut self, op: &str, wait: Duration) -> Result<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let f = self.next(left).await?;
            if f["op"] == op {
                return Ok(f);
            }
        }
    }
}

/// Log output captured in memory: a `tracing_subscriber` writer (`move || capture.clone()`)
/// whose text a test reads back.
#[derive(Clone, Default)]
pub struct LogCapture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}
