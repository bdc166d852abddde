//! An `Attempt` as an OpenTelemetry span. The OTLP and JSON sinks both start from here, so
//! the JSON line mirrors the exported span exactly.

use std::{
    borrow::Cow,
    num::NonZeroUsize,
    sync::{Arc, LazyLock},
    time::SystemTime,
};

use lru::LruCache;

use opentelemetry::{
    InstrumentationScope, KeyValue,
    trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState},
};
use opentelemetry_sdk::{
    Resource,
    trace::{IdGenerator, RandomIdGenerator, SpanData, SpanEvents, SpanLinks},
};

use crate::{
    attempt::{Attempt, EventKind, PacketDrop},
    config::TraceContext,
    enrich::identity::{Identity, Process},
    evidence::Evidence,
};

/// Low-cardinality on purpose: addresses and ports are attributes, never part of the name.
pub(crate) const SPAN_NAME: &str = "tcp connect";

/// Attribute keys. OpenTelemetry semantic conventions first; ours under `synspan.`.
pub(crate) mod key {
    pub(crate) use opentelemetry_semantic_conventions::attribute::{
        CONTAINER_ID, ERROR_TYPE, HOST_NAME, K8S_POD_UID, NETWORK_LOCAL_ADDRESS, NETWORK_LOCAL_PORT,
        NETWORK_PEER_ADDRESS, NETWORK_PEER_PORT, NETWORK_TRANSPORT, NETWORK_TYPE, PROCESS_COMMAND,
        PROCESS_COMMAND_LINE, PROCESS_EXECUTABLE_NAME, PROCESS_EXECUTABLE_PATH, PROCESS_PARENT_PID,
        PROCESS_PID, SERVER_ADDRESS, SERVER_PORT, SERVICE_NAME, THREAD_ID,
    };

    pub(crate) const OUTCOME: &str = "synspan.outcome";
    pub(crate) const SYN_RETRANSMITS: &str = "synspan.syn_retransmits";
    pub(crate) const SYN_RETRANSMITS_HELD: &str = "synspan.syn_retransmits_held";
    pub(crate) const ERRNO: &str = "synspan.errno";
    pub(crate) const SOFT_ERRNO: &str = "synspan.soft_errno";
    pub(crate) const CGROUP_ID: &str = "synspan.cgroup_id";
    pub(crate) const NETNS: &str = "synspan.netns.inode";
    pub(crate) const NEVER_STARTED: &str = "synspan.never_started";
    /// Where conntrack sent the attempt: the translated destination and source.
    pub(crate) const NAT_PEER_ADDRESS: &str = "synspan.nat.peer.address";
    pub(crate) const NAT_PEER_PORT: &str = "synspan.nat.peer.port";
    pub(crate) const NAT_LOCAL_ADDRESS: &str = "synspan.nat.local.address";
    pub(crate) const NAT_LOCAL_PORT: &str = "synspan.nat.local.port";
    pub(crate) const NAT_STATE: &str = "synspan.nat.state";
    /// Ephemeral ports of the attempt's namespace, for `address_not_available`.
    pub(crate) const LISTENER_QUEUED: &str = "synspan.listener.queued";
    pub(crate) const LISTENER_BACKLOG: &str = "synspan.listener.backlog";
    pub(crate) const LISTENER_OVERFLOWS: &str = "synspan.listener.overflows";
    pub(crate) const PORTS_RANGE: &str = "synspan.ports.range";
    pub(crate) const PORTS_RANGE_SIZE: &str = "synspan.ports.range_size";
    pub(crate) const PORTS_IN_USE: &str = "synspan.ports.in_use";
    pub(crate) const PORTS_IN_USE_TO_DESTINATION: &str = "synspan.ports.in_use_to_destination";
    /// Stacks, one frame per line, innermost first.
    pub(crate) const USER_STACK: &str = "synspan.user_stack";
    pub(crate) const KERNEL_STACK: &str = "synspan.kernel_stack";
    pub(crate) const END_KERNEL_STACK: &str = "synspan.end_kernel_stack";
    pub(crate) const COLLISION_LOCAL_ADDRESS: &str = "synspan.collision.local.address";
    pub(crate) const COLLISION_LOCAL_PORT: &str = "synspan.collision.local.port";
    pub(crate) const COLLISION_PEER_ADDRESS: &str = "synspan.collision.peer.address";
    pub(crate) const COLLISION_PEER_PORT: &str = "synspan.collision.peer.port";
    pub(crate) const COLLISION_STATE: &str = "synspan.collision.state";
    /// Handshake packets the kernel dropped: on the span, how many and the last reason; on
    /// each `packet_dropped` event, the packet, where and why.
    pub(crate) const PACKET_DROP_COUNT: &str = "synspan.packet_drop.count";
    pub(crate) const PACKET_DROP_REASON: &str = "synspan.packet_drop.reason";
    pub(crate) const PACKET_DROP_PACKET: &str = "synspan.packet_drop.packet";
    pub(crate) const PACKET_DROP_DIRECTION: &str = "synspan.packet_drop.direction";
    pub(crate) const PACKET_DROP_LOCATION: &str = "synspan.packet_drop.location";
    /// Thread-context attributes the application published, under their own names.
    pub(crate) const THREAD_CONTEXT_PREFIX: &str = "synspan.thread_context.";
    /// On events.
    pub(crate) const RETRANSMIT_NUMBER: &str = "synspan.retransmit.number";
    pub(crate) const ELAPSED_MS: &str = "synspan.elapsed_ms";
}

/// A finished attempt, ready for every sink: what its span is made of, not the span itself.
/// Attempts wait in the export queue by the thousand; the OTLP sink encodes each straight
/// from here, in the batch that sends it.
#[derive(Clone, Debug)]
pub(crate) struct ConnectSpan {
    pub(crate) attempt: Attempt,
    pub(crate) identity: Identity,
    pub(crate) evidence: Evidence,
    pub(crate) trace_id: TraceId,
    pub(crate) span_id: SpanId,
    /// What the span does with the application's span active on the connecting thread
    /// (`attempt.thread_context`), if there was one.
    pub(crate) trace_context: TraceContext,
    /// The traced process's service, not synspan's.
    pub(crate) resource: Resource,
    /// Identifies `resource`: spans with the same one go out in one request.
    pub(crate) service: Arc<str>,
}

static SCOPE: LazyLock<InstrumentationScope> = LazyLock::new(|| {
    InstrumentationScope::builder(env!("CARGO_PKG_NAME"))
        .with_version(env!("CARGO_PKG_VERSION"))
        .build()
});

/// synspan, with its version: the instrumentation scope of its spans and metrics.
pub(crate) fn scope() -> &'static InstrumentationScope {
    &SCOPE
}

impl ConnectSpan {
    /// The span as OpenTelemetry has it, for the JSON line: the same parts the OTLP encoder
    /// takes one by one.
    pub(crate) fn span_data(&self) -> SpanData {
        let a = &self.attempt;
        let mut events = SpanEvents::default();
        events.events = self.events();
        SpanData {
            span_context: SpanContext::new(
                self.trace_id,
                self.span_id,
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: self.parent_span_id(),
            parent_span_is_remote: self.parent_span_id() != SpanId::INVALID,
            span_kind: SpanKind::Client,
            name: Cow::Borrowed(SPAN_NAME),
            start_time: a.start,
            end_time: a.end,
            attributes: self.attributes(),
            dropped_attributes_count: 0,
            events,
            links: self.links(),
            status: self.status(),
            instrumentation_scope: SCOPE.clone(),
        }
    }

    pub(crate) fn attributes(&self) -> Vec<KeyValue> {
        attributes(&self.attempt, &self.identity, &self.evidence)
    }

    /// The application's span: the parent with `--trace-context parent`;
    /// [`SpanId::INVALID`] for a root span.
    pub(crate) fn parent_span_id(&self) -> SpanId {
        match (&self.attempt.thread_context, self.trace_context) {
            (Some(app), TraceContext::Parent) => SpanId::from_bytes(app.span_id),
            _ => SpanId::INVALID,
        }
    }

    /// The application's span, with `--trace-context link`: the span links to it.
    pub(crate) fn link(&self) -> Option<(TraceId, SpanId)> {
        match (&self.attempt.thread_context, self.trace_context) {
            (Some(app), TraceContext::Link) => {
                Some((TraceId::from_bytes(app.trace_id), SpanId::from_bytes(app.span_id)))
            }
            _ => None,
        }
    }

    fn links(&self) -> SpanLinks {
        let mut links = SpanLinks::default();
        if let Some((trace_id, span_id)) = self.link() {
            let context = SpanContext::new(
                trace_id,
                span_id,
                TraceFlags::SAMPLED,
                true,
                TraceState::default(),
            );
            links
                .links
                .push(opentelemetry::trace::Link::with_context(context));
        }
        links
    }

    pub(crate) fn events(&self) -> Vec<opentelemetry::trace::Event> {
        events(&self.attempt)
    }

    pub(crate) fn status(&self) -> Status {
        status(&self.attempt)
    }
}

/// Builds spans; owns the id generator and the per-service resources.
pub(crate) struct SpanBuilder {
    ids: RandomIdGenerator,
    trace_context: TraceContext,
    host_name: String,
    resources: LruCache<String, (Arc<str>, Resource)>,
}

/// Distinct services remembered: more than one host runs, so only a host where every process
/// names itself anew (a service name with a pid in it) forgets one, and builds it again.
const MAX_RESOURCES: NonZeroUsize = NonZeroUsize::new(4096).unwrap();

impl SpanBuilder {
    pub(crate) fn new(host_name: String) -> Self {
        Self {
            ids: RandomIdGenerator::default(),
            trace_context: TraceContext::Parent,
            host_name,
            resources: LruCache::new(MAX_RESOURCES),
        }
    }

    /// What spans do with the application's active span; `parent` unless told.
    pub(crate) fn with_trace_context(mut self, mode: TraceContext) -> Self {
        self.trace_context = mode;
        self
    }

    /// The traced process's own service: `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`
    /// from its environment, else its executable name; so that its connect spans sit next to
    /// its own traces.
    fn resource(&mut self, attempt: &Attempt, identity: &Identity) -> (Arc<str>, Resource) {
        self.service(identity.process.as_deref(), &attempt.comm)
    }

    /// A process's service key and resource; `comm` names it when `/proc` could not be read.
    pub(crate) fn service(&mut self, process: Option<&Process>, comm: &str) -> (Arc<str>, Resource) {
        let info = process.map(|p| &p.info);
        let name = info
            .and_then(|i| i.service.name.as_deref())
            .or(info.map(|i| i.exe_name.as_str()))
            .unwrap_or(comm);
        let extra = info
            .map(|i| i.service.resource_attributes.as_slice())
            .unwrap_or_default();
        // Where the process runs is part of its resource (the semantic conventions put
        // `container.id` and `k8s.pod.uid` there, and Jaeger shows them as the process's
        // tags), unless the process named them itself.
        let platform = || {
            process
                .into_iter()
                .flat_map(|p| {
                    [
                        (key::CONTAINER_ID, p.container_id.as_deref()),
                        (key::K8S_POD_UID, p.k8s_pod_uid.as_deref()),
                    ]
                })
                .filter_map(|(k, v)| Some((k, v?)))
                .filter(|(k, _)| !extra.iter().any(|(named, _)| named == k))
        };
        let cache_key: String = std::iter::once(name)
            .chain(extra.iter().flat_map(|(k, v)| [k.as_str(), v.as_str()]))
            .chain(platform().flat_map(|(k, v)| [k, v]))
            .collect::<Vec<_>>()
            .join("\0");
        if let Some(known) = self.resources.get(&cache_key) {
            return known.clone();
        }
        let resource = Resource::builder_empty()
            .with_attributes(
                extra
                    .iter()
                    .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
                    .chain(platform().map(|(k, v)| KeyValue::new(k, v.to_string())))
                    .chain([
                        KeyValue::new(key::SERVICE_NAME, name.to_string()),
                        KeyValue::new(key::HOST_NAME, self.host_name.clone()),
                    ]),
            )
            .build();
        let service: Arc<str> = cache_key.as_str().into();
        self.resources.put(cache_key, (service.clone(), resource.clone()));
        (service, resource)
    }

    pub(crate) fn build(&mut self, attempt: Attempt, identity: &Identity, evidence: Evidence) -> ConnectSpan {
        let (service, resource) = self.resource(&attempt, identity);
        // The sampled bit is not looked at: the application's tracer may publish 0 before it
        // decides, and the connect span is kept or not by synspan's own policy.
        let trace_id = match (&attempt.thread_context, self.trace_context) {
            (Some(app), TraceContext::Parent) => TraceId::from_bytes(app.trace_id),
            _ => self.ids.new_trace_id(),
        };
        ConnectSpan {
            trace_id,
            span_id: self.ids.new_span_id(),
            trace_context: self.trace_context,
            attempt,
            identity: identity.clone(),
            evidence,
            resource,
            service,
        }
    }
}

fn attributes(a: &Attempt, identity: &Identity, evidence: &Evidence) -> Vec<KeyValue> {
    let mut attrs = Vec::with_capacity(32);
    let process = identity.process.as_deref();
    let info = process.map(|p| &p.info);
    // One string for both keys that carry the peer, shared rather than formatted twice.
    let peer = opentelemetry::StringValue::from(Arc::<str>::from(a.peer.ip().to_string()));
    attrs.extend([
        KeyValue::new(key::NETWORK_TRANSPORT, "tcp"),
        KeyValue::new(key::NETWORK_TYPE, if a.peer.is_ipv4() { "ipv4" } else { "ipv6" }),
        KeyValue::new(key::NETWORK_LOCAL_ADDRESS, a.local.ip().to_string()),
        KeyValue::new(key::NETWORK_LOCAL_PORT, i64::from(a.local.port())),
        KeyValue::new(key::NETWORK_PEER_ADDRESS, peer.clone()),
        KeyValue::new(key::NETWORK_PEER_PORT, i64::from(a.peer.port())),
        KeyValue::new(key::SERVER_ADDRESS, peer),
        KeyValue::new(key::SERVER_PORT, i64::from(a.peer.port())),
        KeyValue::new(key::PROCESS_PID, i64::from(a.pid)),
        KeyValue::new(key::THREAD_ID, i64::from(a.tid)),
        KeyValue::new(
            key::PROCESS_EXECUTABLE_NAME,
            match (info, &identity.exe_name) {
                (Some(info), _) => info.exe_name.clone(),
                (None, Some(name)) => name.to_string(),
                (None, None) => a.comm.clone(),
            },
        ),
        KeyValue::new(key::PROCESS_COMMAND, a.comm.clone()),
        KeyValue::new(key::OUTCOME, a.outcome.as_str()),
        KeyValue::new(key::SYN_RETRANSMITS, i64::from(a.syn_retransmits)),
        KeyValue::new(key::CGROUP_ID, a.cgroup_id as i64),
    ]);
    if a.syn_retransmits_held > 0 {
        attrs.push(KeyValue::new(
            key::SYN_RETRANSMITS_HELD,
            i64::from(a.syn_retransmits_held),
        ));
    }
    if a.outcome.is_failure() {
        attrs.push(KeyValue::new(key::ERROR_TYPE, a.outcome.as_str()));
    }
    if a.errno != 0 {
        attrs.push(KeyValue::new(key::ERRNO, i64::from(a.errno)));
    }
    if a.soft_errno != 0 {
        attrs.push(KeyValue::new(key::SOFT_ERRNO, i64::from(a.soft_errno)));
    }
    if let Some(c) = &a.collision {
        attrs.extend(collision_attributes(c));
    }
    if a.never_started {
        attrs.push(KeyValue::new(key::NEVER_STARTED, true));
    }
    if let Some(last) = a.drops.last() {
        attrs.extend([
            KeyValue::new(key::PACKET_DROP_COUNT, i64::from(a.drop_count)),
            KeyValue::new(key::PACKET_DROP_REASON, last.reason_text()),
        ]);
    }
    if let Some(t) = &evidence.nat {
        attrs.extend([
            KeyValue::new(key::NAT_PEER_ADDRESS, t.reply_src.ip().to_string()),
            KeyValue::new(key::NAT_PEER_PORT, i64::from(t.reply_src.port())),
            KeyValue::new(key::NAT_LOCAL_ADDRESS, t.reply_dst.ip().to_string()),
            KeyValue::new(key::NAT_LOCAL_PORT, i64::from(t.reply_dst.port())),
        ]);
        if let Some(state) = &t.tcp_state {
            attrs.push(KeyValue::new(key::NAT_STATE, state.clone()));
        }
    }
    if let Some(l) = &evidence.listener {
        attrs.extend([
            KeyValue::new(key::LISTENER_QUEUED, i64::from(l.queued)),
            KeyValue::new(key::LISTENER_BACKLOG, i64::from(l.backlog)),
        ]);
        if let Some(overflows) = l.overflows {
            attrs.push(KeyValue::new(key::LISTENER_OVERFLOWS, overflows as i64));
        }
    }
    if let Some(p) = &evidence.ports {
        attrs.extend([
            KeyValue::new(key::PORTS_RANGE, format!("{}-{}", p.range.0, p.range.1)),
            KeyValue::new(key::PORTS_RANGE_SIZE, i64::from(p.range_size)),
            KeyValue::new(key::PORTS_IN_USE, i64::from(p.in_use_total)),
            KeyValue::new(
                key::PORTS_IN_USE_TO_DESTINATION,
                i64::from(p.in_use_to_destination),
            ),
        ]);
    }
    if let Some(info) = info {
        attrs.push(KeyValue::new(key::PROCESS_PARENT_PID, i64::from(info.parent_pid)));
        if let Some(path) = &info.exe_path {
            attrs.push(KeyValue::new(
                key::PROCESS_EXECUTABLE_PATH,
                path.display().to_string(),
            ));
        }
        if let Some(line) = &info.command_line {
            attrs.push(KeyValue::new(key::PROCESS_COMMAND_LINE, line.clone()));
        }
        if let Some(inode) = info.netns_inode {
            attrs.push(KeyValue::new(key::NETNS, inode as i64));
        }
    }
    if let Some(context) = &a.thread_context {
        let keys = info
            .map(|i| i.thread_attribute_keys.as_slice())
            .unwrap_or_default();
        for (index, value) in &context.attributes {
            // Indexes outside the key map are ignored, as the specification says.
            if let Some(name) = keys.get(usize::from(*index)).filter(|k| !k.is_empty()) {
                attrs.push(KeyValue::new(
                    format!("{}{name}", key::THREAD_CONTEXT_PREFIX),
                    value.clone(),
                ));
            }
        }
    }
    for (k, stack) in [
        (key::USER_STACK, &identity.user_stack),
        (key::KERNEL_STACK, &identity.kernel_stack),
        (key::END_KERNEL_STACK, &identity.end_kernel_stack),
    ] {
        if let Some(stack) = stack {
            attrs.push(KeyValue::new(k, opentelemetry::StringValue::from(stack.clone())));
        }
    }
    attrs
}

fn collision_attributes(c: &crate::attempt::Collision) -> [KeyValue; 5] {
    [
        KeyValue::new(key::COLLISION_LOCAL_ADDRESS, c.local.ip().to_string()),
        KeyValue::new(key::COLLISION_LOCAL_PORT, i64::from(c.local.port())),
        KeyValue::new(key::COLLISION_PEER_ADDRESS, c.peer.ip().to_string()),
        KeyValue::new(key::COLLISION_PEER_PORT, i64::from(c.peer.port())),
        KeyValue::new(key::COLLISION_STATE, c.state),
    ]
}

fn drop_attributes(d: &PacketDrop) -> [KeyValue; 5] {
    [
        KeyValue::new(key::PACKET_DROP_PACKET, d.packet),
        KeyValue::new(key::PACKET_DROP_DIRECTION, d.direction),
        KeyValue::new(key::PACKET_DROP_REASON, d.reason_text()),
        KeyValue::new(key::PACKET_DROP_LOCATION, d.location_text()),
        KeyValue::new(key::PACKET_DROP_COUNT, i64::from(d.count)),
    ]
}

fn elapsed_ms(start: SystemTime, t: SystemTime) -> f64 {
    t.duration_since(start).unwrap_or_default().as_secs_f64() * 1e3
}

fn events(a: &Attempt) -> Vec<opentelemetry::trace::Event> {
    a.events
        .iter()
        .map(|e| {
            let mut attrs = vec![KeyValue::new(key::ELAPSED_MS, elapsed_ms(a.start, e.time))];
            match e.kind {
                EventKind::SynRetransmit(n) => {
                    attrs.push(KeyValue::new(key::RETRANSMIT_NUMBER, i64::from(n)))
                }
                EventKind::IcmpError(errno) => attrs.push(KeyValue::new(key::ERRNO, i64::from(errno))),
                EventKind::Collision => attrs.extend(
                    a.collision
                        .as_ref()
                        .map(collision_attributes)
                        .into_iter()
                        .flatten(),
                ),
                EventKind::PacketDropped(i) => {
                    attrs.extend(a.drops.get(i).map(drop_attributes).into_iter().flatten())
                }
                EventKind::RstReceived | EventKind::RstSent => {}
            }
            opentelemetry::trace::Event::new(e.kind.name(), e.time, attrs, 0)
        })
        .collect()
}

fn status(a: &Attempt) -> Status {
    if !a.outcome.is_failure() {
        return Status::Unset;
    }
    let description = if a.errno != 0 {
        format!("connect failed: {}", std::io::Error::from_raw_os_error(a.errno))
    } else {
        format!("connect failed: {}", a.outcome)
    };
    Status::error(description)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use opentelemetry::Value;

    use super::*;
    use crate::{attempt::AttemptEvent, outcome::Outcome};

    pub(crate) fn timed_out() -> Attempt {
        let start = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        Attempt {
            start,
            end: start + Duration::from_millis(7100),
            pid: 42,
            tid: 43,
            comm: "nc".into(),
            cgroup_id: 1,
            local: "127.0.0.1:40000".parse().unwrap(),
            peer: "127.0.0.2:80".parse().unwrap(),
            outcome: Outcome::TimedOut,
            errno: libc::ETIMEDOUT,
            soft_errno: 0,
            syn_retransmits: 1,
            syn_retransmits_held: 0,
            events: vec![AttemptEvent {
                time: start + Duration::from_secs(1),
                kind: EventKind::SynRetransmit(1),
            }],
            user_stack_id: None,
            user_frame: None,
            kernel_stack_id: None,
            end_kernel_stack_id: None,
            collision: None,
            never_started: false,
            drops: Vec::new(),
            drop_count: 0,
            thread_context: None,
        }
    }

    fn attr<'a>(span: &'a SpanData, k: &str) -> Option<&'a Value> {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == k)
            .map(|kv| &kv.value)
    }

    #[test]
    fn failed_attempt_span() {
        let mut builder = SpanBuilder::new("host".into());
        let span = builder.build(timed_out(), &Identity::default(), Evidence::default());
        let d = &span.span_data();
        assert_eq!(d.name, SPAN_NAME);
        assert_eq!(d.span_kind, SpanKind::Client);
        assert!(matches!(&d.status, Status::Error { description } if description.contains("timed out")));
        assert_eq!(attr(d, key::ERROR_TYPE), Some(&Value::from("timed_out")));
        assert_eq!(attr(d, key::NETWORK_LOCAL_PORT), Some(&Value::I64(40000)));
        assert_eq!(attr(d, key::NETWORK_TYPE), Some(&Value::from("ipv4")));
        assert_eq!(d.events.len(), 1);
        assert_eq!(d.events[0].name, "syn_retransmit");
        assert!(d.span_context.is_valid());
        let service = span
            .resource
            .get(&opentelemetry::Key::from_static_str(key::SERVICE_NAME));
        assert_eq!(service, Some(Value::from("nc")));
    }

    pub(crate) fn in_the_apps_span() -> Attempt {
        let mut a = timed_out();
        a.thread_context = Some(Box::new(crate::attempt::ThreadContext {
            trace_id: [0xab; 16],
            span_id: [0xcd; 8],
            trace_flags: 1,
            attributes: vec![(0, "/checkout".into()), (7, "unknown key".into())],
        }));
        a
    }

    #[test]
    fn the_apps_span_is_the_parent_or_a_link() {
        let parent = SpanBuilder::new("host".into()).build(
            in_the_apps_span(),
            &Identity::default(),
            Evidence::default(),
        );
        let d = parent.span_data();
        assert_eq!(d.span_context.trace_id(), TraceId::from_bytes([0xab; 16]));
        assert_eq!(d.parent_span_id, SpanId::from_bytes([0xcd; 8]));
        assert!(d.parent_span_is_remote);
        assert!(d.links.links.is_empty());
        // No key map: the attributes have no names, so none are put on the span.
        assert!(
            d.attributes
                .iter()
                .all(|kv| !kv.key.as_str().starts_with(key::THREAD_CONTEXT_PREFIX))
        );

        let linked = SpanBuilder::new("host".into())
            .with_trace_context(TraceContext::Link)
            .build(in_the_apps_span(), &Identity::default(), Evidence::default());
        let d = linked.span_data();
        assert_ne!(d.span_context.trace_id(), TraceId::from_bytes([0xab; 16]));
        assert_eq!(d.parent_span_id, SpanId::INVALID);
        assert_eq!(
            d.links.links[0].span_context.span_id(),
            SpanId::from_bytes([0xcd; 8])
        );

        let off = SpanBuilder::new("host".into())
            .with_trace_context(TraceContext::Off)
            .build(in_the_apps_span(), &Identity::default(), Evidence::default());
        let d = off.span_data();
        assert_eq!(d.parent_span_id, SpanId::INVALID);
        assert!(d.links.links.is_empty());
    }

    #[test]
    fn established_has_no_error() {
        let mut a = timed_out();
        a.outcome = Outcome::Established;
        a.errno = 0;
        let span = SpanBuilder::new("host".into()).build(a, &Identity::default(), Evidence::default());
        let d = span.span_data();
        assert_eq!(d.status, Status::Unset);
        assert_eq!(attr(&d, key::ERROR_TYPE), None);
    }
}
/// What `--export-queue-size`'s help, the README and deploy/README.md say a queued span
/// weighs ("about half a KiB", heap parts beside): this keeps them true.
#[cfg(test)]
#[test]
fn a_queued_span_is_about_half_a_kib() {
    let size = size_of::<ConnectSpan>();
    assert!(
        (400..=640).contains(&size),
        "ConnectSpan is {size} bytes: update the docs"
    );
}
