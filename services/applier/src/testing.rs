//! One region's moving parts for a test (feature `testing`): a real nats-server, a bus under a
//! unique prefix with the region's stream provisioned, and a temporary embedded store; and the
//! real applier between them. Used by this crate's tests and by the tests of push, which
//! needs the applier to apply what it publishes. Nothing is mocked.

use std::sync::Arc;
use std::time::Duration;

use meridian_bus::testing::{unique_prefix, NatsServer};
use meridian_bus::{Bus, BusConfig, BusError};
use meridian_model::RegionId;
use meridian_store::testing::TempStore;
use meridian_store::{Store, StoreError};
use thiserror::Error;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{ApplierConfig, ApplierError, ApplierMetrics};

/// What setting up or stopping a [`TestRegion`] can fail with.
#[derive(Debug, Error)]
pub enum TestRegionError {
    #[error("nats-server: {0}")]
    Nats(#[from] std::io::Error),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the applier failed: {0}")]
    Applier(#[from] ApplierError),
    #[error("the applier did not stop within {0:?}")]
    NotStopped(Duration),
    #[error("the applier task panicked: {0}")]
    Panicked(#[from] tokio::task::JoinError),
}

/// A nats-server of its own, a bus under a unique prefix with the region's stream ensured,
/// and an embedded store in a temporary directory under a unique namespace. Dropping it
/// kills the server and removes the directories.
pub struct TestRegion {
    pub region: RegionId,
    pub server: NatsServer,
    pub bus: Bus,
    pub store: Store,
    /// The store's directory (the store above is its handle).
    pub store_dir: TempStore,
}

impl TestRegion {
    pub async fn start(region: RegionId) -> Result<TestRegion, TestRegionError> {
        let server = NatsServer::start()?;
        let mut cfg = BusConfig::new(server.url(), region.clone());
        cfg.prefix = unique_prefix();
        let bus = Bus::connect(cfg).await?;
        bus.ensure_stream().await?;
        let store_dir = TempStore::open()?;
        Ok(TestRegion {
            region,
            server,
            bus,
            store: store_dir.store.clone(),
            store_dir,
        })
    }

    /// The real applier on this region's stream, with the default configuration.
    pub fn start_applier(&self) -> RunningApplier {
        self.start_applier_with(ApplierConfig::new(self.region.clone()))
    }

    pub fn start_applier_with(&self, cfg: ApplierConfig) -> RunningApplier {
        let metrics = Arc::new(ApplierMetrics::default());
        let stop = CancellationToken::new();
        let task = tokio::spawn(crate::run_with_metrics(
            cfg,
            self.bus.clone(),
            self.store.clone(),
            metrics.clone(),
            stop.clone(),
        ));
        RunningApplier { metrics, stop, task }
    }
}

/// An applier task started by [`TestRegion::start_applier`]. Dropped without
/// [`RunningApplier::stop`], it runs until the test's runtime ends.
pub struct RunningApplier {
    pub metrics: Arc<ApplierMetrics>,
    stop: CancellationToken,
    task: JoinHandle<Result<(), ApplierError>>,
}

impl RunningApplier {
    /// Cancels the applier and waits (10 s at most) for it to finish; its metrics.
    pub async fn stop(self) -> Result<Arc<ApplierMetrics>, TestRegionError> {
        const WITHIN: Duration = Duration::from_secs(10);
        self.stop.cancel();
        tokio::time::timeout(WITHIN, self.task)
            .await
            .map_err(|_| TestRegionError::NotStopped(WITHIN))???;
        Ok(self.metrics)
    }
}
