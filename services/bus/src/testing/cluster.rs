//! Several regions on one machine, linked as `meridian up --regions` links them
//! (docs/design.md §3): a hub without JetStream, and per region a JetStream server in its own
//! domain that is a leafnode of the hub. Every process dies with the cluster (and with the
//! test process, through each one's watchdog).

use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use meridian_model::RegionId;

use super::{binary, free_port, random_secret, wait_leafnodes, NatsServer, Process, RegionLink};
use crate::{nats_hub_config, BusConfig, BusRole, Durability, HubSpec, RoleCredentials};

/// How long `start` waits for every region's leafnode link.
const LINK_TIMEOUT: Duration = Duration::from_secs(15);

/// A hub and one linked JetStream server per region. Dropping it kills them all.
pub struct NatsCluster {
    // Regions first: dropped before the hub, so no server spends its last moments
    // reconnecting to a hub that is already gone.
    regions: Vec<(RegionId, NatsServer)>,
    hub: NatsHub,
    /// Role users per region, when started with roles.
    credentials: Vec<RoleCredentials>,
}

/// Options for [`NatsCluster`]; [`NatsCluster::builder`].
pub struct NatsClusterBuilder {
    regions: Vec<RegionId>,
    durability: Durability,
    roles: Vec<BusRole>,
    prefix: String,
    leaf_address: Option<Box<LeafRoute>>,
}

/// See [`NatsClusterBuilder::leaf_address`].
type LeafRoute = dyn FnMut(&RegionId, SocketAddr) -> SocketAddr;

impl NatsClusterBuilder {
    /// Durability of every region's server (default `process`).
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// Also accept, in every region, an nkey user per role in `roles` with that role's
    /// permissions for `prefix` and the region's mirrors ([`NatsCluster::role_config`]).
    pub fn roles(mut self, prefix: &str, roles: &[BusRole]) -> Self {
        self.prefix = prefix.to_string();
        self.roles = roles.to_vec();
        self
    }

    /// Where a region's server dials the hub's leafnode port: given the region and the
    /// hub's leaf address, the address to dial instead (a link proxy forwarding to the hub,
    /// for WAN delay or partitions; the closure may start it and keep its handle). Called
    /// once per region, after the hub is up and before that region's server starts.
    /// Default: the hub itself.
    pub fn leaf_address(mut self, route: impl FnMut(&RegionId, SocketAddr) -> SocketAddr + 'static) -> Self {
        self.leaf_address = Some(Box::new(route));
        self
    }

    /// Starts the hub, then every region's server, and waits until every region is linked.
    pub fn start(mut self) -> io::Result<NatsCluster> {
        let leaf_users: Vec<(String, String)> = self
            .regions
            .iter()
            .map(|r| (format!("leaf-{r}"), random_secret()))
            .collect();
        let hub = NatsHub::start(leaf_users.clone())?;
        let hub_leaf = SocketAddr::from(([127, 0, 0, 1], hub.leaf_port()));
        let credentials: Vec<RoleCredentials> = self
            .regions
            .iter()
            .flat_map(|region| {
                let mirrors = others(&self.regions, region);
                self.roles
                    .iter()
                    .map(move |&role| (role, region.clone(), mirrors.clone()))
            })
            .map(|(role, region, mirrors)| {
                RoleCredentials::generate_with_mirrors(role, &self.prefix, &region, &mirrors)
            })
            .collect();
        let mut regions = Vec::with_capacity(self.regions.len());
        for (region, (user, password)) in self.regions.iter().zip(&leaf_users) {
            let dial = match &mut self.leaf_address {
                Some(route) => route(region, hub_leaf),
                None => hub_leaf,
            };
            let link = RegionLink {
                region: region.clone(),
                mirrors: others(&self.regions, region),
                leaf_url: format!("nats-leaf://{user}:{password}@{dial}"),
            };
            let roles = credentials
                .iter()
                .filter(|c| c.region == *region)
                .cloned()
                .collect();
            let server = NatsServer::start_full(self.durability, roles, None, Some(link))?;
            regions.push((region.clone(), server));
        }
        let cluster = NatsCluster {
            regions,
            hub,
            credentials,
        };
        // Through a proxy the hub may see the links later than the regions do; the regions'
        // own view is what mirrors depend on.
        for (_, server) in &cluster.regions {
            server.wait_linked(LINK_TIMEOUT)?;
        }
        Ok(cluster)
    }
}

fn others(all: &[RegionId], me: &RegionId) -> Vec<RegionId> {
    all.iter().filter(|r| *r != me).cloned().collect()
}

impl NatsCluster {
    /// A hub and a server per region in `regions` (e.g. `&["us", "eu", "ap"]`), linked,
    /// without role users: connect with [`NatsCluster::bus_config`].
    pub fn start(regions: &[&str]) -> io::Result<NatsCluster> {
        Self::builder(regions)?.start()
    }

    /// Options before starting; `regions` as for [`NatsCluster::start`].
    pub fn builder(regions: &[&str]) -> io::Result<NatsClusterBuilder> {
        let mut ids: Vec<RegionId> = Vec::with_capacity(regions.len());
        for r in regions {
            let id = RegionId::parse(*r)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
            if ids.contains(&id) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("region {r} twice"),
                ));
            }
            ids.push(id);
        }
        Ok(NatsClusterBuilder {
            regions: ids,
            durability: Durability::Process,
            roles: Vec::new(),
            prefix: String::new(),
            leaf_address: None,
        })
    }

    /// The regions, in start order.
    pub fn regions(&self) -> Vec<RegionId> {
        self.regions.iter().map(|(r, _)| r.clone()).collect()
    }

    /// `region`'s server. Panics for a region the cluster does not have (a test bug).
    pub fn region(&self, region: &str) -> &NatsServer {
        &self.regions[self.index(region)].1
    }

    /// `region`'s server, to kill, stop or restart it.
    pub fn region_mut(&mut self, region: &str) -> &mut NatsServer {
        let i = self.index(region);
        &mut self.regions[i].1
    }

    fn index(&self, region: &str) -> usize {
        self.regions
            .iter()
            .position(|(r, _)| r.as_str() == region)
            .unwrap_or_else(|| panic!("the cluster has no region {region}"))
    }

    pub fn hub(&self) -> &NatsHub {
        &self.hub
    }

    pub fn hub_mut(&mut self) -> &mut NatsHub {
        &mut self.hub
    }

    /// A harness-login [`BusConfig`] for `region` under `prefix`, mirroring every other
    /// region.
    pub fn bus_config(&self, region: &str, prefix: &str) -> BusConfig {
        let server = self.region(region);
        let id = self.regions[self.index(region)].0.clone();
        server.bus_config(&id, prefix)
    }

    /// `region`'s credentials for `role` (started with [`NatsClusterBuilder::roles`]).
    pub fn credentials(&self, region: &str, role: BusRole) -> Option<&RoleCredentials> {
        self.credentials
            .iter()
            .find(|c| c.region.as_str() == region && c.role == role)
    }

    /// A [`BusConfig`] logging in to `region`'s server as `role`, mirroring every other
    /// region. Panics when the cluster was not started with that role (a test bug).
    pub fn role_config(&self, region: &str, role: BusRole) -> io::Result<BusConfig> {
        let creds = self
            .credentials(region, role)
            .unwrap_or_else(|| panic!("the cluster was started without role {}", role.as_str()));
        self.region(region).role_config(creds)
    }

    /// Waits (bounded) until every region's leafnode link is up again, e.g. after
    /// restarting the hub.
    pub fn wait_linked(&self, timeout: Duration) -> io::Result<()> {
        for (_, server) in &self.regions {
            server.wait_linked(timeout)?;
        }
        Ok(())
    }
}

/// The hub: nats-server without JetStream, accepting the regions' leafnode connections.
pub struct NatsHub {
    dir: tempfile::TempDir,
    binary: PathBuf,
    spec: HubSpec,
    monitor_port: u16,
    process: Process,
}

impl NatsHub {
    fn start(leaf_users: Vec<(String, String)>) -> io::Result<NatsHub> {
        let mut last_err = None;
        // As for NatsServer: a port taken between probe and bind shows as an early exit.
        for _ in 0..3 {
            let mut hub = NatsHub {
                dir: tempfile::Builder::new().prefix("meridian-hub-").tempdir()?,
                binary: binary(),
                spec: HubSpec {
                    server_name: format!("hub-{}", free_port()?),
                    port: free_port()?,
                    leaf_port: free_port()?,
                    leaf_users: leaf_users.clone(),
                },
                monitor_port: free_port()?,
                process: Process::default(),
            };
            match hub.spawn() {
                Ok(()) => return Ok(hub),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("hub did not start")))
    }

    fn spawn(&mut self) -> io::Result<()> {
        let mut conf = nats_hub_config(&self.spec);
        conf.push_str(&format!("http: \"127.0.0.1:{}\"\n", self.monitor_port));
        let path = self.dir.path().join("hub.conf");
        fs::write(&path, conf)?;
        self.process = Process::spawn(
            &self.binary,
            &path,
            &self.dir.path().join("hub.log"),
            self.monitor_port,
        )?;
        Ok(())
    }

    /// The leafnode port the regions dial.
    pub fn leaf_port(&self) -> u16 {
        self.spec.leaf_port
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// SIGKILL: every region loses its link at once.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// Graceful stop (SIGTERM, SIGKILL after 5 s).
    pub fn stop(&mut self) {
        self.process.terminate();
    }

    /// SIGSTOP: links hang rather than drop.
    pub fn sigstop(&self) {
        self.process.signal("-STOP");
    }

    pub fn sigcont(&self) {
        self.process.signal("-CONT");
    }

    /// Kill, then start again on the same ports (the regions' servers reconnect by
    /// themselves; [`NatsCluster::wait_linked`] waits for it).
    pub fn restart(&mut self) -> io::Result<()> {
        self.kill();
        self.spawn()
    }

    /// How many region links the hub sees now.
    pub fn wait_leafnodes(&self, count: usize, timeout: Duration) -> io::Result<()> {
        wait_leafnodes(self.monitor_port, count, timeout)
    }
}

impl Drop for NatsHub {
    fn drop(&mut self) {
        self.kill();
    }
}
