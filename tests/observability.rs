//! Metrics and logs of a running region (issue 8 item 10): `/metrics` is one OpenMetrics
//! document from the process registry, holding the publish, apply, apply-lag and delivery
//! histograms once traffic has passed; every request leaves one access line, and the
//! binary's JSON log format makes each line a JSON object.
//!
//! The log subscriber is process-wide, so this file is its own test binary; its tests share
//! the captured lines and pick theirs out by trace id.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use meridian::logging::{self, LogFormat};
use meridian_e2e::{LogCapture, TestRegion};
use serde_json::{json, Value};
use tracing_subscriber::util::SubscriberInitExt as _;

const WAIT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------
// A strict reader of the OpenMetrics text format (what prometheus-client writes and
// Prometheus scrapes).

type Labels = BTreeMap<String, String>;

#[derive(Debug, Default)]
struct MetricFamily {
    kind: String,
    /// (sample name, labels, value)
    samples: Vec<(String, Labels, f64)>,
}

/// One histogram series: its (le, cumulative count) buckets and its `_count`.
#[derive(Default)]
struct HistogramSeries {
    buckets: Vec<(f64, f64)>,
    count: Option<f64>,
}

fn parse_openmetrics(text: &str) -> Result<BTreeMap<String, MetricFamily>> {
    let mut families: BTreeMap<String, MetricFamily> = BTreeMap::new();
    let lines: Vec<&str> = text.lines().collect();
    ensure!(lines.last() == Some(&"# EOF"), "the document must end with # EOF");
    for (n, line) in lines[..lines.len() - 1].iter().enumerate() {
        let at = || format!("line {}: {line:?}", n + 1);
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (keyword, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            ensure!(valid_name(name), "bad metric name, {}", at());
            match keyword {
                "TYPE" => {
                    let kind = parts.next().unwrap_or("");
                    ensure!(
                        [
                            "counter",
                            "gauge",
                            "histogram",
                            "summary",
                            "info",
                            "stateset",
                            "unknown"
                        ]
                        .contains(&kind),
                        "unknown type, {}",
                        at()
                    );
                    let family = families.entry(name.to_string()).or_default();
                    ensure!(family.kind.is_empty(), "family declared twice, {}", at());
                    family.kind = kind.to_string();
                }
                "HELP" | "UNIT" => {}
                _ => bail!("unknown comment, {}", at()),
            }
            continue;
        }
        let (name, labels, value) = parse_sample(line).with_context(at)?;
        let (family, kind) = families
            .iter_mut()
            .filter(|(f, m)| {
                let suffixes: &[&str] = match m.kind.as_str() {
                    "counter" => &["_total", "_created"],
                    "histogram" => &["_bucket", "_sum", "_count", "_created"],
                    _ => &[""],
                };
                suffixes.iter().any(|s| name == format!("{f}{s}"))
            })
            .map(|(_, m)| {
                let kind = m.kind.clone();
                (m, kind)
            })
            .next()
            .with_context(|| format!("sample of no declared family, {}", at()))?;
        ensure!(!kind.is_empty(), "sample before its TYPE, {}", at());
        family.samples.push((name, labels, value));
    }
    for (name, family) in &families {
        if family.kind == "histogram" {
            check_histogram(name, family)?;
        }
    }
    Ok(families)
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `name{k="v",...} value`.
fn parse_sample(line: &str) -> Result<(String, Labels, f64)> {
    let name_end = line.find(['{', ' ']).context("no value")?;
    let name = &line[..name_end];
    ensure!(valid_name(name), "bad sample name");
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices();
        let mut key = String::new();
        loop {
            let (i, c) = chars.next().context("unterminated labels")?;
            match c {
                '}' if key.is_empty() => {
                    rest = &body[i + 1..];
                    break;
                }
                '=' => {
                    ensure!(
                        chars.next().map(|(_, c)| c) == Some('"'),
                        "label value not quoted"
                    );
                    let mut value = String::new();
                    loop {
                        match chars.next().context("unterminated label value")?.1 {
                            '\\' => match chars.next().context("dangling escape")?.1 {
                                'n' => value.push('\n'),
                                c @ ('\\' | '"') => value.push(c),
                                c => bail!("bad escape \\{c}"),
                            },
                            '"' => break,
                            c => value.push(c),
                        }
                    }
                    ensure!(valid_name(&key), "bad label name {key:?}");
                    ensure!(
                        labels.insert(std::mem::take(&mut key), value).is_none(),
                        "label twice"
                    );
                    match chars.next().context("unterminated labels")? {
                        (_, ',') => {}
                        (j, '}') => {
                            rest = &body[j + 1..];
                            break;
                        }
                        (_, c) => bail!("unexpected {c:?} after a label"),
                    }
                }
                c => key.push(c),
            }
        }
    }
    let value = rest.strip_prefix(' ').context("no space before the value")?;
    let value = value.split(' ').next().unwrap_or("");
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().with_context(|| format!("value {v:?}"))?,
    };
    Ok((name.to_string(), labels, value))
}

/// Per label set: cumulative buckets ending at `+Inf`, whose count is `_count`.
fn check_histogram(name: &str, family: &MetricFamily) -> Result<()> {
    let mut series: BTreeMap<Labels, HistogramSeries> = BTreeMap::new();
    for (sample, labels, value) in &family.samples {
        let mut key = labels.clone();
        let le = key.remove("le");
        let entry = series.entry(key).or_default();
        if sample.ends_with("_bucket") {
            let le = le.with_context(|| format!("{name}: a bucket without le"))?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse()? };
            entry.buckets.push((le, *value));
        } else if sample.ends_with("_count") {
            entry.count = Some(*value);
        }
    }
    for (labels, HistogramSeries { buckets, count }) in series {
        ensure!(
            buckets.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
            "{name}{labels:?}: buckets not cumulative"
        );
        let last = buckets
            .last()
            .with_context(|| format!("{name}{labels:?}: no buckets"))?;
        ensure!(last.0.is_infinite(), "{name}{labels:?}: no +Inf bucket");
        ensure!(
            Some(last.1) == count,
            "{name}{labels:?}: +Inf bucket is not _count"
        );
    }
    Ok(())
}

/// The `_count` of histogram `name`, summed over its label sets.
fn histogram_count(families: &BTreeMap<String, MetricFamily>, name: &str) -> Option<f64> {
    let family = families.get(name).filter(|f| f.kind == "histogram")?;
    Some(
        family
            .samples
            .iter()
            .filter(|(s, _, _)| s.ends_with("_count"))
            .map(|(_, _, v)| v)
            .sum(),
    )
}

async fn scrape(r: &TestRegion) -> Result<(String, String)> {
    let resp = r.http.get(format!("{}/metrics", r.base)).send().await?;
    ensure!(resp.status() == 200, "/metrics answered {}", resp.status());
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    Ok((content_type, resp.text().await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item10_metrics_parse_and_hold_the_latency_histograms_after_traffic() -> Result<()> {
    logs();
    let r = TestRegion::start().await?;
    let ann = r.user("ann", "laptop").await?;
    let bob = r.user("bob", "phone").await?;
    let cid = ann.direct("bob").await?;
    let head = bob.wait_entries(1).await?.len() as u64;
    let mut ws = bob.ws().await?;
    ws.send(json!({"op": "hello", "after": head})).await?;
    // The first message may come in the hello's replay; the second, sent once the first
    // is in, comes live.
    for n in 1..=2 {
        ann.send(&cid, &format!("m{n}"), "hi").await?;
        ws.next_op("entry", WAIT).await?;
    }

    let histograms = [
        "meridian_gateway_publish_seconds",
        "meridian_applier_apply_seconds",
        "meridian_applier_apply_lag_seconds",
        "meridian_gateway_delivery_seconds",
    ];
    let deadline = tokio::time::Instant::now() + WAIT;
    let (content_type, families) = loop {
        let (content_type, text) = scrape(&r).await?;
        let families = parse_openmetrics(&text).with_context(|| format!("/metrics:\n{text}"))?;
        let missing: Vec<&str> = histograms
            .iter()
            .copied()
            .filter(|h| histogram_count(&families, h).unwrap_or(0.0) < 1.0)
            .collect();
        if missing.is_empty() {
            break (content_type, families);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("histograms missing or empty after traffic: {missing:?}\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    // Apply lag is per stream.
    let lag = &families["meridian_applier_apply_lag_seconds"];
    assert!(
        lag.samples.iter().all(|(_, labels, _)| labels
            .get("stream")
            .is_some_and(|s| s.starts_with("SYNC") || s.contains("SYNC"))),
        "{lag:?}"
    );
    // Every role's metrics are in the one document.
    for family in [
        "meridian_gateway_requests",
        "meridian_gateway_ws_connections",
        "meridian_applier_applied",
        "meridian_applier_checkpoint",
    ] {
        assert!(families.contains_key(family), "{family} missing");
    }
    assert_eq!(families["meridian_gateway_requests"].kind, "counter");
    assert!(histogram_count(&families, "meridian_gateway_publish_seconds").unwrap() >= 2.0);
    r.stop().await
}

// ---------------------------------------------------------------------------------------
// Logs.

/// The process's log lines, written by the binary's JSON subscriber; installed once.
fn logs() -> &'static LogCapture {
    static LOGS: OnceLock<LogCapture> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = LogCapture::default();
        let writer = logs.clone();
        logging::subscriber(
            LogFormat::Json,
            tracing_subscriber::EnvFilter::new("warn,meridian::access=debug"),
            move || writer.clone(),
            false,
        )
        .init();
        logs
    })
}

/// Every captured line, each of which must be a JSON object.
fn json_lines(logs: &LogCapture) -> Result<Vec<Value>> {
    logs.text()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).with_context(|| format!("not a JSON line: {l:?}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item10_every_request_leaves_one_json_access_line() -> Result<()> {
    let logs = logs();
    let r = TestRegion::start().await?;
    let ann = r.user("ann", "laptop").await?;
    // A trace id of our own, so this request's line can be told from every other.
    let trace_id = "5e1f0c2a9b8d47e6a3c4b5d6e7f80912";
    let resp = ann
        .http
        .get(format!("{}/v1/me", r.base))
        .bearer_auth(&ann.token)
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let missing = r.http.get(format!("{}/v1/no/such/route", r.base)).send().await?;
    assert_eq!(missing.status(), 404);

    let access = |lines: &[Value]| -> Vec<Value> {
        lines
            .iter()
            .filter(|l| l["target"] == "meridian::access")
            .cloned()
            .collect()
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    let mine = loop {
        let lines = json_lines(logs)?;
        let mine: Vec<Value> = access(&lines)
            .into_iter()
            .filter(|l| l["trace_id"] == trace_id)
            .collect();
        if !mine.is_empty() || tokio::time::Instant::now() > deadline {
            break mine;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(mine.len(), 1, "one access line per request: {mine:?}");
    let line = &mine[0];
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["method"], "GET");
    assert_eq!(line["route"], "/v1/me");
    assert_eq!(line["status"], 200);
    assert!(line["duration_ms"].as_f64().is_some_and(|d| d >= 0.0), "{line}");
    assert!(line["timestamp"].is_string(), "{line}");

    // An unmatched path is logged by status, without the raw path.
    let lines = json_lines(logs)?;
    let not_found: Vec<Value> = access(&lines)
        .into_iter()
        .filter(|l| l["status"] == 404 && l["route"] == "-")
        .collect();
    assert!(!not_found.is_empty(), "no access line for the 404");
    assert!(
        !lines.iter().any(|l| l.to_string().contains("/v1/no/such/route")),
        "raw paths stay out of the log"
    );
    r.stop().await
}
