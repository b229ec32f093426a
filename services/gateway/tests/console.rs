//! Issue 13, item 6: the operator console in a real browser. Two linked regions (a
//! nats-server each, mirroring each other), headless Chromium (Debian's package) driven by
//! `console/e2e/drive.mjs` through playwright-core: the page loads and shows both regions
//! converged; a failover clicked in the page moves a user (checked here through the API);
//! a failback is refused while the home region cannot tell it caught up (the other region's
//! nats-server is down), then accepted; a drill report appears with its picture. Screenshots
//! of the main view land in `target/console-screenshots/` (docs/console*.png are copies).
//!
//! Needs `node`, `console/node_modules` (`npm ci --prefix console`) and Chromium
//! (`/usr/bin/chromium`, or `CHROMIUM`): `deploy/check` installs them.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use common::{eventually, eventually_some, Cluster, Session, ADMIN_KEY};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const WAIT: Duration = Duration::from_secs(60);
/// The whole browser run's bound (each step waits at most a minute in the page).
const RUN_LIMIT: Duration = Duration::from_secs(300);
const FENCE_AFTER_S: u64 = 2;
const DRILL_RUN: &str = "region-loss-20261129T201500Z";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A drill run folder written by the drills' own report writer (`meridian_chaos::drill`),
/// so the console is tested on exactly what `meridian drill` writes: report.json and the
/// plotted report.svg.
fn write_drill_run(dir: &Path) -> Result<()> {
    use meridian_chaos::drill::report::{Fault, Report, Sample, Verdict, REPORT_SVG};
    let run = dir.join(DRILL_RUN);
    std::fs::create_dir_all(&run)?;
    let started_at_ms = 1_795_983_300_000u64;
    let report = Report {
        scenario: "region-loss".into(),
        verdict: Verdict::Pass,
        started_at_ms,
        ended_at_ms: started_at_ms + 60_000,
        duration_s: 60.0,
        regions: vec!["us".into(), "eu".into()],
        acked: 3000,
        lost: 0,
        duplicated: 0,
        delivered: 3000,
        faults: vec![Fault {
            kind: "region-loss".into(),
            target: "eu".into(),
            detail: "killed (SIGKILL) nats-server and region process".into(),
            start_ms: started_at_ms + 20_000,
            end_ms: Some(started_at_ms + 24_000),
            recovery_s: Some(1.2),
        }],
        converge_s: Some(3.1),
        digests_equal: true,
        digests: [
            ("us".to_string(), "ab".to_string()),
            ("eu".to_string(), "ab".to_string()),
        ]
        .into(),
        violations: vec![],
        samples: (1..=60)
            .map(|t| Sample {
                t_s: f64::from(t),
                sent: 50,
                acked: 50,
                delivered: 50,
                errors: 0,
                p50_ms: Some(4.0),
                p99_ms: Some(if (20..24).contains(&t) { 900.0 } else { 12.0 }),
            })
            .collect(),
        counts: [("send".to_string(), 3000u64)].into(),
        picture: REPORT_SVG.into(),
    };
    report.write(&run)?;
    // A folder that is not a run (no report yet) and a file are not listed.
    std::fs::create_dir_all(dir.join("in-progress-20261129T203000Z"))?;
    std::fs::write(dir.join("notes.txt"), "not a run")?;
    Ok(())
}

/// What `/v1/me` of `user` answers at `s`'s region.
async fn me(s: &Session) -> Result<(u16, Value)> {
    s.get("/v1/me").await
}

/// The driver's next `step <name> <detail>` line.
async fn next_step(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    want: &str,
) -> Result<String> {
    let line = tokio::time::timeout(RUN_LIMIT, lines.next_line())
        .await
        .with_context(|| format!("no step {want} within {RUN_LIMIT:?}"))??
        .with_context(|| format!("the browser driver ended before step {want}"))?;
    println!("browser: {line}");
    let rest = line
        .strip_prefix(&format!("step {want}"))
        .with_context(|| format!("expected step {want}, got {line:?}"))?;
    Ok(rest.trim().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item6_console_in_a_browser_fails_a_region_over_and_back_and_shows_a_drill() -> Result<()> {
    let root = repo();
    let driver = root.join("console/e2e/drive.mjs");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    ensure!(
        root.join("console/node_modules/playwright-core").is_dir(),
        "console/node_modules is missing: run `npm ci --prefix console` (deploy/check does)"
    );
    ensure!(
        Path::new(&chromium).exists(),
        "no Chromium at {chromium}: `apt-get install chromium` (deploy/check does) or set CHROMIUM"
    );
    let shots = root.join("target/console-screenshots");
    std::fs::create_dir_all(&shots)?;
    let drills = tempfile::tempdir()?;
    write_drill_run(drills.path())?;

    let drills_dir = drills.path().to_path_buf();
    let mut c = Cluster::start_linked(&["us", "eu"], move |cfg| {
        cfg.fence_after_s = FENCE_AFTER_S;
        cfg.mirror_unhealthy_after_s = FENCE_AFTER_S;
        cfg.console.drills_dir = Some(drills_dir.clone());
    })
    .await?;
    c.provision_in(&["us"], "bob", "us").await?;
    c.provision_in(&["eu"], "ann", "eu").await?;
    for r in ["us", "eu"] {
        eventually(WAIT, &format!("{r} ready and knows bob"), || async {
            let ready = c.admin(r, reqwest::Method::GET, "/readyz", None).await?.0 == 200;
            let known =
                c.admin(
                    r,
                    reqwest::Method::POST,
                    "/v1/admin/tokens",
                    Some(json!({"user_id": "bob", "device_id": "d1"})),
                )
                .await?
                .0 == 200;
            Ok(ready && known)
        })
        .await?;
    }
    let bob_us = c.session("us", "bob").await?;
    let bob_eu = c.session("eu", "bob").await?;
    let (st, body) = me(&bob_us).await?;
    ensure!(st == 200 && body["serving_region"] == "us", "{st} {body}");

    // Traffic while the page fills its sparklines: bob (us) writes to ann, live at eu, so
    // both regions show sends, deliveries and a p99. Stopped before convergence is judged.
    let ann = eventually_some(WAIT, "ann known at eu", || async {
        Ok(c.session("eu", "ann").await.ok())
    })
    .await?;
    let cid = eventually_some(WAIT, "bob's conversation with ann", || async {
        Ok(bob_us.direct("ann").await.ok())
    })
    .await?;
    let mut ann_ws = ann.ws().await?;
    ann_ws.hello().await?;
    let traffic = tokio::spawn({
        let bob = c.session("us", "bob").await?;
        async move {
            for i in 0..10_000u32 {
                let _ = bob
                    .post(
                        &format!("/v1/conversations/{cid}/messages"),
                        json!({"client_msg_id": format!("t{i}"), "type": "text", "body": {"text": format!("hello {i}")}}),
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let reader = tokio::spawn(async move {
        // Reading keeps ann's socket live; its frames are not checked here.
        while ann_ws.next(Duration::from_secs(600)).await.is_ok() {}
    });

    let mut child = tokio::process::Command::new("node")
        .arg(&driver)
        .current_dir(root.join("console"))
        .env("CONSOLE_URL", format!("{}/console", c.region("us").base))
        .env("ADMIN_KEY", ADMIN_KEY)
        .env("SCREENSHOTS", &shots)
        .env("CHROMIUM", &chromium)
        .env("FAIL_REGION", "us")
        .env("TO_REGION", "eu")
        .env("DRILL_RUN", DRILL_RUN)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting node (is Node.js installed?)")?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let mut stderr = child.stderr.take().context("stderr")?;
    let errors = tokio::spawn(async move {
        let mut out = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut out).await;
        out
    });

    let steps = async {
        // 1. Loaded with traffic flowing, then (traffic stopped) both regions converged.
        next_step(&mut lines, "loaded").await?;
        traffic.abort();
        stdin.write_all(b"go\n").await?;
        next_step(&mut lines, "converged").await?;
        stdin.write_all(b"go\n").await?;

        // 2. The failover clicked in the page moved bob: eu serves him, us answers 421.
        let said = next_step(&mut lines, "failed-over").await?;
        ensure!(said.contains("eu serves us's users"), "{said}");
        let (st, body) = me(&bob_eu).await?;
        ensure!(
            st == 200 && body["serving_region"] == "eu",
            "bob at eu: {st} {body}"
        );
        eventually(WAIT, "us answers bob 421", || async {
            Ok(me(&bob_us).await?.0 == 421)
        })
        .await?;

        // eu's nats-server goes down: us cannot tell what eu accepted for bob since, so a
        // failback must be refused. Wait until us's mirror of eu has been quiet past the bound.
        c.nats.linked().region_mut("eu").kill();
        eventually(WAIT, "us notices eu is quiet", || async {
            let (_, regions) = c
                .admin("us", reqwest::Method::GET, "/v1/admin/regions", None)
                .await?;
            Ok(!regions["regions"][0]["mirror_problems"]
                .as_array()
                .is_none_or(Vec::is_empty))
        })
        .await?;
        stdin.write_all(b"go\n").await?;

        // 3. Refused in the page with its reason; bob still served by eu.
        let refusal = next_step(&mut lines, "failback-refused").await?;
        ensure!(refusal.contains("not_caught_up"), "{refusal}");
        ensure!(
            me(&bob_eu).await?.0 == 200,
            "bob moved although the failback was refused"
        );

        // eu comes back; once us hears it again the failback is accepted.
        c.nats.linked().region_mut("eu").restart()?;
        eventually(WAIT, "us ready again", || async {
            Ok(c.admin("us", reqwest::Method::GET, "/readyz", None).await?.0 == 200)
        })
        .await?;
        stdin.write_all(b"go\n").await?;

        // 4. Accepted: us serves bob again, eu answers 421.
        next_step(&mut lines, "failed-back").await?;
        eventually(WAIT, "bob home at us", || async {
            let (st, body) = me(&bob_us).await?;
            Ok(st == 200 && body["serving_region"] == "us")
        })
        .await?;
        eventually(WAIT, "eu answers bob 421", || async {
            Ok(me(&bob_eu).await?.0 == 421)
        })
        .await?;
        stdin.write_all(b"go\n").await?;

        // 5. The drill run, with its figures.
        let detail = next_step(&mut lines, "drill-shown").await?;
        ensure!(
            detail.contains("acked 3000") && detail.contains("lost 0"),
            "{detail}"
        );
        stdin.write_all(b"go\n").await?;
        anyhow::Ok(())
    };
    let outcome = tokio::time::timeout(RUN_LIMIT, steps).await;
    reader.abort();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    let driver_errors = errors.await.unwrap_or_default();
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(e)) => bail!("{e:#}\nbrowser driver: {driver_errors}"),
        Err(_) => bail!("the browser run took longer than {RUN_LIMIT:?}\nbrowser driver: {driver_errors}"),
    }
    let status = status.context("the browser driver did not exit")??;
    ensure!(status.success(), "browser driver: {status}: {driver_errors}");

    // The drill listing through the API: the run, not the folder without a report or the file.
    let (st, list) = c
        .admin("eu", reqwest::Method::GET, "/v1/admin/drills", None)
        .await?;
    ensure!(st == 200, "{list}");
    let runs: Vec<&str> = list["runs"]
        .as_array()
        .context("runs")?
        .iter()
        .filter_map(|r| r["run"].as_str())
        .collect();
    ensure!(runs == [DRILL_RUN], "{list}");
    for bad in ["..", "..%2F..%2Fetc", ".hidden", "in-progress-20261129T203000Z"] {
        let (st, body) = c
            .admin(
                "us",
                reqwest::Method::GET,
                &format!("/v1/admin/drills/{bad}/report"),
                None,
            )
            .await?;
        ensure!(st == 404 && body["error"] == "not_found", "{bad}: {st} {body}");
    }
    Ok(())
}

/// Reads server-sent events from `resp` until `want` of them arrived: (event, data) pairs.
async fn read_events(mut resp: reqwest::Response, want: usize) -> Result<Vec<(String, Value)>> {
    let mut buf = String::new();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while out.len() < want {
        let chunk = tokio::time::timeout_at(deadline, resp.chunk())
            .await
            .with_context(|| format!("{} of {want} events within {WAIT:?}", out.len()))??
            .context("the feed ended")?;
        buf.push_str(std::str::from_utf8(&chunk)?);
        while let Some(cut) = buf.find("\n\n") {
            let block: String = buf.drain(..cut + 2).collect();
            let mut event = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event:") {
                    event = e.trim().to_string();
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push_str(d.trim_start());
                }
            }
            if !data.is_empty() {
                out.push((event, serde_json::from_str(&data)?));
            }
        }
    }
    Ok(out)
}

/// The feed and the actions through the API alone (no browser): the feed opens with the kept
/// history and then samples both regions, converged; an action needs an operator, is sent
/// to the region that must answer it, answers as that region answered, and is logged in the
/// feed with who and when.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item2_item3_the_feed_samples_every_region_and_actions_are_sent_where_they_belong() -> Result<()> {
    let c = Cluster::start_linked(&["us", "eu"], |_| {}).await?;
    c.provision_in(&["eu"], "ann", "eu").await?;
    let feed = |r: &str| {
        c.http
            .get(format!("{}/v1/admin/console/events", c.region(r).base))
            .header("X-Admin-Key", ADMIN_KEY)
            .send()
    };
    let resp = feed("us").await?;
    ensure!(resp.status() == 200, "{}", resp.status());
    let content_type = resp.headers()["content-type"].to_str()?.to_string();
    ensure!(content_type.starts_with("text/event-stream"), "{content_type}");
    // history first (nothing kept yet: no page watched before), then samples.
    let events = read_events(resp, 3).await?;
    ensure!(events[0].0 == "history", "{:?}", events[0]);
    let sample = &events[2].1;
    ensure!(events[1].0 == "sample" && events[2].0 == "sample", "{events:?}");
    let regions: Vec<&str> = sample["regions"]
        .as_array()
        .context("regions")?
        .iter()
        .filter_map(|r| r["region"].as_str())
        .collect();
    ensure!(regions == ["us", "eu"], "{sample}");
    for r in sample["regions"].as_array().context("regions")? {
        ensure!(r["reachable"] == true && r["status"] == "active", "{r}");
        ensure!(r["digest"].as_str().is_some_and(|d| d.len() == 64), "{r}");
        ensure!(r["streams"].as_object().is_some_and(|s| s.len() == 2), "{r}");
        ensure!(
            r["metrics"]["published_per_s"].is_number() || r["metrics"]["published_per_s"].is_null(),
            "{r}"
        );
    }
    // Converged once both have applied the provisioning (a few samples at most).
    let resp = feed("eu").await?;
    let events = read_events(resp, 15).await?;
    ensure!(
        events
            .iter()
            .any(|(_, s)| s["convergence"]["state"] == "converged"),
        "never converged: {:?}",
        events.last()
    );
    // A page opened later gets the kept samples at once.
    let resp = feed("us").await?;
    let history = read_events(resp, 1).await?;
    ensure!(
        history[0].1["samples"].as_array().is_some_and(|s| s.len() >= 2),
        "{:?}",
        history[0]
    );

    // Without an operator: refused; a name that breaks the pattern too.
    let post = |r: &str, path: &str, operator: Option<&str>, body: Value| {
        let mut req = c
            .http
            .post(format!("{}{path}", c.region(r).base))
            .header("X-Admin-Key", ADMIN_KEY)
            .json(&body);
        if let Some(o) = operator {
            req = req.header("X-Operator", o);
        }
        async move { common::answer(req.send().await?).await }
    };
    let body = json!({"region": "eu", "to": "us"});
    for operator in [None, Some("-dash-first"), Some("semi;colon")] {
        let (st, answer) = post("eu", "/v1/admin/console/failover", operator, body.clone()).await?;
        ensure!(
            st == 400 && answer["field"] == "X-Operator",
            "{operator:?}: {st} {answer}"
        );
    }
    // Asked of eu's console, the failover of eu to us is sent to us (the acting region).
    let (st, answer) = post("eu", "/v1/admin/console/failover", Some("kim"), body).await?;
    ensure!(
        st == 200 && answer["serving"] == "us" && answer["changed"] == true,
        "{st} {answer}"
    );
    // Failback of eu asked of us's console is sent to eu; once caught up it is accepted.
    eventually(WAIT, "failback of eu accepted", || async {
        let (st, answer) = post(
            "us",
            "/v1/admin/console/failback",
            Some("lee"),
            json!({"region": "eu"}),
        )
        .await?;
        ensure!(
            st == 200 || (st == 409 && answer["error"] == "not_caught_up"),
            "{st} {answer}"
        );
        Ok(st == 200 && answer["serving"] == "eu")
    })
    .await?;
    // eu's feed lists kim's failover; us's lists lee's failback(s).
    for (r, who, action) in [("eu", "kim", "failover"), ("us", "lee", "failback")] {
        let resp = feed(r).await?;
        let events = read_events(resp, 2).await?;
        let actions = &events[1].1["actions"];
        ensure!(
            actions.as_array().is_some_and(|a| a
                .iter()
                .any(|x| x["operator"] == who && x["action"] == action && x["at_ms"].as_u64().is_some())),
            "{r}: {actions}"
        );
    }
    Ok(())
}
