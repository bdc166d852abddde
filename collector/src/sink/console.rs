//! One human-readable line per attempt.
//!
//! ```text
//! 2026-11-25T21:48:04.120Z timed_out           7103.2ms pid=23023/23023 nc               10.0.0.1:42636 -> 10.0.0.2:22 retransmits=5
//! ```

use std::io::{self, Write};

use crate::span::ConnectSpan;

pub(crate) fn write_line(out: &mut Vec<u8>, span: &ConnectSpan) -> io::Result<()> {
    let a = &span.attempt;
    write!(
        out,
        "{} {:<21} {:>9.1}ms pid={}/{} {:<15} {} -> {} retransmits={}",
        humantime::format_rfc3339_millis(a.start),
        a.outcome.as_str(),
        a.duration().as_secs_f64() * 1e3,
        a.pid,
        a.tid,
        a.comm,
        a.local,
        a.peer,
        a.syn_retransmits,
    )?;
    // The application's trace this attempt joined, short as trace ids are quoted.
    if span.parent_span_id() != opentelemetry::trace::SpanId::INVALID {
        let trace = span.trace_id.to_string();
        write!(out, " trace={}", &trace[..8])?;
    }
    if a.syn_retransmits_held > 0 {
        write!(
            out,
            "; SYN still queued in this host at {} retransmit timeout(s)",
            a.syn_retransmits_held
        )?;
    }
    if let Some(c) = &a.collision {
        write!(
            out,
            "; collided with {} socket {} <- {}",
            c.state, c.local, c.peer
        )?;
    }
    if let Some(last) = a.drops.last() {
        write!(
            out,
            "; {} dropped here {}×: {} ({})",
            last.packet,
            a.drop_count,
            last.reason_text(),
            last.location_text()
        )?;
    }
    if let Some(l) = span.evidence.listener.as_deref().filter(|l| l.is_full()) {
        write!(out, "; listener queue full ({}/{})", l.queued, l.backlog)?;
    }
    writeln!(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        attempt::PacketDrop,
        config::TraceContext,
        evidence::{Evidence, ListenerQueue},
        span::{
            SpanBuilder,
            tests::{in_the_apps_span, timed_out},
        },
    };

    #[test]
    fn line_shows_what_matters() {
        let span = SpanBuilder::new("h".into()).build(timed_out(), &Default::default(), Default::default());
        let mut out = Vec::new();
        write_line(&mut out, &span).unwrap();
        let line = String::from_utf8(out).unwrap();
        assert_eq!(
            line,
            "2023-11-14T22:13:20.000Z timed_out                7100.0ms pid=42/43 nc              \
             127.0.0.1:40000 -> 127.0.0.2:80 retransmits=1\n"
        );
    }

    #[test]
    fn line_shows_the_trace_it_joined() {
        let line = |mode| {
            let span = SpanBuilder::new("h".into()).with_trace_context(mode).build(
                in_the_apps_span(),
                &Default::default(),
                Default::default(),
            );
            let mut out = Vec::new();
            write_line(&mut out, &span).unwrap();
            String::from_utf8(out).unwrap()
        };
        assert!(
            line(TraceContext::Parent).ends_with("retransmits=1 trace=abababab\n"),
            "{}",
            line(TraceContext::Parent)
        );
        // A link joins no trace: the span is a root of its own.
        assert!(line(TraceContext::Link).ends_with("retransmits=1\n"));
    }

    #[test]
    fn line_ends_with_the_last_drop() {
        let mut attempt = timed_out();
        let drop = PacketDrop {
            time: attempt.start,
            packet: "SYN",
            direction: "egress",
            reason: 12,
            location: 0xffff_ffff_8100_0000,
            count: 1,
            reason_name: Some("NETFILTER_DROP".into()),
            function: Some("nf_hook_slow".into()),
        };
        attempt.drops = vec![drop.clone(), drop];
        attempt.drop_count = 6;
        let span = SpanBuilder::new("h".into()).build(attempt, &Default::default(), Default::default());
        let mut out = Vec::new();
        write_line(&mut out, &span).unwrap();
        let line = String::from_utf8(out).unwrap();
        assert!(
            line.ends_with("retransmits=1; SYN dropped here 6×: NETFILTER_DROP (nf_hook_slow)\n"),
            "{line}"
        );
    }

    #[test]
    fn line_ends_with_a_full_listener_queue() {
        let queue = |queued| Evidence {
            listener: Some(Box::new(ListenerQueue {
                queued,
                backlog: 1,
                overflows: Some(3),
            })),
            ..Default::default()
        };
        let line = |evidence| {
            let span = SpanBuilder::new("h".into()).build(timed_out(), &Default::default(), evidence);
            let mut out = Vec::new();
            write_line(&mut out, &span).unwrap();
            String::from_utf8(out).unwrap()
        };
        assert!(line(queue(2)).ends_with("retransmits=1; listener queue full (2/1)\n"));
        assert!(
            line(queue(1)).ends_with("retransmits=1\n"),
            "room left: not shown"
        );
    }
}
