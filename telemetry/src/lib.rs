//! OpenTelemetry for both slimci processes: the `[telemetry]` configuration, the OTLP
//! exporters it starts (`Telemetry::start`: traces and metrics, HTTP/protobuf by default, gRPC
//! as an option, the standard `OTEL_*` variables honoured), W3C trace context as it travels in
//! AMQP headers (`TraceParent`, `inject`, `extract`), and the attribute names (`semconv`).
//!
//! Off is the default and costs nothing: `Telemetry::off()` holds no provider, no thread and
//! no exporter, and every span helper returns at once when there is no tracer.

pub mod semconv;

use std::time::{Duration, SystemTime};

use lapin::types::{AMQPValue, FieldTable};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use serde::Deserialize;

/// The AMQP header carrying the W3C `traceparent` of the span that published a message.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// How to reach the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Protocol {
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    #[serde(rename = "grpc")]
    Grpc,
}

/// `[telemetry]` in either process's configuration. Every setting left out falls back to the
/// standard `OTEL_*` environment variable, then to OpenTelemetry's default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Export traces and metrics over OTLP. Left out: on when `OTEL_EXPORTER_OTLP_ENDPOINT`
    /// (or the traces one) is set. `OTEL_SDK_DISABLED=true` turns it off either way.
    pub enabled: Option<bool>,
    /// The collector's base URL (`http://collector:4318` for HTTP, `http://collector:4317` for
    /// gRPC); the HTTP paths `/v1/traces` and `/v1/metrics` are added. Else
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`, else localhost.
    pub endpoint: Option<String>,
    /// `http/protobuf` (the default) or `grpc`. Else `OTEL_EXPORTER_OTLP_PROTOCOL`.
    pub protocol: Option<Protocol>,
    /// The `service.name` resource attribute. Else `OTEL_SERVICE_NAME`, else
    /// `slimci-coordinator` or `slimci-agent`.
    pub service_name: Option<String>,
    /// How often metrics are exported (coordinator). Else `OTEL_METRIC_EXPORT_INTERVAL`
    /// (milliseconds), else 60 s.
    pub metrics_interval_secs: Option<u64>,
    /// Coordinator only: also serve `/metrics` without a token on this address (for a
    /// Prometheus that cannot hold the API token; bind it to a private interface).
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot build the OTLP {signal} exporter: {source}")]
    Exporter {
        signal: &'static str,
        source: opentelemetry_otlp::ExporterBuildError,
    },
    #[error(
        "unknown OTEL_EXPORTER_OTLP_PROTOCOL `{0}`: use `http/protobuf` or `grpc` (set `protocol` in [telemetry] to override)"
    )]
    Protocol(String),
}

impl TelemetryConfig {
    /// Whether export is on, by the configuration and then the environment.
    pub fn export_enabled(&self) -> bool {
        let env = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
        if env("OTEL_SDK_DISABLED").is_some_and(|value| value.eq_ignore_ascii_case("true")) {
            return false;
        }
        self.enabled.unwrap_or_else(|| {
            env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
                || env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
        })
    }

    fn protocol(&self) -> Result<Protocol, TelemetryError> {
        if let Some(protocol) = self.protocol {
            return Ok(protocol);
        }
        match std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").ok().as_deref() {
            None | Some("" | "http/protobuf") => Ok(Protocol::HttpProtobuf),
            Some("grpc") => Ok(Protocol::Grpc),
            Some(other) => Err(TelemetryError::Protocol(other.to_owned())),
        }
    }
}

/// Builds one signal's OTLP exporter (`builder`: `SpanExporter::builder()` or
/// `MetricExporter::builder()`) for `protocol`, at `url` when one is configured, else where the
/// `OTEL_*` variables or the default say. A macro because the two builders share the methods
/// but no trait that has them.
macro_rules! otlp_exporter {
    ($builder:expr, $protocol:expr, $url:expr) => {
        match ($protocol, $url) {
            (Protocol::HttpProtobuf, url) => {
                let http = $builder
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
                match url {
                    Some(url) => http.with_endpoint(url).build(),
                    None => http.build(),
                }
            }
            (Protocol::Grpc, Some(url)) => $builder.with_tonic().with_endpoint(url).build(),
            (Protocol::Grpc, None) => $builder.with_tonic().build(),
        }
    };
}

/// What is exported, for the rest of the process: a tracer and a meter when on, nothing when
/// off.
#[derive(Default)]
pub struct Telemetry {
    tracer: Option<SdkTracer>,
    tracer_provider: Option<SdkTracerProvider>,
    meter_provider: Option<SdkMeterProvider>,
}

impl Telemetry {
    /// Nothing exported, nothing spent.
    pub fn off() -> Telemetry {
        Telemetry::default()
    }

    /// Starts the exporters `config` asks for (none when export is off). Call it inside the
    /// tokio runtime: the gRPC exporter's connection lives there. Spans and metrics are sent
    /// from OpenTelemetry's own threads, batched, so a slow collector never slows a build.
    pub fn start(
        config: &TelemetryConfig,
        default_service: &str,
    ) -> Result<Telemetry, TelemetryError> {
        if !config.export_enabled() {
            return Ok(Telemetry::off());
        }
        let protocol = config.protocol()?;
        let service_name = config
            .service_name
            .clone()
            .or_else(|| {
                std::env::var("OTEL_SERVICE_NAME")
                    .ok()
                    .filter(|name| !name.is_empty())
            })
            .unwrap_or_else(|| default_service.to_owned());
        let resource = Resource::builder()
            .with_service_name(service_name.clone())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let env_off = |name: &str| std::env::var(name).is_ok_and(|value| value == "none");
        let endpoint = |path: &str| {
            config.endpoint.as_ref().map(|base| match protocol {
                Protocol::HttpProtobuf => format!("{}{path}", base.trim_end_matches('/')),
                Protocol::Grpc => base.clone(),
            })
        };

        let (tracer, tracer_provider) = if env_off("OTEL_TRACES_EXPORTER") {
            (None, None)
        } else {
            let exporter = otlp_exporter!(
                opentelemetry_otlp::SpanExporter::builder(),
                protocol,
                endpoint("/v1/traces")
            )
            .map_err(|source| TelemetryError::Exporter {
                signal: "traces",
                source,
            })?;
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource.clone())
                .build();
            use opentelemetry::trace::TracerProvider as _;
            (Some(provider.tracer("slimci")), Some(provider))
        };

        let meter_provider = if env_off("OTEL_METRICS_EXPORTER") {
            None
        } else {
            let exporter = otlp_exporter!(
                opentelemetry_otlp::MetricExporter::builder(),
                protocol,
                endpoint("/v1/metrics")
            )
            .map_err(|source| TelemetryError::Exporter {
                signal: "metrics",
                source,
            })?;
            let mut reader = PeriodicReader::builder(exporter);
            if let Some(secs) = config.metrics_interval_secs {
                reader = reader.with_interval(Duration::from_secs(secs.max(1)));
            }
            Some(
                SdkMeterProvider::builder()
                    .with_reader(reader.build())
                    .with_resource(resource)
                    .build(),
            )
        };
        tracing::info!(
            service = %service_name,
            ?protocol,
            endpoint = config.endpoint.as_deref().unwrap_or("(from OTEL_* or the default)"),
            traces = tracer.is_some(),
            metrics = meter_provider.is_some(),
            "exporting telemetry over OTLP"
        );
        Ok(Telemetry {
            tracer,
            tracer_provider,
            meter_provider,
        })
    }

    /// The tracer, when traces are exported.
    pub fn tracer(&self) -> Option<&SdkTracer> {
        self.tracer.as_ref()
    }

    /// A meter, when metrics are exported.
    pub fn meter(&self) -> Option<opentelemetry::metrics::Meter> {
        use opentelemetry::metrics::MeterProvider as _;
        self.meter_provider
            .as_ref()
            .map(|provider| provider.meter("slimci"))
    }

    /// Sends what is still buffered and stops the exporters (blocking: call it off the async
    /// threads, e.g. in `spawn_blocking`).
    pub fn shutdown(&self) {
        if let Some(provider) = &self.tracer_provider
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "could not flush the last spans");
        }
        if let Some(provider) = &self.meter_provider
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "could not flush the last metrics");
        }
    }
}

/// A span's identity as W3C trace context carries it (`traceparent`: version 00).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub sampled: bool,
}

impl TraceParent {
    /// A new trace's root: fresh random ids.
    pub fn new_root() -> TraceParent {
        use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};
        let ids = RandomIdGenerator::default();
        TraceParent {
            trace_id: ids.new_trace_id(),
            span_id: ids.new_span_id(),
            sampled: true,
        }
    }

    /// `00-<trace id>-<span id>-<flags>`.
    pub fn to_header(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            self.trace_id,
            self.span_id,
            u8::from(self.sampled)
        )
    }

    /// Reads a `traceparent` value; `None` for anything that is not version 00 with non-zero
    /// ids (a message from elsewhere just starts no child span).
    pub fn parse(text: &str) -> Option<TraceParent> {
        let mut parts = text.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if version != "00"
            || parts.next().is_some()
            || trace.len() != 32
            || span.len() != 16
            || flags.len() != 2
        {
            return None;
        }
        let trace_id = TraceId::from_hex(trace).ok()?;
        let span_id = SpanId::from_hex(span).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
            return None;
        }
        Some(TraceParent {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// A context whose parent is this span, in another process or another time.
    pub fn context(&self) -> Context {
        let flags = if self.sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        Context::new().with_remote_span_context(SpanContext::new(
            self.trace_id,
            self.span_id,
            flags,
            true,
            TraceState::default(),
        ))
    }

    /// The identity of a span that was started.
    pub fn of(context: &SpanContext) -> TraceParent {
        TraceParent {
            trace_id: context.trace_id(),
            span_id: context.span_id(),
            sampled: context.is_sampled(),
        }
    }
}

/// Adds `traceparent` to a message's headers.
pub fn inject(headers: &mut FieldTable, parent: &TraceParent) {
    headers.insert(
        TRACEPARENT_HEADER.into(),
        AMQPValue::LongString(parent.to_header().as_str().into()),
    );
}

/// The `traceparent` a message carries, if any.
pub fn extract(headers: Option<&FieldTable>) -> Option<TraceParent> {
    let value = headers?.inner().get(TRACEPARENT_HEADER)?;
    let text = match value {
        AMQPValue::LongString(text) => text.to_string(),
        AMQPValue::ShortString(text) => text.as_str().to_owned(),
        _ => return None,
    };
    TraceParent::parse(&text)
}

/// A span whose times are known: it is started at `start` and ended at `end` at once. Used
/// for what happened before it could be recorded (a queue wait, a phase, a dbt node). Returns
/// the span's identity, for children.
pub struct Finished<'a> {
    pub name: String,
    pub kind: SpanKind,
    pub parent: &'a Context,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<KeyValue>,
    /// `Some(message)`: the span ended in error.
    pub error: Option<String>,
    /// Fixed ids (a run's root span, whose id was chosen when the run was made).
    pub ids: Option<TraceParent>,
}

impl Finished<'_> {
    pub fn emit(self, tracer: &SdkTracer) -> TraceParent {
        let mut builder = tracer
            .span_builder(self.name)
            .with_kind(self.kind)
            .with_start_time(self.start)
            .with_attributes(self.attributes);
        if let Some(ids) = self.ids {
            builder = builder
                .with_trace_id(ids.trace_id)
                .with_span_id(ids.span_id);
        }
        let mut span = builder.start_with_context(tracer, self.parent);
        if let Some(message) = self.error {
            span.set_status(Status::error(message));
        }
        let identity = TraceParent::of(span.span_context());
        span.end_with_timestamp(self.end.max(self.start));
        identity
    }
}

/// Milliseconds since the epoch (the store's and the events' clock) as a `SystemTime`.
pub fn time_from_ms(ms: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// A chrono time as a `SystemTime`.
pub fn time_from(at: chrono::DateTime<chrono::Utc>) -> SystemTime {
    time_from_ms(at.timestamp_millis())
        + Duration::from_micros(u64::from(at.timestamp_subsec_micros() % 1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_refuses_garbage() {
        let parent = TraceParent::new_root();
        let header = parent.to_header();
        assert_eq!(header.len(), 55, "{header}");
        assert_eq!(TraceParent::parse(&header), Some(parent));
        let known = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parsed = TraceParent::parse(known).unwrap();
        assert_eq!(
            parsed.trace_id.to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(parsed.span_id.to_string(), "00f067aa0ba902b7");
        assert!(parsed.sampled);
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e473x-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn amqp_headers_carry_the_traceparent() {
        let parent = TraceParent::new_root();
        let mut headers = FieldTable::default();
        inject(&mut headers, &parent);
        assert_eq!(extract(Some(&headers)), Some(parent));
        assert_eq!(extract(None), None);
        assert_eq!(extract(Some(&FieldTable::default())), None);
    }

    #[test]
    fn off_is_off() {
        let config = TelemetryConfig {
            enabled: Some(false),
            ..TelemetryConfig::default()
        };
        assert!(!config.export_enabled());
        let telemetry = Telemetry::start(&config, "slimci-test").unwrap();
        assert!(telemetry.tracer().is_none());
        assert!(telemetry.meter().is_none());
    }
}
