//! The process's log output: human-readable text (the default) or JSON lines for log
//! shippers, chosen by `--log-format` / `MERIDIAN_LOG_FORMAT`; the level filter comes from
//! `RUST_LOG` (default `info`).
//!
//! A JSON line is one event: `timestamp`, `level`, `target`, the message and the event's
//! fields at the top level (`{"message":"request","method":"GET","route":...}`), and
//! `span`, the innermost span's fields, which inside a request carry its `trace_id`.

use tracing::Subscriber;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// The environment variable naming the log format (`text` or `json`); the binary's
/// `--log-format` sets it too, so processes `meridian up` starts inherit the choice.
pub const LOG_FORMAT_ENV: &str = "MERIDIAN_LOG_FORMAT";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (colours on a terminal).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// The subscriber the binary installs, writing to `writer`. `ansi` colours text output
/// (never JSON).
pub fn subscriber<W>(
    format: LogFormat,
    filter: EnvFilter,
    writer: W,
    ansi: bool,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => Box::new(builder.with_ansi(ansi).finish()),
        LogFormat::Json => Box::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .with_span_list(false)
                .finish(),
        ),
    }
}

/// `RUST_LOG`, else `info`.
pub fn env_filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn capture(format: LogFormat) -> String {
        let out = Captured::default();
        let writer = out.clone();
        let sub = subscriber(format, EnvFilter::new("info"), move || writer.clone(), false);
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!(
                "http",
                method = "POST",
                trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
            );
            let _in = span.enter();
            tracing::info!(target: "meridian::access", route = "/v1/sync", status = 200u16, duration_ms = 1.5, "request");
            tracing::debug!("filtered out at info");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        text
    }

    #[test]
    fn item10_json_format_writes_one_json_object_per_line() {
        let text = capture(LogFormat::Json);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        let line: serde_json::Value = serde_json::from_str(lines[0]).expect("a JSON line");
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["target"], "meridian::access");
        assert_eq!(line["message"], "request");
        assert_eq!(line["route"], "/v1/sync");
        assert_eq!(line["status"], 200);
        assert_eq!(line["duration_ms"], 1.5);
        assert_eq!(line["span"]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(line["timestamp"].is_string());
    }

    #[test]
    fn text_format_stays_the_default_and_is_not_json() {
        assert_eq!(LogFormat::default(), LogFormat::Text);
        let text = capture(LogFormat::Text);
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(
            text.contains("route=\"/v1/sync\"") || text.contains("route=/v1/sync"),
            "{text}"
        );
        assert!(serde_json::from_str::<serde_json::Value>(text.trim()).is_err());
    }
}
