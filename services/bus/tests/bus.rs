//! meridian-bus against real nats-server processes (deploy/install-nats.sh installs one).

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use futures::StreamExt;
use meridian_bus::testing::{unique_prefix, NatsServer};
use meridian_bus::{Bus, BusConfig, ReceivedEvent};
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
