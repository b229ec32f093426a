//! Issue 9 on linked regions (a nats-server per region, linked through a hub, each region
//! mirroring and applying the others' streams, logged in as the `region` role): the directory
//! replicates so any region answers 421 for any user (item 5); typing and presence cross the
//! link under the role's permissions (item 4); `/v1/admin/regions`, `/v1/admin/digest` and
//! `/readyz` report every mirror for real, and readiness fails while one is cut (item 6).

mod common;

use std::time::Duration;

use anyhow::{Context, Result};
use common::{eventually, eventually_some, Cluster};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);

async fn get(c: &Cluster, region: &str, path: &str) -> Result<(u16, Value)> {
    c.admin(region, reqwest::Method::GET, path, None).await
}

/// A token for `user` from `region`, once that region's directory knows the user.
async fn session_when_known(c: &Cluster, region: &str, user: &str) -> Result<common::Session> {
    eventually_some(WAIT, &format!("{user} known in {region}"), || async {
        Ok(c.session(region, user).await.ok())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item5_a_user_provisioned_in_one_region_is_answered_421_by_another() -> Result<()> {
    let c = Cluster::start_linked(&["us", "eu"], |_| {}).await?;
    // Provisioned in us, homed in eu: us's directory replicates to eu through the mirror.
    c.provision_in(&["us"], "ann", "eu").await?;
    let in_us = c.session("us", "ann").await?;
    let (st, body) = in_us.get("/v1/me").await?;
    assert_eq!(
        (st, body["error"].as_str()),
        (421, Some("wrong_region")),
        "{body}"
    );
    assert_eq!(body["endpoint"], json!(c.region("eu").base));
    let in_eu = session_when_known(&c, "eu", "ann").await?;
    let (st, me) = in_eu.get("/v1/me").await?;
    assert_eq!(st, 200, "{me}");
    assert_eq!(me["served_by"], "eu");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item4_typing_and_presence_cross_linked_regions_under_the_role_permissions() -> Result<()> {
    let c = Cluster::start_linked(&["us", "eu"], |_| {}).await?;
    c.provision_in(&["us"], "ann", "us").await?;
    c.provision_in(&["us"], "bob", "eu").await?;
    let ann = c.session("us", "ann").await?;
    let cid = ann.direct("bob").await?;
    let bob = session_when_known(&c, "eu", "bob").await?;
    let mut bob_ws = bob.ws().await?;
    bob_ws.hello().await?;
    let (st, body) = ann.get("/v1/presence?user_ids=bob").await?;
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["users"][0]["online"], true, "{body}");
    let mut ann_ws = ann.ws().await?;
    ann_ws.hello().await?;
    ann_ws
        .send(json!({"op": "typing", "conversation_id": cid}))
        .await?;
    let typing = bob_ws.next_op("typing", WAIT).await?;
    assert_eq!(typing["user_id"], "ann");
    Ok(())
}

fn stream<'a>(regions: &'a Value, name_part: &str) -> Option<&'a Value> {
    regions["regions"][0]["streams"]
        .as_object()?
        .iter()
        .find(|(name, _)| name.ends_with(name_part))
        .map(|(_, v)| v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item6_regions_digest_and_readiness_report_each_mirror_and_a_cut_one_fails_readiness() -> Result<()> {
    let mut c = Cluster::start_linked(&["us", "eu"], |cfg| cfg.mirror_unhealthy_after_s = 3).await?;
    c.provision_in(&["eu"], "ann", "eu").await?;
    c.provision_in(&["us"], "bob", "us").await?;
    // us applies its own stream and eu's mirror: both reported, with real positions.
    let regions = eventually_some(WAIT, "eu's mirror applied in us", || async {
        let (st, body) = get(&c, "us", "/v1/admin/regions").await?;
        assert_eq!(st, 200, "{body}");
        let done = stream(&body, "SYNC_EU").is_some_and(|m| m["last_seq"] == 1 && m["apply_lag"] == 0);
        Ok(done.then_some(body))
    })
    .await?;
    let own = stream(&regions, "SYNC_US").context("own stream")?;
    assert_eq!(
        (&own["mirror"], &own["origin"], &own["apply_lag"]),
        (&json!(false), &json!("us"), &json!(0)),
        "{regions}"
    );
    let mirror = stream(&regions, "SYNC_EU").context("mirror")?;
    assert_eq!(
        (&mirror["mirror"], &mirror["origin"]),
        (&json!(true), &json!("eu")),
        "{regions}"
    );
    assert_eq!(mirror["mirror_lag"], 0, "{regions}");
    assert!(
        mirror["active_age_ms"].as_u64().is_some_and(|a| a < 3_000),
        "{regions}"
    );
    assert_eq!(mirror["error"], Value::Null, "{regions}");
    let names: Vec<&str> = regions["regions"]
        .as_array()
        .context("regions")?
        .iter()
        .map(|r| r["region"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(names, ["us", "eu"], "{regions}");
    assert_eq!(regions["regions"][1]["status"], "active");

    // The digest lists every applied stream, and the replicas agree once quiet.
    eventually(WAIT, "equal digests", || async {
        let (_, us) = get(&c, "us", "/v1/admin/digest").await?;
        let (_, eu) = get(&c, "eu", "/v1/admin/digest").await?;
        assert_eq!(us["applied"].as_object().map(|a| a.len()), Some(2), "{us}");
        Ok(us["digest"] == eu["digest"] && us["applied"] == eu["applied"] && us["settled"] == true)
    })
    .await?;

    // Healthy while idle: an idle mirror still hears from its origin.
    eventually(WAIT, "us ready", || async {
        Ok(get(&c, "us", "/readyz").await?.0 == 200)
    })
    .await?;
    for _ in 0..8 {
        let (st, body) = get(&c, "us", "/readyz").await?;
        assert_eq!(st, 200, "idle but healthy: {body}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // eu's server dies: us's mirror of eu goes quiet, reports lag 0, and readiness fails
    // naming it.
    c.nats.linked().region_mut("eu").kill();
    let refused = eventually_some(WAIT, "us unready while eu's mirror is cut", || async {
        let (st, body) = get(&c, "us", "/readyz").await?;
        Ok((st == 503).then_some(body))
    })
    .await?;
    let problems = refused["problems"].to_string();
    assert!(
        problems.contains("SYNC_EU") && problems.contains("region eu"),
        "{refused}"
    );

    // Back: the mirror re-attaches (up to ~15 s after the origin, measured in h/bus) and
    // readiness returns.
    c.nats.linked().region_mut("eu").restart()?;
    eventually(Duration::from_secs(60), "us ready again", || async {
        Ok(get(&c, "us", "/readyz").await?.0 == 200)
    })
    .await?;
    Ok(())
}
