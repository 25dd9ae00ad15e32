//! OTLP export of the call spans: each call's `call` span (call sid, stream sid, caller,
//! outcome) and its backends' `backend` spans go to an OpenTelemetry collector over OTLP/HTTP,
//! with the warnings logged inside them as span events. Off unless `log.otlp.endpoint` is set.

use std::collections::HashMap;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing::Subscriber;
use tracing_subscriber::filter::{filter_fn, FilterFn};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use crate::config::OtlpSettings;

/// A collector's answer is a small protobuf message; more than this is not read.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// The exporter, kept until the process ends: [`Exporter::shutdown`] sends what the batch
/// still holds, so the spans of the calls a drain waited for are not lost at exit.
pub struct Exporter {
    provider: SdkTracerProvider,
}

impl Exporter {
    /// The exporter for `settings`, sending through `runtime` (the service's own): the batch
    /// processor exports from a thread of its own, which has no runtime to run a client on.
    pub fn new(
        settings: &OtlpSettings,
        runtime: tokio::runtime::Handle,
    ) -> Result<Exporter, String> {
        let timeout = Duration::from_millis(settings.timeout_ms);
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| format!("cannot build the OTLP client: {e}"))?;
        let headers: HashMap<String, String> = settings
            .headers
            .iter()
            .map(|(name, value)| (name.clone(), value.expose().to_string()))
            .collect();
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(Client { client, runtime })
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(settings.endpoint.clone())
            .with_timeout(timeout)
            .with_headers(headers)
            .build()
            .map_err(|e| format!("log.otlp: {e}"))?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                Resource::builder()
                    .with_service_name(settings.service_name.clone())
                    .with_attribute(opentelemetry::KeyValue::new(
                        "service.version",
                        env!("CARGO_PKG_VERSION"),
                    ))
                    .build(),
            )
            .build();
        Ok(Exporter { provider })
    }

    /// The tracing layer that hands the call spans to this exporter.
    pub fn layer<S>(&self) -> impl Layer<S> + Send + Sync + 'static
    where
        S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
    {
        let tracer = self.provider.tracer("call-proxy");
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(exported())
    }

    /// Sends what is still batched and stops the exporter; at most the export timeout.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("call-proxy: OTLP export at exit: {e}");
        }
    }
}

/// What goes out: the call and backend spans of this crate, and inside them the events of
/// WARN and above. Decided on the metadata alone, so each callsite's answer is cached and the
/// audio path's debug events cost nothing more with the export on.
fn exported() -> FilterFn {
    filter_fn(|meta| {
        if meta.is_span() {
            meta.target().starts_with("call_proxy") && matches!(meta.name(), "call" | "backend")
        } else {
            *meta.level() <= tracing::Level::WARN
        }
    })
}

/// The service's reqwest client, run on the service's runtime: the OTLP exporter's thread
/// waits on the task, which any executor can.
#[derive(Debug)]
struct Client {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl HttpClient for Client {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let request = reqwest::Request::try_from(request)?;
        let client = self.client.clone();
        let task = self.runtime.spawn(async move {
            let mut answer = client.execute(request).await?;
            let mut response = Response::builder().status(answer.status());
            if let Some(headers) = response.headers_mut() {
                *headers = std::mem::take(answer.headers_mut());
            }
            let mut body = Vec::new();
            while let Some(chunk) = answer.chunk().await? {
                if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                    break;
                }
                body.extend_from_slice(&chunk);
            }
            Ok::<_, HttpError>(response.body(Bytes::from(body))?)
        });
        task.await?
    }
}
