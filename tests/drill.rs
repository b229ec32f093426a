//! Issue 11, items 2 and 3: the drill's workload against real regions with no faults passes
//! every invariant of the checker, and the checker finds violations planted in a record.

use std::time::Duration;

use anyhow::{Context, Result};
use meridian_chaos::drill::check::check;
use meridian_chaos::drill::record::{AckedSend, InboxSpan, Receipt, RegionTarget, Via, WorkloadRecord};
use meridian_chaos::drill::workload::{Workload, WorkloadConfig, WorkloadTuning};
use meridian_e2e::{TestRegion, TestRegions, ADMIN_KEY};
use reqwest::Method;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

fn targets(regions: &TestRegions) -> Vec<RegionTarget> {
    regions
        .nodes()
        .iter()
        .map(|n| RegionTarget {
            region: n.id.to_string(),
            endpoint: n.base.clone(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn item3_a_drill_without_faults_passes_every_invariant() -> Result<()> {
    let regions = TestRegions::start(&["us", "eu"]).await?;
    let targets = targets(&regions);
    let cfg = WorkloadConfig {
        regions: targets.clone(),
        admin_key: ADMIN_KEY.into(),
        users_per_region: 2,
        rate_per_s: 10.0,
        seed: 11,
        run_id: format!("quiet{}", regions.prefix.to_lowercase().replace('_', "")),
    };
    let shutdown = CancellationToken::new();
    // Reconnects every 2-4 s, so a short run resumes every device's stream a few times.
    let tuning = WorkloadTuning {
        reconnect_every: (Duration::from_secs(2), Duration::from_secs(4)),
    };
    let workload = Workload::start_tuned(cfg, tuning, shutdown.clone()).await?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let progress = workload.progress();
    let record = workload.stop().await;
    let outcome = check(&record, &targets, ADMIN_KEY, Duration::from_secs(30)).await;
    eprintln!(
        "acked {}, receipts {}, samples {}, converge_s {:?}, counts {:?}",
        record.acked.len(),
        record.receipts.len(),
        record.samples.len(),
        outcome.converge_s,
        record.counts
    );
    assert!(
        progress.acked > 0,
        "nothing acked: {progress:?} {:?}",
        record.counts
    );
    assert!(outcome.acked > 0);
    assert_eq!((outcome.lost, outcome.duplicated), (0, 0));
    assert!(
        outcome.violations.is_empty(),
        "violations: {:#?}",
        outcome.violations
    );
    assert!(outcome.digests_equal && outcome.converge_s.is_some());
    assert!(!record.samples.is_empty() && !record.inbox.is_empty());
    assert!(record.receipts.iter().any(|r| r.via == Via::Live));
    assert!(
        record.counts.get("reconnect").copied().unwrap_or(0) >= 4,
        "{:?}",
        record.counts
    );
    // The record is what report.json carries: it survives JSON.
    let back: WorkloadRecord = serde_json::from_str(&serde_json::to_string(&record)?)?;
    assert_eq!(back.acked, record.acked);
    regions.stop().await
}

/// The same across a failover of us's users to eu and their failback: every client follows
/// 421, resyncs into the new epoch, and nothing acked is lost, doubled or missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn item3_a_drill_across_failover_and_failback_passes_every_invariant() -> Result<()> {
    let regions = TestRegions::start(&["us", "eu"]).await?;
    let targets = targets(&regions);
    let cfg = WorkloadConfig {
        regions: targets.clone(),
        admin_key: ADMIN_KEY.into(),
        users_per_region: 2,
        rate_per_s: 10.0,
        seed: 12,
        run_id: format!("moved{}", regions.prefix.to_lowercase().replace('_', "")),
    };
    let tuning = WorkloadTuning {
        reconnect_every: (Duration::from_secs(2), Duration::from_secs(4)),
    };
    let workload = Workload::start_tuned(cfg, tuning, CancellationToken::new()).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (st, body) = regions
        .admin(
            "eu",
            Method::POST,
            "/v1/admin/failover",
            Some(json!({"region": "us"})),
        )
        .await?;
    assert_eq!(st, 200, "failover: {body}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (st, body) = regions
            .admin(
                "us",
                Method::POST,
                "/v1/admin/failback",
                Some(json!({"region": "us"})),
            )
            .await?;
        if st == 200 {
            break;
        }
        assert!(
            st == 409 && tokio::time::Instant::now() < deadline,
            "failback: {st} {body}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let record = workload.stop().await;
    let outcome = check(&record, &targets, ADMIN_KEY, Duration::from_secs(30)).await;
    eprintln!(
        "acked {}, receipts {}, converge_s {:?}, counts {:?}",
        record.acked.len(),
        record.receipts.len(),
        outcome.converge_s,
        record.counts
    );
    assert!(outcome.acked > 0);
    assert!(
        outcome.violations.is_empty(),
        "violations: {:#?}",
        outcome.violations
    );
    assert!(
        record.receipts.iter().any(|r| r.via == Via::Resync) || record.counts.contains_key("resync"),
        "{:?}",
        record.counts
    );
    regions.stop().await
}

/// The same with a region's nats-server killed for a few seconds and restarted: sends to it
/// fail and are retried, and once it is back nothing acked is lost, doubled or missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn item3_a_drill_across_a_killed_nats_server_passes_every_invariant() -> Result<()> {
    let mut regions = TestRegions::start(&["us", "eu"]).await?;
    let targets = targets(&regions);
    let cfg = WorkloadConfig {
        regions: targets.clone(),
        admin_key: ADMIN_KEY.into(),
        users_per_region: 2,
        rate_per_s: 10.0,
        seed: 13,
        run_id: format!("killed{}", regions.prefix.to_lowercase().replace('_', "")),
    };
    let tuning = WorkloadTuning {
        reconnect_every: (Duration::from_secs(2), Duration::from_secs(4)),
    };
    let workload = Workload::start_tuned(cfg, tuning, CancellationToken::new()).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    regions.kill_nats("us");
    tokio::time::sleep(Duration::from_secs(3)).await;
    regions.restart_nats("us")?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let t0 = std::time::Instant::now();
    let record = workload.stop().await;
    let t1 = std::time::Instant::now();
    let outcome = check(&record, &targets, ADMIN_KEY, Duration::from_secs(45)).await;
    eprintln!(
        "stop {:?} check {:?}: acked {}, receipts {}, converge_s {:?}, counts {:?}",
        t1 - t0,
        t1.elapsed(),
        record.acked.len(),
        record.receipts.len(),
        outcome.converge_s,
        record.counts
    );
    assert!(outcome.acked > 0);
    assert!(
        outcome.violations.is_empty(),
        "violations: {:#?}",
        outcome.violations
    );
    regions.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item3_the_checker_names_planted_violations() -> Result<()> {
    let regions = TestRegions::start(&["us", "eu"]).await?;
    let targets = targets(&regions);
    let ann = regions.user("us", "ann", "d1").await?;
    regions.provision("eu", "bob", "eu").await?;
    regions.wait_directory(&["ann", "bob"]).await?;
    let cid = ann.direct("bob").await?;
    let sent = ann.send(&cid, "real-1", "hello").await?;
    let real = sent["message_id"].as_str().context("message_id")?.to_string();
    regions.wait_converged().await?;

    let acked = |message_id: &str, client_msg_id: &str| AckedSend {
        message_id: message_id.into(),
        conversation_id: cid.clone(),
        sender: "ann".into(),
        client_msg_id: client_msg_id.into(),
        region: "us".into(),
        sent_at_ms: 1,
        acked_at_ms: 2,
        recipients: vec!["bob".into()],
    };
    let receipt = |via: Via, seq: u64| Receipt {
        user: "bob".into(),
        device: "d1".into(),
        message_id: real.clone(),
        conversation_id: cid.clone(),
        via,
        epoch: Some("eu.1".into()),
        seq: Some(seq),
        at_ms: 3,
    };
    let span = |after: u64, last: u64| InboxSpan {
        user: "bob".into(),
        device: "d1".into(),
        epoch: "eu.1".into(),
        after,
        last,
    };
    let ghost = "0190f0f0-0000-7000-8000-000000000001";
    let mut record = WorkloadRecord {
        acked: vec![acked(&real, "real-1"), acked(ghost, "ghost-1")],
        // The real message twice (live, then again after a reconnect); the ghost never.
        receipts: vec![receipt(Via::Live, 2), receipt(Via::Sync, 3)],
        // Seqs 1-3, then 6-7: 4 and 5 never handed.
        inbox: vec![span(0, 3), span(5, 7)],
        read_regressions: vec!["bob: planted".into()],
        ..Default::default()
    };
    record.devices.insert("bob".into(), vec!["d1".into()]);
    let outcome = check(&record, &targets, ADMIN_KEY, Duration::from_secs(30)).await;
    assert_eq!((outcome.acked, outcome.lost, outcome.duplicated), (2, 1, 0));
    assert!(outcome.digests_equal, "{outcome:?}");
    let of = |inv: &str| {
        outcome
            .violations
            .iter()
            .filter(|v| v.invariant == inv)
            .collect::<Vec<_>>()
    };
    let stored = of("stored_once");
    assert_eq!(stored.len(), 2, "the ghost, absent in us and in eu: {stored:#?}");
    for v in &stored {
        assert_eq!(v.message_id.as_deref(), Some(ghost));
        assert!(v.found.contains("absent"), "{v:?}");
    }
    let delivered = of("delivered_once");
    assert_eq!(delivered.len(), 2, "{delivered:#?}");
    let twice = delivered
        .iter()
        .find(|v| v.message_id.as_deref() == Some(&real))
        .context("the duplicate receipt")?;
    assert!(
        twice.found.contains("2 times") && twice.found.contains("Sync"),
        "{twice:?}"
    );
    assert_eq!(twice.user.as_deref(), Some("bob"));
    let never = delivered
        .iter()
        .find(|v| v.message_id.as_deref() == Some(ghost))
        .context("the missing receipt")?;
    assert_eq!(never.found, "never received");
    let gaps = of("inbox_gap_free");
    assert_eq!(gaps.len(), 1, "{gaps:#?}");
    assert!(gaps[0].found.contains("4..=5"), "{:?}", gaps[0]);
    assert_eq!(of("read_index_monotonic").len(), 1);
    assert_eq!(
        outcome.violations.len(),
        6,
        "nothing else: {:#?}",
        outcome.violations
    );
    regions.stop().await
}

/// The admin timeline read the checker relies on: the region's storage timeline as stored,
/// oldest first, in pages; recalled messages as tombstones, messages a member deleted for
/// themselves included; no membership; 404 for a conversation the region does not hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item3_the_admin_timeline_read_shows_the_timeline_as_stored() -> Result<()> {
    let r = TestRegion::start().await?;
    let ann = r.user("ann", "d1").await?;
    r.user("bob", "d1").await?;
    let bob = r.session("bob", "d1").await?;
    let cid = ann.direct("bob").await?;
    let mut ids = Vec::new();
    for i in 0..5 {
        let sent = ann.send(&cid, &format!("c-{i}"), &format!("m{i}")).await?;
        ids.push(sent["message_id"].as_str().context("message_id")?.to_string());
    }
    let (st, body) = ann
        .post(
            &format!("/v1/conversations/{cid}/messages/{}/recall", ids[1]),
            json!({}),
        )
        .await?;
    assert_eq!(st, 200, "{body}");
    let (st, body) = bob
        .delete(&format!("/v1/conversations/{cid}/messages/{}", ids[2]))
        .await?;
    assert_eq!(st, 204, "{body}");

    let path = |after: &str, limit: usize| {
        format!("/v1/admin/conversations/{cid}/messages?after={after}&limit={limit}")
    };
    let (st, first) = r.admin(Method::GET, &path("", 3), None).await?;
    assert_eq!(st, 200, "{first}");
    let next = first["next_cursor"].as_str().context("a next page")?.to_string();
    let (st, second) = r.admin(Method::GET, &path(&next, 3), None).await?;
    assert_eq!(st, 200, "{second}");
    assert!(second["next_cursor"].is_null(), "{second}");
    let messages: Vec<&Value> = first["messages"]
        .as_array()
        .into_iter()
        .chain(second["messages"].as_array())
        .flatten()
        .collect();
    let got: Vec<&str> = messages.iter().filter_map(|m| m["message_id"].as_str()).collect();
    assert_eq!(got, ids, "every message once, oldest first");
    assert_eq!(messages[1]["recalled"], true);
    assert!(messages[1]["body"].is_null());
    assert_eq!(
        messages[2]["body"]["text"], "m2",
        "deleted for bob only: still stored"
    );
    assert_eq!(messages[4]["client_msg_id"], "c-4");

    let unknown = "g_00000000000000000000000000000000";
    let (st, body) = r
        .admin(
            Method::GET,
            &format!("/v1/admin/conversations/{unknown}/messages"),
            None,
        )
        .await?;
    assert_eq!((st, body["error"].as_str()), (404, Some("not_found")), "{body}");
    let (st, body) = r.admin(Method::GET, &path("", 1001), None).await?;
    assert_eq!(
        (st, body["error"].as_str()),
        (400, Some("invalid_argument")),
        "{body}"
    );
    let (st, body) = r.admin(Method::GET, &path("not-a-cursor", 10), None).await?;
    assert_eq!((st, body["field"].as_str()), (400, Some("after")), "{body}");
    // Members get no such call: it needs the admin key.
    let (st, _) = ann.get(&path("", 10)).await?;
    assert_eq!(st, 401);
    Ok(())
}
