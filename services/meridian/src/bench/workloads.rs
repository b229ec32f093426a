//! The workloads, W1-W4, and the open loop W1 and W2 measure their steps with.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::rngs::ThreadRng;
use rand::Rng;
use tokio_util::sync::CancellationToken;

use super::connections::{body_100, connect_all, Conn, Shared};
use super::report::{cpu_s_per_1k, finish_step, print_row, StepOutcome, StepResult};
use super::target::{provision, Target};
use super::{setup_err, BenchError, BenchOptions};

/// One measured step of W1, W2 or X1.
pub(super) struct Step {
    pub(super) workload: &'static str,
    /// The row's step column.
    pub(super) name: String,
    /// The prefix of the step's message ids: only those are counted.
    pub(super) tag: String,
    pub(super) rate: u64,
    pub(super) over_http: bool,
}

/// Runs one step on connections already open and returns its row, printed: the server's CPU
/// around the open loop, and what the receivers saw.
pub(super) async fn measured_step(
    target: &Arc<Target>,
    conns: &[Conn],
    shared: &Arc<Shared>,
    opts: &BenchOptions,
    stop: &CancellationToken,
    step: Step,
    pick: impl FnMut(&mut ThreadRng) -> (usize, String, u64),
) -> StepResult {
    let cpu0 = target.cpu_seconds();
    let outcome = open_loop(
        target,
        conns,
        shared,
        &step.tag,
        step.rate,
        opts.step,
        step.over_http,
        opts.drain,
        stop,
        pick,
    )
    .await;
    let cpu = target.cpu_seconds() - cpu0;
    let row = finish_step(shared, step.workload, step.name, step.rate, outcome, cpu);
    print_row(&row);
    row
}

/// Sends `count` messages at `rate`/s from random senders, open loop, and waits for delivery.
/// `pick` chooses (sender index, conversation id, expected recipients).
#[allow(clippy::too_many_arguments)]
async fn open_loop(
    target: &Arc<Target>,
    conns: &[Conn],
    shared: &Arc<Shared>,
    tag: &str,
    rate: u64,
    duration: Duration,
    over_http: bool,
    drain: Duration,
    stop: &CancellationToken,
    mut pick: impl FnMut(&mut ThreadRng) -> (usize, String, u64),
) -> StepOutcome {
    // Each step starts from an idle server: an overloaded step's backlog is its own result.
    if let Some(lag) = target
        .wait_idle(Duration::from_secs(300))
        .await
        .filter(|l| *l > 0)
    {
        eprintln!("  .. {tag}: starting with an apply backlog of {lag} events");
    }
    *shared.step_tag.lock().unwrap_or_else(|p| p.into_inner()) = tag.to_string();
    let total = (rate as f64 * duration.as_secs_f64()) as u64;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let started = Instant::now();
    let mut sent = 0u64;
    let mut errors = 0u64;
    let mut expected = 0u64;
    let mut last_progress = Instant::now();
    let http_errors = Arc::new(AtomicU64::new(0));
    while sent < total && !stop.is_cancelled() {
        // Open loop: the n-th message is due at n * interval, however the server is doing.
        let due = started + interval.mul_f64(sent as f64);
        let now = Instant::now();
        if due > now {
            tokio::time::sleep(due - now).await;
        }
        let (from, cid, recipients) = pick(&mut rand::thread_rng());
        let id = format!("{tag}{sent}");
        let body = body_100(shared.now_us(), &id);
        if over_http {
            let client = conns[from].client.clone();
            let errs = http_errors.clone();
            tokio::spawn(async move {
                if client.send(&cid, &id, "text", &body).await.is_err() {
                    errs.fetch_add(1, Ordering::Relaxed);
                }
            });
        } else {
            let frame = serde_json::json!({"op": "send", "ref": id, "conversation_id": cid, "client_msg_id": id, "type": "text", "body": body});
            if conns[from].tx.try_send(frame.to_string()).is_err() {
                errors += 1;
            }
        }
        sent += 1;
        expected += recipients;
        if last_progress.elapsed() > Duration::from_secs(5) {
            last_progress = Instant::now();
            eprintln!(
                "  .. {tag}: {sent}/{total} sent, {} received, {:.0}s",
                shared.received.load(Ordering::Relaxed),
                started.elapsed().as_secs_f64()
            );
        }
    }
    let send_window = started.elapsed();
    // Stragglers: wait until everything arrived or `drain` passed.
    let deadline = Instant::now() + drain;
    while Instant::now() < deadline && !stop.is_cancelled() {
        let got = shared.tally.lock().map(|t| t.seen.len() as u64).unwrap_or(0);
        if got >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    StepOutcome {
        sent,
        send_errors: errors + http_errors.load(Ordering::Relaxed),
        expected,
        window: send_window,
    }
}

pub(super) async fn w1(
    target: &Arc<Target>,
    opts: &BenchOptions,
    run_id: &str,
    stop: &CancellationToken,
) -> Result<Vec<StepResult>, BenchError> {
    eprintln!(
        "W1: provisioning {} users and their direct conversations...",
        opts.users
    );
    let users = provision(target, &format!("{run_id}w1u"), opts.users).await?;
    let shared = Shared::new();
    let conn_stop = stop.child_token();
    let conns = connect_all(target, &users, &shared, &conn_stop).await?;
    // Every pair gets its direct conversation up front (a send needs one to exist).
    let n = conns.len();
    let pairs: Vec<(usize, usize)> = (0..n).flat_map(|a| (a + 1..n).map(move |b| (a, b))).collect();
    type Created = Result<((usize, usize), String), BenchError>;
    let cids: Vec<Created> = futures::stream::iter(pairs.into_iter().map(|(a, b)| {
        let client = conns[a].client.clone();
        let other = conns[b].user.clone();
        async move { Ok(((a, b), client.create_direct(&other).await?.conversation_id)) }
    }))
    .buffer_unordered(64)
    .collect()
    .await;
    let mut direct = HashMap::new();
    for c in cids {
        let (k, cid) = c?;
        direct.insert(k, cid);
    }
    eprintln!("W1: {} conversations ready", direct.len());
    let mut rows = Vec::new();
    for &rate in opts.rates.iter().take_while(|_| !stop.is_cancelled()) {
        let step = Step {
            workload: "W1",
            name: format!("{rate}/s{}", if opts.over_http { " http" } else { "" }),
            tag: format!("{run_id}w1r{rate}_"),
            rate,
            over_http: opts.over_http,
        };
        let row = measured_step(target, &conns, &shared, opts, stop, step, |rng| {
            let a = rng.gen_range(0..n);
            let mut b = rng.gen_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            let key = (a.min(b), a.max(b));
            (a, direct[&key].clone(), 1)
        })
        .await;
        rows.push(row);
    }
    conn_stop.cancel();
    Ok(rows)
}

pub(super) async fn w2(
    target: &Arc<Target>,
    opts: &BenchOptions,
    run_id: &str,
    stop: &CancellationToken,
) -> Result<Vec<StepResult>, BenchError> {
    let mut rows = Vec::new();
    // (members, senders, message rates): deliveries/s = rate x (members - 1).
    let plan: Vec<(usize, usize, Vec<u64>)> = if opts.smoke {
        vec![(10, 3, vec![20])]
    } else {
        vec![(50, 10, vec![200, 1_000, 2_000]), (1_000, 10, vec![10, 50])]
    };
    for (size, senders, rates) in plan {
        eprintln!("W2: group of {size} ({senders} senders), rates {rates:?} msg/s...");
        let users = provision(target, &format!("{run_id}w2g{size}u"), size).await?;
        let shared = Shared::new();
        let conn_stop = stop.child_token();
        let conns = connect_all(target, &users, &shared, &conn_stop).await?;
        let members: Vec<&str> = users[1..].iter().map(|(u, _)| u.as_str()).collect();
        // conns[0] is users[0]'s: connect_all keeps the order.
        let cid = conns[0]
            .client
            .create_group("bench", &members)
            .await?
            .conversation_id;
        for rate in rates.into_iter().take_while(|_| !stop.is_cancelled()) {
            let step = Step {
                workload: "W2",
                name: format!("group {size} @{rate}"),
                tag: format!("{run_id}w2g{size}r{rate}_"),
                rate,
                over_http: false,
            };
            let row = measured_step(target, &conns, &shared, opts, stop, step, |rng| {
                (rng.gen_range(0..senders), cid.clone(), size as u64 - 1)
            })
            .await;
            rows.push(row);
        }
        conn_stop.cancel();
    }
    Ok(rows)
}

/// W3: 100 offline users receive 20 messages each, then connect and sync everything.
pub(super) async fn w3(
    target: &Arc<Target>,
    _opts: &BenchOptions,
    run_id: &str,
    _stop: &CancellationToken,
) -> Result<Vec<StepResult>, BenchError> {
    eprintln!("W3: 100 offline users x 20 messages...");
    let users = provision(target, &format!("{run_id}w3u"), 101).await?;
    let sender = target.client(&users[0].1);
    let receivers = &users[1..];
    let started = Instant::now();
    let cpu0 = target.cpu_seconds();
    let mut sent = 0u64;
    let mut errors = 0u64;
    for (u, _) in receivers {
        let cid = &sender.create_direct(u).await?.conversation_id;
        let sends = futures::stream::iter((0..20).map(|i| {
            let client_msg_id = format!("{run_id}w3{u}m{i}");
            let body = body_100(0, &format!("{u}m{i}"));
            let client = sender.clone();
            async move { client.send(cid, &client_msg_id, "text", &body).await }
        }))
        .buffer_unordered(20)
        .collect::<Vec<_>>()
        .await;
        for s in sends {
            if s.is_ok() {
                sent += 1
            } else {
                errors += 1
            }
        }
    }
    // Now each receiver comes online and pulls its inbox.
    let mut delivered = 0u64;
    let mut duplicates = 0u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    for (_, tok) in receivers {
        let receiver = target.client(tok);
        loop {
            let mut ids = HashMap::<String, u32>::new();
            let mut after = 0u64;
            loop {
                let page = receiver.sync_page(after, None, 1000).await?;
                for e in page.entries {
                    after = e.seq;
                    if e.kind == "message" {
                        *ids.entry(e.message_id.unwrap_or_default()).or_default() += 1;
                    }
                }
                if !page.has_more {
                    break;
                }
            }
            if ids.len() >= 20 || Instant::now() > deadline {
                delivered += ids.len() as u64;
                duplicates += ids.values().map(|c| (*c as u64).saturating_sub(1)).sum::<u64>();
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let elapsed = started.elapsed();
    let cpu = target.cpu_seconds() - cpu0;
    let row = StepResult {
        workload: "W3".into(),
        step: "100x20 offline".into(),
        target_rate: 0,
        sent,
        send_errors: errors,
        delivered,
        delivered_per_s: delivered as f64 / elapsed.as_secs_f64(),
        undelivered: 2_000u64.saturating_sub(delivered),
        duplicates,
        p50_ms: 0.0,
        p99_ms: 0.0,
        p999_ms: 0.0,
        max_ms: 0.0,
        server_cpu_s: cpu,
        cpu_s_per_1k: cpu_s_per_1k(cpu, delivered),
        memory_per_conn_kib: None,
        mirror_lag: None,
    };
    print_row(&row);
    Ok(vec![row])
}

/// W4: `idle_connections` idle WebSockets; server memory per connection. Connections are
/// spread over several loopback source addresses, since one address has ~28k ephemeral ports.
pub(super) async fn w4(
    target: &Arc<Target>,
    opts: &BenchOptions,
    run_id: &str,
    stop: &CancellationToken,
) -> Result<Vec<StepResult>, BenchError> {
    let n = opts.idle_connections;
    eprintln!("W4: opening {n} idle WebSockets...");
    // Spread over users, one per 16 sockets: a gateway refuses a user's 17th socket (its
    // default `max_sockets_per_user`), each user's requests (upgrades included) are rate
    // limited, and a real fleet is many users with a few devices each.
    let users = provision(target, &format!("{run_id}w4u"), n.div_ceil(16).max(1)).await?;
    let rss0 = target.rss_kib();
    let host = target.endpoint.trim_start_matches("http://").to_string();
    let addr: std::net::SocketAddr = tokio::net::lookup_host(&host)
        .await
        .map_err(setup_err)?
        .next()
        .ok_or_else(|| setup_err("no address"))?;
    let mut sockets = Vec::with_capacity(n);
    let mut failed = 0u64;
    // Why connections failed, by reason: the machine's limits (ports, descriptors) show here.
    let mut failures: std::collections::BTreeMap<String, u64> = Default::default();
    const GIVE_UP_AFTER: usize = 50;
    let mut consecutive_failures = 0;
    let started = Instant::now();
    for i in 0..n {
        if stop.is_cancelled() {
            break;
        }
        let src = std::net::Ipv4Addr::new(127, 0, 1 + (i / 20_000) as u8, 1);
        let sock = match tokio::net::TcpSocket::new_v4() {
            Ok(sock) => sock,
            Err(e) => {
                // Out of descriptors here: the rest would fail the same way.
                let rest = (n - i) as u64;
                failed += rest;
                *failures.entry(format!("generator socket: {e}")).or_default() += rest;
                break;
            }
        };
        let token = &users[i % users.len()].1;
        let url = format!("ws://{host}/v1/ws?token={token}");
        // A server out of descriptors leaves connections unaccepted in its backlog: without
        // a deadline the generator would wait on them forever.
        let open = async {
            sock.bind(std::net::SocketAddr::from((src, 0)))
                .map_err(|e| format!("bind: {e}"))?;
            let stream = sock.connect(addr).await.map_err(|e| format!("connect: {e}"))?;
            tokio_tungstenite::client_async(url, stream)
                .await
                .map_err(|e| format!("handshake: {e}"))
        };
        let why = match tokio::time::timeout(Duration::from_secs(5), open).await {
            Ok(Ok((ws, _))) => {
                sockets.push(ws);
                consecutive_failures = 0;
                continue;
            }
            Ok(Err(why)) => why,
            Err(_) => "no answer within 5 s".to_string(),
        };
        failed += 1;
        consecutive_failures += 1;
        if consecutive_failures >= GIVE_UP_AFTER {
            // A limit was reached (descriptors, ports): the rest would fail the same way.
            let rest = (n - i) as u64;
            failed += rest - 1;
            *failures
                .entry(format!("{why} (and every later one)"))
                .or_default() += rest;
            break;
        }
        *failures.entry(why).or_default() += 1;
        if i % 5_000 == 4_999 {
            eprintln!("  .. {} open, {failed} failed", sockets.len());
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss1 = target.rss_kib();
    let open = sockets.len() as u64;
    let per_conn = if open > 0 {
        (rss1.saturating_sub(rss0)) as f64 / open as f64
    } else {
        0.0
    };
    drop(sockets);
    let row = StepResult {
        workload: "W4".into(),
        step: format!("{open} idle"),
        target_rate: n as u64,
        sent: n as u64,
        send_errors: failed,
        delivered: open,
        delivered_per_s: open as f64 / started.elapsed().as_secs_f64(),
        undelivered: failed,
        duplicates: 0,
        p50_ms: 0.0,
        p99_ms: 0.0,
        p999_ms: 0.0,
        max_ms: 0.0,
        server_cpu_s: 0.0,
        cpu_s_per_1k: 0.0,
        memory_per_conn_kib: Some(per_conn),
        mirror_lag: None,
    };
    print_row(&row);
    println!(
        "W4: server RSS {} MiB -> {} MiB for {open} connections",
        rss0 / 1024,
        rss1 / 1024
    );
    for (why, count) in &failures {
        println!("W4: {count} failed: {why}");
    }
    Ok(vec![row])
}

/// "acks": what each durability level costs a sender (docs/design.md §6). Closed loop:
/// `opts.users / 2` senders, each in its own direct conversation, send over HTTP one after
/// another with `Meridian-Durability: <level>` for `opts.step`, per level of
/// `opts.ack_levels`. A row per level: acked sends (`delivered`), acked/s, and the latency
/// from sending to the 202 (not to delivery: a `geo` wait holds the ack, not the fan-out).
/// A send answered otherwise counts in `send_errors`.
pub(super) async fn acks(
    target: &Arc<Target>,
    opts: &BenchOptions,
    run_id: &str,
    stop: &CancellationToken,
) -> Result<Vec<StepResult>, BenchError> {
    let senders = (opts.users / 2).max(1);
    eprintln!("acks: provisioning {senders} senders and their recipients...");
    let users = provision(target, &format!("{run_id}acku"), senders * 2).await?;
    let mut pairs = Vec::with_capacity(senders);
    for pair in users.chunks(2) {
        let cid = target
            .client(&pair[0].1)
            .create_direct(&pair[1].0)
            .await?
            .conversation_id;
        pairs.push((pair[0].1.clone(), cid));
    }
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(senders * 2)
        .build()
        .map_err(setup_err)?;
    let mut rows = Vec::new();
    for level in opts.ack_levels.iter().take_while(|_| !stop.is_cancelled()) {
        if let Some(lag) = target
            .wait_idle(Duration::from_secs(300))
            .await
            .filter(|l| *l > 0)
        {
            eprintln!("  .. acks {level}: starting with an apply backlog of {lag} events");
        }
        let cpu0 = target.cpu_seconds();
        let started = Instant::now();
        let until = started + opts.step;
        let tasks = pairs.iter().enumerate().map(|(i, (token, cid))| {
            let (http, token, cid, level) = (http.clone(), token.clone(), cid.clone(), level.clone());
            let url = format!("{}/v1/conversations/{cid}/messages", target.endpoint);
            let stop = stop.clone();
            async move {
                let mut latencies_us = Vec::new();
                let mut errors = 0u64;
                let mut n = 0u64;
                while Instant::now() < until && !stop.is_cancelled() {
                    let id = format!("{run_id}a{level}{i}_{n}");
                    n += 1;
                    let t0 = Instant::now();
                    let sent = http
                        .post(&url)
                        .bearer_auth(&token)
                        .header("Meridian-Durability", level.as_str())
                        .json(&serde_json::json!({"client_msg_id": id, "body": {"t": id}}))
                        .send()
                        .await;
                    match sent {
                        Ok(r) if r.status().as_u16() == 202 => {
                            latencies_us.push(t0.elapsed().as_micros() as u64)
                        }
                        _ => errors += 1,
                    }
                }
                (latencies_us, errors)
            }
        });
        let results = futures::future::join_all(tasks).await;
        let window = started.elapsed().as_secs_f64();
        let cpu = target.cpu_seconds() - cpu0;
        let mut all: Vec<u64> = Vec::new();
        let mut errors = 0;
        for (l, e) in results {
            all.extend(l);
            errors += e;
        }
        all.sort_unstable();
        let acked = all.len() as u64;
        let row = StepResult {
            workload: "acks".into(),
            step: format!("{level} x{senders}"),
            target_rate: 0,
            sent: acked + errors,
            send_errors: errors,
            delivered: acked,
            delivered_per_s: acked as f64 / window,
            undelivered: 0,
            duplicates: 0,
            p50_ms: super::report::percentile(&all, 0.50),
            p99_ms: super::report::percentile(&all, 0.99),
            p999_ms: super::report::percentile(&all, 0.999),
            max_ms: all.last().map_or(0.0, |m| *m as f64 / 1000.0),
            server_cpu_s: cpu,
            cpu_s_per_1k: cpu_s_per_1k(cpu, acked),
            memory_per_conn_kib: None,
            mirror_lag: None,
        };
        print_row(&row);
        rows.push(row);
    }
    Ok(rows)
}
