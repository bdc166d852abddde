//! The denominator: every attempt the kernel saw finish, counted in the kernel per process,
//! destination and outcome (`CONNECT_SERIES`), folded here into one cumulative series per
//! traced service, destination and outcome, and exported beside the self-metrics with
//! exemplars that lead to the spans of attempts exported in the same interval.
//!
//! Three parties share a [`ConnectMetrics`]: the agent folds kernel readings into it, the
//! enrichment worker tells it which service a process is and which attempts became spans,
//! and the metrics export encodes it.

use std::{
    collections::HashMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    num::NonZeroUsize,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant, SystemTime},
};

use lru::LruCache;
use opentelemetry_proto::tonic::{
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    metrics::v1::{
        AggregationTemporality, Exemplar, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
        ResourceMetrics, ScopeMetrics, exemplar, metric, number_data_point,
    },
    resource::v1::Resource,
};
use synspan_shared::{AF_INET, DURATION_BOUNDS_NS, SeriesKey, SeriesValue, outcome};

use crate::{
    loader::SeriesReading,
    otlp::unix_nanos,
    outcome::Outcome,
    self_metrics::{cumulative_counter, string_attribute},
    span::{ConnectSpan, key},
};

/// Instrument names, in the style of the semantic conventions.
pub(crate) mod name {
    pub(crate) const ATTEMPTS: &str = "synspan.connect.attempts";
    pub(crate) const DURATION: &str = "synspan.connect.duration";
    pub(crate) const SYN_RETRANSMITS: &str = "synspan.connect.syn_retransmits";
}

/// On the overflow series: the OpenTelemetry SDKs' attribute for what passed a cardinality
/// limit.
const OVERFLOW: &str = "otel.metric.overflow";

/// The service of a process the agent never managed to read (it exited before its note was
/// handled): the name the OpenTelemetry SDKs fall back to.
const UNKNOWN_SERVICE: &str = "unknown_service";

/// How long a series is kept after its last attempt, in metric intervals. Then it leaves the
/// kernel's map and, after one last export, the agent.
pub(crate) const QUIET_INTERVALS: u32 = 6;

/// Readings a kernel series of a process whose service is not known yet is held back for:
/// the enrichment worker reads the process when the kernel notes it, milliseconds after its
/// first attempt, so a reading just after that attempt would otherwise put it under
/// [`UNKNOWN_SERVICE`].
const UNRESOLVED_READINGS: u32 = 2;

/// Processes whose service is remembered; one that exited keeps its service as long as it
/// stays among these, so that its last attempts are exported under it.
const MAX_SERVICES: NonZeroUsize = NonZeroUsize::new(16384).unwrap();

/// Services whose resource is kept for the processes above to share.
const MAX_RESOURCES: NonZeroUsize = NonZeroUsize::new(4096).unwrap();

/// Who connected where, and how it ended: one exported series.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct SeriesId {
    /// The service's key (as spans group by it).
    service: Arc<str>,
    peer: IpAddr,
    port: u16,
    outcome: u8,
}

/// A service as its spans carry it.
#[derive(Clone, Debug)]
struct Service {
    key: Arc<str>,
    resource: Arc<Resource>,
}

#[derive(Debug)]
struct Series {
    resource: Arc<Resource>,
    total: SeriesValue,
    start_time_unix_nano: u64,
    last_change: Instant,
}

/// The last reading of one kernel series, to take the next one's difference from.
#[derive(Debug)]
struct KernelSeries {
    last: SeriesValue,
    last_change: Instant,
    unresolved: u32,
}

/// A span exported for a series in this interval.
#[derive(Clone, Copy, Debug)]
struct Recorded {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    duration_s: f64,
    time_unix_nano: u64,
    at: Instant,
}

#[derive(Debug)]
struct Book {
    series: HashMap<SeriesId, Series>,
    kernel: HashMap<SeriesKey, KernelSeries>,
    overflow: Vec<SeriesValue>,
    overflow_start_unix_nano: u64,
    services: LruCache<u32, Service>,
    /// Each service's resource, by its key, shared by its processes.
    resources: LruCache<Arc<str>, Arc<Resource>>,
    unknown: Arc<Resource>,
    exemplars: HashMap<SeriesId, Recorded>,
    max_series: usize,
    quiet_after: Duration,
    /// The last reading: nothing is held back any more.
    last_reading: bool,
}

/// The shared handle.
#[derive(Clone, Debug)]
pub(crate) struct ConnectMetrics(Arc<Mutex<Book>>);

fn int_value(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(value)),
        }),
        ..Default::default()
    }
}

/// An SDK resource as OTLP carries it.
fn proto_resource(resource: &opentelemetry_sdk::Resource) -> Resource {
    use opentelemetry::Value;
    let mut attributes: Vec<KeyValue> = resource
        .iter()
        .map(|(k, v)| {
            let value = match v {
                Value::Bool(b) => any_value::Value::BoolValue(*b),
                Value::I64(i) => any_value::Value::IntValue(*i),
                Value::F64(f) => any_value::Value::DoubleValue(*f),
                other => any_value::Value::StringValue(other.to_string()),
            };
            KeyValue {
                key: k.to_string(),
                value: Some(AnyValue { value: Some(value) }),
                ..Default::default()
            }
        })
        .collect();
    attributes.sort_by(|a, b| a.key.cmp(&b.key));
    Resource {
        attributes,
        ..Default::default()
    }
}

fn peer_of(key: &SeriesKey) -> IpAddr {
    if key.family == AF_INET {
        let [a, b, c, d, ..] = key.daddr;
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    } else {
        IpAddr::V6(Ipv6Addr::from(key.daddr))
    }
}

/// `later − earlier`, field by field: what the kernel counted between two readings.
fn difference(later: &SeriesValue, earlier: &SeriesValue) -> SeriesValue {
    let mut d = SeriesValue {
        attempts: later.attempts.wrapping_sub(earlier.attempts),
        syn_retransmits: later.syn_retransmits.wrapping_sub(earlier.syn_retransmits),
        duration_ns: later.duration_ns.wrapping_sub(earlier.duration_ns),
        ..SeriesValue::ZERO
    };
    for ((d, l), e) in d.buckets.iter_mut().zip(later.buckets).zip(earlier.buckets) {
        *d = l.wrapping_sub(e);
    }
    d
}

fn add(total: &mut SeriesValue, delta: &SeriesValue) {
    total.attempts = total.attempts.wrapping_add(delta.attempts);
    total.syn_retransmits = total.syn_retransmits.wrapping_add(delta.syn_retransmits);
    total.duration_ns = total.duration_ns.wrapping_add(delta.duration_ns);
    for (t, d) in total.buckets.iter_mut().zip(delta.buckets) {
        *t = t.wrapping_add(d);
    }
}

impl ConnectMetrics {
    /// `max_series`: the kernel's bound, which bounds what is kept here too. Series that saw
    /// no attempt for [`QUIET_INTERVALS`] of `interval` are forgotten.
    pub(crate) fn new(max_series: u32, interval: Duration, host_name: &str) -> Self {
        let interval = if interval.is_zero() {
            Duration::from_secs(10)
        } else {
            interval
        };
        let unknown = Resource {
            attributes: vec![
                string_attribute(key::HOST_NAME, host_name),
                string_attribute(key::SERVICE_NAME, UNKNOWN_SERVICE),
            ],
            ..Default::default()
        };
        Self(Arc::new(Mutex::new(Book {
            series: HashMap::new(),
            kernel: HashMap::new(),
            overflow: vec![SeriesValue::ZERO; outcome::LEN as usize],
            overflow_start_unix_nano: unix_nanos(SystemTime::now()),
            services: LruCache::new(MAX_SERVICES),
            resources: LruCache::new(MAX_RESOURCES),
            unknown: Arc::new(unknown),
            exemplars: HashMap::new(),
            max_series: max_series as usize,
            quiet_after: interval * QUIET_INTERVALS,
            last_reading: false,
        })))
    }

    /// The programs are detached: the next reading is the last, and what is in it goes out
    /// under whatever service is known by then.
    pub(crate) fn last_reading(&self) {
        self.book().last_reading = true;
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The service of process `pid`, as its spans carry it.
    pub(crate) fn service(&self, pid: u32, key: Arc<str>, resource: &opentelemetry_sdk::Resource) {
        let mut book = self.book();
        if book.services.peek(&pid).is_some_and(|s| s.key == key) {
            book.services.promote(&pid);
            return;
        }
        // Processes of one service share its resource: a host's churn of short-lived
        // processes would otherwise hold a copy per process (about 5 MiB in the churn soak).
        let resource = match book.resources.get(&key) {
            Some(shared) => shared.clone(),
            None => {
                let made = Arc::new(proto_resource(resource));
                book.resources.put(key.clone(), made.clone());
                made
            }
        };
        book.services.put(pid, Service { key, resource });
    }

    /// An attempt became a span: its series gets it as an exemplar.
    pub(crate) fn exported(&self, span: &ConnectSpan) {
        let a = &span.attempt;
        let id = SeriesId {
            service: span.service.clone(),
            peer: a.peer.ip(),
            port: a.peer.port(),
            outcome: a.outcome as u8,
        };
        let recorded = Recorded {
            trace_id: span.trace_id.to_bytes(),
            span_id: span.span_id.to_bytes(),
            duration_s: a.end.duration_since(a.start).unwrap_or_default().as_secs_f64(),
            time_unix_nano: unix_nanos(a.end),
            at: Instant::now(),
        };
        let mut book = self.book();
        if book.exemplars.len() < book.max_series || book.exemplars.contains_key(&id) {
            book.exemplars.insert(id, recorded);
        }
        drop(book);
        self.service(a.pid, span.service.clone(), &span.resource);
    }

    /// Folds a reading of the kernel's series in; takes series that went quiet out of the
    /// kernel with `forget`, which returns what they had counted by then.
    pub(crate) fn fold(
        &self,
        reading: SeriesReading,
        mut forget: impl FnMut(&SeriesKey) -> Option<SeriesValue>,
    ) {
        let now = Instant::now();
        let start = unix_nanos(SystemTime::now());
        let mut book = self.book();
        let book = &mut *book;
        let mut present = std::collections::HashSet::with_capacity(reading.series.len());
        for (key, value) in reading.series {
            present.insert(key);
            let seen = book.kernel.entry(key).or_insert(KernelSeries {
                last: SeriesValue::ZERO,
                last_change: now,
                unresolved: 0,
            });
            let service = book.services.get(&key.pid).cloned();
            if service.is_none() && seen.unresolved < UNRESOLVED_READINGS && !book.last_reading {
                seen.unresolved += 1;
                continue;
            }
            let mut delta = difference(&value, &seen.last);
            seen.last = value;
            if delta.attempts != 0 {
                seen.last_change = now;
            } else if now.duration_since(seen.last_change) >= book.quiet_after {
                // What was counted since this reading goes out with it.
                if let Some(last) = forget(&key) {
                    delta = difference(&last, &value);
                }
                book.kernel.remove(&key);
                present.remove(&key);
            }
            if delta.attempts == 0 {
                continue;
            }
            let (service, resource) = match service {
                Some(s) => (s.key, s.resource),
                None => (Arc::from(UNKNOWN_SERVICE), book.unknown.clone()),
            };
            let id = SeriesId {
                service,
                peer: peer_of(&key),
                port: key.dport,
                outcome: key.outcome,
            };
            let series = book.series.entry(id).or_insert_with(|| Series {
                resource,
                total: SeriesValue::ZERO,
                start_time_unix_nano: start,
                last_change: now,
            });
            add(&mut series.total, &delta);
            series.last_change = now;
        }
        // Gone from the kernel without us (or never to be seen again): stop taking
        // differences from it.
        book.kernel.retain(|key, _| present.contains(key));
        let quiet_after = book.quiet_after;
        // One more interval than the kernel's: the last counts go out at least once.
        book.series
            .retain(|_, s| now.duration_since(s.last_change) < quiet_after + quiet_after / QUIET_INTERVALS);
        book.exemplars
            .retain(|_, r| now.duration_since(r.at) < quiet_after);
        if reading.overflow.len() == book.overflow.len() {
            book.overflow = reading.overflow;
        }
    }

    /// One line for `--stats-interval`: the destinations with the most attempts, and their
    /// failures.
    pub(crate) fn busiest(&self, n: usize) -> String {
        let book = self.book();
        let mut by_destination: HashMap<(IpAddr, u16), (u64, u64)> = HashMap::new();
        for (id, s) in &book.series {
            let entry = by_destination.entry((id.peer, id.port)).or_default();
            entry.0 += s.total.attempts;
            if id.outcome != outcome::ESTABLISHED {
                entry.1 += s.total.attempts;
            }
        }
        let mut busiest: Vec<_> = by_destination.into_iter().collect();
        busiest.sort_by(|a, b| b.1.0.cmp(&a.1.0).then(a.0.cmp(&b.0)));
        let mut line = String::new();
        for ((peer, port), (attempts, failed)) in busiest.iter().take(n) {
            if !line.is_empty() {
                line.push_str(", ");
            }
            let peer = std::net::SocketAddr::new(*peer, *port);
            let _ = write!(line, "{peer} attempts={attempts} failed={failed}");
        }
        let overflow: u64 = book.overflow.iter().map(|v| v.attempts).sum();
        if overflow > 0 {
            let _ = write!(
                line,
                "{}overflow attempts={overflow}",
                if line.is_empty() { "" } else { ", " }
            );
        }
        if line.is_empty() {
            line.push_str("none yet");
        }
        line
    }

    /// The connect metrics, one resource per service, and the overflow series as metrics
    /// of synspan's own resource (`own`). Exemplars go out once.
    pub(crate) fn resource_metrics(
        &self,
        own: &Resource,
        scope: &InstrumentationScope,
    ) -> Vec<ResourceMetrics> {
        let now = unix_nanos(SystemTime::now());
        let mut book = self.book();
        let book = &mut *book;
        let mut by_service: HashMap<Arc<str>, (Arc<Resource>, Points)> = HashMap::new();
        let mut ids: Vec<&SeriesId> = book.series.keys().collect();
        ids.sort();
        for id in ids {
            let series = &book.series[id];
            let recorded = book.exemplars.remove(id);
            let (_, points) = by_service
                .entry(id.service.clone())
                .or_insert_with(|| (series.resource.clone(), Points::default()));
            points.push(
                destination_attributes(id),
                id.outcome,
                &series.total,
                series.start_time_unix_nano,
                now,
                recorded,
            );
        }
        let mut overflow = Points::default();
        for (code, total) in book.overflow.iter().enumerate() {
            if total.attempts == 0 {
                continue;
            }
            let attributes = vec![KeyValue {
                key: OVERFLOW.into(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::BoolValue(true)),
                }),
                ..Default::default()
            }];
            overflow.push(
                attributes,
                code as u8,
                total,
                book.overflow_start_unix_nano,
                now,
                None,
            );
        }
        let mut out: Vec<ResourceMetrics> = by_service
            .into_values()
            .map(|(resource, points)| points.resource_metrics((*resource).clone(), scope))
            .collect();
        if !overflow.is_empty() {
            out.push(overflow.resource_metrics(own.clone(), scope));
        }
        out
    }
}

fn destination_attributes(id: &SeriesId) -> Vec<KeyValue> {
    vec![
        string_attribute(key::SERVER_ADDRESS, &id.peer.to_string()),
        int_value(key::SERVER_PORT, i64::from(id.port)),
        string_attribute(key::NETWORK_TYPE, if id.peer.is_ipv4() { "ipv4" } else { "ipv6" }),
    ]
}

/// Data points of one resource's three metrics.
#[derive(Default)]
struct Points {
    attempts: Vec<NumberDataPoint>,
    retransmits: Vec<NumberDataPoint>,
    durations: Vec<HistogramDataPoint>,
}

fn int_point(
    value: u64,
    attributes: Vec<KeyValue>,
    start: u64,
    now: u64,
    exemplars: Vec<Exemplar>,
) -> NumberDataPoint {
    NumberDataPoint {
        attributes,
        start_time_unix_nano: start,
        time_unix_nano: now,
        value: Some(number_data_point::Value::AsInt(
            i64::try_from(value).unwrap_or(i64::MAX),
        )),
        exemplars,
        ..Default::default()
    }
}

impl Points {
    fn is_empty(&self) -> bool {
        self.attempts.is_empty()
    }

    fn push(
        &mut self,
        mut attributes: Vec<KeyValue>,
        code: u8,
        total: &SeriesValue,
        start: u64,
        now: u64,
        recorded: Option<Recorded>,
    ) {
        let outcome = Outcome::from_code(code);
        attributes.push(string_attribute(key::OUTCOME, outcome.as_str()));
        if outcome.is_failure() {
            attributes.push(string_attribute(key::ERROR_TYPE, outcome.as_str()));
        }
        let exemplar = |value: exemplar::Value| {
            recorded.map(|r| Exemplar {
                time_unix_nano: r.time_unix_nano,
                span_id: r.span_id.to_vec(),
                trace_id: r.trace_id.to_vec(),
                value: Some(value),
                ..Default::default()
            })
        };
        // Failures lead to their spans from the count too; successes only from the latency.
        let count_exemplars = if outcome.is_failure() {
            exemplar(exemplar::Value::AsInt(1)).into_iter().collect()
        } else {
            Vec::new()
        };
        self.attempts.push(int_point(
            total.attempts,
            attributes.clone(),
            start,
            now,
            count_exemplars,
        ));
        self.retransmits.push(int_point(
            total.syn_retransmits,
            attributes.clone(),
            start,
            now,
            Vec::new(),
        ));
        self.durations.push(HistogramDataPoint {
            attributes,
            start_time_unix_nano: start,
            time_unix_nano: now,
            count: total.attempts,
            sum: Some(total.duration_ns as f64 / 1e9),
            bucket_counts: total.buckets.to_vec(),
            explicit_bounds: DURATION_BOUNDS_NS.iter().map(|&ns| ns as f64 / 1e9).collect(),
            exemplars: recorded
                .and_then(|r| exemplar(exemplar::Value::AsDouble(r.duration_s)))
                .into_iter()
                .collect(),
            ..Default::default()
        });
    }

    fn resource_metrics(self, resource: Resource, scope: &InstrumentationScope) -> ResourceMetrics {
        let metrics = vec![
            cumulative_counter(
                name::ATTEMPTS,
                "{attempt}",
                "TCP connect attempts that finished, exported as spans or not",
                self.attempts,
            ),
            cumulative_counter(
                name::SYN_RETRANSMITS,
                "{retransmit}",
                "SYN retransmits of those attempts",
                self.retransmits,
            ),
            Metric {
                name: name::DURATION.into(),
                description: "How long the attempts stayed in SYN_SENT".into(),
                unit: "s".into(),
                data: Some(metric::Data::Histogram(Histogram {
                    data_points: self.durations,
                    aggregation_temporality: AggregationTemporality::Cumulative as i32,
                })),
                ..Default::default()
            },
        ];
        ResourceMetrics {
            resource: Some(resource),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(scope.clone()),
                metrics,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(pid: u32, outcome: u8) -> SeriesKey {
        SeriesKey {
            daddr: [127, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            pid,
            dport: 443,
            family: AF_INET,
            outcome,
            _pad: [0; 7],
        }
    }

    fn value(attempts: u64) -> SeriesValue {
        let mut v = SeriesValue {
            attempts,
            duration_ns: attempts * 1_000_000,
            ..SeriesValue::ZERO
        };
        v.buckets[3] = attempts;
        v
    }

    fn reading(series: Vec<(SeriesKey, SeriesValue)>) -> SeriesReading {
        SeriesReading {
            series,
            overflow: vec![SeriesValue::ZERO; outcome::LEN as usize],
        }
    }

    /// (service.name, attempts) of every `synspan.connect.attempts` point.
    fn attempts(metrics: &ConnectMetrics) -> Vec<(String, i64)> {
        let own = Resource::default();
        let mut out = Vec::new();
        for rm in metrics.resource_metrics(&own, &InstrumentationScope::default()) {
            let service = rm
                .resource
                .unwrap()
                .attributes
                .into_iter()
                .find(|kv| kv.key == key::SERVICE_NAME);
            let service = match service.and_then(|kv| kv.value?.value) {
                Some(any_value::Value::StringValue(s)) => s,
                _ => String::new(),
            };
            for m in rm.scope_metrics.into_iter().flat_map(|s| s.metrics) {
                if let (name::ATTEMPTS, Some(metric::Data::Sum(sum))) = (m.name.as_str(), m.data) {
                    for p in sum.data_points {
                        if let Some(number_data_point::Value::AsInt(v)) = p.value {
                            out.push((service.clone(), v));
                        }
                    }
                }
            }
        }
        out.sort();
        out
    }

    fn checkout(metrics: &ConnectMetrics, pid: u32) {
        let resource = opentelemetry_sdk::Resource::builder_empty()
            .with_attribute(opentelemetry::KeyValue::new(key::SERVICE_NAME, "checkout"))
            .build();
        metrics.service(pid, "checkout".into(), &resource);
    }

    #[test]
    fn processes_of_one_service_add_up_and_quiet_series_leave_the_kernel_with_their_last_counts() {
        let metrics = ConnectMetrics::new(16, Duration::from_millis(2), "node-7");
        checkout(&metrics, 7);
        checkout(&metrics, 8);
        let never = |_: &SeriesKey| panic!("nothing is quiet yet");
        metrics.fold(reading(vec![(key(7, 0), value(3)), (key(8, 0), value(2))]), never);
        assert_eq!(attempts(&metrics), [("checkout".into(), 5)]);
        metrics.fold(reading(vec![(key(7, 0), value(4)), (key(8, 0), value(2))]), never);
        assert_eq!(attempts(&metrics), [("checkout".into(), 6)]);
        std::thread::sleep(Duration::from_millis(20));
        let mut forgotten = Vec::new();
        // Pid 8 counted one more attempt after this reading and before its series was taken out.
        metrics.fold(reading(vec![(key(7, 0), value(4)), (key(8, 0), value(2))]), |k| {
            forgotten.push(k.pid);
            Some(value(if k.pid == 8 { 3 } else { 4 }))
        });
        forgotten.sort();
        assert_eq!(forgotten, [7, 8]);
        assert_eq!(attempts(&metrics), [("checkout".into(), 7)]);
        // Gone from the kernel; the series here goes once it has been exported a while.
        assert!(metrics.book().kernel.is_empty());
        std::thread::sleep(Duration::from_millis(20));
        metrics.fold(reading(vec![]), never);
        assert!(attempts(&metrics).is_empty());
    }

    #[test]
    fn a_process_not_yet_read_is_held_back_then_counted_as_unknown() {
        let metrics = ConnectMetrics::new(16, Duration::from_secs(10), "node-7");
        for _ in 0..UNRESOLVED_READINGS {
            metrics.fold(reading(vec![(key(9, 1), value(2))]), |_| None);
            assert!(attempts(&metrics).is_empty());
        }
        metrics.fold(reading(vec![(key(9, 1), value(2))]), |_| None);
        assert_eq!(attempts(&metrics), [(UNKNOWN_SERVICE.into(), 2)]);
        // Held back no more once the programs are gone.
        metrics.last_reading();
        metrics.fold(
            reading(vec![(key(9, 1), value(2)), (key(10, 1), value(1))]),
            |_| None,
        );
        // Two processes of one (unknown) service: one series.
        assert_eq!(attempts(&metrics), [(UNKNOWN_SERVICE.into(), 3)]);
    }

    #[test]
    fn failures_carry_error_type_and_overflow_goes_under_our_own_resource() {
        let metrics = ConnectMetrics::new(16, Duration::from_secs(10), "node-7");
        checkout(&metrics, 7);
        let mut r = reading(vec![(key(7, outcome::TIMED_OUT), value(1))]);
        r.overflow[outcome::CONNECTION_REFUSED as usize] = value(4);
        metrics.fold(r, |_| None);
        let own = Resource {
            attributes: vec![string_attribute(key::SERVICE_NAME, "synspan")],
            ..Default::default()
        };
        let all = metrics.resource_metrics(&own, &InstrumentationScope::default());
        assert_eq!(all.len(), 2);
        let point_attrs = |rm: &ResourceMetrics| match &rm.scope_metrics[0].metrics[0].data {
            Some(metric::Data::Sum(sum)) => sum.data_points[0].attributes.clone(),
            other => panic!("{other:?}"),
        };
        let timed_out = point_attrs(&all[0]);
        assert!(timed_out.contains(&string_attribute(key::ERROR_TYPE, "timed_out")));
        assert!(timed_out.contains(&string_attribute(key::SERVER_ADDRESS, "127.0.0.9")));
        assert!(timed_out.contains(&int_value(key::SERVER_PORT, 443)));
        assert_eq!(all[1].resource.as_ref(), Some(&own));
        let overflow = point_attrs(&all[1]);
        assert_eq!(overflow[0].key, OVERFLOW);
        assert!(overflow.contains(&string_attribute(key::OUTCOME, "connection_refused")));
        let histogram = match &all[0].scope_metrics[0].metrics[2].data {
            Some(metric::Data::Histogram(h)) => h.data_points[0].clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(histogram.count, 1);
        assert_eq!(histogram.sum, Some(0.001));
        assert_eq!(histogram.bucket_counts[3], 1);
        assert_eq!(histogram.explicit_bounds[3], 0.001);
    }
}
