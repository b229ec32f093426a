//! The operator console (docs/console.md): the page at `/console` (built by `console/` into
//! `console/dist`, embedded here, so a deployment needs no Node.js), and what the page reads.
//!
//! - A live feed, `GET /v1/admin/console/events` (server-sent events): every
//!   [`SAMPLE_EVERY`] the sampler assembles one sample of the whole deployment: this region's
//!   admin regions and digest answers and metrics, and the same of every other region (its
//!   `/v1/admin/regions`, `/v1/admin/digest` and `/metrics`, fetched with bounded timeouts),
//!   with rates and p99 delivery latency over the last few seconds and a convergence verdict.
//!   The last [`HISTORY`] samples are kept, so a page opened now draws minutes of sparklines
//!   at once. Digests scan the store, so the sampler works only while a page watches (and
//!   [`LINGER`] after), never on an idle deployment.
//! - Failover and failback on behalf of the page (`POST /v1/admin/console/failover|failback`):
//!   the same admin call, sent to the region that must answer it (the acting region for a
//!   failover, the home region for a failback), with the operator's name, and kept in a log
//!   of actions the feed carries.
//! - Drill reports (`GET /v1/admin/drills...`): the run folders of `console.drills_dir`, each
//!   with `report.json` and `report.svg`; run names are checked against a strict pattern and
//!   against the folder's listing, so no request reads outside it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt as _;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::error::{ApiError, ApiResult};
use crate::extract::{Admin, ApiJson};
use crate::routes::admin::{self, FailbackRequest, FailoverRequest};
use crate::state::AppState;

/// One sample per second: fine enough for a failover (seconds), coarse enough that a
/// digest scan per region per tick stays cheap on the deployments drills run.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Samples kept: five minutes of sparkline.
pub const HISTORY: usize = 300;
/// How long the sampler keeps working after the last page went away.
pub const LINGER: Duration = Duration::from_secs(600);
/// Actions kept for the page.
const ACTIONS_KEPT: usize = 50;
/// Rates and p99 are taken over this many samples (about five seconds).
const RATE_WINDOW: usize = 5;
/// A region that does not answer within this is shown unreachable for the sample.
const FETCH_TIMEOUT: Duration = Duration::from_millis(800);
/// Failover waits for the acting region to apply its event (up to 10 s) before answering.
const ACTION_TIMEOUT: Duration = Duration::from_secs(20);
/// A report.json larger than this is listed as unreadable rather than parsed.
const MAX_REPORT_BYTES: u64 = 16 * 1024 * 1024;
/// Runs listed at most (newest first).
const MAX_RUNS: usize = 200;

/// The `[console]` table of a region file (env `MERIDIAN__CONSOLE__...`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Where drill runs are (`<scenario>-<UTC time>/report.json` + `report.svg`); none: the
    /// console lists no drills.
    #[serde(default)]
    pub drills_dir: Option<PathBuf>,
}

/// The console's shared state: the sample history, the feed, the action log.
pub struct Console {
    samples: Mutex<VecDeque<Arc<str>>>,
    feed: broadcast::Sender<Arc<str>>,
    actions: Mutex<VecDeque<Value>>,
    /// When a page last watched (connected, or was connected at a tick).
    watched: Mutex<Option<Instant>>,
    http: reqwest::Client,
}

impl Default for Console {
    fn default() -> Self {
        Self {
            samples: Mutex::new(VecDeque::with_capacity(HISTORY)),
            feed: broadcast::channel(16).0,
            actions: Mutex::new(VecDeque::new()),
            watched: Mutex::new(None),
            http: reqwest::Client::builder()
                .connect_timeout(FETCH_TIMEOUT)
                .build()
                .unwrap_or_default(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Console {
    fn watched_lately(&self) -> bool {
        if self.feed.receiver_count() > 0 {
            *lock(&self.watched) = Some(Instant::now());
            return true;
        }
        lock(&self.watched).is_some_and(|at| at.elapsed() < LINGER)
    }

    fn record_action(&self, action: Value) {
        let mut actions = lock(&self.actions);
        if actions.len() == ACTIONS_KEPT {
            actions.pop_front();
        }
        actions.push_back(action);
    }

    fn actions(&self) -> Vec<Value> {
        lock(&self.actions).iter().rev().cloned().collect()
    }
}

// ---------------------------------------------------------------------------------------
// The page.

const INDEX_HTML: &str = include_str!("../../../console/dist/index.html");
const CONSOLE_JS: &str = include_str!("../../../console/dist/console.js");
const CONSOLE_CSS: &str = include_str!("../../../console/dist/console.css");

/// The page's headers: nothing but its own assets may load or be fetched, and nothing may
/// frame it (the buttons fail regions over).
fn page(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; \
                 connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `GET /console`: the page. Outside the OpenAPI document: it is HTML for a browser, not a
/// call of the API (everything it shows comes from documented admin calls).
pub async fn index() -> Response {
    page("text/html; charset=utf-8", INDEX_HTML)
}

/// `GET /console/{asset}`: the page's script and style sheet.
pub async fn asset(Path(name): Path<String>) -> Response {
    match name.as_str() {
        "console.js" => page("text/javascript; charset=utf-8", CONSOLE_JS),
        "console.css" => page("text/css; charset=utf-8", CONSOLE_CSS),
        "" | "index.html" => page("text/html; charset=utf-8", INDEX_HTML),
        _ => ApiError::not_found("not_found", "no such console asset").into_response(),
    }
}

// ---------------------------------------------------------------------------------------
// The feed.

/// `GET /v1/admin/console/events`: `history` (every kept sample), then a `sample` per tick.
pub async fn events(_: Admin, State(s): State<Arc<AppState>>) -> Response {
    // Subscribed before the history is read, so no sample falls between the two.
    let rx = s.console.feed.subscribe();
    *lock(&s.console.watched) = Some(Instant::now());
    let history: Vec<Arc<str>> = lock(&s.console.samples).iter().cloned().collect();
    let history = format!(
        "{{\"samples\":[{}]}}",
        history.iter().map(|x| &**x).collect::<Vec<_>>().join(",")
    );
    let first = futures::stream::once(async move {
        Ok::<_, std::convert::Infallible>(Event::default().event("history").data(history))
    });
    let live = futures::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(sample) => {
                    return Some((Ok(Event::default().event("sample").data(&*sample)), rx));
                }
                // A slow page misses samples; the next one is whole.
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    // Graceful shutdown waits for requests in flight: the feed ends with the gateway.
    let stream = first.chain(live).take_until(s.shutdown.clone().cancelled_owned());
    let mut resp = Sse::new(stream).keep_alive(KeepAlive::default()).into_response();
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    resp
}

/// Counters and histograms of one region's `/metrics` at one moment.
#[derive(Clone)]
struct MetricPoint {
    at: Instant,
    published: f64,
    delivered: f64,
    applied: f64,
    /// `meridian_gateway_delivery_seconds_bucket`: (le, cumulative count).
    delivery_buckets: Vec<(f64, f64)>,
    /// Gauges whose name says lag, of push and search (when the process has them), and push's
    /// entries in flight.
    lags: BTreeMap<String, f64>,
}

/// Reads the few series the console shows from OpenMetrics text.
fn parse_metrics(text: &str) -> MetricPoint {
    let mut p = MetricPoint {
        at: Instant::now(),
        published: 0.0,
        delivered: 0.0,
        applied: 0.0,
        delivery_buckets: Vec::new(),
        lags: BTreeMap::new(),
    };
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        match name {
            "meridian_gateway_published_total" => p.published += value,
            "meridian_gateway_ws_entries_sent_total" => p.delivered += value,
            "meridian_applier_applied_total" => p.applied += value,
            "meridian_gateway_delivery_seconds_bucket" => {
                let le = labels
                    .split("le=\"")
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .map(|le| {
                        if le == "+Inf" {
                            f64::INFINITY
                        } else {
                            le.parse().unwrap_or(f64::NAN)
                        }
                    });
                if let Some(le) = le.filter(|le| !le.is_nan()) {
                    p.delivery_buckets.push((le, value));
                }
            }
            n if (n.starts_with("meridian_push_") || n.starts_with("meridian_search_"))
                && (n.contains("lag") || n == "meridian_push_in_flight")
                && !n.ends_with("_bucket")
                && !n.ends_with("_created") =>
            {
                *p.lags.entry(n.to_string()).or_default() += value;
            }
            _ => {}
        }
    }
    p.delivery_buckets
        .sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
    p
}

/// Rates and p99 between the oldest and newest of `points`.
fn rates(points: &VecDeque<MetricPoint>) -> Value {
    let (Some(old), Some(new)) = (points.front(), points.back()) else {
        return json!({});
    };
    let dt = new.at.duration_since(old.at).as_secs_f64();
    let rate = |a: f64, b: f64| (dt > 0.0).then(|| ((b - a).max(0.0) / dt * 10.0).round() / 10.0);
    // p99 of the deliveries in the window: the first bucket bound holding 99 % of them.
    let deltas: Vec<(f64, f64)> = new
        .delivery_buckets
        .iter()
        .map(|(le, n)| {
            let before = old
                .delivery_buckets
                .iter()
                .find(|(l, _)| l == le)
                .map_or(0.0, |(_, c)| *c);
            (*le, n - before)
        })
        .collect();
    let total = deltas.last().map_or(0.0, |(_, n)| *n);
    let p99_ms = (total > 0.0)
        .then(|| deltas.iter().find(|(_, n)| *n >= total * 0.99).map(|(le, _)| *le))
        .flatten()
        .map(|le| if le.is_finite() { le * 1000.0 } else { f64::MAX });
    json!({
        "published_per_s": rate(old.published, new.published),
        "delivered_per_s": rate(old.delivered, new.delivered),
        "applied_per_s": rate(old.applied, new.applied),
        "p99_delivery_ms": p99_ms,
        "deliveries_in_window": total,
        "lags": new.lags,
    })
}

/// What the sampler remembers between ticks.
#[derive(Default)]
struct Sampler {
    points: HashMap<String, VecDeque<MetricPoint>>,
    /// (converged, since ms) of the current streak.
    streak: Option<(bool, u64)>,
}

async fn fetch_json(s: &AppState, base: &str, path: &str) -> Result<Value, String> {
    let resp = s
        .console
        .http
        .get(format!("{base}{path}"))
        .header("X-Admin-Key", &s.cfg.admin_key)
        .timeout(FETCH_TIMEOUT)
        .send()
        .await
        .map_err(|e| format!("{path}: {}", without_url(&e)))?;
    let status = resp.status();
    let body: Value = resp
        .json()
        .await
        .map_err(|e| format!("{path}: {}", without_url(&e)))?;
    if !status.is_success() {
        return Err(format!(
            "{path}: {status} {}",
            body["error"].as_str().unwrap_or("")
        ));
    }
    Ok(body)
}

async fn fetch_text(s: &AppState, base: &str, path: &str) -> Result<String, String> {
    let resp = s
        .console
        .http
        .get(format!("{base}{path}"))
        .timeout(FETCH_TIMEOUT)
        .send()
        .await
        .map_err(|e| format!("{path}: {}", without_url(&e)))?;
    resp.text()
        .await
        .map_err(|e| format!("{path}: {}", without_url(&e)))
}

fn without_url(e: &reqwest::Error) -> String {
    let mut msg = e.to_string();
    if let Some(u) = e.url() {
        msg = msg.replace(&format!(" ({u})"), "").replace(u.as_str(), "");
    }
    if e.is_timeout() {
        "timed out".into()
    } else {
        msg
    }
}

/// One region's regions, digest and metrics answers: computed here for this region, fetched
/// from the others.
async fn region_answers(
    s: &Arc<AppState>,
    region: &str,
) -> (
    Result<Value, String>,
    Result<Value, String>,
    Result<String, String>,
) {
    if region == s.cfg.region.as_str() {
        let regions = admin::regions_json(s).await.map_err(|e| e.message);
        let digest = admin::digest_json(s).await.map_err(|e| e.message);
        let mut text = String::new();
        let metrics = prometheus_client::encoding::text::encode(&mut text, &s.registry)
            .map(|()| text)
            .map_err(|e| e.to_string());
        return (regions, digest, metrics);
    }
    let Some(base) = s.cfg.region_endpoints.get(region) else {
        let e = format!("no endpoint of region {region} in region_endpoints");
        return (Err(e.clone()), Err(e.clone()), Err(e));
    };
    let base = base.trim_end_matches('/');
    tokio::join!(
        fetch_json(s, base, "/v1/admin/regions"),
        fetch_json(s, base, "/v1/admin/digest"),
        fetch_text(s, base, "/metrics"),
    )
}

/// Every region of the deployment, this one first.
fn deployment(s: &AppState) -> Vec<String> {
    let mut out = vec![s.cfg.region.to_string()];
    out.extend(
        s.cfg
            .region_endpoints
            .keys()
            .filter(|r| **r != s.cfg.region.as_str())
            .cloned(),
    );
    out
}

impl Sampler {
    async fn sample(&mut self, s: &Arc<AppState>) -> Value {
        let regions = deployment(s);
        let answers = futures::future::join_all(regions.iter().map(|r| region_answers(s, r))).await;
        let at_ms = now_ms();
        // The directory as this region has it: who serves whom.
        let local_view: Option<&Value> = answers[0].0.as_ref().ok();
        let mut out = Vec::new();
        // Per region: the applied position of every origin's stream, and the digest.
        let mut positions: Vec<Option<(BTreeMap<String, u64>, String)>> = Vec::new();
        for (region, (regions_answer, digest, metrics)) in regions.iter().zip(&answers) {
            let mut entry = json!({"region": region, "errors": []});
            let mut errors = Vec::new();
            let listed = |view: &Value| {
                view["regions"]
                    .as_array()
                    .and_then(|a| a.iter().find(|x| x["region"] == region.as_str()).cloned())
            };
            let dir = local_view
                .and_then(listed)
                .or_else(|| regions_answer.as_ref().ok().and_then(listed));
            if let Some(d) = dir {
                for k in ["status", "serving", "serving_for", "epoch"] {
                    entry[k] = d[k].clone();
                }
            }
            let mut origin_of = BTreeMap::new();
            match regions_answer {
                Ok(v) => {
                    let own = listed(v).unwrap_or_default();
                    entry["streams"] = own["streams"].clone();
                    entry["mirror_problems"] = own["mirror_problems"].clone();
                    // The search index's state, where the region has one (issue 12).
                    if !own["search"].is_null() {
                        entry["search"] = own["search"].clone();
                    }
                    for (name, h) in own["streams"].as_object().into_iter().flatten() {
                        if let Some(o) = h["origin"].as_str() {
                            origin_of.insert(name.clone(), o.to_string());
                        }
                    }
                }
                Err(e) => errors.push(e.clone()),
            }
            let mut position = None;
            match digest {
                Ok(d) => {
                    entry["digest"] = d["digest"].clone();
                    entry["settled"] = d["settled"].clone();
                    entry["applied"] = d["applied"].clone();
                    let by_origin: BTreeMap<String, u64> = d["applied"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .filter_map(|(stream, seq)| Some((origin_of.get(stream)?.clone(), seq.as_u64()?)))
                        .collect();
                    if d["settled"] == true && !by_origin.is_empty() {
                        position = d["digest"].as_str().map(|x| (by_origin, x.to_string()));
                    }
                }
                Err(e) => errors.push(e.clone()),
            }
            positions.push(position);
            match metrics {
                Ok(text) => {
                    let points = self.points.entry(region.clone()).or_default();
                    if points.len() > RATE_WINDOW {
                        points.pop_front();
                    }
                    points.push_back(parse_metrics(text));
                    entry["metrics"] = rates(points);
                }
                Err(e) => {
                    self.points.remove(region);
                    errors.push(e.clone());
                }
            }
            entry["reachable"] = json!(errors.is_empty());
            entry["errors"] = json!(errors);
            out.push(entry);
        }
        let (state, detail) = convergence(&positions);
        let converged = state == "converged";
        let since = match self.streak {
            Some((c, since)) if c == converged => since,
            _ => at_ms,
        };
        self.streak = Some((converged, since));
        json!({
            "at_ms": at_ms,
            "region": s.cfg.region.as_str(),
            "regions": out,
            "convergence": {"state": state, "since_ms": since, "detail": detail},
            "actions": s.console.actions(),
        })
    }
}

/// Converged: every region answered a settled digest, all at the same applied position of
/// every stream, all equal. Diverged: equal positions, different digests (a real fault).
/// Catching up: positions differ (traffic in flight: not comparable yet).
fn convergence(positions: &[Option<(BTreeMap<String, u64>, String)>]) -> (&'static str, String) {
    if positions.iter().any(Option::is_none) {
        return (
            "unknown",
            "a region is unreachable or its digest was taken while it applied".into(),
        );
    }
    let all: Vec<&(BTreeMap<String, u64>, String)> = positions.iter().flatten().collect();
    let Some(first) = all.first() else {
        return ("unknown", "no region answered".into());
    };
    if all.iter().any(|(p, _)| p != &first.0) {
        return ("catching_up", "regions have applied different positions".into());
    }
    if all.iter().any(|(_, d)| d != &first.1) {
        return ("diverged", "digests differ at equal applied positions".into());
    }
    (
        "converged",
        format!("digest {}", &first.1[..first.1.len().min(12)]),
    )
}

/// The sampler: a sample per [`SAMPLE_EVERY`] while a page watches, until `shutdown`.
pub async fn run_sampler(s: Arc<AppState>, shutdown: CancellationToken) {
    let mut sampler = Sampler::default();
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !s.console.watched_lately() {
            continue;
        }
        let sample = tokio::select! {
            _ = shutdown.cancelled() => return,
            v = sampler.sample(&s) => v,
        };
        let sample: Arc<str> = sample.to_string().into();
        {
            let mut ring = lock(&s.console.samples);
            if ring.len() == HISTORY {
                ring.pop_front();
            }
            ring.push_back(sample.clone());
        }
        // No page connected: kept for the next one.
        let _ = s.console.feed.send(sample);
    }
}

// ---------------------------------------------------------------------------------------
// Actions.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleFailover {
    region: String,
    to: String,
}

fn operator_required(headers: &HeaderMap) -> ApiResult<String> {
    admin::operator(headers)?.ok_or_else(|| {
        ApiError::bad_request("invalid_argument", "X-Operator (who acts) is required")
            .with("field", "X-Operator")
    })
}

/// Sends `body` to `acting`'s `path` (or runs it here) and answers what it answered.
async fn act(
    s: &Arc<AppState>,
    operator: &str,
    action: &str,
    acting: &str,
    region: &str,
    to: &str,
    body: Value,
) -> Response {
    let started = now_ms();
    let (status, answer): (StatusCode, Value) = if acting == s.cfg.region.as_str() {
        let result = match action {
            "failover" => {
                admin::failover(
                    s,
                    FailoverRequest {
                        region: region.to_string(),
                        to: Some(to.to_string()),
                    },
                    Some(operator),
                )
                .await
            }
            _ => {
                admin::failback(
                    s,
                    FailbackRequest {
                        region: region.to_string(),
                    },
                    Some(operator),
                )
                .await
            }
        };
        match result {
            Ok(v) => (StatusCode::OK, v),
            Err(e) => {
                let status = e.status;
                let resp = e.into_response();
                let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
                    .await
                    .unwrap_or_default();
                (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
            }
        }
    } else {
        match s.cfg.region_endpoints.get(acting) {
            None => (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": "region_unreachable", "message": format!("no endpoint of region {acting} in region_endpoints")}),
            ),
            Some(base) => {
                let sent = s
                    .console
                    .http
                    .post(format!("{}/v1/admin/{action}", base.trim_end_matches('/')))
                    .header("X-Admin-Key", &s.cfg.admin_key)
                    .header(admin::OPERATOR_HEADER, operator)
                    .json(&body)
                    .timeout(ACTION_TIMEOUT)
                    .send()
                    .await;
                match sent {
                    Ok(resp) => {
                        let status =
                            StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
                        let v = resp.json::<Value>().await.unwrap_or(Value::Null);
                        if status.is_server_error() || !v.is_object() {
                            (
                                StatusCode::SERVICE_UNAVAILABLE,
                                json!({"error": "region_unreachable",
                                       "message": format!("region {acting} answered {status}: {}", v["message"].as_str().unwrap_or("no JSON"))}),
                            )
                        } else {
                            (status, v)
                        }
                    }
                    Err(e) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        json!({"error": "region_unreachable",
                               "message": format!("region {acting} did not answer: {}", without_url(&e))}),
                    ),
                }
            }
        }
    };
    let outcome = if status.is_success() {
        format!(
            "{} serves {}'s users, epoch {}{}",
            answer["serving"].as_str().unwrap_or("?"),
            region,
            answer["epoch"].as_str().unwrap_or("?"),
            if answer["changed"] == false {
                " (already so)"
            } else {
                ""
            }
        )
    } else {
        format!(
            "{} {}: {}",
            status.as_u16(),
            answer["error"].as_str().unwrap_or("error"),
            answer["message"].as_str().unwrap_or("")
        )
    };
    tracing::info!(
        operator, action, region, to, acting, status = status.as_u16(), outcome = %outcome,
        "console action"
    );
    s.console.record_action(json!({
        "at_ms": started,
        "operator": operator,
        "action": action,
        "region": region,
        "to": to,
        "acting": acting,
        "status": status.as_u16(),
        "outcome": outcome,
        "answer": answer.clone(),
    }));
    (status, Json(answer)).into_response()
}

/// `POST /v1/admin/console/failover {region, to}` with `X-Operator`: `POST /v1/admin/failover`
/// sent to `to`, answered as it answers; logged with who and when.
pub async fn failover(
    _: Admin,
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<ConsoleFailover>,
) -> ApiResult<Response> {
    let who = operator_required(&headers)?;
    let region = admin::deployment_region(&s, req.region, "region")?;
    let to = admin::deployment_region(&s, req.to, "to")?;
    let body = json!({"region": region.as_str(), "to": to.as_str()});
    Ok(act(
        &s,
        &who,
        "failover",
        to.as_str(),
        region.as_str(),
        to.as_str(),
        body,
    )
    .await)
}

/// `POST /v1/admin/console/failback {region}` with `X-Operator`: `POST /v1/admin/failback`
/// sent to `region` (only the home region answers it); logged with who and when.
pub async fn failback(
    _: Admin,
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<FailbackRequest>,
) -> ApiResult<Response> {
    let who = operator_required(&headers)?;
    let region = admin::deployment_region(&s, req.region, "region")?;
    let body = json!({"region": region.as_str()});
    Ok(act(
        &s,
        &who,
        "failback",
        region.as_str(),
        region.as_str(),
        region.as_str(),
        body,
    )
    .await)
}

// ---------------------------------------------------------------------------------------
// Drill reports.

/// A run folder's name: `<scenario>-<UTC time>`, letters, digits, `_`, `.` and `-`, not
/// starting with a dot (so never `.` or `..`).
pub const RUN_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$";

fn valid_run(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// The folder of run `name`, when it is one of the drills directory's run folders.
async fn run_dir(s: &AppState, name: &str) -> ApiResult<PathBuf> {
    let not_found = || ApiError::not_found("not_found", format!("no drill run {name}"));
    let Some(dir) = &s.cfg.console.drills_dir else {
        return Err(not_found());
    };
    if !valid_run(name) {
        return Err(not_found());
    }
    let path = dir.join(name);
    // A folder of the listing itself, not a link elsewhere.
    match tokio::fs::symlink_metadata(&path).await {
        Ok(m) if m.is_dir() => Ok(path),
        _ => Err(not_found()),
    }
}

/// The figures the list shows of one report.json.
fn summary(run: &str, report: &Value) -> Value {
    let n = |k: &str| report[k].clone();
    json!({
        "run": run,
        "scenario": n("scenario"),
        "verdict": n("verdict"),
        "started_at_ms": n("started_at_ms"),
        "duration_s": n("duration_s"),
        "regions": n("regions"),
        "acked": n("acked"),
        "lost": n("lost"),
        "duplicated": n("duplicated"),
        "delivered": n("delivered"),
        "converge_s": n("converge_s"),
        "digests_equal": n("digests_equal"),
        "faults": report["faults"].as_array().map_or(0, Vec::len),
        "violations": report["violations"].as_array().map_or(0, Vec::len),
    })
}

/// `GET /v1/admin/drills`: every run folder of `console.drills_dir` with its summary, newest
/// first.
pub async fn drills(_: Admin, State(s): State<Arc<AppState>>) -> ApiResult<Json<Value>> {
    let Some(dir) = s.cfg.console.drills_dir.clone() else {
        return Ok(Json(json!({"configured": false, "runs": []})));
    };
    let mut names = Vec::new();
    if let Ok(mut entries) = tokio::fs::read_dir(&dir).await {
        while let Ok(Some(e)) = entries.next_entry().await {
            let name = e.file_name().to_string_lossy().to_string();
            if valid_run(&name) && e.file_type().await.is_ok_and(|t| t.is_dir()) {
                names.push(name);
            }
        }
    }
    names.sort_unstable_by(|a, b| b.cmp(a));
    let mut runs = Vec::new();
    for name in names {
        if runs.len() == MAX_RUNS {
            break;
        }
        let path = dir.join(&name).join("report.json");
        let report = match tokio::fs::metadata(&path).await {
            Ok(m) if m.len() <= MAX_REPORT_BYTES => tokio::fs::read(&path)
                .await
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok()),
            Ok(_) => None,
            // A run still in progress has no report yet.
            Err(_) => continue,
        };
        runs.push(match report {
            Some(r) => summary(&name, &r),
            None => json!({"run": name, "verdict": "unreadable"}),
        });
    }
    runs.sort_by_key(|r| std::cmp::Reverse(r["started_at_ms"].as_u64().unwrap_or(0)));
    Ok(Json(json!({"configured": true, "runs": runs})))
}

/// `GET /v1/admin/drills/{run}/report`: the run's report.json as written.
pub async fn drill_report(
    _: Admin,
    State(s): State<Arc<AppState>>,
    Path(run): Path<String>,
) -> ApiResult<Json<Value>> {
    let path = run_dir(&s, &run).await?.join("report.json");
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|_| ApiError::not_found("not_found", format!("drill run {run} has no report.json")))?;
    let report: Value = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            StatusCode::CONFLICT,
            "report_unreadable",
            format!("report.json of {run} is not JSON: {e}"),
        )
    })?;
    Ok(Json(report))
}

/// `GET /v1/admin/drills/{run}/picture`: the run's report.svg.
pub async fn drill_picture(
    _: Admin,
    State(s): State<Arc<AppState>>,
    Path(run): Path<String>,
) -> ApiResult<Response> {
    let path = run_dir(&s, &run).await?.join("report.svg");
    let svg = tokio::fs::read(&path)
        .await
        .map_err(|_| ApiError::not_found("not_found", format!("drill run {run} has no report.svg")))?;
    Ok((
        [
            (header::CONTENT_TYPE, "image/svg+xml"),
            // An SVG may hold script: never run it in this origin.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; style-src 'unsafe-inline'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        svg,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_names_never_leave_the_folder() {
        for ok in ["region-loss-20261129T201500Z", "a", "x.y_z-1"] {
            assert!(valid_run(ok), "{ok}");
        }
        for bad in [
            "",
            "..",
            ".",
            ".hidden",
            "a/b",
            "a\\b",
            "../etc",
            "a\0",
            &"x".repeat(129),
        ] {
            assert!(!valid_run(bad), "{bad:?}");
        }
    }

    #[test]
    fn p99_comes_from_the_window_of_the_delivery_histogram() {
        let text = |n: [u64; 3]| {
            format!(
                "meridian_gateway_delivery_seconds_bucket{{le=\"0.001\"}} {}\n\
                 meridian_gateway_delivery_seconds_bucket{{le=\"0.01\"}} {}\n\
                 meridian_gateway_delivery_seconds_bucket{{le=\"+Inf\"}} {}\n\
                 meridian_gateway_published_total 10\n",
                n[0], n[1], n[2]
            )
        };
        let mut points = VecDeque::new();
        points.push_back(parse_metrics(&text([100, 100, 100])));
        // 100 more deliveries, 2 of them slower than 1 ms: p99 is the 10 ms bucket.
        points.push_back(parse_metrics(&text([198, 200, 200])));
        let r = rates(&points);
        assert_eq!(r["p99_delivery_ms"], 10.0);
        assert_eq!(r["deliveries_in_window"], 100.0);
    }

    #[test]
    fn convergence_needs_equal_positions_and_digests() {
        let at = |seq: u64, d: &str| Some((BTreeMap::from([("us".to_string(), seq)]), d.to_string()));
        assert_eq!(convergence(&[at(1, "a"), at(1, "a")]).0, "converged");
        assert_eq!(convergence(&[at(1, "a"), at(2, "a")]).0, "catching_up");
        assert_eq!(convergence(&[at(1, "a"), at(1, "b")]).0, "diverged");
        assert_eq!(convergence(&[at(1, "a"), None]).0, "unknown");
    }
}
