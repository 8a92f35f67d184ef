//! Logging setup: human-readable or JSON lines on stderr, filtered like
//! `RUST_LOG`; with the `otel` feature and `telemetry.otlp_endpoint`, the
//! spans (one per delivery, and the handler's own) exported over OTLP/HTTP.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, LogSettings, TelemetrySettings};

/// Keeps the OpenTelemetry exporter alive; dropping it flushes the spans
/// still buffered (at most a few seconds). Hold it until the worker stops.
#[must_use = "dropping it shuts the span exporter down"]
#[derive(Debug, Default)]
pub struct TelemetryGuard {
    #[cfg(feature = "otel")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        #[cfg(feature = "otel")]
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            tracing::warn!(error = %e, "could not flush the last spans to the OTLP collector");
        }
    }
}

fn filter(log: &LogSettings) -> EnvFilter {
    let directives = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty() && EnvFilter::try_new(s).is_ok())
        .unwrap_or_else(|| log.level.clone());
    // lapin logs every connection problem at ERROR from its I/O thread,
    // repeating what rabbit-guard already reports with context; name it in
    // the filter to see it anyway.
    let directives = if directives.contains("lapin") {
        directives
    } else {
        format!("{directives},lapin=off")
    };
    EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info,lapin=off"))
}

/// Installs the global subscriber. `RUST_LOG`, when set, overrides
/// `log.level`. Panics are logged through it too, so JSON output stays one
/// object per line. Calling it twice is harmless (the second call does nothing).
pub fn init(log: &LogSettings) {
    drop(init_with(log, &TelemetrySettings::default()));
}

/// [`init`], plus the OpenTelemetry export `telemetry` asks for (feature
/// `otel`). Keep the guard until the worker stops.
pub fn init_with(log: &LogSettings, telemetry: &TelemetrySettings) -> TelemetryGuard {
    let ansi = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let fmt = match log.format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            // The delivery's span (queue, message id, attempt, trace id) on
            // every line logged while handling it, the handler's own too.
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    };
    #[cfg(feature = "otel")]
    let (otel, guard) = otel::layer(telemetry);
    #[cfg(not(feature = "otel"))]
    let (otel, guard) = {
        let _ = telemetry;
        (
            None::<tracing_subscriber::layer::Identity>,
            TelemetryGuard::default(),
        )
    };
    let installed = tracing_subscriber::registry()
        .with(filter(log))
        .with(fmt)
        .with(otel)
        .try_init()
        .is_ok();
    if installed {
        std::panic::set_hook(Box::new(|info| {
            let location = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            let message = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(%location, panic = %message, "panic");
        }));
    }
    guard
}

trait Boxed<S> {
    fn boxed(self) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>;
}

impl<S, L> Boxed<S> for L
where
    L: tracing_subscriber::Layer<S> + Send + Sync + 'static,
    S: tracing::Subscriber,
{
    fn boxed(self) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync> {
        Box::new(self)
    }
}

#[cfg(feature = "otel")]
mod otel {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::{Protocol, WithExportConfig};

    use super::TelemetryGuard;
    use crate::config::{OtlpProtocol, TelemetrySettings};

    /// The OTLP traces URL: `/v1/traces` added to an endpoint without a path.
    fn traces_url(endpoint: &str) -> String {
        match url::Url::parse(endpoint) {
            Ok(u) if u.path() == "/" || u.path().is_empty() => {
                format!("{}/v1/traces", endpoint.trim_end_matches('/'))
            }
            _ => endpoint.to_owned(),
        }
    }

    /// The OpenTelemetry layer, when an endpoint is configured.
    pub(super) fn layer<S>(
        telemetry: &TelemetrySettings,
    ) -> (
        Option<tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>>,
        TelemetryGuard,
    )
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    {
        let Some(endpoint) = &telemetry.otlp_endpoint else {
            return (None, TelemetryGuard::default());
        };
        let protocol = match telemetry.otlp_protocol {
            OtlpProtocol::HttpProtobuf => Protocol::HttpBinary,
            OtlpProtocol::HttpJson => Protocol::HttpJson,
        };
        let exporter = match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(protocol)
            .with_endpoint(traces_url(endpoint.expose()))
            .build()
        {
            Ok(e) => e,
            Err(e) => {
                // Logging is not set up yet: say it on stderr, and run without export.
                #[allow(clippy::print_stderr)]
                {
                    eprintln!(
                        "warning: no OpenTelemetry export to {}: {e}",
                        endpoint.masked()
                    );
                }
                return (None, TelemetryGuard::default());
            }
        };
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(telemetry.service_name.clone())
                    .build(),
            )
            .build();
        let tracer = provider.tracer("rabbit-guard");
        (
            Some(tracing_opentelemetry::layer().with_tracer(tracer)),
            TelemetryGuard {
                provider: Some(provider),
            },
        )
    }

    #[cfg(test)]
    #[test]
    fn the_traces_path_is_added_only_when_missing() {
        assert_eq!(traces_url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(
            traces_url("http://c:4318/custom/path"),
            "http://c:4318/custom/path"
        );
    }
}
