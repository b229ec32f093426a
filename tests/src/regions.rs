//! Several regions in one test: a [`NatsCluster`] (a hub without JetStream and one JetStream
//! server per region, each its own domain, linked as leafnodes of the hub) and per region a
//! gateway, applier and sweeper started in-process on its own embedded store, exactly as
//! [`TestRegion`](crate::TestRegion) starts one. Each region mirrors every other region's
//! stream and applies it; each gateway knows every region's real endpoint, so a 421 names a
//! URL a client can follow.
//!
//! Every test gets its own cluster and a unique stream prefix, so tests run in parallel;
//! dropping a [`TestRegions`] ends its regions' tasks and kills its servers.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use meridian::config::RegionConfig;
use meridian::region::{self, Roles, RunningRegion};
use meridian_bus::testing::NatsCluster;
use meridian_bus::BusRole;
use meridian_gateway::GatewayConfig;
use meridian_model::{ConversationId, RegionId, UserId};
use meridian_store::timeline::HistoryPage;
use serde_json::{json, Value};

use crate::{admin_call, Session, ADMIN_KEY, JWT_SECRET};

/// How long helpers poll for replication before giving up: well above the mirror latency
/// on loopback (milliseconds) and the re-attach time of a mirror after its origin restarts
/// (about the outage), well below the test timeouts.
pub const REPLICATION_WAIT: Duration = Duration::from_secs(30);

/// One region of a [`TestRegions`].
pub struct RegionNode {
    pub id: RegionId,
    pub cfg: RegionConfig,
    /// `http://127.0.0.1:port` of its gateway (also its entry in every `region_endpoints`).
    pub base: String,
    running: Option<RunningRegion>,
    _dir: tempfile::TempDir,
}

impl RegionNode {
    pub fn running(&self) -> &RunningRegion {
        self.running.as_ref().expect("region is running")
    }
}

/// N regions on one NATS cluster.
pub struct TestRegions {
    pub cluster: NatsCluster,
    pub prefix: String,
    pub http: reqwest::Client,
    nodes: Vec<RegionNode>,
}

impl TestRegions {
    /// Starts `ids` (e.g. `["us", "eu", "ap"]`), each mirroring all the others.
    pub async fn start(ids: &[&str]) -> Result<TestRegions> {
        let prefix = meridian_bus::testing::unique_prefix();
        let ids: Vec<RegionId> = ids
            .iter()
            .map(|r| RegionId::parse(*r))
            .collect::<Result<_, _>>()?;
        // Blocking (it waits for the servers and their links): off the runtime's workers.
        let cluster = {
            let ids = ids.clone();
            let prefix = prefix.clone();
            tokio::task::spawn_blocking(move || {
                let names: Vec<&str> = ids.iter().map(RegionId::as_str).collect();
                NatsCluster::builder(&names)?
                    .roles(&prefix, &[BusRole::Region])
                    .start()
            })
            .await?
            .context("starting the nats cluster")?
        };
        // The gateways' ports are chosen before any starts, so that every region's config
        // names every region's real endpoint.
        let ports: Vec<u16> = ids.iter().map(|_| free_port()).collect::<Result<_>>()?;
        let endpoints: BTreeMap<String, String> = ids
            .iter()
            .zip(&ports)
            .map(|(r, p)| (r.to_string(), format!("http://127.0.0.1:{p}")))
            .collect();
        // Every region's own stream exists before any mirror of it is made: a mirror made
        // before its origin attaches only when the server retries it, seconds later.
        for id in &ids {
            let bus = meridian_bus::Bus::connect(cluster.role_config(id.as_str(), BusRole::Region)?).await?;
            bus.ensure_stream().await?;
        }
        let mut nodes = Vec::new();
        for (id, port) in ids.iter().zip(&ports) {
            let dir = tempfile::tempdir()?;
            // Its own stream, and a mirror of every other region's.
            let mut bus = cluster.role_config(id.as_str(), BusRole::Region)?;
            bus.publish_timeout_s = 20;
            let mut gateway = GatewayConfig::new(id.clone(), JWT_SECRET, ADMIN_KEY);
            gateway.listen = ([127, 0, 0, 1], *port).into();
            gateway.region_endpoints = endpoints.clone();
            let cfg = RegionConfig {
                region: id.clone(),
                store: format!("embedded://{}", dir.path().join("store").display()),
                inbox_ttl_s: 7 * 24 * 3600,
                sweep_interval_s: 60,
                bus,
                gateway,
                applier: meridian_applier::ApplierConfig::new(id.clone()),
                push: None,
                search: crate::fast_search(),
            };
            cfg.validate()?;
            let running = region::start(cfg.clone(), Roles::ALL)
                .await
                .with_context(|| format!("starting region {id}"))?;
            nodes.push(RegionNode {
                id: id.clone(),
                base: endpoints[id.as_str()].clone(),
                cfg,
                running: Some(running),
                _dir: dir,
            });
        }
        Ok(TestRegions {
            cluster,
            prefix,
            http: reqwest::Client::new(),
            nodes,
        })
    }

    pub fn nodes(&self) -> &[RegionNode] {
        &self.nodes
    }

    pub fn node(&self, region: &str) -> &RegionNode {
        self.nodes
            .iter()
            .find(|n| n.id.as_str() == region)
            .unwrap_or_else(|| panic!("no region {region} in this test"))
    }

    /// An admin call to `region`'s gateway.
    pub async fn admin(
        &self,
        region: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value)> {
        admin_call(&self.http, &self.node(region).base, method, path, body).await
    }

    /// Provisions `user` homed in `home` through `via`'s gateway (any region may provision
    /// any user).
    pub async fn provision(&self, via: &str, user: &str, home: &str) -> Result<()> {
        let (st, body) = self
            .admin(
                via,
                reqwest::Method::PUT,
                &format!("/v1/admin/users/{user}"),
                Some(json!({"home_region": home})),
            )
            .await?;
        if st != 200 {
            bail!("provisioning {user} (home {home}) via {via}: {st} {body}");
        }
        Ok(())
    }

    /// A token for `user`, minted by `region` once that region knows the user (the directory
    /// reaches it through the mirrors), as a session pointed at `region`'s gateway.
    pub async fn session_at(&self, region: &str, user: &str, device: &str) -> Result<Session> {
        let deadline = tokio::time::Instant::now() + REPLICATION_WAIT;
        loop {
            let (st, body) = self
                .admin(
                    region,
                    reqwest::Method::POST,
                    "/v1/admin/tokens",
                    Some(json!({"user_id": user, "device_id": device, "ttl_s": 3600})),
                )
                .await?;
            if st == 200 {
                return Ok(Session {
                    http: self.http.clone(),
                    base: self.node(region).base.clone(),
                    token: body["token"].as_str().context("token")?.to_string(),
                    user: user.to_string(),
                });
            }
            if st != 404 || tokio::time::Instant::now() > deadline {
                bail!("token for {user} at {region}: {st} {body}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Provisions `user` homed in `home` (through `home`) and returns a session at `home`.
    pub async fn user(&self, home: &str, user: &str, device: &str) -> Result<Session> {
        self.provision(home, user, home).await?;
        self.session_at(home, user, device).await
    }

    /// Waits until every region knows every one of `users` (each can mint their tokens).
    pub async fn wait_directory(&self, users: &[&str]) -> Result<()> {
        for n in &self.nodes {
            for u in users {
                self.session_at(n.id.as_str(), u, "probe").await?;
            }
        }
        Ok(())
    }

    /// Each region's store digest, from `GET /v1/admin/digest`.
    pub async fn digests(&self) -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for n in &self.nodes {
            let (st, body) = self
                .admin(n.id.as_str(), reqwest::Method::GET, "/v1/admin/digest", None)
                .await?;
            if st != 200 {
                bail!("digest of {}: {st} {body}", n.id);
            }
            let d = body["digest"].as_str().context("digest")?.to_string();
            out.push((n.id.to_string(), d));
        }
        Ok(out)
    }

    /// Whether every region has applied every event of every region's stream: each mirror
    /// holds what its origin holds, and each region's checkpoint of each stream is at its
    /// copy's last sequence. Returns what is missing, if anything.
    pub async fn caught_up(&self) -> Result<Option<String>> {
        let mut origin_last = HashMap::new();
        for n in &self.nodes {
            let r = n.running();
            let stream = r.bus.stream();
            let st = r.bus.stream_state(&stream).await?;
            origin_last.insert(stream, st.last_seq);
        }
        for n in &self.nodes {
            let r = n.running();
            for (stream, last) in &origin_last {
                let st = match r.bus.stream_state(stream).await {
                    Ok(st) => st,
                    Err(e) => return Ok(Some(format!("{}: {stream}: {e}", n.id))),
                };
                if st.last_seq != *last {
                    return Ok(Some(format!(
                        "{}: {stream} holds up to {}, its origin {last}",
                        n.id, st.last_seq
                    )));
                }
                let cp = r.store.stream_checkpoint(stream).await?;
                let applied = meridian_gateway::state::applied_in(&cp, &st);
                if applied != *last {
                    return Ok(Some(format!(
                        "{}: {stream} applied up to {applied} of {last}",
                        n.id
                    )));
                }
            }
        }
        Ok(None)
    }

    /// Polls (bounded by `REPLICATION_WAIT`) until every region has applied every stream to
    /// its end and every region's digest is the same; returns the digest.
    pub async fn wait_converged(&self) -> Result<String> {
        self.wait_converged_within(REPLICATION_WAIT).await
    }

    /// [`TestRegions::wait_converged`] with another bound (after an origin restarts, its
    /// mirrors re-attach only when the servers retry: 17 s on this machine for a 1.5 s
    /// outage).
    pub async fn wait_converged_within(&self, limit: Duration) -> Result<String> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let behind = self.caught_up().await?;
            let digests = self.digests().await?;
            if behind.is_none() && digests.iter().all(|(_, d)| *d == digests[0].1) {
                return Ok(digests[0].1.clone());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "regions did not converge within {limit:?}: {}; digests {digests:?}",
                    behind.unwrap_or_else(|| "all streams applied".into())
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The messages of `cid` in `region`'s store, oldest first, as `viewer` sees them:
    /// `(client_msg_id, sender)` for each.
    pub async fn stored_messages(
        &self,
        region: &str,
        cid: &str,
        viewer: &str,
    ) -> Result<Vec<(String, String)>> {
        let store = &self.node(region).running().store;
        let cid = ConversationId::parse(cid.to_string())?;
        let viewer = UserId::parse(viewer.to_string())?;
        let mut out = Vec::new();
        let mut page = HistoryPage::After(None);
        // Bounded: a conversation of a test holds far fewer than 100 pages.
        for _ in 0..100 {
            let h = store.history(&cid, &viewer, page, 500).await?;
            let Some(last) = h.messages.last() else {
                return Ok(out);
            };
            page = HistoryPage::After(Some(last.order_key.clone()));
            let more = h.more;
            out.extend(h.messages.into_iter().map(|m| (m.client_msg_id, m.sender)));
            if !more {
                return Ok(out);
            }
        }
        Err(anyhow!("{cid} in {region}: more than 100 pages"))
    }

    /// SIGKILLs `region`'s nats-server (the region's roles keep running and reconnect).
    pub fn kill_nats(&mut self, region: &str) {
        self.cluster.region_mut(region).kill();
    }

    /// Starts `region`'s nats-server again on its port and store.
    pub fn restart_nats(&mut self, region: &str) -> Result<()> {
        self.cluster
            .region_mut(region)
            .restart()
            .with_context(|| format!("restarting the nats-server of {region}"))
    }

    /// Stops `region`'s process (gateway, applier, push; its nats-server keeps running): a
    /// lost region as its users see it, nothing listening at its endpoint.
    pub async fn stop_region(&mut self, region: &str) -> Result<()> {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.id.as_str() == region)
            .with_context(|| format!("no region {region}"))?;
        if let Some(r) = node.running.take() {
            r.stop().await?;
        }
        Ok(())
    }

    /// Stops every region in order (the servers die when `self` drops).
    pub async fn stop(mut self) -> Result<()> {
        for n in &mut self.nodes {
            if let Some(r) = n.running.take() {
                r.stop().await?;
            }
        }
        Ok(())
    }
}

/// A port for a gateway started next, below the ephemeral range (see
/// `meridian_bus::testing::free_port`: a `bind(0)` port can be taken by any outgoing
/// connection first).
fn free_port() -> Result<u16> {
    Ok(meridian_bus::testing::free_port()?)
}
