//! synspan's own counters as OTLP metrics, next to the spans: what it saw, exported, and
//! dropped, by reason. Cumulative counters, read from the last accounting snapshot.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use opentelemetry::{KeyValue, metrics::MeterProvider as _};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::{
    Resource,
    metrics::{PeriodicReader, SdkMeterProvider},
};

use crate::{
    config::redacted,
    sink::{otlp::tls_config, tls::TlsMaterial},
    span::key,
    stats::Accounting,
};

/// The last accounting reading; the agent refreshes it, the exporter thread reads it.
pub type Snapshot = Arc<Mutex<Accounting>>;

pub struct SelfMetrics {
    provider: SdkMeterProvider,
}

/// (reason, count) for every way an attempt can be dropped.
fn drops(a: &Accounting) -> [(&'static str, u64); 10] {
    [
        ("filtered", a.filtered()),
        ("ringbuf_full", a.kernel.ringbuf_full),
        ("evicted", a.evicted()),
        ("replaced", a.kernel.replaced),
        ("track_failed", a.kernel.track_failed),
        ("undecodable", a.undecodable),
        ("enrich_queue_full", a.enrich_queue_full),
        ("export_queue_full", a.export_queue_full),
        ("export_failed", a.export_failed),
        ("unflushed", a.unflushed),
    ]
}

impl SelfMetrics {
    pub fn start(
        endpoint: &http::Uri,
        tls: &TlsMaterial,
        host_name: &str,
        interval: Duration,
        snapshot: Snapshot,
    ) -> Result<Self, opentelemetry_otlp::ExporterBuildError> {
        let url = endpoint.to_string();
        let mut builder = opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .with_endpoint(url.trim_end_matches('/'));
        if endpoint.scheme_str() == Some("https") {
            builder = builder.with_tls_config(tls_config(endpoint, tls));
        }
        let exporter = builder.build()?;
        let reader = PeriodicReader::builder(exporter).with_interval(interval).build();
        let provider = SdkMeterProvider::builder()
            .with_reader(reader)
            .with_resource(
                Resource::builder_empty()
                    .with_attributes([
                        KeyValue::new(key::SERVICE_NAME, "synspan"),
                        KeyValue::new(key::HOST_NAME, host_name.to_string()),
                    ])
                    .build(),
            )
            .build();
        let meter = provider.meter("synspan");
        let read = move || *snapshot.lock().unwrap_or_else(|e| e.into_inner());
        let r = read.clone();
        meter
            .u64_observable_counter("synspan.attempts.seen")
            .with_description("TCP connect attempts that entered SYN_SENT while synspan ran")
            .with_callback(move |o| o.observe(r().seen(), &[]))
            .build();
        let r = read.clone();
        meter
            .u64_observable_counter("synspan.attempts.exported")
            .with_description("Attempts delivered to the collector")
            .with_callback(move |o| o.observe(r().exported, &[]))
            .build();
        let r = read.clone();
        meter
            .u64_observable_counter("synspan.attempts.dropped")
            .with_description("Attempts that will not be exported, by reason")
            .with_callback(move |o| {
                for (reason, n) in drops(&r()) {
                    o.observe(n, &[KeyValue::new("synspan.drop.reason", reason)]);
                }
            })
            .build();
        meter
            .u64_observable_gauge("synspan.attempts.in_flight")
            .with_description("Attempts waiting in SYN_SENT")
            .with_callback(move |o| o.observe(read().in_flight, &[]))
            .build();
        tracing::debug!("self-metrics every {interval:?} to {}", redacted(endpoint));
        Ok(Self { provider })
    }

    /// Sends a last reading. Blocks up to the exporter's timeout: call off the runtime.
    pub fn shutdown(self) {
        if let Err(err) = self.provider.shutdown() {
            tracing::debug!("self-metrics shutdown: {err}");
        }
    }
}
