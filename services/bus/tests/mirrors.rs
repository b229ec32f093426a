//! Regions linked through a hub (issue 9, item 2), against real nats-server processes: a
//! hub without JetStream and one JetStream server per region, each its own domain, each
//! holding a mirror of every other region's stream.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use futures::StreamExt;
use meridian_bus::testing::{binary, unique_prefix, NatsCluster};
use meridian_bus::{
    nats_hub_config, nats_server_config, Bus, BusRole, Durability, HubSpec, LeafRemote, MirrorHealth,
    NatsServerSpec,
};
use meridian_model::events::{event_envelope::Body, EventEnvelope, UserUpserted};
use meridian_model::{EventId, RegionId, UserId};
use tokio::time::Instant;

const REGIONS: [&str; 3] = ["us", "eu", "ap"];

fn event(region: &str, n: usize) -> EventEnvelope {
    EventEnvelope {
        event_id: EventId::new_v7().as_bytes().to_vec(),
        origin_region: region.to_string(),
        hlc: n as u64 + 1,
        actor: "admin".into(),
        actor_device: String::new(),
        traceparent: String::new(),
        tracestate: String::new(),
        body: Some(Body::UserUpserted(UserUpserted {
            user_id: format!("{region}-u{n}"),
            home_region: region.to_string(),
            display_name: format!("U{n}"),
        })),
    }
}

fn id_of(env: &EventEnvelope) -> String {
    EventId::from_bytes(&env.event_id).unwrap().to_string()
}

/// A harness-login bus per region, each with its stream and mirrors ensured.
async fn buses(cluster: &NatsCluster, prefix: &str) -> Result<BTreeMap<String, Bus>> {
    let mut out = BTreeMap::new();
    for r in cluster.regions() {
        let bus = Bus::connect(cluster.bus_config(r.as_str(), prefix)).await?;
        bus.ensure_stream().await?;
        out.insert(r.to_string(), bus);
    }
    // Mirrors after every origin exists, so none starts out failing to find its origin.
    for bus in out.values() {
        bus.ensure_mirrors().await?;
    }
    Ok(out)
}

/// `stream`'s events in `bus`'s region: sequence -> event id, read one by one.
async fn stream_ids(bus: &Bus, stream: &str) -> Result<BTreeMap<u64, String>> {
    let state = bus.stream_state(stream).await?;
    let s = bus.jetstream().get_stream_no_info(stream).await?;
    let mut out = BTreeMap::new();
    for seq in state.first_seq.max(1)..=state.last_seq {
        let msg = s
            .get_raw_message(seq)
            .await
            .with_context(|| format!("{stream} seq {seq}"))?;
        let env: EventEnvelope = prost::Message::decode(msg.payload.as_ref())?;
        out.insert(seq, id_of(&env));
    }
    Ok(out)
}

/// Polls (bounded) until every region's mirror of `origin` holds `last_seq`.
async fn wait_mirrored(
    buses: &BTreeMap<String, Bus>,
    origin: &str,
    last_seq: u64,
    within: Duration,
) -> Result<()> {
    let deadline = Instant::now() + within;
    let stream = buses[origin].stream();
    for (region, bus) in buses.iter().filter(|(r, _)| r.as_str() != origin) {
        loop {
            let state = bus.stream_state(&stream).await?;
            if state.last_seq >= last_seq {
                break;
            }
            if Instant::now() > deadline {
                let health = bus.mirror_health().await?;
                bail!(
                    "{region}'s mirror of {origin} at {} of {last_seq}; health {health:?}",
                    state.last_seq
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// Every region's copy of every region's stream holds the same sequence -> id map.
async fn assert_replicas_equal(
    buses: &BTreeMap<String, Bus>,
) -> Result<BTreeMap<String, BTreeMap<u64, String>>> {
    let mut origins = BTreeMap::new();
    for (origin, bus) in buses {
        let ids = stream_ids(bus, &bus.stream()).await?;
        for (region, other) in buses.iter().filter(|(r, _)| *r != origin) {
            let mirrored = stream_ids(other, &bus.stream()).await?;
            ensure!(
                mirrored == ids,
                "{region}'s mirror of {origin} differs: {} vs {} events",
                mirrored.len(),
                ids.len()
            );
        }
        origins.insert(origin.clone(), ids);
    }
    Ok(origins)
}

fn health_of<'a>(all: &'a [MirrorHealth], region: &str) -> &'a MirrorHealth {
    all.iter()
        .find(|h| h.region.as_str() == region)
        .expect("a mirror of every other region")
}

#[test]
fn item2_rendered_configs_are_valid_for_nats_server() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let region = nats_server_config(&NatsServerSpec {
        store_dir: dir.path().join("js"),
        port: 4333,
        durability: Durability::Disk,
        server_name: "meridian-eu".into(),
        domain: "eu".into(),
        leaf_remotes: vec![LeafRemote {
            url: "nats-leaf://leaf-eu:pw@127.0.0.1:7902".into(),
        }],
    });
    let hub = nats_hub_config(&HubSpec {
        server_name: "meridian-hub".into(),
        port: 7900,
        leaf_port: 7902,
        leaf_users: vec![("leaf-eu".into(), "pw".into()), ("leaf-us".into(), "p\"w".into())],
    });
    let roles = meridian_bus::RoleCredentials::generate_with_mirrors(
        BusRole::Region,
        "",
        &RegionId::parse("eu")?,
        &[RegionId::parse("us")?],
    );
    let region = format!(
        "{region}{}",
        meridian_bus::nats_server_auth_config(&[roles.user], None)
    );
    for (name, text) in [("region.conf", region), ("hub.conf", hub)] {
        let path = dir.path().join(name);
        std::fs::write(&path, &text)?;
        let out = std::process::Command::new(binary())
            .arg("-t")
            .arg("-c")
            .arg(&path)
            .output()?;
        ensure!(
            out.status.success(),
            "{name} rejected: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item2_events_of_each_region_appear_in_the_others_mirrors_with_equal_sequences() -> Result<()> {
    let prefix = unique_prefix();
    let cluster = NatsCluster::builder(&REGIONS)?
        .roles(&prefix, &[BusRole::Applier, BusRole::Gateway])
        .start()?;
    // The applier role provisions (its permissions must allow every mirror); the harness
    // login publishes.
    for r in REGIONS {
        let applier = Bus::connect(cluster.role_config(r, BusRole::Applier)?).await?;
        applier.ensure_stream().await?;
    }
    for r in REGIONS {
        let applier = Bus::connect(cluster.role_config(r, BusRole::Applier)?).await?;
        applier.ensure_mirrors().await?;
        assert_eq!(applier.applied_streams().len(), 3);
        assert_eq!(applier.applied_streams()[0], applier.stream());
    }
    let buses = buses(&cluster, &prefix).await?;
    const N: usize = 40;
    for (region, bus) in &buses {
        let envs: Vec<_> = (0..N).map(|n| event(region, n)).collect();
        let acks = bus.publish_events(&envs).await?;
        assert_eq!(acks.last().unwrap().stream_seq, N as u64);
    }
    for region in REGIONS {
        wait_mirrored(&buses, region, N as u64, Duration::from_secs(30)).await?;
    }
    let origins = assert_replicas_equal(&buses).await?;
    for (origin, ids) in &origins {
        assert_eq!(ids.len(), N, "{origin}");
    }
    // The gateway role reads its mirrors' health.
    let gateway = Bus::connect(cluster.role_config("eu", BusRole::Gateway)?).await?;
    let health = gateway.mirror_health().await?;
    assert_eq!(health.len(), 2);
    for h in &health {
        assert_eq!(h.last_seq, N as u64, "{h:?}");
        assert_eq!(h.error, None, "{h:?}");
        assert!(h.active_age.is_some(), "{h:?}");
        // The gateway may ask each origin for its stream's end, through its domain: the
        // lag is then the real distance, not JetStream's rarely refreshed figure.
        assert_eq!(h.origin_last_seq, Some(N as u64), "{h:?}");
        assert_eq!(h.lag, 0, "{h:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item2_ensure_mirrors_is_idempotent_and_repairs_a_wrong_stream() -> Result<()> {
    let cluster = NatsCluster::start(&["us", "eu"])?;
    let prefix = unique_prefix();
    let buses = buses(&cluster, &prefix).await?;
    let (us, eu) = (&buses["us"], &buses["eu"]);
    us.publish_events(&(0..5).map(|n| event("us", n)).collect::<Vec<_>>())
        .await?;
    wait_mirrored(&buses, "us", 5, Duration::from_secs(30)).await?;
    let mirror = us.stream();
    let before = eu.stream_state(&mirror).await?;
    eu.ensure_mirrors().await?;
    eu.ensure_mirrors().await?;
    let after = eu.stream_state(&mirror).await?;
    assert_eq!(
        after.instance, before.instance,
        "an idempotent ensure keeps the instance"
    );
    assert_eq!(after.last_seq, 5);

    // Changed limits are updated in place: same instance, nothing copied again.
    let mut longer = eu.config().clone();
    longer.max_age_s += 3600;
    Bus::connect(longer.clone()).await?.ensure_mirrors().await?;
    let info = eu.jetstream().get_stream(&mirror).await?.cached_info().clone();
    assert_eq!(info.config.max_age, Duration::from_secs(longer.max_age_s));
    assert_eq!(eu.stream_state(&mirror).await?.instance, before.instance);

    // A plain stream where the mirror belongs (as an operator's mistake would leave it).
    eu.jetstream().delete_stream(&mirror).await?;
    eu.jetstream()
        .create_stream(async_nats::jetstream::stream::Config {
            name: mirror.clone(),
            subjects: vec![format!("{prefix}wrong.>")],
            ..Default::default()
        })
        .await?;
    let health = eu.mirror_health().await?;
    let err = health_of(&health, "us").error.clone().unwrap_or_default();
    assert!(err.contains("not the mirror"), "{health:?}");
    eu.ensure_mirrors().await?;
    wait_mirrored(&buses, "us", 5, Duration::from_secs(30)).await?;
    assert_eq!(health_of(&eu.mirror_health().await?, "us").error, None);

    // A mirror of the right stream through the wrong domain (eu's own: it would mirror
    // itself) is recreated too.
    eu.jetstream().delete_stream(&mirror).await?;
    eu.jetstream()
        .create_stream(async_nats::jetstream::stream::Config {
            name: mirror.clone(),
            mirror: Some(async_nats::jetstream::stream::Source {
                name: mirror.clone(),
                external: Some(async_nats::jetstream::stream::External {
                    api_prefix: "$JS.nowhere.API".into(),
                    delivery_prefix: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await?;
    let wrong = eu.stream_state(&mirror).await?.instance;
    eu.ensure_mirrors().await?;
    assert_ne!(eu.stream_state(&mirror).await?.instance, wrong);
    wait_mirrored(&buses, "us", 5, Duration::from_secs(30)).await?;
    assert_replicas_equal(&buses).await?;

    // A missing mirror is reported, then created.
    eu.jetstream().delete_stream(&mirror).await?;
    let health = eu.mirror_health().await?;
    assert!(health_of(&health, "us")
        .error
        .as_deref()
        .unwrap_or("")
        .contains("does not exist"));
    eu.ensure_mirrors().await?;
    wait_mirrored(&buses, "us", 5, Duration::from_secs(30)).await?;
    Ok(())
}

/// Publishes `count` events to `bus` one batch at a time until told to stop; returns the
/// acked sequence -> id pairs.
async fn publish_until(
    bus: Bus,
    region: &'static str,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<BTreeMap<u64, String>> {
    let mut acked = BTreeMap::new();
    for n in 0..10_000 {
        if *stop.borrow() {
            break;
        }
        let env = event(region, n);
        let ack = bus.publish_event(&env).await?;
        ensure!(
            acked.insert(ack.stream_seq, id_of(&env)).is_none(),
            "seq {} twice",
            ack.stream_seq
        );
        tokio::select! {
            _ = stop.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    Ok(acked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item2_region_killed_and_restarted_while_others_publish_mirrors_catch_up() -> Result<()> {
    let mut cluster = NatsCluster::start(&REGIONS)?;
    let prefix = unique_prefix();
    let buses = buses(&cluster, &prefix).await?;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let eu = tokio::spawn(publish_until(buses["eu"].clone(), "eu", stop.clone()));
    let ap = tokio::spawn(publish_until(buses["ap"].clone(), "ap", stop.clone()));
    let first: Vec<_> = (0..20).map(|n| event("us", n)).collect();
    buses["us"].publish_events(&first).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.region_mut("us").kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.region_mut("us").restart()?;
    let restarted = Instant::now();
    let second: Vec<_> = (20..40).map(|n| event("us", n)).collect();
    let acks = buses["us"].publish_events(&second).await?;
    let us_last = acks.last().unwrap().stream_seq;
    assert_eq!(
        us_last, 40,
        "us's stream survived its kill with every acked event"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_tx.send(true)?;
    let eu_acked = eu.await??;
    let ap_acked = ap.await??;
    let eu_last = *eu_acked.keys().last().unwrap();
    let ap_last = *ap_acked.keys().last().unwrap();
    wait_mirrored(&buses, "us", us_last, Duration::from_secs(90)).await?;
    eprintln!(
        "mirrors of the restarted region caught up {:?} after its restart",
        restarted.elapsed()
    );
    wait_mirrored(&buses, "eu", eu_last, Duration::from_secs(90)).await?;
    wait_mirrored(&buses, "ap", ap_last, Duration::from_secs(90)).await?;
    let origins = assert_replicas_equal(&buses).await?;
    // Nothing lost, nothing doubled: each origin holds exactly the acked events, once.
    assert_eq!(origins["eu"], eu_acked);
    assert_eq!(origins["ap"], ap_acked);
    let us_ids: Vec<String> = first.iter().chain(&second).map(id_of).collect();
    assert_eq!(origins["us"].values().cloned().collect::<Vec<_>>(), us_ids);
    Ok(())
}

/// Polls `bus`'s mirror of `origin` until `done` holds for its health (bounded).
async fn wait_health(
    bus: &Bus,
    origin: &str,
    within: Duration,
    done: impl Fn(&MirrorHealth) -> bool,
) -> Result<MirrorHealth> {
    let deadline = Instant::now() + within;
    loop {
        let all = bus.mirror_health().await?;
        let h = health_of(&all, origin).clone();
        if done(&h) {
            return Ok(h);
        }
        if Instant::now() > deadline {
            bail!("mirror of {origin} still {h:?} after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item2_cut_link_shows_a_growing_active_age_with_lag_zero() -> Result<()> {
    let mut cluster = NatsCluster::start(&["us", "eu"])?;
    let prefix = unique_prefix();
    let buses = buses(&cluster, &prefix).await?;
    let (us, eu) = (buses["us"].clone(), buses["eu"].clone());
    us.publish_events(&(0..3).map(|n| event("us", n)).collect::<Vec<_>>())
        .await?;
    wait_mirrored(&buses, "us", 3, Duration::from_secs(30)).await?;

    // The hub gone: both regions keep serving, the mirror hears nothing.
    cluster.hub_mut().kill();
    us.publish_events(&(3..8).map(|n| event("us", n)).collect::<Vec<_>>())
        .await?;
    let cut = wait_health(&eu, "us", Duration::from_secs(30), |h| {
        h.active_age.is_some_and(|a| a > Duration::from_secs(3))
    })
    .await?;
    assert_eq!(cut.lag, 0, "a cut mirror reports lag 0: {cut:?}");
    assert_eq!(cut.origin_last_seq, None, "the origin cannot be asked: {cut:?}");
    assert_eq!(cut.last_seq, 3);
    let later = wait_health(&eu, "us", Duration::from_secs(30), |h| {
        h.active_age.is_some_and(|a| a > cut.active_age.unwrap())
    })
    .await?;
    assert_eq!(later.lag, 0, "{later:?}");

    cluster.hub_mut().restart()?;
    let healed = Instant::now();
    wait_mirrored(&buses, "us", 8, Duration::from_secs(90)).await?;
    eprintln!("mirror caught up {:?} after the hub came back", healed.elapsed());
    let h = wait_health(&eu, "us", Duration::from_secs(30), |h| {
        h.active_age.is_some_and(|a| a < Duration::from_secs(2))
    })
    .await?;
    assert_eq!(h.last_seq, 8);
    assert_eq!(h.origin_last_seq, Some(8), "{h:?}");

    // A hung origin (SIGSTOP): the same picture, and it recovers on SIGCONT.
    cluster.region("us").sigstop();
    let hung = wait_health(&eu, "us", Duration::from_secs(30), |h| {
        h.active_age.is_none_or(|a| a > Duration::from_secs(3))
    })
    .await;
    cluster.region("us").sigcont();
    let hung = hung?;
    assert_eq!(hung.lag, 0, "{hung:?}");
    us.publish_events(&(8..10).map(|n| event("us", n)).collect::<Vec<_>>())
        .await?;
    wait_mirrored(&buses, "us", 10, Duration::from_secs(90)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item3_typing_and_presence_cross_regions_with_gateway_permissions() -> Result<()> {
    let prefix = unique_prefix();
    let cluster = NatsCluster::builder(&["us", "eu"])?
        .roles(&prefix, &[BusRole::Gateway])
        .start()?;
    let us = Bus::connect(cluster.role_config("us", BusRole::Gateway)?).await?;
    let eu = Bus::connect(cluster.role_config("eu", BusRole::Gateway)?).await?;
    let bob = UserId::parse("bob.b")?;
    let eu_region = RegionId::parse("eu")?;
    assert_eq!(
        us.ephemeral_subject_in(&eu_region, &bob),
        eu.ephemeral_subject(&bob)
    );
    assert_eq!(us.presence_subject(&eu_region), format!("{prefix}presence.eu"));

    // Typing: us's gateway publishes to a user eu serves; eu's socket subscription sees it.
    let mut sockets = eu.subscribe(eu.user_subjects(&bob)).await?;
    let mut presence = eu.subscribe(eu.presence_subject(&eu_region)).await?;
    eu.client().flush().await?;
    // Interest crosses the links asynchronously; core NATS is at most once, so publish
    // until one arrives (bounded).
    let deadline = Instant::now() + Duration::from_secs(20);
    let typing = loop {
        us.publish_ephemeral(us.ephemeral_subject_in(&eu_region, &bob), "typing".into())
            .await?;
        if let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(200), sockets.next()).await {
            break msg;
        }
        ensure!(Instant::now() < deadline, "no typing frame crossed from us to eu");
    };
    assert_eq!(typing.payload.as_ref(), b"typing");
    assert!(Bus::is_ephemeral_subject(typing.subject.as_str()));

    // Presence: us asks eu; eu answers to us's inbox (allow_responses).
    let answer = tokio::spawn(async move {
        let req = presence.next().await.context("presence subscription ended")?;
        let reply = req.reply.context("a request carries a reply subject")?;
        eu.client()
            .publish(
                reply,
                r#"{"users":{"bob.b":{"online":true,"last_seen_ms":null}}}"#.into(),
            )
            .await?;
        eu.client().flush().await?;
        anyhow::Ok(())
    });
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        us.client().request(
            us.presence_subject(&eu_region),
            r#"{"user_ids":["bob.b"]}"#.into(),
        ),
    )
    .await
    .context("presence request timed out")??;
    assert!(std::str::from_utf8(&reply.payload)?.contains("\"online\":true"));
    answer.await??;
    Ok(())
}

/// A TCP forwarder to `target` on its own threads: what `leaf_address` routes through. Counts
/// the connections it took.
fn forwarder(
    target: std::net::SocketAddr,
    taken: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> std::net::SocketAddr {
    use std::net::{TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a forwarder");
    let addr = listener.local_addr().expect("its address");
    std::thread::spawn(move || {
        for inbound in listener.incoming() {
            let Ok(inbound) = inbound else { return };
            let Ok(outbound) = TcpStream::connect(target) else {
                continue;
            };
            taken.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            for (mut from, mut to) in [
                (inbound.try_clone().unwrap(), outbound.try_clone().unwrap()),
                (outbound, inbound),
            ] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            }
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item2_leaf_links_can_be_routed_through_a_proxy() -> Result<()> {
    let taken = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = taken.clone();
    let cluster = NatsCluster::builder(&["us", "eu"])?
        .leaf_address(move |_, hub| forwarder(hub, counter.clone()))
        .start()?;
    assert!(
        taken.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "both links go through the forwarders"
    );
    let prefix = unique_prefix();
    let buses = buses(&cluster, &prefix).await?;
    buses["us"]
        .publish_events(&(0..3).map(|n| event("us", n)).collect::<Vec<_>>())
        .await?;
    wait_mirrored(&buses, "us", 3, Duration::from_secs(30)).await?;
    assert_replicas_equal(&buses).await?;
    Ok(())
}
