//! synspan's own counters as OTLP metrics, next to the spans: what it saw, exported, and
//! dropped, by reason. Cumulative counters, read from the last accounting snapshot and sent
//! through the same client as the spans.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use opentelemetry_proto::tonic::{
    collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse},
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    metrics::v1::{
        AggregationTemporality, Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum, metric,
        number_data_point,
    },
    resource::v1::Resource,
};
use prost::Message as _;
use tokio::{sync::oneshot, task::JoinHandle, time::Instant};

use crate::{
    connect_metrics::ConnectMetrics,
    otlp::{
        Client,
        retry::{ExportError, with_retry},
        unix_nanos,
    },
    span::{key, scope},
    stats::Accounting,
};

/// The last accounting reading; the agent refreshes it, the export task reads it.
pub(crate) type Snapshot = Arc<Mutex<Accounting>>;

pub(crate) struct SelfMetrics {
    task: JoinHandle<()>,
    /// Asks for a last reading, to be sent by the deadline given.
    stop: oneshot::Sender<Instant>,
}

impl SelfMetrics {
    /// Sends a reading every `interval`, the first one an interval from now, with the
    /// connect metrics when they are on.
    pub(crate) fn start(
        client: Client,
        host_name: &str,
        interval: Duration,
        snapshot: Snapshot,
        connect: Option<ConnectMetrics>,
    ) -> Self {
        let mut requests = MetricsRequests::new(host_name);
        requests.connect = connect;
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(export_loop(client, requests, interval, snapshot, stopped));
        Self { task, stop }
    }

    /// Sends a last reading, waiting at most `timeout`.
    pub(crate) async fn shutdown(self, timeout: Duration) {
        let Self { mut task, stop } = self;
        let deadline = Instant::now() + timeout;
        if stop.send(deadline).is_err() {
            return;
        }
        if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
            task.abort();
            tracing::warn!("self-metrics were not flushed within the shutdown timeout");
        }
    }
}

async fn export_loop(
    client: Client,
    requests: MetricsRequests,
    interval: Duration,
    snapshot: Snapshot,
    mut stopped: oneshot::Receiver<Instant>,
) {
    let read = || *snapshot.lock().unwrap_or_else(|e| e.into_inner());
    let mut tick = tokio::time::interval_at(Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut failing = false;
    // A reading is cumulative: one that cannot be sent before the next is due is superseded
    // by it, so its retries end there. A stop cuts them short: the last reading goes out
    // instead.
    let stop = loop {
        tokio::select! {
            _ = tick.tick() => {
                let deadline = Instant::now() + interval;
                tokio::select! {
                    result = send(client.clone(), requests.request(&read()), deadline) => {
                        failing = report(result, failing);
                    }
                    stop = &mut stopped => break stop,
                }
            }
            stop = &mut stopped => break stop,
        }
    };
    // An error: `SelfMetrics` went away without asking for a last reading.
    if let Ok(deadline) = stop {
        report(send(client, requests.request(&read()), deadline).await, failing);
    }
}

/// Spans report their own export failures; these only when they start and end, so that a
/// wrong metrics endpoint is seen without a line per interval. Returns whether it failed.
fn report(result: Result<(), ExportError>, failing: bool) -> bool {
    match &result {
        Ok(()) if failing => tracing::info!("self-metrics export works again"),
        Err(err) if !failing => tracing::warn!("self-metrics export failed: {err}"),
        _ => {}
    }
    result.is_err()
}

async fn send(client: Client, request: Bytes, deadline: Instant) -> Result<(), ExportError> {
    let response = with_retry(deadline, || {
        let mut client = client.clone();
        let request = request.clone();
        async move { client.export::<ExportMetricsServiceResponse>(request).await }
    })
    .await?;
    if let Some(p) = response.partial_success.filter(|p| p.rejected_data_points > 0) {
        tracing::warn!(
            rejected = p.rejected_data_points,
            "the collector rejected part of the self-metrics: {}",
            p.error_message
        );
    }
    Ok(())
}

/// Builds `ExportMetricsServiceRequest`s: synspan's resource and scope, and one metric per
/// counter, every data point counted from when synspan started.
struct MetricsRequests {
    resource: Resource,
    scope: InstrumentationScope,
    start_time_unix_nano: u64,
    connect: Option<ConnectMetrics>,
}

pub(crate) fn string_attribute(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

/// A monotonic counter counted from when synspan started (or its series did).
pub(crate) fn cumulative_counter(
    name: &str,
    unit: &str,
    description: &str,
    data_points: Vec<NumberDataPoint>,
) -> Metric {
    Metric {
        name: name.into(),
        description: description.into(),
        unit: unit.into(),
        data: Some(metric::Data::Sum(Sum {
            data_points,
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
            is_monotonic: true,
        })),
        ..Default::default()
    }
}

impl MetricsRequests {
    fn new(host_name: &str) -> Self {
        let scope = scope();
        Self {
            resource: Resource {
                attributes: vec![
                    string_attribute(key::SERVICE_NAME, "synspan"),
                    string_attribute(key::HOST_NAME, host_name),
                ],
                ..Default::default()
            },
            scope: InstrumentationScope {
                name: scope.name().into(),
                version: scope.version().unwrap_or_default().into(),
                ..Default::default()
            },
            start_time_unix_nano: unix_nanos(SystemTime::now()),
            connect: None,
        }
    }

    fn request(&self, a: &Accounting) -> Bytes {
        let now = unix_nanos(SystemTime::now());
        let point = |value: u64, attributes: Vec<KeyValue>| NumberDataPoint {
            attributes,
            start_time_unix_nano: self.start_time_unix_nano,
            time_unix_nano: now,
            value: Some(number_data_point::Value::AsInt(
                i64::try_from(value).unwrap_or(i64::MAX),
            )),
            ..Default::default()
        };
        let counter = |name: &str, description: &str, data_points| {
            cumulative_counter(name, "", description, data_points)
        };
        let metrics = vec![
            counter(
                "synspan.attempts.seen",
                "TCP connect attempts that entered SYN_SENT while synspan ran",
                vec![point(a.seen(), vec![])],
            ),
            counter(
                "synspan.attempts.exported",
                "Attempts delivered to the collector",
                vec![point(a.exported, vec![])],
            ),
            counter(
                "synspan.attempts.dropped",
                "Attempts that will not be exported, by reason",
                a.drops()
                    .into_iter()
                    .map(|(reason, n)| point(n, vec![string_attribute("synspan.drop.reason", reason)]))
                    .collect(),
            ),
            counter(
                "synspan.packet_drops",
                "TCP handshake packets the kernel dropped while attempts were in flight, by \
                 whether they belonged to one",
                [
                    ("matched", a.kernel.packet_drops_matched),
                    ("unmatched", a.kernel.packet_drops_unmatched),
                ]
                .into_iter()
                .map(|(attribution, n)| {
                    point(
                        n,
                        vec![string_attribute("synspan.packet_drop.attribution", attribution)],
                    )
                })
                .collect(),
            ),
            Metric {
                name: "synspan.attempts.in_flight".into(),
                description: "Attempts waiting in SYN_SENT".into(),
                data: Some(metric::Data::Gauge(Gauge {
                    data_points: vec![point(a.in_flight, vec![])],
                })),
                ..Default::default()
            },
        ];
        let mut resource_metrics = vec![ResourceMetrics {
            resource: Some(self.resource.clone()),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(self.scope.clone()),
                metrics,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }];
        if let Some(connect) = &self.connect {
            resource_metrics.extend(connect.resource_metrics(&self.resource, &self.scope));
        }
        ExportMetricsServiceRequest { resource_metrics }
            .encode_to_vec()
            .into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_cumulative_metric_per_counter() {
        let a = Accounting {
            exported: 5,
            in_flight: 2,
            export_failed: 1,
            kernel: crate::loader::KernelCounters {
                packet_drops_unmatched: 3,
                ..Default::default()
            },
            ..Default::default()
        };
        let request =
            ExportMetricsServiceRequest::decode(MetricsRequests::new("node-7").request(&a)).unwrap();
        let resource = &request.resource_metrics[0];
        let attrs = &resource.resource.as_ref().unwrap().attributes;
        assert_eq!(attrs[0], string_attribute("service.name", "synspan"));
        assert_eq!(attrs[1], string_attribute("host.name", "node-7"));
        let scope = &resource.scope_metrics[0];
        assert_eq!(scope.scope.as_ref().unwrap().name, "synspan");
        let metric = |name: &str| scope.metrics.iter().find(|m| m.name == name).unwrap();
        let sum = |name: &str| match &metric(name).data {
            Some(metric::Data::Sum(sum)) => sum.clone(),
            other => panic!("{name}: {other:?}"),
        };
        let value = |p: &NumberDataPoint| match p.value {
            Some(number_data_point::Value::AsInt(v)) => v,
            other => panic!("{other:?}"),
        };
        let exported = sum("synspan.attempts.exported");
        assert!(exported.is_monotonic);
        assert_eq!(
            exported.aggregation_temporality,
            AggregationTemporality::Cumulative as i32
        );
        assert_eq!(value(&exported.data_points[0]), 5);
        let dropped = sum("synspan.attempts.dropped");
        assert_eq!(dropped.data_points.len(), a.drops().len());
        let failed = dropped
            .data_points
            .iter()
            .find(|p| p.attributes == [string_attribute("synspan.drop.reason", "export_failed")])
            .unwrap();
        assert_eq!(value(failed), 1);
        assert!(failed.start_time_unix_nano > 0 && failed.time_unix_nano >= failed.start_time_unix_nano);
        match &metric("synspan.attempts.in_flight").data {
            Some(metric::Data::Gauge(g)) => assert_eq!(value(&g.data_points[0]), 2),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            value(&sum("synspan.attempts.seen").data_points[0]),
            a.seen() as i64
        );
        let packet_drops = sum("synspan.packet_drops");
        let unmatched = packet_drops
            .data_points
            .iter()
            .find(|p| p.attributes == [string_attribute("synspan.packet_drop.attribution", "unmatched")])
            .unwrap();
        assert_eq!(value(unmatched), 3);
    }
}
