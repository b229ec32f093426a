//! Regions of real parts for the gateway's tests: per region its own stream, an embedded
//! store, the real applier and a gateway on a free port, each gateway knowing the others'
//! endpoints. Two kinds of NATS under them:
//!
//! - [`Cluster::start`]: one nats-server shared by the regions (one prefix). Core NATS
//!   subjects are shared as the link between regions shares them, so typing and presence
//!   cross regions; the streams are not mirrored, so a test provisions users in each region
//!   whose directory it relies on ([`Cluster::provision_in`]) and can make the directories
//!   disagree on purpose.
//! - [`Cluster::start_linked`]: a nats-server per region linked through a hub (the bus's
//!   `NatsCluster`), each region mirroring the others' streams and applying them, logged in
//!   as the `region` role with its real permissions: the production topology.

#![allow(dead_code)] // each test binary uses part of it

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::{SinkExt, StreamExt};
use meridian_bus::testing::{unique_prefix, NatsCluster, NatsServer};
use meridian_bus::{Bus, BusConfig, BusRole};
use meridian_gateway::{Gateway, GatewayConfig};
use meridian_model::RegionId;
use meridian_store::testing::TempStore;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

pub const ADMIN_KEY: &str = "test-admin-key-0123456789";
pub const JWT_SECRET: &str = "test-jwt-secret-0123456789abcdef0123";

pub struct Region {
    pub id: RegionId,
    pub base: String,
    pub bus: Bus,
    pub store: TempStore,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Region {
    fn drop(&mut self) {
        self.stop.cancel();
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The NATS under a [`Cluster`].
pub enum Nats {
    Shared(NatsServer),
    Linked(NatsCluster),
}

impl Nats {
    /// The linked cluster (to kill or restart a region's server).
    pub fn linked(&mut self) -> &mut NatsCluster {
        match self {
            Nats::Linked(c) => c,
            Nats::Shared(_) => panic!("a cluster started with Cluster::start is not linked"),
        }
    }
}

pub struct Cluster {
    pub nats: Nats,
    pub regions: Vec<Region>,
    pub http: reqwest::Client,
}

/// A port nobody listens on now (the gateway binds it right after), below the ephemeral
/// range (see `meridian_bus::testing::free_port`).
fn free_port() -> Result<u16> {
    Ok(meridian_bus::testing::free_port()?)
}

impl Cluster {
    /// Regions `serving` run a gateway and an applier; `absent` regions are only named in
    /// the gateways' endpoints (users can be homed there, nothing answers for them).
    pub async fn start(serving: &[&str], absent: &[&str]) -> Result<Cluster> {
        Self::start_with(serving, absent, |_| {}).await
    }

    pub async fn start_with(
        serving: &[&str],
        absent: &[&str],
        tweak: impl Fn(&mut GatewayConfig),
    ) -> Result<Cluster> {
        let nats = Nats::Shared(NatsServer::start().context("starting nats-server")?);
        Self::start_on(nats, &unique_prefix(), serving, absent, tweak).await
    }

    /// Regions `regions` on linked nats-servers, each mirroring and applying the others'
    /// streams, as the `region` role.
    pub async fn start_linked(regions: &[&str], tweak: impl Fn(&mut GatewayConfig)) -> Result<Cluster> {
        Self::start_linked_at(regions, meridian_bus::Durability::Process, tweak).await
    }

    /// [`Cluster::start_linked`] with every region's nats-server at `durability` (`disk`
    /// and `geo` render `sync_interval: always`); the gateways' `durability` is set to match.
    pub async fn start_linked_at(
        regions: &[&str],
        durability: meridian_bus::Durability,
        tweak: impl Fn(&mut GatewayConfig),
    ) -> Result<Cluster> {
        let tweak = move |cfg: &mut GatewayConfig| {
            cfg.durability = durability;
            tweak(cfg)
        };
        let prefix = unique_prefix();
        let linked = NatsCluster::builder(regions)?
            .durability(durability)
            .roles(&prefix, &[BusRole::Region])
            .start()
            .context("starting the linked nats-servers")?;
        linked.wait_linked(Duration::from_secs(20))?;
        Self::start_on(Nats::Linked(linked), &prefix, regions, &[], tweak).await
    }

    async fn start_on(
        nats: Nats,
        prefix: &str,
        serving: &[&str],
        absent: &[&str],
        tweak: impl Fn(&mut GatewayConfig),
    ) -> Result<Cluster> {
        let mut endpoints = BTreeMap::new();
        for r in serving {
            endpoints.insert(r.to_string(), format!("http://127.0.0.1:{}", free_port()?));
        }
        for r in absent {
            // Nothing listens there: a client following it would fail, which no test does.
            endpoints.insert(r.to_string(), format!("http://127.0.0.1:{}", free_port()?));
        }
        let mut regions = Vec::new();
        for r in serving {
            let id = RegionId::parse(*r)?;
            let bus_cfg = match &nats {
                Nats::Shared(server) => {
                    let mut cfg = BusConfig::new(server.url(), id.clone());
                    cfg.prefix = prefix.to_string();
                    cfg
                }
                Nats::Linked(cluster) => cluster.role_config(r, BusRole::Region)?,
            };
            let bus = Bus::connect(bus_cfg).await?;
            bus.ensure_stream().await?;
            // The mirrors and the streams to apply are named here rather than left to the
            // applier's defaults, so the harness does not depend on which applier creates
            // them.
            bus.ensure_mirrors().await?;
            let store = TempStore::open()?;
            let stop = CancellationToken::new();
            let applier = tokio::spawn({
                let (bus, store, stop) = (bus.clone(), store.store.clone(), stop.clone());
                let mut cfg = meridian_applier::ApplierConfig::new(id.clone());
                cfg.streams = bus.applied_streams();
                async move {
                    if let Err(e) = meridian_applier::run(cfg, bus, store, stop).await {
                        panic!("applier failed: {e}");
                    }
                }
            });
            let base = endpoints[*r].clone();
            let mut cfg = GatewayConfig::new(id.clone(), JWT_SECRET, ADMIN_KEY);
            cfg.listen = base.trim_start_matches("http://").parse()?;
            cfg.region_endpoints = endpoints
                .iter()
                .filter(|(k, _)| k.as_str() != *r)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            tweak(&mut cfg);
            let gw = Gateway::bind(cfg, store.store.clone(), bus.clone(), stop.clone()).await?;
            let gateway = tokio::spawn(async move {
                if let Err(e) = gw.run().await {
                    panic!("gateway failed: {e}");
                }
            });
            regions.push(Region {
                id,
                base,
                bus,
                store,
                stop,
                tasks: vec![applier, gateway],
            });
        }
        Ok(Cluster {
            nats,
            regions,
            http: reqwest::Client::new(),
        })
    }

    pub fn region(&self, r: &str) -> &Region {
        self.regions
            .iter()
            .find(|x| x.id.as_str() == r)
            .expect("a region of this cluster")
    }

    pub async fn admin(
        &self,
        r: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value)> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.region(r).base))
            .header("X-Admin-Key", ADMIN_KEY);
        if let Some(b) = body {
            req = req.json(&b);
        }
        answer(req.send().await?).await
    }

    /// Provisions `user` homed in `home` in the directory of each of `regions`.
    pub async fn provision_in(&self, regions: &[&str], user: &str, home: &str) -> Result<()> {
        for r in regions {
            let (st, body) = self
                .admin(
                    r,
                    reqwest::Method::PUT,
                    &format!("/v1/admin/users/{user}"),
                    Some(json!({"home_region": home})),
                )
                .await?;
            if st != 200 {
                bail!("provisioning {user} in {r}: {st} {body}");
            }
        }
        Ok(())
    }

    /// Provisions `user` homed in `home` in every running region's directory.
    pub async fn provision(&self, user: &str, home: &str) -> Result<()> {
        let all: Vec<String> = self.regions.iter().map(|r| r.id.to_string()).collect();
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        self.provision_in(&all, user, home).await
    }

    /// A session of `user` talking to region `r` (tokens are valid in every region: one
    /// signing key).
    pub async fn session(&self, r: &str, user: &str) -> Result<Session> {
        let (st, body) = self
            .admin(
                r,
                reqwest::Method::POST,
                "/v1/admin/tokens",
                Some(json!({"user_id": user, "device_id": "d1", "ttl_s": 3600})),
            )
            .await?;
        if st != 200 {
            bail!("token for {user}: {st} {body}");
        }
        Ok(Session {
            http: self.http.clone(),
            base: self.region(r).base.clone(),
            token: body["token"].as_str().context("token")?.to_string(),
        })
    }
}

pub async fn answer(resp: reqwest::Response) -> Result<(u16, Value)> {
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await?;
    if bytes.is_empty() {
        return Ok((status, Value::Null));
    }
    let v = serde_json::from_slice(&bytes)
        .with_context(|| format!("status {status}: not JSON: {}", String::from_utf8_lossy(&bytes)))?;
    Ok((status, v))
}

#[derive(Clone)]
pub struct Session {
    pub http: reqwest::Client,
    pub base: String,
    pub token: String,
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

    /// Opens a direct conversation with `other`; its id.
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

    /// Opens a WebSocket, or the HTTP status and body it was refused with.
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

    pub async fn ws(&self) -> Result<Ws> {
        match self.try_ws().await? {
            Ok(ws) => Ok(ws),
            Err((status, body)) => bail!("websocket refused: {status} {body}"),
        }
    }
}

pub struct Ws {
    socket: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
}

/// What the server sent next: a JSON text frame, or the close code.
#[derive(Debug)]
pub enum Frame {
    Json(Value),
    Closed(Option<u16>),
}

impl Ws {
    pub async fn send(&mut self, frame: Value) -> Result<()> {
        self.socket.send(Message::text(frame.to_string())).await?;
        Ok(())
    }

    /// The next text frame or close, within `wait`.
    pub async fn next(&mut self, wait: Duration) -> Result<Frame> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let msg = tokio::time::timeout(left, self.socket.next())
                .await
                .context("no frame in time")?;
            match msg {
                None => return Ok(Frame::Closed(None)),
                Some(Err(e)) => bail!("socket failed: {e}"),
                Some(Ok(Message::Text(t))) => return Ok(Frame::Json(serde_json::from_str(t.as_str())?)),
                Some(Ok(Message::Close(c))) => return Ok(Frame::Closed(c.map(|c| u16::from(c.code)))),
                Some(Ok(_)) => continue,
            }
        }
    }

    /// The next frame whose `op` is `op`, skipping others; fails if the socket closes.
    pub async fn next_op(&mut self, op: &str, wait: Duration) -> Result<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await? {
                Frame::Json(v) if v["op"] == op => return Ok(v),
                Frame::Json(_) => continue,
                Frame::Closed(code) => bail!("socket closed ({code:?}) before a {op} frame"),
            }
        }
    }

    /// Says hello from seq 0 and waits until the server answers a ping after it (so the
    /// hello's replay is done and the socket is live).
    pub async fn hello(&mut self) -> Result<()> {
        self.send(json!({"op": "hello", "after": 0})).await?;
        self.send(json!({"op": "ping"})).await?;
        self.next_op("pong", Duration::from_secs(10)).await?;
        Ok(())
    }
}

/// Polls `check` every 20 ms until it holds, for at most `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{what}: not within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `check` every 20 ms until it gives a value, for at most `within`.
pub async fn eventually_some<T, F, Fut>(within: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{what}: not within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
