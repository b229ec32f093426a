//! One region process: the store, the bus, and the roles over them (gateway, applier, inbox
//! sweeper), started in order and stopped in order.
//!
//! Stop order: the gateway stops accepting and finishes requests in flight (their publishes
//! complete or fail back to the client), then the applier commits the batch it holds, then
//! push, then the search indexer (which commits what it added), then the sweeper (which
//! runs where the applier runs) ends, and the store is closed last when its handles drop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meridian_applier::ApplierMetrics;
use meridian_bus::{Bus, BusRole};
use meridian_gateway::Gateway;
use meridian_store::Store;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::RegionConfig;

#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error("store: {0}")]
    Store(#[from] meridian_store::StoreError),
    #[error("bus: {0}")]
    Bus(#[from] meridian_bus::BusError),
    #[error("gateway: {0}")]
    Gateway(#[from] meridian_gateway::GatewayError),
    #[error("applier: {0}")]
    Applier(#[from] meridian_applier::ApplierError),
    #[error("push: {0}")]
    Push(#[from] meridian_push::PushError),
    #[error("search: {0}")]
    Search(#[from] meridian_search::SearchError),
    #[error("role task {0} panicked")]
    Panicked(&'static str),
}

/// Which roles this process runs (an embedded store can be opened by one process only, so
/// with it a region runs both in one process).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    pub gateway: bool,
    pub applier: bool,
}

impl Roles {
    pub const ALL: Roles = Roles {
        gateway: true,
        applier: true,
    };
}

/// A started region.
pub struct RunningRegion {
    /// Where the gateway listens, when it runs here.
    pub gateway_addr: Option<SocketAddr>,
    pub store: Store,
    pub bus: Bus,
    gateway: Option<(CancellationToken, JoinHandle<Result<(), RegionError>>)>,
    applier: Option<(CancellationToken, JoinHandle<Result<(), RegionError>>)>,
    push: Option<(CancellationToken, JoinHandle<Result<(), RegionError>>)>,
    search: Option<(CancellationToken, JoinHandle<Result<(), RegionError>>)>,
    sweeper: Option<(CancellationToken, JoinHandle<()>)>,
}

/// Opens the store, connects the bus (creating the stream and the mirrors of the other
/// regions' streams when the applier runs here), and starts the roles.
pub async fn start(cfg: RegionConfig, roles: Roles) -> Result<RunningRegion, RegionError> {
    let mut bus_cfg = cfg.bus.clone();
    let role = *bus_cfg
        .role
        .get_or_insert(BusRole::for_roles(roles.gateway, roles.applier));
    if !role.covers(roles.gateway, roles.applier) {
        return Err(RegionError::Bus(meridian_bus::BusError::Config {
            field: "role",
            reason: format!(
                "bus.role {} lacks the NATS permissions of the roles this process runs \
                 (gateway: {}, applier: {})",
                role.as_str(),
                roles.gateway,
                roles.applier
            ),
        }));
    }
    let store = Store::open(&cfg.store, b"").await?;
    let bus = Bus::connect(bus_cfg).await?;
    // Only the applier's credentials may create the streams; a gateway on its own publishes
    // (retrying) once an applier has. The mirrors of the other regions' streams (`mirrors`)
    // are created, or repaired, before the applier starts applying them.
    if roles.applier {
        bus.ensure_stream().await?;
        bus.ensure_mirrors().await?;
    }

    // The search index runs where the applier runs (one indexer per region, like the
    // sweeper), opened before any role starts so a bad index directory stops nothing.
    let search_metrics = Arc::new(meridian_search::SearchMetrics::default());
    let search = match (roles.applier && cfg.search.enabled, cfg.search_index_dir()) {
        (true, Some(dir)) => {
            let mut search_cfg = cfg.search.clone();
            search_cfg.index_dir = Some(dir);
            Some(meridian_search::Search::open(
                search_cfg,
                store.clone(),
                search_metrics.clone(),
            )?)
        }
        (true, None) => {
            tracing::warn!("search is off: set search.index_dir (the store is not embedded)");
            None
        }
        (false, _) => None,
    };

    let applier_metrics = Arc::new(ApplierMetrics::default());
    let applier = if roles.applier {
        let token = CancellationToken::new();
        let task = tokio::spawn(meridian_applier::run_with_metrics(
            cfg.applier.clone(),
            bus.clone(),
            store.clone(),
            applier_metrics.clone(),
            token.clone(),
        ));
        let task = tokio::spawn(async move {
            task.await
                .map_err(|_| RegionError::Panicked("applier"))?
                .map_err(RegionError::from)
        });
        Some((token, task))
    } else {
        None
    };

    let push_metrics = Arc::new(meridian_push::PushMetrics::default());
    let mut push = None;
    let (gateway, gateway_addr) = if roles.gateway {
        let token = CancellationToken::new();
        let mut gw = match Gateway::bind(cfg.gateway.clone(), store.clone(), bus.clone(), token.clone()).await
        {
            Ok(gw) => gw,
            Err(e) => {
                // The applier is already running: stop it rather than leave it detached
                // (in-process callers such as tests would otherwise keep it alive).
                if let Some((token, task)) = applier {
                    token.cancel();
                    let _ = task.await;
                }
                return Err(e.into());
            }
        };
        let addr = gw.local_addr();
        if let Some(search) = &search {
            gw.set_search(search.clone());
            search_metrics.register(gw.metrics_registry());
        }
        // One registry for the process, encoded by the gateway's /metrics.
        if roles.applier {
            applier_metrics.register(gw.metrics_registry());
        }
        // Push runs beside the gateway: "offline" means no WebSocket open here, and the
        // gateway's hub is what knows that.
        if let Some(push_cfg) = cfg.push.clone() {
            push_metrics.register(gw.metrics_registry());
            let hub = gw.hub();
            let presence: Arc<dyn meridian_push::Presence> =
                Arc::new(move |u: &meridian_model::UserId| hub.presence(u).0);
            // Subscribed before the gateway serves, so no delivery precedes push.
            let started = meridian_push::Push::start(
                push_cfg,
                bus.clone(),
                store.clone(),
                presence,
                push_metrics.clone(),
            )
            .await;
            let started = match started {
                Ok(p) => p,
                Err(e) => {
                    if let Some((token, task)) = applier {
                        token.cancel();
                        let _ = task.await;
                    }
                    return Err(e.into());
                }
            };
            let token = CancellationToken::new();
            let task = tokio::spawn(started.run(token.clone()));
            let task = tokio::spawn(async move {
                task.await
                    .map_err(|_| RegionError::Panicked("push"))?
                    .map_err(RegionError::from)
            });
            push = Some((token, task));
        }
        let task = tokio::spawn(gw.run());
        let task = tokio::spawn(async move {
            task.await
                .map_err(|_| RegionError::Panicked("gateway"))?
                .map_err(RegionError::from)
        });
        (Some((token, task)), Some(addr))
    } else {
        (None, None)
    };

    let search = search.map(|search| {
        let token = CancellationToken::new();
        let task = tokio::spawn({
            let token = token.clone();
            // An indexer that fails stops indexing, not the region: delivery goes on,
            // search answers from the last commit, and the lag shows it (the next start
            // resumes from the committed checkpoint).
            async move {
                let ended = search.run(token).await;
                if let Err(e) = &ended {
                    tracing::error!(error = %e, "search indexer stopped; search results fall behind until the region restarts");
                }
                ended
            }
        });
        let task = tokio::spawn(async move {
            task.await
                .map_err(|_| RegionError::Panicked("search"))?
                .map_err(RegionError::from)
        });
        (token, task)
    });

    // The sweeper deletes inbox entries, which only the applier writes: running it with the
    // applier gives a region exactly as many sweepers as appliers, instead of one more per
    // gateway replica racing them on the same keys.
    let sweeper = roles.applier.then(|| {
        let token = CancellationToken::new();
        let task = tokio::spawn(meridian_store::inbox::run_sweeper(
            store.clone(),
            Duration::from_secs(cfg.inbox_ttl_s),
            Duration::from_secs(cfg.sweep_interval_s),
            token.clone(),
        ));
        (token, task)
    });
    tracing::info!(region = %cfg.region, gateway = ?gateway_addr, applier = roles.applier, "region started");
    Ok(RunningRegion {
        gateway_addr,
        store,
        bus,
        gateway,
        applier,
        push,
        search,
        sweeper,
    })
}

impl RunningRegion {
    /// Stops the roles in order: gateway, applier, sweeper. Returns the first role error.
    pub async fn stop(self) -> Result<(), RegionError> {
        let mut first_err = None;
        // Data flows gateway -> bus -> applier -> store -> push: stop in that order, so each
        // role drains what the one before it already handed on.
        for (name, role) in [
            ("gateway", self.gateway),
            ("applier", self.applier),
            ("push", self.push),
            ("search", self.search),
        ] {
            if let Some((token, task)) = role {
                token.cancel();
                match task.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::error!(role = name, error = %e, "role ended with an error");
                        first_err.get_or_insert(e);
                    }
                    Err(_) => {
                        first_err.get_or_insert(RegionError::Panicked(name));
                    }
                }
            }
        }
        if let Some((token, task)) = self.sweeper {
            token.cancel();
            let _ = task.await;
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Resolves when a role ends on its own (roles run until stopped, so that is a failure).
    pub async fn failed(&self) -> &'static str {
        loop {
            if self.gateway.as_ref().is_some_and(|(_, t)| t.is_finished()) {
                return "gateway";
            }
            if self.applier.as_ref().is_some_and(|(_, t)| t.is_finished()) {
                return "applier";
            }
            if self.push.as_ref().is_some_and(|(_, t)| t.is_finished()) {
                return "push";
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Runs a region until `shutdown`, then stops it in order. A role that dies on its own
/// stops the process with an error, so a supervisor (`meridian up`, systemd) restarts it.
pub async fn run(cfg: RegionConfig, roles: Roles, shutdown: CancellationToken) -> Result<(), RegionError> {
    let region = start(cfg, roles).await?;
    tokio::select! {
        _ = shutdown.cancelled() => {}
        role = region.failed() => tracing::error!(role, "a role stopped unexpectedly; stopping the region"),
    }
    region.stop().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_bus_role_short_of_the_roles_run_is_refused_naming_the_field() {
        let text = r#"
region = "us"
store = "embedded:///nonexistent/meridian-region-test"
[bus]
nats_url = "nats://127.0.0.1:1"
role = "gateway"
[gateway]
listen = "127.0.0.1:0"
jwt_secret = "0123456789abcdef0123456789abcdef"
admin_key = "admin-key-admin-key"
"#;
        let cfg = RegionConfig::from_toml(text, "test", Vec::new()).unwrap();
        // Refused before the store is opened or NATS is dialled.
        match start(cfg, Roles::ALL).await {
            Err(RegionError::Bus(meridian_bus::BusError::Config { field, .. })) => assert_eq!(field, "role"),
            Err(e) => panic!("expected a bus.role error, got {e}"),
            Ok(_) => panic!("started with a gateway's credentials for every role"),
        }
    }
}
