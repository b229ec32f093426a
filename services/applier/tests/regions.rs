//! Appliers of linked regions (issue 9, item 3 as far as the applier's stream list goes):
//! each region applies its own stream and its mirror of every other region's, so events
//! from three regions end in every region's store. Real nats-server processes (a hub and a
//! JetStream server per region), real embedded stores.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Result};
use meridian_applier::{ApplierConfig, ApplierMetrics};
use meridian_bus::testing::{unique_prefix, NatsCluster};
use meridian_bus::{Bus, BusRole};
use meridian_model::ConversationId;
use meridian_store::testing::{eventually, user, EventFactory, TempStore};
use meridian_store::timeline::HistoryPage;
use meridian_store::Store;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const REGIONS: [&str; 3] = ["us", "eu", "ap"];

struct Region {
    /// The region role's login, as `meridian up`'s region process has: the applier runs
    /// with exactly its permissions.
    bus: Bus,
    /// The harness's login, for what no role may do (deleting a mirror under the applier).
    admin: Bus,
    store: Store,
    _dir: TempStore,
    events: EventFactory,
    stop: CancellationToken,
    task: JoinHandle<Result<(), meridian_applier::ApplierError>>,
}

async fn start(cluster: &NatsCluster, prefix: &str) -> Result<BTreeMap<&'static str, Region>> {
    let mut out = BTreeMap::new();
    for r in REGIONS {
        // Nothing provisioned here: each applier ensures its own stream and its mirrors.
        let bus = Bus::connect(cluster.role_config(r, BusRole::Region)?).await?;
        let admin = Bus::connect(cluster.bus_config(r, prefix)).await?;
        let dir = TempStore::open()?;
        let store = dir.store.clone();
        let stop = CancellationToken::new();
        let mut cfg = ApplierConfig::new(bus.region().clone());
        cfg.batch_wait_ms = 50;
        let task = tokio::spawn(meridian_applier::run_with_metrics(
            cfg,
            bus.clone(),
            store.clone(),
            std::sync::Arc::new(ApplierMetrics::default()),
            stop.clone(),
        ));
        out.insert(
            r,
            Region {
                bus,
                admin,
                store,
                _dir: dir,
                events: EventFactory::new(r),
                stop,
                task,
            },
        );
    }
    Ok(out)
}

/// Waits until every region has applied every region's stream up to its end.
async fn wait_applied(regions: &BTreeMap<&'static str, Region>) -> Result<()> {
    let mut ends = BTreeMap::new();
    for region in regions.values() {
        let stream = region.bus.stream();
        let state = region.bus.stream_state(&stream).await?;
        ends.insert(stream, state.last_seq);
    }
    for (name, region) in regions {
        for (stream, last) in &ends {
            eventually(
                Duration::from_secs(60),
                &format!("{name} applies {stream} to {last}"),
                || async {
                    let cp = region.store.stream_checkpoint(stream).await?;
                    Ok(cp.seq >= *last)
                },
            )
            .await?;
        }
    }
    Ok(())
}

async fn digests(regions: &BTreeMap<&'static str, Region>) -> Result<BTreeMap<&'static str, String>> {
    let mut out = BTreeMap::new();
    for (name, region) in regions {
        out.insert(*name, region.store.digest().await?);
    }
    Ok(out)
}

async fn history_len(store: &Store, cid: &ConversationId, viewer: &str) -> Result<usize> {
    let h = store
        .history(cid, &user(viewer), HistoryPage::After(None), 10_000)
        .await?;
    Ok(h.messages.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item3_each_region_applies_its_mirrors_and_the_stores_converge() -> Result<()> {
    let prefix = unique_prefix();
    let cluster = NatsCluster::builder(&REGIONS)?
        .roles(&prefix, &[BusRole::Region])
        .start()?;
    let regions = start(&cluster, &prefix).await?;
    for region in regions.values() {
        assert_eq!(region.bus.applied_streams().len(), 3);
    }

    // One user homed in each region, provisioned by its region; a group made in us.
    for (name, region) in &regions {
        let ev = region.events.user(&format!("{name}-user"), name);
        region.bus.publish_event(&ev).await?;
    }
    let cid = ConversationId::new_group();
    let us = &regions["us"];
    let group = us.events.group("us-user", &cid, &["eu-user", "ap-user"]);
    us.bus.publish_event(&group).await?;
    wait_applied(&regions).await?;

    // Every member sends from its home region.
    const N: usize = 10;
    for (name, region) in &regions {
        let sender = format!("{name}-user");
        let envs: Vec<_> = (0..N)
            .map(|n| {
                region
                    .events
                    .message(&sender, &cid, &format!("m{n}"), &format!("hi {n}"))
            })
            .collect();
        region.bus.publish_events(&envs).await?;
    }
    wait_applied(&regions).await?;
    let d = digests(&regions).await?;
    ensure!(d.values().all(|x| *x == d["us"]), "digests differ: {d:?}");
    for (name, region) in &regions {
        assert_eq!(
            history_len(&region.store, &cid, &format!("{name}-user")).await?,
            3 * N,
            "{name}"
        );
    }

    // A mirror checkpoint counts in the mirror's own instance: eu's mirror of us deleted
    // and recreated is a new instance, applied again from its start without changing
    // anything, and what us sends next still arrives.
    let eu = &regions["eu"];
    let mirror = us.bus.stream();
    let old = eu.bus.stream_state(&mirror).await?.instance;
    assert_eq!(eu.store.stream_checkpoint(&mirror).await?.instance, old);
    eu.admin.jetstream().delete_stream(&mirror).await?;
    let more: Vec<_> = (N..N + 3)
        .map(|n| us.events.message("us-user", &cid, &format!("m{n}"), "late"))
        .collect();
    us.bus.publish_events(&more).await?;
    // The applier's task for that mirror recreates it when it opens it again; the harness
    // does too, in case the task is still waiting out a backoff.
    eventually(Duration::from_secs(60), "eu's mirror of us is back", || async {
        if eu.bus.stream_state(&mirror).await.is_err() {
            eu.bus.ensure_mirrors().await?;
        }
        Ok(true)
    })
    .await?;
    wait_applied(&regions).await?;
    let new = eu.bus.stream_state(&mirror).await?.instance;
    assert_ne!(new, old);
    eventually(
        Duration::from_secs(60),
        "eu's checkpoint moves to the new mirror",
        || async { Ok(eu.store.stream_checkpoint(&mirror).await?.instance == new) },
    )
    .await?;
    let d = digests(&regions).await?;
    ensure!(
        d.values().all(|x| *x == d["us"]),
        "digests differ after the mirror was replaced: {d:?}"
    );
    assert_eq!(history_len(&eu.store, &cid, "eu-user").await?, 3 * N + 3);

    for region in regions.into_values() {
        region.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), region.task).await???;
    }
    Ok(())
}

/// Stream retention (`meridian_applier::trim_applied`, issue 14): a region trims from its
/// own stream what it applied and every other region's mirror holds, and from its mirrors
/// what it applied; a region whose mirror cannot be asked holds the trimming of the
/// origin's stream back. After trimming, every stream keeps flowing and the stores agree.
/// The age rule (`retain_applied_s`) is the task's and is given as "everything" here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_trims_what_this_region_applied_and_every_mirror_holds() -> Result<()> {
    let prefix = unique_prefix();
    let cluster = NatsCluster::builder(&REGIONS)?
        .roles(&prefix, &[BusRole::Region])
        .start()?;
    let regions = start(&cluster, &prefix).await?;
    for (name, region) in &regions {
        region
            .bus
            .publish_event(&region.events.user(&format!("{name}-user"), name))
            .await?;
    }
    let cid = ConversationId::new_group();
    let us = &regions["us"];
    us.bus
        .publish_event(&us.events.group("us-user", &cid, &["eu-user", "ap-user"]))
        .await?;
    const N: usize = 8;
    for (name, region) in &regions {
        let sender = format!("{name}-user");
        let envs: Vec<_> = (0..N)
            .map(|n| region.events.message(&sender, &cid, &format!("a{n}"), "before"))
            .collect();
        region.bus.publish_events(&envs).await?;
    }
    wait_applied(&regions).await?;

    // Everything is applied everywhere and every mirror holds it: each region's own stream
    // and its mirrors are trimmed to their ends.
    for (name, region) in &regions {
        for stream in region.bus.applied_streams() {
            let before = region.bus.stream_state(&stream).await?;
            let trimmed =
                meridian_applier::trim_applied(&region.bus, &region.store, &stream, u64::MAX).await?;
            assert_eq!(
                trimmed.map(|(through, _)| through),
                Some(before.last_seq),
                "{name} trims {stream} to its end"
            );
            let after = region.bus.stream_state(&stream).await?;
            assert_eq!(
                (after.messages, after.first_seq),
                (0, before.last_seq + 1),
                "{name} {stream}"
            );
        }
    }

    // Nothing above what the age rule allows goes.
    let eu = &regions["eu"];
    eu.bus
        .publish_event(&eu.events.message("eu-user", &cid, "aged", "young"))
        .await?;
    wait_applied(&regions).await?;
    let own = eu.bus.stream();
    let state = eu.bus.stream_state(&own).await?;
    assert_eq!(
        meridian_applier::trim_applied(&eu.bus, &eu.store, &own, state.last_seq - 1).await?,
        None,
        "eu trimmed what the age rule kept"
    );

    // eu's mirror of us gone (as if eu could not be asked): us keeps its own stream whole,
    // though us applied all of it.
    let mirror = us.bus.stream();
    eu.admin.jetstream().delete_stream(&mirror).await?;
    us.bus
        .publish_event(
            &us.events
                .message("us-user", &cid, "held", "while eu's mirror is gone"),
        )
        .await?;
    eventually(Duration::from_secs(30), "us applies its own event", || async {
        let end = us.bus.stream_state(&mirror).await?.last_seq;
        Ok(us.store.stream_checkpoint(&mirror).await?.seq >= end)
    })
    .await?;
    if eu.bus.stream_state(&mirror).await.is_err() {
        let before = us.bus.stream_state(&mirror).await?;
        assert_eq!(
            meridian_applier::trim_applied(&us.bus, &us.store, &mirror, u64::MAX).await?,
            None,
            "us trimmed its stream while eu's mirror of it was missing"
        );
        assert_eq!(us.bus.stream_state(&mirror).await?.messages, before.messages);
    }

    // The mirror comes back (the applier recreates it) and everything still flows: more
    // messages from every region reach every store, and the stores agree.
    eventually(Duration::from_secs(60), "eu's mirror of us is back", || async {
        if eu.bus.stream_state(&mirror).await.is_err() {
            eu.bus.ensure_mirrors().await?;
        }
        Ok(true)
    })
    .await?;
    for (name, region) in &regions {
        let sender = format!("{name}-user");
        let envs: Vec<_> = (0..N)
            .map(|n| region.events.message(&sender, &cid, &format!("b{n}"), "after"))
            .collect();
        region.bus.publish_events(&envs).await?;
    }
    wait_applied(&regions).await?;
    let d = digests(&regions).await?;
    ensure!(
        d.values().all(|x| *x == d["us"]),
        "digests differ after trimming: {d:?}"
    );
    for (name, region) in &regions {
        assert_eq!(
            history_len(&region.store, &cid, &format!("{name}-user")).await?,
            3 * N + 1 + 1 + 3 * N,
            "{name}"
        );
    }

    for region in regions.into_values() {
        region.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), region.task).await???;
    }
    Ok(())
}
