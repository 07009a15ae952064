//! Logs and traces: the one `tracing` subscriber every `cloudai` command runs under.
//!
//! Events go to standard error as text or as JSON lines (`--log-format json`, with the fields
//! of the spans they happen in, so that a log pipeline can group lines by `task_id`). Built
//! with the `otlp` feature, spans are also exported over OTLP/HTTP (protobuf) to a collector
//! (`--otlp-endpoint`): the task lifecycle spans (`submit`, `admit`, `place`, `execute`,
//! `pull`, `start`, `run`, `report`, `finish`, `requeue`) carry `task_id`, `worker_id` and,
//! where a policy decides, `policy`.

use anyhow::Context;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

/// How to set up logging and tracing.
#[derive(Debug, Clone, Default)]
pub struct TelemetryConfig {
    /// JSON lines instead of text.
    pub json: bool,
    /// Base URL of an OTLP/HTTP collector (`http://collector:4318`); spans go to
    /// `<url>/v1/traces`. Needs the `otlp` feature.
    pub otlp_endpoint: Option<String>,
}

/// A layer of the subscriber.
type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

#[cfg(feature = "otlp")]
type Provider = opentelemetry_sdk::trace::SdkTracerProvider;
/// Without the `otlp` feature there is never a span exporter.
#[cfg(not(feature = "otlp"))]
type Provider = std::convert::Infallible;

/// Keeps the exporter alive; [`Telemetry::shutdown`] sends the spans still buffered.
#[must_use = "dropping it without shutdown loses the spans still buffered"]
pub struct Telemetry {
    provider: Option<Provider>,
}

impl Telemetry {
    /// Flushes and stops the span exporter. Call it outside the async runtime: the exporter
    /// blocks on its last export.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            shutdown(provider);
        }
    }
}

/// Installs the global subscriber: `RUST_LOG` filters (default `info`), events on standard
/// error, spans to the collector when one is configured.
pub fn init(config: &TelemetryConfig) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let format = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let format: BoxedLayer = if config.json {
        format.json().boxed()
    } else {
        format.boxed()
    };
    let (export, provider) = match &config.otlp_endpoint {
        Some(endpoint) => {
            let (layer, provider) = exporter(endpoint)?;
            (Some(layer), Some(provider))
        }
        None => (None, None),
    };
    let layers: Vec<BoxedLayer> = std::iter::once(format).chain(export).collect();
    tracing_subscriber::registry()
        .with(layers.with_filter(filter))
        .try_init()
        .context("installing the log subscriber")?;
    Ok(Telemetry { provider })
}

#[cfg(feature = "otlp")]
fn exporter(endpoint: &str) -> anyhow::Result<(BoxedLayer, Provider)> {
    otlp::layer(endpoint)
}

#[cfg(not(feature = "otlp"))]
fn exporter(endpoint: &str) -> anyhow::Result<(BoxedLayer, Provider)> {
    anyhow::bail!(
        "--otlp-endpoint {endpoint}: this cloudai was built without OTLP export; \
         rebuild it with `cargo build --release -p cloudai --features otlp`"
    )
}

#[cfg(feature = "otlp")]
fn shutdown(provider: Provider) {
    if let Err(error) = provider.shutdown() {
        eprintln!("warning: the last spans were not exported: {error}");
    }
}

#[cfg(not(feature = "otlp"))]
fn shutdown(provider: Provider) {
    match provider {}
}

/// The URL spans are posted to: the OTLP/HTTP convention is a base URL to which the signal's
/// path is added, but a URL that already names `/v1/traces` is taken as it is.
pub fn traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_string()
    } else {
        format!("{base}/v1/traces")
    }
}

#[cfg(feature = "otlp")]
mod otlp {
    use std::time::Duration;

    use anyhow::Context;
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::Layer;

    /// A span exporter to `endpoint` and the layer that feeds it.
    pub(super) fn layer(endpoint: &str) -> anyhow::Result<(super::BoxedLayer, SdkTracerProvider)> {
        let url = super::traces_url(endpoint);
        let provider = provider(&url)?;
        let tracer = provider.tracer("cloudai");
        let layer = tracing_opentelemetry::layer().with_tracer(tracer).boxed();
        Ok((layer, provider))
    }

    /// Spans batched and posted as protobuf to `url` from the SDK's own thread, so that a
    /// slow collector never slows a request or a scheduling round.
    pub(super) fn provider(url: &str) -> anyhow::Result<SdkTracerProvider> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(url)
            .with_timeout(Duration::from_secs(5))
            .build()
            .with_context(|| format!("setting up the OTLP span exporter to {url}"))?;
        let resource = Resource::builder()
            .with_service_name(env!("CARGO_PKG_NAME"))
            .build();
        Ok(SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn the_traces_path_is_added_once() {
        assert_eq!(
            traces_url("http://127.0.0.1:4318"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://127.0.0.1:4318/"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://c:4318/v1/traces"),
            "http://c:4318/v1/traces"
        );
    }

    #[cfg(not(feature = "otlp"))]
    #[test]
    fn an_endpoint_without_the_feature_is_refused_with_how_to_get_it() {
        let config = TelemetryConfig {
            json: false,
            otlp_endpoint: Some("http://127.0.0.1:4318".into()),
        };
        let error = init(&config).err().map(|e| format!("{e:#}"));
        assert!(
            error
                .as_deref()
                .is_some_and(|e| e.contains("--features otlp")),
            "{error:?}"
        );
    }

    /// A real OTLP/HTTP receiver on loopback gets the span with its task and worker ids.
    #[cfg(feature = "otlp")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spans_reach_an_otlp_collector_with_their_ids() {
        use opentelemetry::trace::TracerProvider as _;
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use opentelemetry_proto::tonic::common::v1::any_value::Value;
        use prost::Message as _;

        let (posted_tx, mut posted) = tokio::sync::mpsc::unbounded_channel::<(String, Vec<u8>)>();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let content_type = headers
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    let _ = posted_tx.send((content_type, body.to_vec()));
                    async { "" }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });

        let url = traces_url(&format!("http://{address}"));
        let provider = otlp::provider(&url).unwrap();
        let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("cloudai"));
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("execute", task_id = "t-42", worker_id = "w-7");
            let _inside = span.enter();
            tracing::info!("container started");
        });
        // The exporter posts from its own thread with a blocking client.
        tokio::task::spawn_blocking(move || provider.force_flush())
            .await
            .unwrap()
            .unwrap();

        let (content_type, body) =
            tokio::time::timeout(std::time::Duration::from_secs(10), posted.recv())
                .await
                .unwrap()
                .unwrap();
        assert_eq!(content_type, "application/x-protobuf");
        let request = ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
        let spans: Vec<_> = request
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
            .collect();
        let span = spans
            .iter()
            .find(|s| s.name == "execute")
            .unwrap_or_else(|| panic!("no execute span in {spans:?}"));
        let attribute = |key: &str| {
            span.attributes
                .iter()
                .find(|a| a.key == key)
                .and_then(|a| a.value.as_ref())
                .and_then(|v| v.value.clone())
        };
        assert_eq!(
            attribute("task_id"),
            Some(Value::StringValue("t-42".into()))
        );
        assert_eq!(
            attribute("worker_id"),
            Some(Value::StringValue("w-7".into()))
        );
        assert!(
            span.events.iter().any(|e| e.name == "container started"),
            "the event inside the span is exported with it: {:?}",
            span.events
        );
    }
}
