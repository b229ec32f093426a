//! Tracing end to end: one message, sent by POST without a `traceparent`, makes one trace
//! that runs gateway (HTTP request → publish) → applier (apply) → gateway (WebSocket
//! delivery), each hop the child of the one before, exported over OTLP with each role's
//! `service.name`, once over http/protobuf and once over grpc, to receivers started here. A
//! request or WebSocket send that carries a `traceparent` joins the client's trace.
//!
//! Telemetry is process-wide, so this file is its own test binary with one test that runs
//! the two protocols one after the other.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use meridian_e2e::{LogCapture, Session, TestRegion, Ws};
use meridian_telemetry::Protocol;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message as _;
use serde_json::json;
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(10);

/// One exported span, flattened.
#[derive(Debug, Clone)]
struct Exported {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
}

#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<Exported>>>);

impl Received {
    fn add(&self, req: ExportTraceServiceRequest) {
        let mut out = self.0.lock().unwrap();
        for rs in req.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    AnyValue::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                out.push(Exported {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                });
            }
        }
    }

    fn spans(&self) -> Vec<Exported> {
        self.0.lock().unwrap().clone()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An OTLP/HTTP receiver: `POST /v1/traces` with a protobuf `ExportTraceServiceRequest`.
async fn http_receiver(received: Received) -> Result<String> {
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let received = received.clone();
            async move {
                match ExportTraceServiceRequest::decode(body) {
                    Ok(req) => {
                        received.add(req);
                        (
                            axum::http::StatusCode::OK,
                            [("content-type", "application/x-protobuf")],
                            ExportTraceServiceResponse::default().encode_to_vec(),
                        )
                    }
                    Err(e) => (
                        axum::http::StatusCode::BAD_REQUEST,
                        [("content-type", "text/plain")],
                        e.to_string().into_bytes(),
                    ),
                }
            }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(format!("http://{addr}"))
}

/// An OTLP/gRPC receiver on bare HTTP/2 (h2c): the trace service's one unary call, framed
/// by hand (1 byte compression flag, 4 bytes length, the message; status in trailers), which
/// is all a unary gRPC call is and spares the tests a gRPC server stack.
async fn grpc_receiver(received: Received) -> Result<String> {
    const EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((io, _)) = listener.accept().await {
            let received = received.clone();
            let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let received = received.clone();
                async move {
                    let path_ok = req.uri().path() == EXPORT;
                    let body = req.into_body().collect().await.map(|b| b.to_bytes());
                    let status = match (path_ok, body) {
                        (false, _) => "12", // UNIMPLEMENTED
                        (true, Ok(body)) => match grpc_messages(&body).and_then(|msgs| {
                            msgs.into_iter()
                                .map(ExportTraceServiceRequest::decode)
                                .collect::<Result<Vec<_>, _>>()
                                .ok()
                        }) {
                            Some(reqs) => {
                                reqs.into_iter().for_each(|r| received.add(r));
                                "0"
                            }
                            None => "3", // INVALID_ARGUMENT
                        },
                        (true, Err(_)) => "13", // INTERNAL
                    };
                    let reply = ExportTraceServiceResponse::default().encode_to_vec();
                    let mut framed = vec![0u8];
                    framed.extend_from_slice(&(reply.len() as u32).to_be_bytes());
                    framed.extend_from_slice(&reply);
                    let mut trailers = hyper::HeaderMap::new();
                    trailers.insert("grpc-status", hyper::header::HeaderValue::from_static(status));
                    let frames: Vec<Result<Frame<Bytes>, Infallible>> = if status == "0" {
                        vec![
                            Ok(Frame::data(Bytes::from(framed))),
                            Ok(Frame::trailers(trailers)),
                        ]
                    } else {
                        vec![Ok(Frame::trailers(trailers))]
                    };
                    let resp = hyper::Response::builder()
                        .header("content-type", "application/grpc")
                        .body(StreamBody::new(futures::stream::iter(frames)))
                        .expect("a valid response");
                    Ok::<_, Infallible>(resp)
                }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(io), service)
                    .await;
            });
        }
    });
    Ok(format!("http://{addr}"))
}

/// The messages of a gRPC body (uncompressed frames only).
fn grpc_messages(mut body: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    while !body.is_empty() {
        if body.len() < 5 || body[0] != 0 {
            return None;
        }
        let len = u32::from_be_bytes(body[1..5].try_into().ok()?) as usize;
        let msg = body.get(5..5 + len)?;
        out.push(msg);
        body = &body[5 + len..];
    }
    Some(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_message_makes_one_trace_across_gateway_applier_and_delivery() -> Result<()> {
    let logs = LogCapture::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "warn,meridian_gateway=debug,meridian_applier=debug,meridian_telemetry=info",
        ))
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let r = TestRegion::start().await?;
    let ann = r.user("ann", "laptop").await?;
    let bob = r.user("bob", "phone").await?;
    let cid = ann.direct("bob").await?;
    let head = bob.wait_entries(1).await?.len() as u64;
    let mut bob_ws = bob.ws().await?;
    bob_ws.send(json!({"op": "hello", "after": head})).await?;
    // Ann sends over her socket in one case; her own inbox gets what she sends, which is
    // not what these checks read, so she goes live without a hello.
    let mut ann_ws = ann.ws().await?;
    // Let the hello land, so the message comes live rather than in the replay.
    tokio::time::sleep(Duration::from_millis(100)).await;

    for (n, protocol) in [(1, Protocol::HttpProtobuf), (2, Protocol::Grpc)] {
        let received = Received::default();
        let endpoint = match protocol {
            Protocol::HttpProtobuf => http_receiver(received.clone()).await?,
            Protocol::Grpc => grpc_receiver(received.clone()).await?,
        };
        let telemetry = meridian_telemetry::init_with_endpoint(&endpoint, protocol)?;
        let mut result = check_one_message(&ann, &mut bob_ws, &cid, n, &received, &logs).await;
        if result.is_ok() {
            result = match protocol {
                Protocol::HttpProtobuf => check_ws_send(&mut ann_ws, &mut bob_ws, &cid, &received).await,
                Protocol::Grpc => check_http_parent(&ann, &mut bob_ws, &cid, &received).await,
            };
        }
        tokio::task::spawn_blocking(move || telemetry.shutdown()).await??;
        result.with_context(|| format!("over {protocol:?}; logs:\n{}", logs.text()))?;
    }
    r.stop().await
}

async fn check_one_message(
    ann: &Session,
    bob_ws: &mut Ws,
    cid: &str,
    n: u64,
    received: &Received,
    logs: &LogCapture,
) -> Result<()> {
    let text = format!("traced {n}");
    ann.send(cid, &format!("t{n}"), &text).await?;
    let entry = bob_ws.next_op("entry", WAIT).await?;
    ensure!(entry["body"]["text"] == text.as_str(), "unexpected entry {entry}");

    let chain = wait_chain(received, |s| {
        s.name == "HTTP POST /v1/conversations/{cid}/messages"
    })
    .await?;
    let [http, publish, apply, deliver] = &chain;
    for s in &chain {
        assert_eq!(s.trace_id, http.trace_id, "one trace: {chain:#?}");
    }
    assert_eq!(
        http.parent_span_id, "",
        "a POST without traceparent starts the trace"
    );
    assert_eq!(
        (http.service.as_str(), publish.service.as_str()),
        ("meridian-gateway", "meridian-gateway")
    );
    assert_eq!(apply.service, "meridian-applier");
    assert_eq!(deliver.service, "meridian-gateway");
    assert_eq!(publish.parent_span_id, http.span_id);
    assert_eq!(apply.parent_span_id, publish.span_id);
    assert_eq!(deliver.parent_span_id, apply.span_id);

    // The gateway's log line for the publish names the trace.
    let needle = format!("trace_id={}", http.trace_id);
    ensure!(
        logs.text()
            .lines()
            .any(|l| l.contains(&needle) && l.contains("published")),
        "no `published` log line with {needle}"
    );
    Ok(())
}

/// A send over the WebSocket whose frame names a trace joins it: "WS send" is the child of
/// the client's span, and the chain below it is the same as for a POST.
async fn check_ws_send(ann_ws: &mut Ws, bob_ws: &mut Ws, cid: &str, received: &Received) -> Result<()> {
    let (trace, client_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    ann_ws
        .send(json!({
            "op": "send", "ref": 1, "conversation_id": cid, "client_msg_id": "ws-traced",
            "type": "text", "body": {"text": "over ws"},
            "traceparent": format!("00-{trace}-{client_span}-01"),
        }))
        .await?;
    ann_ws.next_op("ack", WAIT).await?;
    let entry = bob_ws.next_op("entry", WAIT).await?;
    ensure!(entry["body"]["text"] == "over ws", "unexpected entry {entry}");
    let chain = wait_chain(received, |s| s.name == "WS send" && s.trace_id == trace).await?;
    let [ws_send, publish, apply, deliver] = &chain;
    assert_eq!(ws_send.parent_span_id, client_span);
    assert_eq!(ws_send.service, "meridian-gateway");
    assert_eq!(apply.service, "meridian-applier");
    for s in [publish, apply, deliver] {
        assert_eq!(s.trace_id, trace);
    }
    Ok(())
}

/// A POST carrying a valid `traceparent` header joins the caller's trace.
async fn check_http_parent(ann: &Session, bob_ws: &mut Ws, cid: &str, received: &Received) -> Result<()> {
    let (trace, client_span) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let resp = ann
        .http
        .post(format!("{}/v1/conversations/{cid}/messages", ann.base))
        .bearer_auth(&ann.token)
        .header("traceparent", format!("00-{trace}-{client_span}-01"))
        .json(&json!({"client_msg_id": "http-traced", "type": "text", "body": {"text": "joined"}}))
        .send()
        .await?;
    ensure!(resp.status() == 202, "send: {}", resp.status());
    let entry = bob_ws.next_op("entry", WAIT).await?;
    ensure!(entry["body"]["text"] == "joined", "unexpected entry {entry}");
    let chain = wait_chain(received, |s| {
        s.name.starts_with("HTTP POST") && s.trace_id == trace
    })
    .await?;
    assert_eq!(chain[0].parent_span_id, client_span);
    assert!(chain.iter().all(|s| s.trace_id == trace), "{chain:#?}");
    Ok(())
}

/// Flushes until the chain under the span matching `root` has arrived: spans end just after
/// the work they cover (the delivery span after the frame is written), so one flush right
/// after the frame arrives can miss the last of them.
async fn wait_chain(received: &Received, root: impl Fn(&Exported) -> bool) -> Result<[Exported; 4]> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        tokio::task::spawn_blocking(meridian_telemetry::flush).await??;
        let spans = received.spans();
        match find_chain(&spans, &root) {
            Ok(chain) => return Ok(chain),
            Err(e) if tokio::time::Instant::now() > deadline => {
                bail!("{e}; received spans: {spans:#?}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The span matching `root` and, following parent links down from it, publish → apply →
/// WS deliver.
fn find_chain(spans: &[Exported], root: impl Fn(&Exported) -> bool) -> Result<[Exported; 4]> {
    let by_parent: HashMap<&str, Vec<&Exported>> = spans.iter().fold(HashMap::new(), |mut m, s| {
        m.entry(s.parent_span_id.as_str()).or_default().push(s);
        m
    });
    let child = |parent: &Exported, name: &str| -> Result<Exported> {
        by_parent
            .get(parent.span_id.as_str())
            .and_then(|kids| kids.iter().find(|k| k.name == name))
            .map(|k| (*k).clone())
            .with_context(|| format!("no {name:?} span under {:?} {}", parent.name, parent.span_id))
    };
    let http = spans.iter().find(|s| root(s)).context("no root span")?.clone();
    let publish = child(&http, "publish")?;
    let apply = child(&publish, "apply")?;
    let deliver = child(&apply, "WS deliver")?;
    Ok([http, publish, apply, deliver])
}
