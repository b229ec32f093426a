//! Meridian's tracing: one OpenTelemetry trace per message across the roles that handle it
//! (docs/design.md §3), the context carried between processes as a W3C `traceparent`
//! (an HTTP header, a WebSocket frame field, a NATS header).
//!
//! Roles often share a process (`meridian region` runs gateway and applier, and push, in one)
//! yet each must report under its own `service.name`. So there is no global tracer and no
//! `tracing` layer here: one tracer provider per [`Role`], each with its own resource, and a
//! small span API ([`start`], [`RoleSpan`]) that names the role at every span.
//!
//! # Using it
//! - The binary calls [`init`] once at start (it reads the standard `OTEL_EXPORTER_OTLP_*`
//!   variables) and [`Telemetry::shutdown`] at the very end of its ordered stop, which exports
//!   what is still buffered. Without an endpoint nothing is exported, but spans still get ids,
//!   so trace ids still tie log lines of one message together across roles.
//! - A role receiving work from elsewhere starts a span with the incoming `traceparent` as
//!   parent (root when absent or invalid):
//!
//!   ```no_run
//!   # fn header(_: &str) -> Option<String> { None }
//!   use meridian_telemetry::{Role, SpanKind};
//!   // e.g. the push role, for each message taken off its NATS subject:
//!   let traceparent: Option<String> = header("traceparent");
//!   let mut span = meridian_telemetry::start_with_kind(
//!       Role::Push, "push notify", SpanKind::Consumer, traceparent.as_deref());
//!   span.set_attribute("meridian.user", "bob");
//!   // ... and hands `span.traceparent()` on to whatever it publishes next.
//!   // The span ends when dropped.
//!   ```
//! - Log lines carry the trace id when emitted inside a `tracing` span that records it:
//!   [`RoleSpan::log_span`], or any `tracing::info_span!(.., trace_id = %span.trace_id())`.
//! - [`RoleSpan::scope`] makes a span current for a future, so code deep inside it (which
//!   does not take the span as an argument) can start children with [`start_in_current`].
//!
//! # Layout
//! - [`traceparent`]: W3C `traceparent` parsing and formatting.
//! - `export`: reading the `OTEL_*` variables ([`ExportConfig`]) and building the exporters.
//! - this file: [`Role`], [`init`], the process-wide providers, [`RoleSpan`].

mod export;
pub mod traceparent;

use std::borrow::Cow;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use opentelemetry::trace::{
    FutureExt as _, Span as _, SpanContext, Status, TraceContextExt as _, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use thiserror::Error;

pub use export::{ExportConfig, Protocol};
pub use opentelemetry::trace::SpanKind;

/// The name of the NATS / HTTP header that carries the trace context.
pub const TRACEPARENT: &str = "traceparent";

/// A role reporting spans under its own `service.name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Gateway,
    Applier,
    Push,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Gateway, Role::Applier, Role::Push];

    /// The `service.name` its spans carry.
    fn service_name(self) -> &'static str {
        match self {
            Role::Gateway => "meridian-gateway",
            Role::Applier => "meridian-applier",
            Role::Push => "meridian-push",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Error)]
pub enum TelemetryError {
    #[error("telemetry is already initialized in this process")]
    AlreadyInitialized,
    #[error("{var}={value:?} is not supported (use grpc or http/protobuf)")]
    UnsupportedProtocol { var: &'static str, value: String },
    #[error("building the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("starting the export thread: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("flushing spans: {0}")]
    Flush(String),
}

/// One provider per role, and a tracer from each.
struct Providers {
    providers: [SdkTracerProvider; 3],
    tracers: [SdkTracer; 3],
}

impl Providers {
    fn new(mut build: impl FnMut(Role) -> SdkTracerProvider) -> Providers {
        let providers = Role::ALL.map(&mut build);
        let tracers = Role::ALL.map(|r| providers[r.index()].tracer("meridian"));
        Providers { providers, tracers }
    }

    /// Providers that assign ids but export nothing.
    fn silent() -> Providers {
        Providers::new(|role| SdkTracerProvider::builder().with_resource(resource(role)).build())
    }
}

fn resource(role: Role) -> Resource {
    // `Resource::builder` reads OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME first; the role's
    // name is merged last and wins, since roles sharing a process must stay distinguishable.
    Resource::builder().with_service_name(role.service_name()).build()
}

/// What [`init`] installed; [`start`] uses [`silent`] while this is empty.
static INSTALLED: RwLock<Option<Arc<Providers>>> = RwLock::new(None);

/// Whether spans leave the process (see [`exporting`]).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether an exporter is installed. Spans started without one only carry ids; a caller
/// starting one span per *delivery* (a multiple of the messages) may skip them when this is
/// false: unexported, they were ~8 % of the region process under group fan-out.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

fn silent() -> &'static Providers {
    static SILENT: OnceLock<Providers> = OnceLock::new();
    SILENT.get_or_init(Providers::silent)
}

fn with_tracer<T>(role: Role, f: impl FnOnce(&SdkTracer) -> T) -> T {
    let installed = INSTALLED.read().unwrap_or_else(|p| p.into_inner());
    match installed.as_ref() {
        Some(p) => f(&p.tracers[role.index()]),
        None => f(&silent().tracers[role.index()]),
    }
}

/// Sets up export from the standard variables: when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, each role's spans are batched and sent over
/// OTLP, grpc or http/protobuf per `OTEL_EXPORTER_OTLP_PROTOCOL` (see [`ExportConfig`]).
/// Otherwise (or with `OTEL_SDK_DISABLED=true`) nothing is exported and spans only carry ids.
///
/// Call once, early in `main`, inside the tokio runtime or not. An error leaves the process
/// without export but otherwise working; a binary may log it and go on.
pub fn init() -> Result<Telemetry, TelemetryError> {
    install(ExportConfig::from_env()?)
}

/// [`init`] with an explicit endpoint (used as given for grpc; `/v1/traces` is appended for
/// http/protobuf), for tests.
pub fn init_with_endpoint(endpoint: &str, protocol: Protocol) -> Result<Telemetry, TelemetryError> {
    install(Some(ExportConfig::new(endpoint, protocol)))
}

fn install(cfg: Option<ExportConfig>) -> Result<Telemetry, TelemetryError> {
    let mut installed = INSTALLED.write().unwrap_or_else(|p| p.into_inner());
    if installed.is_some() {
        return Err(TelemetryError::AlreadyInitialized);
    }
    let Some(cfg) = cfg else {
        *installed = Some(Arc::new(Providers::silent()));
        return Ok(Telemetry {
            runtime: None,
            stopped: false,
        });
    };
    let runtime = export::runtime().map_err(TelemetryError::Runtime)?;
    let mut exporters = Vec::with_capacity(Role::ALL.len());
    for _ in Role::ALL {
        exporters.push(export::exporter(&cfg, runtime.handle())?);
    }
    let mut exporters = exporters.into_iter();
    let providers = Providers::new(|role| {
        SdkTracerProvider::builder()
            .with_resource(resource(role))
            .with_batch_exporter(exporters.next().expect("one exporter per role"))
            .build()
    });
    *installed = Some(Arc::new(providers));
    EXPORTING.store(true, Ordering::Relaxed);
    tracing::info!(endpoint = %cfg.endpoint, protocol = ?cfg.protocol, "exporting traces over OTLP");
    Ok(Telemetry {
        runtime: Some(runtime),
        stopped: false,
    })
}

/// Exports every span ended so far. Blocks until the collector answered or the export
/// timed out; from async code run it on a blocking thread (`spawn_blocking`).
pub fn flush() -> Result<(), TelemetryError> {
    let installed = INSTALLED.read().unwrap_or_else(|p| p.into_inner()).clone();
    let Some(p) = installed else { return Ok(()) };
    let mut errors = Vec::new();
    for provider in &p.providers {
        if let Err(e) = provider.force_flush() {
            errors.push(e.to_string());
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(TelemetryError::Flush(errors.join("; ")))
    }
}

/// The installed telemetry. Dropping it is [`Telemetry::shutdown`] without the result.
pub struct Telemetry {
    /// Drives the exporters (see `export::runtime`); stopped after the providers.
    runtime: Option<tokio::runtime::Runtime>,
    stopped: bool,
}

impl Telemetry {
    /// See [`flush`].
    pub fn flush(&self) -> Result<(), TelemetryError> {
        flush()
    }

    /// Exports what is buffered and uninstalls: later spans export nothing (a later [`init`]
    /// may install again). Call it last in the ordered stop, after the roles have ended, so
    /// their final spans are included. Blocks for at most a few seconds.
    pub fn shutdown(mut self) -> Result<(), TelemetryError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), TelemetryError> {
        if std::mem::replace(&mut self.stopped, true) {
            return Ok(());
        }
        let installed = INSTALLED.write().unwrap_or_else(|p| p.into_inner()).take();
        EXPORTING.store(false, Ordering::Relaxed);
        let mut errors = Vec::new();
        if let Some(p) = installed {
            for provider in &p.providers {
                if let Err(e) = provider.shutdown_with_timeout(Duration::from_secs(5)) {
                    errors.push(e.to_string());
                }
            }
        }
        if let Some(rt) = self.runtime.take() {
            // Not `drop`: dropping a runtime from async code panics, and shutdown may well be
            // called from async `main`. The exports it ran have finished above.
            rt.shutdown_background();
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(TelemetryError::Flush(errors.join("; ")))
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(error = %e, "exporting the last spans failed");
        }
    }
}

/// A span of one role. Ends when dropped (or at [`RoleSpan::end`]).
#[derive(Debug)]
pub struct RoleSpan {
    role: Role,
    span: opentelemetry_sdk::trace::Span,
}

/// Starts a span of `role`. With a valid `parent_traceparent` it joins that trace as its
/// child; otherwise (absent, malformed, all-zero ids) it starts a new trace.
pub fn start(role: Role, name: impl Into<Cow<'static, str>>, parent_traceparent: Option<&str>) -> RoleSpan {
    start_with_kind(role, name, SpanKind::Internal, parent_traceparent)
}

/// [`start`] with a span kind (`Server` for a request taken in, `Producer` for a publish,
/// `Consumer` for a message taken off a subject).
pub fn start_with_kind(
    role: Role,
    name: impl Into<Cow<'static, str>>,
    kind: SpanKind,
    parent_traceparent: Option<&str>,
) -> RoleSpan {
    let parent = parent_traceparent
        .and_then(traceparent::parse)
        .map(|sc| Context::new().with_remote_span_context(sc))
        .unwrap_or_default();
    start_in(role, name, kind, &parent)
}

/// Starts a span of `role` whose parent is the span current in this future (made so by
/// [`RoleSpan::scope`]); a new trace when there is none.
pub fn start_in_current(role: Role, name: impl Into<Cow<'static, str>>, kind: SpanKind) -> RoleSpan {
    start_in(role, name, kind, &Context::current())
}

fn start_in(role: Role, name: impl Into<Cow<'static, str>>, kind: SpanKind, parent: &Context) -> RoleSpan {
    let span = with_tracer(role, |t| {
        t.build_with_context(t.span_builder(name).with_kind(kind), parent)
    });
    RoleSpan { role, span }
}

/// The traceparent of the span current in this future, if any (see [`RoleSpan::scope`]):
/// what the tests check a scope sets.
#[cfg(test)]
fn current_traceparent() -> Option<String> {
    let cx = Context::current();
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| traceparent::format(sc))
}

impl RoleSpan {
    pub fn role(&self) -> Role {
        self.role
    }

    fn context(&self) -> &SpanContext {
        opentelemetry::trace::Span::span_context(&self.span)
    }

    /// `00-<trace id>-<span id>-<flags>`, for the next hop's header. Empty once telemetry
    /// was shut down (the span then has no valid ids).
    pub fn traceparent(&self) -> String {
        let sc = self.context();
        if sc.is_valid() {
            traceparent::format(sc)
        } else {
            String::new()
        }
    }

    /// The trace id as 32 lowercase hex digits, for log lines.
    pub fn trace_id(&self) -> String {
        self.context().trace_id().to_string()
    }

    /// The span id as 16 lowercase hex digits.
    pub fn span_id(&self) -> String {
        self.context().span_id().to_string()
    }

    pub fn set_attribute(&mut self, key: &'static str, value: impl Into<Value>) {
        self.span.set_attribute(KeyValue::new(key, value));
    }

    /// Marks the span failed (trace views highlight it).
    pub fn set_error(&mut self, description: impl Into<Cow<'static, str>>) {
        self.span.set_status(Status::error(description));
    }

    /// A child span, possibly of another role (both in this process).
    pub fn child(&self, role: Role, name: impl Into<Cow<'static, str>>) -> RoleSpan {
        self.child_with_kind(role, name, SpanKind::Internal)
    }

    fn child_with_kind(&self, role: Role, name: impl Into<Cow<'static, str>>, kind: SpanKind) -> RoleSpan {
        start_in(role, name, kind, &self.parent_context())
    }

    /// A context naming this span as parent. The span itself stays here (it ends when this
    /// `RoleSpan` drops), so the context holds only its ids.
    fn parent_context(&self) -> Context {
        let sc = self.context();
        let local = SpanContext::new(
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags(),
            false,
            sc.trace_state().clone(),
        );
        Context::new().with_remote_span_context(local)
    }

    /// Runs `fut` with this span current: [`start_in_current`] and the OpenTelemetry context
    /// inside it see this span.
    pub fn scope<F: Future>(&self, fut: F) -> impl Future<Output = F::Output> {
        fut.with_context(self.parent_context())
    }

    /// A `tracing` span carrying this span's `trace_id`, so log lines emitted inside it (e.g.
    /// through `tracing::Instrument::instrument`) can be found from the trace and vice versa.
    pub fn log_span(&self) -> tracing::Span {
        tracing::info_span!("trace", trace_id = %self.trace_id(), role = self.role.service_name())
    }

    /// Ends the span now (dropping it does the same).
    pub fn end(mut self) {
        self.span.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_have_their_service_names() {
        let names: Vec<_> = Role::ALL.iter().map(|r| r.service_name()).collect();
        assert_eq!(names, ["meridian-gateway", "meridian-applier", "meridian-push"]);
    }

    #[test]
    fn spans_join_a_valid_parent_and_start_a_trace_otherwise() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let span = start(Role::Applier, "apply", Some(parent));
        assert_eq!(span.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(span.span_id(), "00f067aa0ba902b7");
        let tp = span.traceparent();
        assert!(tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{tp}");
        assert!(tp.ends_with("-01"), "{tp}");

        for bad in [
            None,
            Some(""),
            Some("garbage"),
            Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
        ] {
            let root = start(Role::Gateway, "root", bad);
            assert_ne!(root.trace_id(), "00000000000000000000000000000000");
            assert_ne!(root.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
            assert!(traceparent::parse(&root.traceparent()).is_some());
        }
    }

    #[test]
    fn children_share_the_trace_and_point_at_their_parent() {
        let root = start(Role::Gateway, "HTTP POST /x", None);
        let child = root.child(Role::Gateway, "publish");
        assert_eq!(child.trace_id(), root.trace_id());
        assert_ne!(child.span_id(), root.span_id());
    }

    #[tokio::test]
    async fn scope_makes_a_span_current_for_a_future() {
        assert_eq!(current_traceparent(), None);
        let root = start(Role::Gateway, "HTTP POST /x", None);
        let expected = root.traceparent();
        let (seen, child_trace) = root
            .scope(async {
                tokio::task::yield_now().await;
                let child = start_in_current(Role::Gateway, "publish", SpanKind::Producer);
                (current_traceparent(), child.trace_id())
            })
            .await;
        assert_eq!(seen.as_deref(), Some(expected.as_str()));
        assert_eq!(child_trace, root.trace_id());
        // Outside the scope nothing is current: a span started here is a new trace.
        let other = start_in_current(Role::Gateway, "other", SpanKind::Internal);
        assert_ne!(other.trace_id(), root.trace_id());
    }
}
