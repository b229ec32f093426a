//! `meridian admin failover|failback --cluster cluster.json --region us [--to eu]`: the
//! operator's region moves (docs/design.md §7), against a running deployment's endpoints,
//! printing each answer and waiting (bounded) until the move is done; and `meridian admin
//! reindex --region us`: rebuild a region's search index from its store, waiting until it
//! has caught up.
//!
//! - failover: `POST /v1/admin/failover {"region", "to"}` to the acting region `to`, then
//!   waits until its `/v1/admin/regions` shows `region` served by `to`.
//! - failback: `POST /v1/admin/failback {"region"}` to the home region, repeated every
//!   second while it answers `409 not_caught_up` (each lag printed), until accepted.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("reading {0}: {1}")]
    Cluster(String, String),
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {source}")]
    Http { path: String, source: reqwest::Error },
    #[error("{what}: {status} {body}")]
    Refused { what: String, status: u16, body: Value },
    #[error("not done within {0:?}: {1}")]
    Timeout(Duration, String),
}

pub struct MoveOptions {
    pub cluster: PathBuf,
    pub admin_key: String,
    /// The region whose users move.
    pub region: String,
    /// Failover only: the acting region.
    pub to: Option<String>,
    /// How long to wait for the move (failback: for the home region to catch up).
    pub wait: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Move {
    Failover,
    Failback,
}

fn endpoint(cluster: &Path, region: &str) -> Result<String, AdminError> {
    let at = cluster.display().to_string();
    let text =
        std::fs::read_to_string(cluster).map_err(|e| AdminError::Cluster(at.clone(), e.to_string()))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| AdminError::Cluster(at.clone(), e.to_string()))?;
    v["regions"][region]["endpoint"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| AdminError::Cluster(at, format!("no region {region}")))
}

async fn call(
    http: &reqwest::Client,
    key: &str,
    method: reqwest::Method,
    url: String,
    body: Option<Value>,
) -> Result<(u16, Value), AdminError> {
    let mut req = http.request(method, &url).header("X-Admin-Key", key);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.map_err(|source| AdminError::Http {
        path: url.clone(),
        source,
    })?;
    let status = resp.status().as_u16();
    let body = resp.json().await.unwrap_or(Value::Null);
    Ok((status, body))
}

/// Runs one move, printing progress through `say`; the final answer.
pub async fn run(what: Move, opts: &MoveOptions, mut say: impl FnMut(String)) -> Result<Value, AdminError> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|source| AdminError::Http {
            path: "client".into(),
            source,
        })?;
    let started = Instant::now();
    let deadline = started + opts.wait;
    match what {
        Move::Failover => {
            let to = opts
                .to
                .clone()
                .ok_or_else(|| AdminError::Usage("failover needs --to <acting region>".into()))?;
            let base = endpoint(&opts.cluster, &to)?;
            let body = json!({"region": opts.region, "to": to});
            say(format!("POST {base}/v1/admin/failover {body}"));
            let (st, answer) = call(
                &http,
                &opts.admin_key,
                reqwest::Method::POST,
                format!("{base}/v1/admin/failover"),
                Some(body),
            )
            .await?;
            say(format!("{st} {answer}"));
            if st != 200 {
                return Err(AdminError::Refused {
                    what: "failover".into(),
                    status: st,
                    body: answer,
                });
            }
            // Done when the acting region reports the failed region served by it.
            loop {
                let (st, regions) = call(
                    &http,
                    &opts.admin_key,
                    reqwest::Method::GET,
                    format!("{base}/v1/admin/regions"),
                    None,
                )
                .await?;
                let entry = regions["regions"]
                    .as_array()
                    .and_then(|rs| rs.iter().find(|r| r["region"] == opts.region.as_str()))
                    .cloned()
                    .unwrap_or(Value::Null);
                if st == 200 && entry["serving"] == to.as_str() {
                    say(format!(
                        "{} ms: region {} served by {to}, epoch {}",
                        started.elapsed().as_millis(),
                        opts.region,
                        entry["epoch"]
                    ));
                    return Ok(answer);
                }
                if Instant::now() >= deadline {
                    return Err(AdminError::Timeout(opts.wait, format!("{st} {entry}")));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Move::Failback => {
            let base = endpoint(&opts.cluster, &opts.region)?;
            let body = json!({"region": opts.region});
            say(format!("POST {base}/v1/admin/failback {body}"));
            loop {
                let (st, answer) = call(
                    &http,
                    &opts.admin_key,
                    reqwest::Method::POST,
                    format!("{base}/v1/admin/failback"),
                    Some(body.clone()),
                )
                .await?;
                let at = started.elapsed().as_millis();
                match st {
                    200 => {
                        say(format!("{at} ms: {st} {answer}"));
                        return Ok(answer);
                    }
                    409 if answer["error"] == "not_caught_up" => {
                        say(format!(
                            "{at} ms: not caught up: lag {} {}",
                            answer["lag"], answer["reasons"]
                        ));
                    }
                    _ => {
                        return Err(AdminError::Refused {
                            what: "failback".into(),
                            status: st,
                            body: answer,
                        })
                    }
                }
                if Instant::now() >= deadline {
                    return Err(AdminError::Timeout(opts.wait, answer.to_string()));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// `meridian admin reindex`: which region, and how long to wait for the rebuild.
pub struct ReindexOptions {
    pub cluster: PathBuf,
    pub admin_key: String,
    pub region: String,
    pub wait: Duration,
}

/// Asks `region` to rebuild its search index from its store (`POST
/// /v1/admin/search/reindex`), then follows `search` in its `/v1/admin/regions` entry until
/// the rebuild is done and the index has caught up; the last `search` status.
pub async fn reindex(opts: &ReindexOptions, mut say: impl FnMut(String)) -> Result<Value, AdminError> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|source| AdminError::Http {
            path: "client".into(),
            source,
        })?;
    let started = Instant::now();
    let started_ms = now_ms();
    let deadline = started + opts.wait;
    let base = endpoint(&opts.cluster, &opts.region)?;
    say(format!("POST {base}/v1/admin/search/reindex"));
    let (st, answer) = call(
        &http,
        &opts.admin_key,
        reqwest::Method::POST,
        format!("{base}/v1/admin/search/reindex"),
        None,
    )
    .await?;
    say(format!("{st} {answer}"));
    if st != 200 {
        return Err(AdminError::Refused {
            what: "reindex".into(),
            status: st,
            body: answer,
        });
    }
    // The rebuild starts at the indexer's next step: seen rebuilding, or caught up after
    // the request (a small index rebuilds between two polls).
    let mut last = Value::Null;
    loop {
        let (st, regions) = call(
            &http,
            &opts.admin_key,
            reqwest::Method::GET,
            format!("{base}/v1/admin/regions"),
            None,
        )
        .await?;
        let search = regions["regions"][0]["search"].clone();
        if search != last {
            say(format!("{} ms: {search}", started.elapsed().as_millis()));
            last = search.clone();
        }
        let committed_since = search["last_commit_ms"].as_u64().is_some_and(|t| t >= started_ms);
        if st == 200 && search["rebuilding"] == false && search["lag_events"] == 0 && committed_since {
            return Ok(search);
        }
        if Instant::now() >= deadline {
            return Err(AdminError::Timeout(opts.wait, format!("{st} {search}")));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
