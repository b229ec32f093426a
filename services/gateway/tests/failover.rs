//! Issue 10 on linked regions (a nats-server per region linked through a hub, each region
//! mirroring and applying the others' streams): failover with the home region hung and
//! failback once it has caught up (items 1, 5), the fence of a region that wakes up after
//! its users were moved (item 2), failover racing with sends (item 5), and the time from
//! the failover command to a moved user's first send (item 6, printed).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use common::{eventually, eventually_some, Cluster, Session};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);

/// The fence bound of these regions: a mirror quiet for longer makes its region refuse its
/// users' writes (`GatewayConfig::fence_after_s`).
const FENCE_AFTER_S: u64 = 2;

async fn linked() -> Result<Cluster> {
    Cluster::start_linked(&["us", "eu"], |cfg| {
        cfg.fence_after_s = FENCE_AFTER_S;
        cfg.mirror_unhealthy_after_s = FENCE_AFTER_S;
    })
    .await
}

async fn admin_post(c: &Cluster, region: &str, path: &str, body: Value) -> Result<(u16, Value)> {
    c.admin(region, reqwest::Method::POST, path, Some(body)).await
}

/// A token for `user` from `region`, once that region's directory knows the user.
async fn session_when_known(c: &Cluster, region: &str, user: &str) -> Result<Session> {
    eventually_some(WAIT, &format!("{user} known in {region}"), || async {
        Ok(c.session(region, user).await.ok())
    })
    .await
}

async fn send(s: &Session, cid: &str, client_msg_id: &str) -> Result<(u16, Value)> {
    s.post(
        &format!("/v1/conversations/{cid}/messages"),
        json!({"client_msg_id": client_msg_id, "type": "text", "body": {"text": client_msg_id}}),
    )
    .await
}

/// Every message of `cid` as `s`'s region holds it: client_msg_id → copies.
async fn history(s: &Session, cid: &str) -> Result<BTreeMap<String, usize>> {
    let mut out = BTreeMap::new();
    // Forward from the start (`after=` empty), each page continuing at `next_cursor`.
    let mut after = String::new();
    for _ in 0..100 {
        let path = format!("/v1/conversations/{cid}/messages?limit=100&after={after}");
        let (st, body) = s.get(&path).await?;
        if st != 200 {
            bail!("history: {st} {body}");
        }
        let msgs = body["messages"].as_array().context("messages")?;
        for m in msgs {
            *out.entry(m["client_msg_id"].as_str().unwrap_or_default().to_string())
                .or_insert(0) += 1;
        }
        match body["next_cursor"].as_str() {
            Some(next) => after = next.to_string(),
            None => return Ok(out),
        }
    }
    bail!("history longer than 100 pages")
}

/// `user`'s inbox seqs in its current epoch, checked consecutive from 1.
async fn inbox_consecutive(s: &Session) -> Result<(String, u64)> {
    let (st, me) = s.get("/v1/me").await?;
    if st != 200 {
        bail!("me: {st} {me}");
    }
    let epoch = me["epoch"].as_str().context("epoch")?.to_string();
    let mut after = 0u64;
    for _ in 0..100 {
        let (st, body) = s
            .get(&format!("/v1/sync?after={after}&epoch={epoch}&limit=100"))
            .await?;
        if st != 200 {
            bail!("sync: {st} {body}");
        }
        let entries = body["entries"].as_array().context("entries")?;
        if entries.is_empty() {
            return Ok((epoch, after));
        }
        for e in entries {
            let seq = e["seq"].as_u64().context("seq")?;
            if seq != after + 1 {
                bail!("inbox seq {seq} after {after} in epoch {epoch}: {body}");
            }
            after = seq;
        }
    }
    bail!("inbox longer than 100 pages")
}

/// Equal digests at equal applied positions, settled, in both regions.
async fn digests_converge(c: &Cluster) -> Result<()> {
    eventually(WAIT, "equal digests", || async {
        let (_, us) = c
            .admin("us", reqwest::Method::GET, "/v1/admin/digest", None)
            .await?;
        let (_, eu) = c
            .admin("eu", reqwest::Method::GET, "/v1/admin/digest", None)
            .await?;
        Ok(us["digest"] == eu["digest"] && us["applied"] == eu["applied"] && us["settled"] == true)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item1_failover_with_the_home_region_hung_then_failback_once_caught_up() -> Result<()> {
    let mut c = linked().await?;
    c.provision_in(&["us"], "bob", "us").await?;
    c.provision_in(&["us"], "ann", "eu").await?;
    let bob_us = c.session("us", "bob").await?;
    let ann = session_when_known(&c, "eu", "ann").await?;
    let cid = bob_us.direct("ann").await?;
    let mut acked = BTreeSet::new();
    for m in ["b0", "b1"] {
        let (st, body) = send(&bob_us, &cid, m).await?;
        assert_eq!(st, 202, "{body}");
        acked.insert(m.to_string());
    }
    eventually(WAIT, "eu has bob's messages", || async {
        Ok(history(&ann, &cid).await?.len() == 2)
    })
    .await?;
    let (_, me) = bob_us.get("/v1/me").await?;
    let home_epoch = me["epoch"].as_str().context("epoch")?.to_string();
    // Both regions hear each other (every mirror attached) before the trouble starts.
    for r in ["us", "eu"] {
        eventually(WAIT, &format!("{r} ready"), || async {
            Ok(c.admin(r, reqwest::Method::GET, "/readyz", None).await?.0 == 200)
        })
        .await?;
    }

    // us hangs: its nats-server stops (SIGSTOP). A send of bob's there is not accepted.
    let hung_at = Instant::now();
    c.nats.linked().region_mut("us").sigstop();
    let (st, body) = send(&bob_us, &cid, "lost-while-hung").await?;
    assert_ne!(st, 202, "a hung region accepted a send: {body}");

    // The operator fails us over to eu, twice at once: one effect, the same answer.
    let started = Instant::now();
    let a = admin_post(
        &c,
        "eu",
        "/v1/admin/failover",
        json!({"region": "us", "to": "eu"}),
    );
    let b = admin_post(&c, "eu", "/v1/admin/failover", json!({"region": "us"}));
    let ((sa, a), (sb, b)) = tokio::try_join!(a, b)?;
    assert_eq!((sa, sb), (200, 200), "{a} {b}");
    assert_eq!(a["serving"], "eu", "{a}");
    assert_eq!(a["epoch"], b["epoch"], "{a} {b}");
    assert_eq!(
        [&a["changed"], &b["changed"]]
            .iter()
            .filter(|c| ***c == json!(true))
            .count(),
        1,
        "{a} {b}"
    );
    let point = a["failover_point"].as_object().context("failover_point")?;
    assert_eq!(
        point.len(),
        2,
        "every applied stream is in the failover point: {a}"
    );
    let (st, again) = admin_post(&c, "eu", "/v1/admin/failover", json!({"region": "us"})).await?;
    assert_eq!(
        (st, &again["epoch"], &again["changed"]),
        (200, &a["epoch"], &json!(false)),
        "{again}"
    );
    // Asked of a region that is not the acting one: 421 naming it.
    let (st, body) = admin_post(
        &c,
        "eu",
        "/v1/admin/failover",
        json!({"region": "us", "to": "us"}),
    )
    .await?;
    assert_eq!(
        (st, body["error"].as_str()),
        (409, Some("failover_to_itself")),
        "{body}"
    );

    // bob is served by eu now: his first send there is the RTO.
    let bob_eu = c.session("eu", "bob").await?;
    let first = eventually_some(WAIT, "bob's first send through eu", || async {
        let (st, body) = send(&bob_eu, &cid, "e0").await?;
        Ok((st == 202).then_some(body))
    })
    .await?;
    println!(
        "RTO: failover command to the first acknowledged send of a moved user: {} ms (send {first})",
        started.elapsed().as_millis()
    );
    acked.insert("e0".to_string());
    let (st, body) = send(&ann, &cid, "a0").await?;
    assert_eq!(st, 202, "{body}");
    acked.insert("a0".to_string());
    // His old epoch is over: a sync with it is told to resync.
    let (st, body) = bob_eu
        .get(&format!("/v1/sync?after=0&epoch={home_epoch}"))
        .await?;
    assert_eq!(
        (st, body["error"].as_str()),
        (409, Some("resync_required")),
        "{body}"
    );
    let (st, me) = bob_eu.get("/v1/me").await?;
    assert_eq!(
        (st, &me["served_by"], &me["epoch"]),
        (200, &json!("eu"), &a["epoch"]),
        "{me}"
    );

    // us wakes up after longer than the fence bound.
    if let Some(left) = Duration::from_secs(FENCE_AFTER_S + 1).checked_sub(hung_at.elapsed()) {
        tokio::time::sleep(left).await;
    }
    c.nats.linked().region_mut("us").sigcont();
    // Failback is refused while us cannot tell what it has missed.
    let (st, body) = admin_post(&c, "us", "/v1/admin/failback", json!({"region": "us"})).await?;
    assert_eq!(
        (st, body["error"].as_str()),
        (409, Some("not_caught_up")),
        "{body}"
    );
    assert!(body["lag"].is_object(), "{body}");
    // Asked of eu: 421 to the home region, which must be the one caught up.
    let (st, body) = admin_post(&c, "eu", "/v1/admin/failback", json!({"region": "us"})).await?;
    assert_eq!((st, body["region"].as_str()), (421, Some("us")), "{body}");
    // It takes bob back only once caught up; meanwhile every answer is 409 not_caught_up.
    let mut refusals = 0;
    let back = eventually_some(WAIT, "failback accepted", || async {
        let (st, body) = admin_post(&c, "us", "/v1/admin/failback", json!({"region": "us"})).await?;
        match st {
            200 => Ok(Some(body)),
            409 if body["error"] == "not_caught_up" => Ok(None),
            _ => bail!("failback: {st} {body}"),
        }
    })
    .await?;
    refusals += 1;
    assert_eq!(
        (&back["serving"], &back["changed"]),
        (&json!("us"), &json!(true)),
        "{back}"
    );
    assert_ne!(back["epoch"], a["epoch"]);
    let (st, again) = admin_post(&c, "us", "/v1/admin/failback", json!({"region": "us"})).await?;
    assert_eq!(
        (st, &again["changed"], &again["epoch"]),
        (200, &json!(false), &back["epoch"]),
        "{again}"
    );

    // Home again: bob sends through us; eu sends him back with 421.
    eventually(WAIT, "bob sends through us again", || async {
        Ok(send(&bob_us, &cid, "u1").await?.0 == 202)
    })
    .await?;
    acked.insert("u1".to_string());
    eventually(WAIT, "eu refers bob home", || async {
        Ok(bob_eu.get("/v1/me").await?.0 == 421)
    })
    .await?;

    // Nothing acknowledged lost or doubled, in either region; the new inbox is gap-free.
    for s in [&bob_us, &ann] {
        let acked = acked.clone();
        eventually(WAIT, "every acknowledged message once", || async {
            let h = history(s, &cid).await?;
            if h.values().any(|n| *n > 1) {
                bail!("doubled: {h:?}");
            }
            Ok(acked.iter().all(|m| h.contains_key(m)))
        })
        .await?;
    }
    digests_converge(&c).await?;
    let (epoch, head) = inbox_consecutive(&bob_us).await?;
    assert_eq!(epoch, back["epoch"].as_str().unwrap_or_default());
    println!("failback refused before acceptance: at least {refusals}; bob's inbox at home: epoch {epoch}, head {head}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item2_a_region_woken_after_its_users_were_failed_over_refuses_their_sends() -> Result<()> {
    let mut c = linked().await?;
    c.provision_in(&["us"], "bob", "us").await?;
    c.provision_in(&["us"], "ann", "eu").await?;
    let bob_us = c.session("us", "bob").await?;
    session_when_known(&c, "eu", "ann").await?;
    let cid = bob_us.direct("ann").await?;
    for r in ["us", "eu"] {
        eventually(WAIT, &format!("{r} ready"), || async {
            Ok(c.admin(r, reqwest::Method::GET, "/readyz", None).await?.0 == 200)
        })
        .await?;
    }
    let (st, body) = send(&bob_us, &cid, "before").await?;
    assert_eq!(st, 202, "{body}");

    // us hangs (its nats-server stopped) past the fence bound; eu takes its users over.
    let hung_at = Instant::now();
    c.nats.linked().region_mut("us").sigstop();
    let (st, moved) = admin_post(&c, "eu", "/v1/admin/failover", json!({"region": "us"})).await?;
    assert_eq!(st, 200, "{moved}");
    let bob_eu = c.session("eu", "bob").await?;
    let (st, body) = send(&bob_eu, &cid, "through-eu").await?;
    assert_eq!(st, 202, "{body}");
    if let Some(left) = Duration::from_secs(FENCE_AFTER_S + 1).checked_sub(hung_at.elapsed()) {
        tokio::time::sleep(left).await;
    }
    c.nats.linked().region_mut("us").sigcont();

    // Woken, us has not heard of the failover yet: it must not take bob's send.
    let (st, body) = send(&bob_us, &cid, "after-wake").await?;
    assert!(
        st == 421 || (st == 503 && body["error"] == "region_unsure"),
        "the woken region answered a moved user's send with {st} {body}"
    );
    // Once it has caught up it knows, and points him to eu; nothing it refused was stored.
    eventually(WAIT, "us refers bob to eu", || async {
        let (st, body) = send(&bob_us, &cid, "after-wake").await?;
        if st == 202 {
            bail!("the woken region accepted a moved user's send: {body}");
        }
        Ok(st == 421 && body["region"] == "eu")
    })
    .await?;
    digests_converge(&c).await?;
    let h = history(&bob_eu, &cid).await?;
    assert_eq!(
        h.keys().map(String::as_str).collect::<Vec<_>>(),
        ["before", "through-eu"],
        "{h:?}"
    );
    Ok(())
}

/// A moved user's client: sends each message until acknowledged, following `421` to the
/// region it names, retrying others a bounded number of times with the same id.
async fn send_following(
    sessions: &BTreeMap<String, Session>,
    start: &str,
    cid: &str,
    id: &str,
) -> Result<(Option<String>, String)> {
    let mut at = start.to_string();
    for _ in 0..40 {
        let (st, body) = send(&sessions[&at], cid, id).await?;
        match st {
            202 => return Ok((Some(id.to_string()), at)),
            421 => at = body["region"].as_str().context("region")?.to_string(),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    Ok((None, at))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item5_failover_racing_with_sends_loses_and_doubles_nothing_acknowledged() -> Result<()> {
    let c = linked().await?;
    c.provision_in(&["us"], "bob", "us").await?;
    c.provision_in(&["us"], "ann", "eu").await?;
    let mut bob = BTreeMap::new();
    bob.insert("us".to_string(), c.session("us", "bob").await?);
    bob.insert("eu".to_string(), session_when_known(&c, "eu", "bob").await?);
    let ann = session_when_known(&c, "eu", "ann").await?;
    let cid = bob["us"].direct("ann").await?;
    // Each region hears the other (so us learns of the failover while bob sends there).
    for r in ["us", "eu"] {
        eventually(WAIT, &format!("{r} ready"), || async {
            Ok(c.admin(r, reqwest::Method::GET, "/readyz", None).await?.0 == 200)
        })
        .await?;
    }
    // Two senders of bob's and ann's sends, all in flight while the failover happens.
    let bob_sends = {
        let (bob, cid) = (bob.clone(), cid.clone());
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut at = "us".to_string();
            // Until ten sends after he moved (bounded: the failover comes early).
            let mut after_move = 0;
            for i in 0..400 {
                let (ok, now_at) = send_following(&bob, &at, &cid, &format!("b{i}")).await?;
                at = now_at;
                acked.extend(ok);
                after_move += usize::from(at == "eu");
                if after_move >= 10 {
                    break;
                }
            }
            anyhow::Ok((acked, at))
        })
    };
    let ann_sends = {
        let (ann, cid) = (ann.clone(), cid.clone());
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..40 {
                if send(&ann, &cid, &format!("a{i}")).await?.0 == 202 {
                    acked.push(format!("a{i}"));
                }
            }
            anyhow::Ok(acked)
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (st, moved) = admin_post(&c, "eu", "/v1/admin/failover", json!({"region": "us"})).await?;
    assert_eq!(st, 200, "{moved}");
    let (bob_acked, bob_at) = bob_sends.await??;
    let ann_acked = ann_sends.await??;
    assert_eq!(bob_at, "eu", "bob ends served by eu");
    let acked: BTreeSet<String> = bob_acked.into_iter().chain(ann_acked).collect();
    assert!(acked.len() >= 40, "most sends are acknowledged: {acked:?}");
    for s in [&bob["eu"], &ann] {
        let acked = acked.clone();
        let waited = eventually(WAIT, "every acknowledged message present", || async {
            let h = history(s, &cid).await?;
            if let Some((m, n)) = h.iter().find(|(_, n)| **n > 1) {
                bail!("{m} doubled ({n} copies)");
            }
            Ok(acked.iter().all(|m| h.contains_key(m)))
        })
        .await;
        if let Err(e) = waited {
            let h = history(s, &cid).await?;
            let missing: Vec<&String> = acked.iter().filter(|m| !h.contains_key(*m)).collect();
            bail!(
                "{e}: missing {missing:?} of {} acknowledged; held {:?}",
                acked.len(),
                h.keys()
            );
        }
    }
    digests_converge(&c).await?;
    // Every copy is acknowledged or was retried until it was (same id): nothing extra.
    let h = history(&ann, &cid).await?;
    let extra: Vec<&String> = h.keys().filter(|m| !acked.contains(*m)).collect();
    assert!(extra.is_empty(), "stored but never acknowledged: {extra:?}");
    // Inboxes gap-free within their epochs: bob's new one at eu, ann's unchanged.
    let (epoch, _) = inbox_consecutive(&bob["eu"]).await?;
    assert_eq!(epoch, moved["epoch"].as_str().unwrap_or_default());
    inbox_consecutive(&ann).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item3_the_client_resyncs_across_a_failover_without_losing_or_doubling() -> Result<()> {
    use meridian_client::{Checkpoint, Client, SyncEvent};
    let c = linked().await?;
    c.provision_in(&["us"], "bob", "us").await?;
    c.provision_in(&["us"], "ann", "eu").await?;
    let ann = session_when_known(&c, "eu", "ann").await?;
    let bob_token = c.session("us", "bob").await?.token;
    let cid = ann.direct("bob").await?;
    let client = Client::new(&c.region("us").base, bob_token);
    let mut sync = client.sync(Checkpoint::default());
    let mut sent = BTreeSet::new();
    for i in 0..3 {
        let (st, body) = send(&ann, &cid, &format!("before{i}")).await?;
        assert_eq!(st, 202, "{body}");
        sent.insert(body["message_id"].as_str().context("message_id")?.to_string());
    }
    // ann keeps sending while us's users move to eu.
    let during = {
        let (ann, cid) = (ann.clone(), cid.clone());
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..20 {
                let (st, body) = send(&ann, &cid, &format!("during{i}")).await?;
                if st == 202 {
                    ids.push(body["message_id"].as_str().context("message_id")?.to_string());
                }
            }
            anyhow::Ok(ids)
        })
    };
    let (st, moved) = admin_post(&c, "eu", "/v1/admin/failover", json!({"region": "us"})).await?;
    assert_eq!(st, 200, "{moved}");
    sent.extend(during.await??);
    for i in 0..3 {
        let (st, body) = send(&ann, &cid, &format!("after{i}")).await?;
        assert_eq!(st, 202, "{body}");
        sent.insert(body["message_id"].as_str().context("message_id")?.to_string());
    }
    // Every message reaches the app once, from its inbox or from the timelines.
    let mut got: BTreeMap<String, usize> = BTreeMap::new();
    let mut resynced_to = None;
    let deadline = Instant::now() + WAIT;
    while !(sent.iter().all(|m| got.contains_key(m)) && resynced_to.is_some()) {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = match tokio::time::timeout(left, sync.next()).await {
            Ok(Some(ev)) => ev,
            Ok(None) => bail!("the sync loop ended"),
            Err(_) => bail!("not every message within {WAIT:?}: got {got:?}, resynced to {resynced_to:?}"),
        };
        match ev {
            Ok(SyncEvent::Entry(e)) if e.kind == "message" => {
                *got.entry(e.message_id.unwrap_or_default()).or_insert(0) += 1;
            }
            Ok(SyncEvent::Recovered { message, .. }) => {
                *got.entry(message.message_id).or_insert(0) += 1;
            }
            Ok(SyncEvent::ResyncRequired { epoch, .. }) => resynced_to = Some(epoch),
            _ => {}
        }
    }
    // A little longer: nothing comes twice.
    let quiet_until = Instant::now() + Duration::from_secs(2);
    while let Ok(Some(ev)) =
        tokio::time::timeout(quiet_until.saturating_duration_since(Instant::now()), sync.next()).await
    {
        match ev {
            Ok(SyncEvent::Entry(e)) if e.kind == "message" => {
                *got.entry(e.message_id.unwrap_or_default()).or_insert(0) += 1;
            }
            Ok(SyncEvent::Recovered { message, .. }) => {
                *got.entry(message.message_id).or_insert(0) += 1;
            }
            _ => {}
        }
    }
    let doubled: Vec<_> = got.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "handed out twice: {doubled:?}");
    assert_eq!(resynced_to.as_deref(), moved["epoch"].as_str());
    assert_eq!(client.base_url(), c.region("eu").base);
    assert_eq!(sync.checkpoint().epoch.as_deref(), moved["epoch"].as_str());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item5_home_nats_killed_and_restarted_failover_then_failback_loses_nothing() -> Result<()> {
    let mut c = linked().await?;
    c.provision_in(&["us"], "bob", "us").await?;
    c.provision_in(&["us"], "ann", "eu").await?;
    let bob_us = c.session("us", "bob").await?;
    let ann = session_when_known(&c, "eu", "ann").await?;
    let cid = bob_us.direct("ann").await?;
    for r in ["us", "eu"] {
        eventually(WAIT, &format!("{r} ready"), || async {
            Ok(c.admin(r, reqwest::Method::GET, "/readyz", None).await?.0 == 200)
        })
        .await?;
    }
    let mut acked = BTreeSet::new();
    let (st, body) = send(&bob_us, &cid, "k0").await?;
    assert_eq!(st, 202, "{body}");
    acked.insert("k0".to_string());
    eventually(WAIT, "eu has k0", || async {
        Ok(history(&ann, &cid).await?.contains_key("k0"))
    })
    .await?;

    // us's nats-server is killed (SIGKILL); eu takes bob over and he keeps talking.
    c.nats.linked().region_mut("us").kill();
    let (st, moved) = admin_post(&c, "eu", "/v1/admin/failover", json!({"region": "us"})).await?;
    assert_eq!(st, 200, "{moved}");
    let bob_eu = c.session("eu", "bob").await?;
    for m in ["k1", "k2"] {
        let (st, body) = send(&bob_eu, &cid, m).await?;
        assert_eq!(st, 202, "{body}");
        acked.insert(m.to_string());
    }
    // Restarted on its store: us must catch up before it takes bob back.
    c.nats.linked().region_mut("us").restart()?;
    let back = eventually_some(WAIT, "failback accepted", || async {
        let (st, body) = admin_post(&c, "us", "/v1/admin/failback", json!({"region": "us"})).await?;
        match st {
            200 => Ok(Some(body)),
            409 if body["error"] == "not_caught_up" => Ok(None),
            _ => bail!("failback: {st} {body}"),
        }
    })
    .await?;
    assert_eq!(
        (&back["serving"], &back["changed"]),
        (&json!("us"), &json!(true)),
        "{back}"
    );
    // Caught up means bob's messages through eu are here before he is.
    let h = history(&bob_us, &cid).await?;
    assert!(h.contains_key("k1") && h.contains_key("k2"), "{h:?}");
    eventually(WAIT, "bob sends through us again", || async {
        Ok(send(&bob_us, &cid, "k3").await?.0 == 202)
    })
    .await?;
    acked.insert("k3".to_string());
    for s in [&bob_us, &ann] {
        let acked = acked.clone();
        eventually(WAIT, "every acknowledged message once", || async {
            let h = history(s, &cid).await?;
            if h.values().any(|n| *n > 1) {
                bail!("doubled: {h:?}");
            }
            Ok(acked.iter().all(|m| h.contains_key(m)))
        })
        .await?;
    }
    digests_converge(&c).await?;
    inbox_consecutive(&bob_us).await?;
    Ok(())
}
