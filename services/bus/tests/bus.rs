//! meridian-bus against real nats-server processes (deploy/install-nats.sh installs one).

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use futures::StreamExt;
use meridian_bus::testing::{unique_prefix, NatsServer};
use meridian_bus::{
    Bus, BusConfig, BusError, BusRole, Durability, ReceivedEvent, RoleCredentials, ServerTls,
};
use meridian_model::events::{event_envelope::Body, EventEnvelope, UserUpserted};
use meridian_model::{EventId, RegionId, UserId};

fn region() -> RegionId {
    RegionId::parse("eu-west").unwrap()
}

fn config(server: &NatsServer) -> BusConfig {
    let mut cfg = BusConfig::new(server.url(), region());
    cfg.prefix = unique_prefix();
    cfg
}

async fn bus(server: &NatsServer) -> Result<Bus> {
    let bus = Bus::connect(config(server)).await?;
    bus.ensure_stream().await?;
    Ok(bus)
}

fn event(n: usize) -> EventEnvelope {
    EventEnvelope {
        event_id: EventId::new_v7().as_bytes().to_vec(),
        origin_region: region().to_string(),
        hlc: n as u64,
        actor: "admin".into(),
        actor_device: String::new(),
        traceparent: format!("00-{:032x}-{:016x}-01", n + 1, n + 1),
        tracestate: if n.is_multiple_of(2) {
            "m=1".into()
        } else {
            String::new()
        },
        body: Some(Body::UserUpserted(UserUpserted {
            user_id: format!("u{n}"),
            home_region: region().to_string(),
            display_name: format!("U{n}"),
        })),
    }
}

fn id_of(env: &EventEnvelope) -> String {
    EventId::from_bytes(&env.event_id).unwrap().to_string()
}

/// Reads until `n` events arrived (or `within` passed).
async fn consume(
    consumer: &mut meridian_bus::EventConsumer,
    n: usize,
    within: Duration,
) -> Result<Vec<ReceivedEvent>> {
    let deadline = tokio::time::Instant::now() + within;
    let mut out = Vec::new();
    while out.len() < n {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "only {} of {n} events arrived",
            out.len()
        );
        match consumer.next_batch(64, Duration::from_millis(200)).await {
            Ok(batch) => {
                consumer.ack(&batch).await.ok();
                out.extend(batch);
            }
            Err(e) => {
                eprintln!("next_batch: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_stream_is_idempotent_and_applies_config() -> Result<()> {
    let server = NatsServer::start()?;
    let mut cfg = config(&server);
    let bus = Bus::connect(cfg.clone()).await?;
    bus.ensure_stream().await?;
    bus.ensure_stream().await?;
    let mut stream = bus.jetstream().get_stream(bus.stream()).await?;
    let info = stream.info().await?;
    assert_eq!(info.config.name, cfg.stream_name(&region()));
    assert_eq!(
        info.config.subjects,
        vec![format!("{}sync.eu-west.>", cfg.prefix)]
    );
    assert_eq!(info.config.duplicate_window, Duration::from_secs(300));
    assert_eq!(
        info.config.storage,
        async_nats::jetstream::stream::StorageType::File
    );
    assert_eq!(info.config.max_age, Duration::from_secs(30 * 24 * 3600));

    // A changed limit is applied to the existing stream, which keeps its events.
    bus.publish_event(&event(0)).await?;
    cfg.max_age_s = 7 * 24 * 3600;
    cfg.duplicate_window_s = 120;
    let bus2 = Bus::connect(cfg).await?;
    bus2.ensure_stream().await?;
    let info = stream.info().await?;
    assert_eq!(info.config.duplicate_window, Duration::from_secs(120));
    assert_eq!(info.config.max_age, Duration::from_secs(7 * 24 * 3600));
    assert_eq!(bus2.stream_state(&bus2.stream()).await?.messages, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_events_come_back_in_order_with_trace_headers() -> Result<()> {
    let server = NatsServer::start()?;
    let bus = bus(&server).await?;
    let events: Vec<EventEnvelope> = (0..5).map(event).collect();
    let first = bus.publish_event(&events[0]).await?;
    assert_eq!((first.stream_seq, first.duplicate), (1, false));
    assert_eq!(first.stream, bus.stream());
    let rest = bus.publish_events(&events[1..]).await?;
    let seqs: Vec<u64> = rest.iter().map(|a| a.stream_seq).collect();
    assert_eq!(seqs, vec![2, 3, 4, 5]);

    let mut consumer = bus.event_consumer(&bus.stream(), "reader").await?;
    let got = consume(&mut consumer, 5, Duration::from_secs(10)).await?;
    for (i, (r, sent)) in got.iter().zip(&events).enumerate() {
        assert_eq!(r.stream_seq, i as u64 + 1);
        assert_eq!(r.envelope.as_ref(), Some(sent));
        assert_eq!(r.traceparent.as_deref(), Some(sent.traceparent.as_str()));
        let state = (!sent.tracestate.is_empty()).then(|| sent.tracestate.clone());
        assert_eq!(r.tracestate, state);
        assert_eq!(r.msg_id.as_deref(), Some(id_of(sent).as_str()));
    }
    // Nothing more is waiting.
    assert!(consumer
        .next_batch(10, Duration::from_millis(300))
        .await?
        .is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_event_id_is_stored_once() -> Result<()> {
    let server = NatsServer::start()?;
    let bus = bus(&server).await?;
    let ev = event(1);
    let a = bus.publish_event(&ev).await?;
    let b = bus.publish_event(&ev).await?;
    assert!(!a.duplicate);
    assert!(b.duplicate, "second publish must be reported as a duplicate");
    assert_eq!(a.stream_seq, b.stream_seq);
    // Also inside one pipelined batch.
    let acks = bus.publish_events(&[ev.clone(), event(2), ev.clone()]).await?;
    assert!(acks[0].duplicate && !acks[1].duplicate && acks[2].duplicate);
    assert_eq!(bus.stream_state(&bus.stream()).await?.messages, 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_survive_a_kill_9_restart_exactly_once() -> Result<()> {
    const N: usize = 300;
    let mut server = NatsServer::start()?;
    let bus = bus(&server).await?;
    let events: Vec<EventEnvelope> = (0..N).map(event).collect();
    let (progress_tx, mut progress_rx) = tokio::sync::mpsc::channel::<usize>(N);
    let publisher = tokio::spawn({
        let bus = bus.clone();
        let events = events.clone();
        async move {
            let mut acks = Vec::new();
            for (i, chunk) in events.chunks(3).enumerate() {
                // Mix single and pipelined publishes: both must ride through the restart.
                if i.is_multiple_of(2) {
                    for ev in chunk {
                        acks.push(bus.publish_event(ev).await);
                    }
                } else {
                    match bus.publish_events(chunk).await {
                        Ok(a) => acks.extend(a.into_iter().map(Ok)),
                        Err(e) => acks.push(Err(e)),
                    }
                }
                progress_tx.send(acks.len()).await.ok();
            }
            acks
        }
    });
    while let Some(done) = progress_rx.recv().await {
        if done >= N / 3 {
            break;
        }
    }
    let killed_at = bus.stream_state(&bus.stream()).await?.messages;
    server.restart()?;
    tokio::spawn(async move { while progress_rx.recv().await.is_some() {} });
    let acks = publisher.await?;
    assert_eq!(acks.len(), N);
    for (i, a) in acks.iter().enumerate() {
        a.as_ref()
            .map_err(|e| anyhow::anyhow!("publish {i} failed: {e}"))?;
    }
    eprintln!("killed after {killed_at} stored events");

    let state = bus.stream_state(&bus.stream()).await?;
    assert_eq!(state.messages, N as u64, "stream holds each event exactly once");
    assert_eq!((state.first_seq, state.last_seq), (1, N as u64));
    // Count by message id, reading every message back.
    let mut consumer = bus.event_consumer(&bus.stream(), "count").await?;
    let got = consume(&mut consumer, N, Duration::from_secs(20)).await?;
    let ids: HashSet<String> = got.iter().filter_map(|r| r.msg_id.clone()).collect();
    let want: HashSet<String> = events.iter().map(id_of).collect();
    assert_eq!(ids, want);
    for r in &got {
        assert_eq!(r.msg_id.as_deref(), r.envelope.as_ref().map(id_of).as_deref());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_hands_out_every_event_once_across_a_restart() -> Result<()> {
    let mut server = NatsServer::start()?;
    let bus = bus(&server).await?;
    let events: Vec<EventEnvelope> = (0..200).map(event).collect();
    bus.publish_events(&events[..100]).await?;
    let mut consumer = bus.event_consumer(&bus.stream(), "applier").await?;
    let mut got = consume(&mut consumer, 40, Duration::from_secs(10)).await?;

    server.restart()?;
    bus.publish_events(&events[100..]).await?;
    let more = consume(&mut consumer, 200 - got.len(), Duration::from_secs(30)).await?;
    got.extend(more);
    let seqs: Vec<u64> = got.iter().map(|r| r.stream_seq).collect();
    assert_eq!(
        seqs,
        (1..=200).collect::<Vec<u64>>(),
        "in order, no holes, no repeats"
    );

    // A consumer opened after a checkpoint starts right after it, whatever its acks say.
    drop(consumer);
    let mut again = bus.event_consumer_after(&bus.stream(), "applier", 150).await?;
    let tail = consume(&mut again, 50, Duration::from_secs(10)).await?;
    assert_eq!(tail.first().map(|r| r.stream_seq), Some(151));
    assert_eq!(tail.last().map(|r| r.stream_seq), Some(200));
    let mut behind = bus.event_consumer_after(&bus.stream(), "applier", 10).await?;
    let redo = consume(&mut behind, 5, Duration::from_secs(10)).await?;
    assert_eq!(redo[0].stream_seq, 11);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_payloads_are_handed_out_without_an_envelope() -> Result<()> {
    let server = NatsServer::start()?;
    let bus = bus(&server).await?;
    let subject = format!("{}sync.{}.events", bus.config().prefix, region());
    bus.jetstream()
        .publish(subject, bytes::Bytes::from_static(b"\xff\xff not protobuf"))
        .await?
        .await?;
    let good = event(7);
    bus.publish_event(&good).await?;
    let mut consumer = bus.event_consumer(&bus.stream(), "reader").await?;
    let got = consume(&mut consumer, 2, Duration::from_secs(10)).await?;
    assert_eq!(got[0].stream_seq, 1);
    assert!(got[0].envelope.is_none());
    assert_eq!(got[1].envelope.as_ref(), Some(&good));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_waits_out_a_long_outage() -> Result<()> {
    let mut server = NatsServer::start()?;
    let bus = bus(&server).await?;
    let events: Vec<EventEnvelope> = (0..20).map(event).collect();
    bus.publish_events(&events[..10]).await?;
    let mut consumer = bus.event_consumer(&bus.stream(), "patient").await?;
    let mut got = consume(&mut consumer, 10, Duration::from_secs(10)).await?;
    server.kill();
    // Down for longer than the pull heartbeat window: calls fail or come back empty.
    let down_until = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < down_until {
        if let Ok(batch) = consumer.next_batch(10, Duration::from_millis(200)).await {
            assert!(batch.is_empty());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.restart()?;
    let back = std::time::Instant::now();
    bus.publish_events(&events[10..]).await?;
    eprintln!("published {:?} after restart", back.elapsed());
    got.extend(consume(&mut consumer, 10, Duration::from_secs(30)).await?);
    eprintln!("consumed {:?} after restart", back.elapsed());
    let seqs: Vec<u64> = got.iter().map(|r| r.stream_seq).collect();
    assert_eq!(seqs, (1..=20).collect::<Vec<u64>>());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_subjects_carry_dotted_user_ids_as_one_token() -> Result<()> {
    let server = NatsServer::start()?;
    let bus = bus(&server).await?;
    let mut sub = bus.subscribe(bus.delivery_wildcard()).await?;
    bus.client().flush().await?;
    let users = ["ann.smith", "bob", "c.d.e", "x~y-z_"];
    for u in users.iter().filter(|u| !u.contains('~')) {
        let user = UserId::parse(*u)?;
        bus.publish_delivery(&user, bytes::Bytes::from(u.to_string()))
            .await?;
    }
    for u in users.iter().filter(|u| !u.contains('~')) {
        let msg = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .context("delivery did not arrive")?
            .context("subscription ended")?;
        let subject = msg.subject.to_string();
        assert_eq!(subject, bus.delivery_subject(&UserId::parse(*u)?));
        assert_eq!(subject.matches('.').count(), 3, "{subject}");
        assert_eq!(bus.delivery_user(&subject).map(String::from).as_deref(), Some(*u));
        assert_eq!(msg.payload.as_ref(), u.as_bytes());
    }
    // A bus of another test (another prefix) sees none of it.
    let other = Bus::connect(config(&server)).await?;
    assert_ne!(other.delivery_wildcard(), bus.delivery_wildcard());
    bus.ping().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traced_deliveries_carry_their_traceparent_header() -> Result<()> {
    let server = NatsServer::start()?;
    let bus = bus(&server).await?;
    let bob = UserId::parse("bob")?;
    let mut sub = bus.subscribe(bus.delivery_subject(&bob)).await?;
    bus.client().flush().await?;
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    bus.publish_delivery_traced(&bob, "traced".into(), Some(tp))
        .await?;
    bus.publish_delivery_traced(&bob, "untraced".into(), None).await?;
    let mut got = Vec::new();
    for _ in 0..2 {
        let msg = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .context("delivery did not arrive")?
            .context("subscription ended")?;
        let header = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(meridian_bus::TRACEPARENT))
            .map(|v| v.as_str().to_string());
        got.push((String::from_utf8(msg.payload.to_vec())?, header));
    }
    assert_eq!(
        got,
        [
            ("traced".to_string(), Some(tp.to_string())),
            ("untraced".to_string(), None)
        ]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_gives_up_with_unavailable_when_nats_stays_down() -> Result<()> {
    let mut server = NatsServer::start()?;
    let mut cfg = config(&server);
    cfg.publish_timeout_s = 2;
    let bus = Bus::connect(cfg).await?;
    bus.ensure_stream().await?;
    server.kill();
    let started = std::time::Instant::now();
    let err = bus.publish_event(&event(1)).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(bus.ping().await.is_err());
    Ok(())
}

/// A raw client logged in as `creds`, with the server's `-ERR` lines (permission
/// violations) forwarded to the returned channel.
async fn raw_client(
    server: &NatsServer,
    creds: &RoleCredentials,
) -> Result<(async_nats::Client, tokio::sync::mpsc::Receiver<String>)> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let client = async_nats::ConnectOptions::with_nkey(creds.seed.clone())
        .custom_inbox_prefix(creds.role.inbox_prefix(&creds.prefix, &creds.region))
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if let async_nats::Event::ServerError(e) = event {
                    let _ = tx.try_send(e.to_string());
                }
            }
        })
        .connect(server.address())
        .await?;
    Ok((client, rx))
}

/// Reads `sub` until a message on `sentinel` arrives (bounded), returning the subjects seen
/// before it. A connection's messages arrive in order, so whatever was published before the
/// sentinel and got through is among them.
async fn until_sentinel(sub: &mut async_nats::Subscriber, sentinel: &str) -> Result<Vec<String>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    loop {
        let msg = tokio::time::timeout_at(deadline, sub.next())
            .await
            .context("the sentinel did not arrive")?
            .context("subscription ended")?;
        if msg.subject.as_str() == sentinel {
            return Ok(seen);
        }
        seen.push(msg.subject.to_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item7_bus_refuses_clients_without_credentials_and_confines_gateway_credentials() -> Result<()> {
    let prefix = unique_prefix();
    let gateway = RoleCredentials::generate(BusRole::Gateway, &prefix, &region());
    let applier = RoleCredentials::generate(BusRole::Applier, &prefix, &region());
    let server = NatsServer::start_with_roles(Durability::Process, vec![gateway.clone(), applier.clone()])?;

    // No credentials: refused, by the server and through Bus (at once, not after retries).
    ensure!(
        async_nats::connect(server.address()).await.is_err(),
        "a client without credentials connected"
    );
    let mut anonymous = BusConfig::new(server.address(), region());
    anonymous.prefix = prefix.clone();
    match Bus::connect(anonymous).await {
        Err(BusError::Unauthorized(_)) => {}
        Err(e) => anyhow::bail!("expected Unauthorized, got {e}"),
        Ok(_) => anyhow::bail!("Bus connected without credentials"),
    }

    // The applier's credentials create the stream; the gateway's publish events to it and
    // read them back (the dedup lookup) and its state (readiness).
    let applier_bus = Bus::connect(server.role_config(&applier)?).await?;
    applier_bus.ensure_stream().await?;
    let gateway_bus = Bus::connect(server.role_config(&gateway)?).await?;
    let env = event(1);
    let ack = gateway_bus.publish_event(&env).await?;
    assert_eq!(id_of(&gateway_bus.get_event(ack.stream_seq).await?), id_of(&env));
    let stream = gateway_bus.stream();
    assert_eq!(gateway_bus.stream_state(&stream).await?.messages, 1);

    let (gw, mut errors) = raw_client(&server, &gateway).await?;
    let (user, password) = server.harness_login();
    let harness = async_nats::ConnectOptions::with_user_and_password(user, password)
        .connect(server.address())
        .await?;

    // Publishing: another region's events, a forged delivery (only the applier publishes
    // those), arbitrary subjects, and JetStream calls that read or delete the stream.
    let forged = [
        format!("{prefix}sync.us.events"),
        format!("{prefix}deliver.eu-west.bob.e"),
        "anything.at.all".to_string(),
        format!("$JS.API.STREAM.DELETE.{stream}"),
        format!("$JS.API.CONSUMER.CREATE.{stream}.reader"),
    ];
    let mut everything = harness.subscribe(">").await?;
    harness.flush().await?;
    // Typing frames are the gateway's to publish: the sentinel.
    let typing = format!("{prefix}deliver.eu-west.bob.t");
    for subject in &forged {
        gw.publish(subject.clone(), "forged".into()).await?;
    }
    gw.publish(typing.clone(), "typing".into()).await?;
    gw.flush().await?;
    let seen = until_sentinel(&mut everything, &typing).await?;
    for subject in &forged {
        ensure!(!seen.contains(subject), "the gateway published to {subject}");
    }

    // Subscribing: everything, another region's deliveries, the raw events, another role's
    // inbox. Its own region's delivery subjects (its users' sockets) are allowed: the sentinel.
    let denied = [
        ">".to_string(),
        format!("{prefix}deliver.us.*.*"),
        format!("{prefix}sync.eu-west.>"),
        format!("{}.>", BusRole::Applier.inbox_prefix(&prefix, &region())),
    ];
    let mut denied_subs = Vec::new();
    for subject in &denied {
        denied_subs.push(gw.subscribe(subject.clone()).await?);
    }
    let mut sockets = gw.subscribe(format!("{prefix}deliver.eu-west.*.*")).await?;
    gw.flush().await?;
    for subject in [
        format!("{prefix}deliver.us.bob.e"),
        format!("{prefix}sync.eu-west.probe"),
        format!("{}.x", BusRole::Applier.inbox_prefix(&prefix, &region())),
    ] {
        harness.publish(subject, "secret".into()).await?;
    }
    let delivery = format!("{prefix}deliver.eu-west.bob.e");
    // Core NATS is at most once: should the gateway's connection be re-made meanwhile (its
    // subscriptions are then sent again), a sentinel published in the gap is lost. Publish
    // it again until one arrives (bounded): what is checked is that the denied
    // subscriptions received nothing, not that this one never misses.
    let mut arrived = false;
    for _ in 0..20 {
        harness.publish(delivery.clone(), "entry".into()).await?;
        harness.flush().await?;
        if let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(500), sockets.next()).await {
            if msg.subject.as_str() == delivery {
                arrived = true;
                break;
            }
        }
    }
    ensure!(arrived, "the gateway never received a delivery of its own region");
    for (subject, sub) in denied.iter().zip(denied_subs.iter_mut()) {
        ensure!(
            futures::FutureExt::now_or_never(sub.next()).is_none(),
            "the gateway received a message through its subscription to {subject}"
        );
    }

    // And the server said why, once for each.
    let mut expected: HashSet<String> = forged
        .iter()
        .map(|s| format!("Publish to \"{s}\""))
        .chain(denied.iter().map(|s| format!("Subscription to \"{s}\"")))
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !expected.is_empty() {
        let error = tokio::time::timeout_at(deadline, errors.recv())
            .await
            .with_context(|| format!("no permissions violation reported for {expected:?}"))?
            .context("error channel closed")?;
        expected.retain(|e| !error.contains(e.as_str()));
    }

    // The applier's credentials cannot publish events either.
    let mut applier_cfg = server.role_config(&applier)?;
    applier_cfg.publish_timeout_s = 1;
    let applier_publisher = Bus::connect(applier_cfg).await?;
    ensure!(
        applier_publisher.publish_event(&event(2)).await.is_err(),
        "the applier published an event"
    );
    assert_eq!(
        gateway_bus.stream_state(&stream).await?.messages,
        2,
        "event 1 and the probe"
    );
    Ok(())
}

/// A CA, a server certificate for 127.0.0.1 signed by it and a client certificate, as PEM
/// files in `dir`: the server's TLS settings, and the client's CA, certificate and key.
fn certificates(dir: &std::path::Path) -> Result<(ServerTls, PathBuf, PathBuf, PathBuf)> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key)?;
    let write = |name: &str, pem: String| -> Result<PathBuf> {
        let path = dir.join(name);
        std::fs::write(&path, pem)?;
        Ok(path)
    };
    let server_key = KeyPair::generate()?;
    let server =
        CertificateParams::new(vec!["127.0.0.1".to_string()])?.signed_by(&server_key, &ca, &ca_key)?;
    let client_key = KeyPair::generate()?;
    let client =
        CertificateParams::new(vec!["meridian-region".to_string()])?.signed_by(&client_key, &ca, &ca_key)?;
    let ca_file = write("ca.pem", ca.pem())?;
    let tls = ServerTls {
        cert_file: write("server.pem", server.pem())?,
        key_file: write("server.key", server_key.serialize_pem())?,
        ca_file: Some(ca_file.clone()),
    };
    Ok((
        tls,
        ca_file,
        write("client.pem", client.pem())?,
        write("client.key", client_key.serialize_pem())?,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_required_and_verified_both_ways_when_configured() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (server_tls, ca, cert, key) = certificates(dir.path())?;
    let creds = RoleCredentials::generate(BusRole::Region, &unique_prefix(), &region());
    let server = NatsServer::start_with_tls(Durability::Process, vec![creds.clone()], Some(server_tls))?;

    // The CA to trust the server and a certificate for it to trust us: events go through.
    let mut cfg = server.role_config(&creds)?;
    cfg.tls_ca_file = Some(ca);
    cfg.tls_cert_file = Some(cert);
    cfg.tls_key_file = Some(key);
    let bus = Bus::connect(cfg.clone()).await?;
    bus.ensure_stream().await?;
    bus.publish_event(&event(1)).await?;

    cfg.publish_timeout_s = 1;
    // No client certificate: the server refuses the handshake.
    let mut no_cert = cfg.clone();
    no_cert.tls_cert_file = None;
    no_cert.tls_key_file = None;
    ensure!(
        Bus::connect(no_cert).await.is_err(),
        "connected without a client certificate"
    );
    // Without the CA the client does not trust the server's certificate.
    let mut no_ca = cfg;
    no_ca.tls_ca_file = None;
    ensure!(
        Bus::connect(no_ca).await.is_err(),
        "trusted a server signed by an unknown CA"
    );
    Ok(())
}

/// `nats_url` lists a cluster's servers comma-separated (as regions/*.toml does); the list
/// used to be parsed as one URL, which failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_comma_separated_server_list_connects() -> Result<()> {
    let server = NatsServer::start()?;
    let mut cfg = config(&server);
    cfg.nats_url = format!("nats://127.0.0.1:1, {}", server.url());
    let bus = Bus::connect(cfg).await?;
    bus.ensure_stream().await?;
    bus.publish_event(&event(1)).await?;
    Ok(())
}
