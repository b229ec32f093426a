//! What `disk` and `geo` durability (issue 10, item 4) need from the bus, against real
//! nats-server processes: atomic batches (group commit) and the other regions' view of this
//! region's stream (geo acks).

use std::time::Duration;

use anyhow::{bail, ensure, Result};
use meridian_bus::testing::{unique_prefix, NatsCluster, NatsServer};
use meridian_bus::{Bus, BusConfig, BusRole, Durability};
use meridian_model::events::{event_envelope::Body, EventEnvelope, UserUpserted};
use meridian_model::{EventId, RegionId};
use tokio::time::Instant;

fn event(region: &str, n: usize) -> EventEnvelope {
    EventEnvelope {
        event_id: EventId::new_v7().as_bytes().to_vec(),
        origin_region: region.to_string(),
        hlc: n as u64 + 1,
        actor: "admin".into(),
        body: Some(Body::UserUpserted(UserUpserted {
            user_id: format!("{region}-u{n}"),
            home_region: region.to_string(),
            display_name: format!("U{n}"),
        })),
        ..Default::default()
    }
}

/// The event id stored at `seq` of the bus's own stream.
async fn id_at(bus: &Bus, seq: u64) -> Result<Vec<u8>> {
    Ok(bus.get_event(seq).await?.event_id)
}

#[tokio::test]
async fn item4_disk_group_commit_stores_each_batch_whole_and_retries_stay_exactly_once() -> Result<()> {
    let server = NatsServer::start_with(Durability::Disk)?;
    let mut cfg = BusConfig::new(server.url(), RegionId::parse("us")?);
    cfg.prefix = unique_prefix();
    let bus = Bus::connect(cfg).await?;
    bus.ensure_stream().await?;

    // One batch: consecutive sequences in slice order, each the event it names.
    let first: Vec<_> = (0..100).map(|n| event("us", n)).collect();
    let acks = bus.publish_batch(&first).await?;
    ensure!(acks.len() == 100);
    for (i, (ack, env)) in acks.iter().zip(&first).enumerate() {
        ensure!(ack.stream_seq == i as u64 + 1 && !ack.duplicate, "{i}: {ack:?}");
        ensure!(
            id_at(&bus, ack.stream_seq).await? == env.event_id,
            "seq {}",
            ack.stream_seq
        );
    }

    // A batch holding an event the stream already has (a retried send): the server refuses
    // the atomic batch whole, the bus publishes it one by one, the old event answers with its
    // original sequence and the new ones are stored once.
    let mixed = vec![event("us", 100), first[4].clone(), event("us", 101)];
    let acks = bus.publish_batch(&mixed).await?;
    ensure!(acks[1].duplicate && acks[1].stream_seq == 5, "{acks:?}");
    ensure!(!acks[0].duplicate && !acks[2].duplicate, "{acks:?}");
    ensure!(id_at(&bus, acks[0].stream_seq).await? == mixed[0].event_id);
    ensure!(id_at(&bus, acks[2].stream_seq).await? == mixed[2].event_id);

    // The whole first batch again: every event answers as the original.
    let again = bus.publish_batch(&first).await?;
    for (i, ack) in again.iter().enumerate() {
        ensure!(ack.duplicate && ack.stream_seq == i as u64 + 1, "{i}: {ack:?}");
    }
    let state = bus.stream_state(&bus.stream()).await?;
    ensure!(state.messages == 102 && state.last_seq == 102, "{state:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item4_geo_the_gateway_sees_how_far_another_regions_mirror_holds_its_stream() -> Result<()> {
    let prefix = unique_prefix();
    let mut cluster = NatsCluster::builder(&["us", "eu"])?
        .roles(&prefix, &[BusRole::Applier, BusRole::Gateway])
        .start()?;
    for r in ["us", "eu"] {
        Bus::connect(cluster.role_config(r, BusRole::Applier)?)
            .await?
            .ensure_stream()
            .await?;
    }
    // The gateway role (its permissions, not the harness login) asks eu's domain.
    let gateway = Bus::connect(cluster.role_config("us", BusRole::Gateway)?).await?;
    let eu = RegionId::parse("eu")?;
    ensure!(gateway.mirrored_seq(&eu).await?.is_none(), "no mirror yet");
    Bus::connect(cluster.role_config("eu", BusRole::Applier)?)
        .await?
        .ensure_mirrors()
        .await?;

    let envs: Vec<_> = (0..20).map(|n| event("us", n)).collect();
    let last = gateway.publish_batch(&envs).await?.last().unwrap().stream_seq;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let held = gateway.mirrored_seq(&eu).await?;
        if held == Some(last) {
            break;
        }
        if Instant::now() > deadline {
            bail!("eu's mirror holds {held:?} of {last}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // With eu gone nothing can confirm a geo copy: an error, never a stale yes.
    cluster.region_mut("eu").kill();
    ensure!(gateway.mirrored_seq(&eu).await.is_err());
    Ok(())
}

/// Not a check: the figures behind group commit (docs/benchmarks.md). Run with
/// `cargo test -p meridian-bus --features testing --release --test durability -- --ignored --nocapture`.
#[tokio::test]
#[ignore]
async fn measure_publish_rates_per_durability() -> Result<()> {
    for durability in [Durability::Process, Durability::Disk] {
        let server = NatsServer::start_with(durability)?;
        let mut cfg = BusConfig::new(server.url(), RegionId::parse("us")?);
        cfg.prefix = unique_prefix();
        let bus = Bus::connect(cfg).await?;
        bus.ensure_stream().await?;
        for batch in [1usize, 8, 64, 256] {
            for atomic in [false, true] {
                let n = 4_096usize.min(batch * 500);
                let started = Instant::now();
                for start in (0..n).step_by(batch) {
                    let envs: Vec<_> = (start..start + batch).map(|i| event("us", i)).collect();
                    if atomic {
                        bus.publish_batch(&envs).await?;
                    } else {
                        bus.publish_events(&envs).await?;
                    }
                }
                let secs = started.elapsed().as_secs_f64();
                println!(
                    "{durability:<7} batch {batch:>3} {:<9} {n:>5} events in {secs:.3} s = {:>6.0} acked/s",
                    if atomic { "atomic" } else { "pipelined" },
                    n as f64 / secs
                );
            }
        }
    }
    Ok(())
}
