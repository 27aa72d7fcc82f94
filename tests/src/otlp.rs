//! An OTLP receiver inside the test, over HTTP (`OtlpReceiver::start`: `POST /v1/traces` and
//! `POST /v1/metrics` with protobuf bodies, the exporters' default) or gRPC
//! (`OtlpReceiver::start_grpc`: the collector's `TraceService` and `MetricsService` served by
//! tonic). Both fronts decode with `opentelemetry-proto` into the same record, kept for the test
//! to read, and answer as a collector does (an empty export response), so the processes under
//! test export exactly as they would to a real one.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;

/// One span as the receiver got it.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// The `service.name` of the process that sent it.
    pub service: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    /// OTLP's `SpanKind`: 1 internal, 2 server, 3 client, 4 producer, 5 consumer.
    pub kind: i32,
    pub start_ns: u64,
    pub end_ns: u64,
    /// Attributes as text.
    pub attributes: BTreeMap<String, String>,
    /// OTLP's status code: 0 unset, 1 ok, 2 error.
    pub status: i32,
}

pub const SPAN_KIND_SERVER: i32 = 2;
pub const SPAN_KIND_PRODUCER: i32 = 4;
pub const SPAN_KIND_CONSUMER: i32 = 5;

#[derive(Default)]
struct Received {
    spans: Vec<ReceivedSpan>,
    /// Metric names per service.
    metrics: Vec<(String, String)>,
    refused: Vec<String>,
}

/// The receiver, listening on 127.0.0.1 until dropped.
pub struct OtlpReceiver {
    /// `http://127.0.0.1:<port>`, the base URL exporters are given.
    pub url: String,
    received: Shared,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Shared = Arc<Mutex<Received>>;

impl OtlpReceiver {
    /// The OTLP/HTTP receiver (exporters' `http/protobuf`).
    pub async fn start() -> anyhow::Result<OtlpReceiver> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let received = Shared::default();
        let router = Router::new()
            .route("/v1/traces", post(http_traces))
            .route("/v1/metrics", post(http_metrics))
            .with_state(received.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(OtlpReceiver {
            url,
            received,
            task,
        })
    }

    /// The OTLP/gRPC receiver (exporters' `grpc`), on HTTP/2 without TLS like a collector's
    /// default port 4317.
    pub async fn start_grpc() -> anyhow::Result<OtlpReceiver> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let received = Shared::default();
        let collector = Collector(received.clone());
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .add_service(MetricsServiceServer::new(collector));
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let task = tokio::spawn(async move {
            let _ = server.serve_with_incoming(incoming).await;
        });
        Ok(OtlpReceiver {
            url,
            received,
            task,
        })
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.lock().spans.clone()
    }

    /// The names of the metrics `service` sent so far.
    pub fn metric_names(&self, service: &str) -> Vec<String> {
        self.lock()
            .metrics
            .iter()
            .filter(|(from, _)| from == service)
            .map(|(_, name)| name.clone())
            .collect()
    }

    /// Bodies the receiver could not decode (a test fails on any).
    pub fn refused(&self) -> Vec<String> {
        self.lock().refused.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Received> {
        lock(&self.received)
    }
}

fn protobuf(body: Vec<u8>) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        body,
    )
        .into_response()
}

fn text(value: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.and_then(|value| value.value.as_ref()) {
        Some(Value::StringValue(text)) => text.clone(),
        Some(Value::IntValue(number)) => number.to_string(),
        Some(Value::BoolValue(flag)) => flag.to_string(),
        Some(Value::DoubleValue(number)) => number.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn service_of(resource: Option<&opentelemetry_proto::tonic::resource::v1::Resource>) -> String {
    resource
        .and_then(|resource| {
            resource
                .attributes
                .iter()
                .find(|attribute| attribute.key == "service.name")
        })
        .map(|attribute| text(attribute.value.as_ref()))
        .unwrap_or_default()
}

impl Received {
    fn record_traces(&mut self, request: ExportTraceServiceRequest) {
        for resource_spans in request.resource_spans {
            let service = service_of(resource_spans.resource.as_ref());
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    self.spans.push(ReceivedSpan {
                        service: service.clone(),
                        trace_id: hex::encode(&span.trace_id),
                        span_id: hex::encode(&span.span_id),
                        parent_span_id: hex::encode(&span.parent_span_id),
                        name: span.name,
                        kind: span.kind,
                        start_ns: span.start_time_unix_nano,
                        end_ns: span.end_time_unix_nano,
                        attributes: span
                            .attributes
                            .iter()
                            .map(|attribute| {
                                (attribute.key.clone(), text(attribute.value.as_ref()))
                            })
                            .collect(),
                        status: span.status.map_or(0, |status| status.code),
                    });
                }
            }
        }
    }

    fn record_metrics(&mut self, request: ExportMetricsServiceRequest) {
        for resource_metrics in request.resource_metrics {
            let service = service_of(resource_metrics.resource.as_ref());
            for scope in resource_metrics.scope_metrics {
                for metric in scope.metrics {
                    self.metrics.push((service.clone(), metric.name));
                }
            }
        }
    }
}

/// An HTTP body decoded as `T`; one that is not is noted as refused (the caller answers 400).
fn decode_body<T: Message + Default>(received: &Shared, signal: &str, body: Bytes) -> Option<T> {
    T::decode(body)
        .map_err(|error| lock(received).refused.push(format!("{signal}: {error}")))
        .ok()
}

async fn http_traces(State(received): State<Shared>, body: Bytes) -> Response {
    let Some(request) = decode_body(&received, "traces", body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    lock(&received).record_traces(request);
    protobuf(ExportTraceServiceResponse::default().encode_to_vec())
}

async fn http_metrics(State(received): State<Shared>, body: Bytes) -> Response {
    let Some(request) = decode_body(&received, "metrics", body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    lock(&received).record_metrics(request);
    protobuf(ExportMetricsServiceResponse::default().encode_to_vec())
}

fn lock(received: &Shared) -> std::sync::MutexGuard<'_, Received> {
    received.lock().expect("receiver lock")
}

/// The gRPC services; tonic has decoded the request already (one it cannot decode never
/// reaches them, and the exporter sees the error).
#[derive(Clone)]
struct Collector(Shared);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        lock(&self.0).record_traces(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        lock(&self.0).record_metrics(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}
