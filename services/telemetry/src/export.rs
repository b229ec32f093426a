//! Where spans go: the standard `OTEL_*` variables read into an [`ExportConfig`], and the
//! OTLP exporter built from it.
//!
//! The SDK's batch processor exports from its own plain thread, but both transports (tonic
//! for grpc, hyper for http) need a tokio reactor to run on; without one they panic and
//! every span after is dropped. So exports run on a small runtime of their own
//! ([`runtime`]): not the application's, whose workers may be the very ones blocked in the
//! final flush at shutdown.

use std::sync::Arc;

use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use tokio::runtime::Handle;

use crate::TelemetryError;

const ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
const TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
const PROTOCOL: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
const TRACES_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL";
const SDK_DISABLED: &str = "OTEL_SDK_DISABLED";

/// The OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/gRPC (`grpc`), conventionally port 4317.
    Grpc,
    /// OTLP/HTTP with protobuf bodies (`http/protobuf`), conventionally port 4318.
    HttpProtobuf,
}

/// Where and how spans are exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportConfig {
    /// The full target: for http/protobuf the URL spans are POSTed to (ending in
    /// `/v1/traces` when derived from a base endpoint), for grpc the server's URL.
    pub endpoint: String,
    pub protocol: Protocol,
}

impl ExportConfig {
    /// From a base endpoint, as `OTEL_EXPORTER_OTLP_ENDPOINT` gives it.
    pub fn new(base_endpoint: &str, protocol: Protocol) -> ExportConfig {
        let endpoint = match protocol {
            // gRPC has no per-signal path: the service and method name the call.
            Protocol::Grpc => base_endpoint.to_string(),
            // The spec: per-signal URLs are the base with `v1/traces` appended.
            Protocol::HttpProtobuf => format!("{}/v1/traces", base_endpoint.trim_end_matches('/')),
        };
        ExportConfig { endpoint, protocol }
    }

    /// From the process environment; `None` when no endpoint is set or the SDK is disabled.
    pub fn from_env() -> Result<Option<ExportConfig>, TelemetryError> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// Per the OTLP exporter spec: the traces-specific variables win over the general ones;
    /// a traces endpoint is used as given, a general one gets the signal path (http only);
    /// the protocol defaults to http/protobuf, the spec's default. Unlike the spec there is
    /// no default endpoint: with none set, nothing is exported (no collector is assumed).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Option<ExportConfig>, TelemetryError> {
        let get = |k: &str| get(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        if get(SDK_DISABLED).is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        let protocol = match get(TRACES_PROTOCOL)
            .map(|v| (TRACES_PROTOCOL, v))
            .or_else(|| get(PROTOCOL).map(|v| (PROTOCOL, v)))
        {
            None => Protocol::HttpProtobuf,
            Some((_, v)) if v == "grpc" => Protocol::Grpc,
            Some((_, v)) if v == "http/protobuf" => Protocol::HttpProtobuf,
            Some((var, value)) => return Err(TelemetryError::UnsupportedProtocol { var, value }),
        };
        if let Some(endpoint) = get(TRACES_ENDPOINT) {
            return Ok(Some(ExportConfig { endpoint, protocol }));
        }
        Ok(get(ENDPOINT).map(|base| ExportConfig::new(&base, protocol)))
    }
}

/// The runtime exports run on: one worker thread, which is plenty for batches every few
/// seconds and leaves the application's cores alone.
pub(crate) fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("meridian-otlp")
        .enable_all()
        .build()
}

/// An OTLP span exporter for `cfg` whose exports run on `rt`.
pub(crate) fn exporter(cfg: &ExportConfig, rt: &Handle) -> Result<OnRuntime, TelemetryError> {
    // tonic spawns its connection task when the channel is built: that must be on `rt` too.
    let _entered = rt.enter();
    let inner = match cfg.protocol {
        Protocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(cfg.endpoint.clone())
            .build()?,
        Protocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(cfg.endpoint.clone())
            .build()?,
    };
    Ok(OnRuntime {
        inner: Arc::new(inner),
        rt: rt.clone(),
    })
}

/// Runs each export of `inner` as a task on `rt` (see the module docs).
#[derive(Debug)]
pub(crate) struct OnRuntime {
    inner: Arc<opentelemetry_otlp::SpanExporter>,
    rt: Handle,
}

impl SpanExporter for OnRuntime {
    fn export(&self, batch: Vec<SpanData>) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let inner = self.inner.clone();
        let task = self.rt.spawn(async move { inner.export(batch).await });
        async move {
            task.await
                .unwrap_or_else(|e| Err(OTelSdkError::InternalFailure(format!("export task: {e}"))))
        }
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        // Called while the provider is built, before the exporter is shared; the resource
        // is what puts `service.name` on the exported spans, so it must reach `inner`.
        match Arc::get_mut(&mut self.inner) {
            Some(inner) => inner.set_resource(resource),
            None => tracing::error!("span exporter already shared; spans will lack service.name"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn cfg(vars: &[(&str, &str)]) -> Result<Option<ExportConfig>, TelemetryError> {
        let vars: HashMap<String, String> =
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        ExportConfig::from_vars(|k| vars.get(k).cloned())
    }

    #[test]
    fn nothing_is_exported_without_an_endpoint() {
        assert_eq!(cfg(&[]).unwrap(), None);
        assert_eq!(cfg(&[(PROTOCOL, "grpc")]).unwrap(), None);
        assert_eq!(cfg(&[(ENDPOINT, "  ")]).unwrap(), None);
        assert_eq!(
            cfg(&[(ENDPOINT, "http://c:4318"), (SDK_DISABLED, "true")]).unwrap(),
            None
        );
    }

    #[test]
    fn http_protobuf_is_the_default_and_gets_the_signal_path() {
        let c = cfg(&[(ENDPOINT, "http://collector:4318")]).unwrap().unwrap();
        assert_eq!(c.protocol, Protocol::HttpProtobuf);
        assert_eq!(c.endpoint, "http://collector:4318/v1/traces");
        let c = cfg(&[
            (ENDPOINT, "http://collector:4318/base/"),
            (PROTOCOL, "http/protobuf"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.endpoint, "http://collector:4318/base/v1/traces");
    }

    #[test]
    fn grpc_is_selected_by_the_protocol_variable_and_keeps_the_endpoint() {
        let c = cfg(&[(ENDPOINT, "http://collector:4317"), (PROTOCOL, "grpc")])
            .unwrap()
            .unwrap();
        assert_eq!(
            c,
            ExportConfig {
                endpoint: "http://collector:4317".into(),
                protocol: Protocol::Grpc
            }
        );
    }

    #[test]
    fn traces_specific_variables_win_and_their_endpoint_is_used_as_given() {
        let c = cfg(&[
            (ENDPOINT, "http://general:4318"),
            (PROTOCOL, "grpc"),
            (TRACES_ENDPOINT, "http://traces:9999/custom"),
            (TRACES_PROTOCOL, "http/protobuf"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.endpoint, "http://traces:9999/custom");
        assert_eq!(c.protocol, Protocol::HttpProtobuf);
    }

    #[test]
    fn unsupported_protocols_are_errors() {
        let e = cfg(&[(ENDPOINT, "http://c:4318"), (PROTOCOL, "http/json")]).unwrap_err();
        assert!(e.to_string().contains("http/json"), "{e}");
    }

    #[test]
    fn both_exporters_build() {
        let rt = runtime().unwrap();
        for c in [
            ExportConfig::new("http://127.0.0.1:4317", Protocol::Grpc),
            ExportConfig::new("http://127.0.0.1:4318", Protocol::HttpProtobuf),
        ] {
            exporter(&c, rt.handle()).unwrap();
        }
        rt.shutdown_background();
    }
}
