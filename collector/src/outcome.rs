//! Why an attempt ended, from what the kernel showed.

use synspan_shared::{AttemptRecord, attempt_flags, tcp_state};

/// How a connect attempt ended. The names are the values of `synspan.outcome` and, for
/// failures, `error.type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Outcome {
    Established,
    ConnectionRefused,
    TimedOut,
    HostUnreachable,
    NetworkUnreachable,
    /// The application closed the socket while it was still in SYN_SENT.
    Aborted,
    /// No free ephemeral port: the kernel gave up before sending a SYN.
    AddressNotAvailable,
    Other,
}

impl Outcome {
    #[cfg(test)]
    pub(crate) const ALL: [Outcome; 8] = [
        Outcome::Established,
        Outcome::ConnectionRefused,
        Outcome::TimedOut,
        Outcome::HostUnreachable,
        Outcome::NetworkUnreachable,
        Outcome::Aborted,
        Outcome::AddressNotAvailable,
        Outcome::Other,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Established => "established",
            Outcome::ConnectionRefused => "connection_refused",
            Outcome::TimedOut => "timed_out",
            Outcome::HostUnreachable => "host_unreachable",
            Outcome::NetworkUnreachable => "network_unreachable",
            Outcome::Aborted => "aborted",
            Outcome::AddressNotAvailable => "address_not_available",
            Outcome::Other => "other",
        }
    }

    pub(crate) fn is_failure(self) -> bool {
        self != Outcome::Established
    }

    /// The outcome a `connect()` errno stands for.
    pub(crate) fn from_errno(errno: i32) -> Option<Self> {
        match errno {
            libc::ECONNREFUSED => Some(Outcome::ConnectionRefused),
            libc::ETIMEDOUT => Some(Outcome::TimedOut),
            libc::EHOSTUNREACH => Some(Outcome::HostUnreachable),
            libc::ENETUNREACH => Some(Outcome::NetworkUnreachable),
            libc::EADDRNOTAVAIL => Some(Outcome::AddressNotAvailable),
            _ => None,
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Classifies a finished attempt.
///
/// `sk_err` at the moment the socket left SYN_SENT is the errno `connect()` reports, so it
/// decides first. It is 0 in two cases the kernel does not flag otherwise: the application
/// closed a pending connect, and `inet_hash_connect` found no free port (then no port was
/// ever chosen, and the socket never sent a SYN).
pub(crate) fn classify(record: &AttemptRecord) -> Outcome {
    if record.flags & attempt_flags::NEVER_STARTED != 0 {
        return Outcome::from_errno(record.error).unwrap_or(Outcome::Other);
    }
    match record.end_state {
        tcp_state::ESTABLISHED => return Outcome::Established,
        tcp_state::CLOSE => {}
        _ => return Outcome::Other,
    }
    if record.error != 0 {
        return Outcome::from_errno(record.error).unwrap_or(Outcome::Other);
    }
    if record.flags & attempt_flags::RST_RECEIVED != 0 {
        return Outcome::ConnectionRefused;
    }
    if record.sport == 0 && record.retransmits == 0 {
        return Outcome::AddressNotAvailable;
    }
    // The application closed the socket. If the kernel had told it why first (a soft ICMP
    // error, which reading SO_ERROR clears), that is why the attempt ended.
    if record.flags & attempt_flags::ERROR_SEEN != 0
        && let Some(outcome) = Outcome::from_errno(record.first_error)
    {
        return outcome;
    }
    Outcome::Aborted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(end_state: u8, error: i32, sport: u16) -> AttemptRecord {
        AttemptRecord {
            end_state,
            error,
            sport,
            ..AttemptRecord::ZERO
        }
    }

    #[test]
    fn errno_decides() {
        let cases = [
            (libc::ECONNREFUSED, Outcome::ConnectionRefused),
            (libc::ETIMEDOUT, Outcome::TimedOut),
            (libc::EHOSTUNREACH, Outcome::HostUnreachable),
            (libc::ENETUNREACH, Outcome::NetworkUnreachable),
            (libc::EPERM, Outcome::Other),
        ];
        for (errno, outcome) in cases {
            assert_eq!(
                classify(&record(tcp_state::CLOSE, errno, 40000)),
                outcome,
                "errno {errno}"
            );
        }
    }

    #[test]
    fn established_ignores_errors() {
        assert_eq!(
            classify(&record(tcp_state::ESTABLISHED, 0, 40000)),
            Outcome::Established
        );
    }

    #[test]
    fn closed_without_error() {
        assert_eq!(classify(&record(tcp_state::CLOSE, 0, 40000)), Outcome::Aborted);
        assert_eq!(
            classify(&record(tcp_state::CLOSE, 0, 0)),
            Outcome::AddressNotAvailable
        );
        let mut reset = record(tcp_state::CLOSE, 0, 40000);
        reset.flags = attempt_flags::RST_RECEIVED;
        assert_eq!(classify(&reset), Outcome::ConnectionRefused);
        let mut icmp = record(tcp_state::CLOSE, 0, 40000);
        icmp.flags = attempt_flags::ERROR_SEEN;
        icmp.first_error = libc::EHOSTUNREACH;
        assert_eq!(classify(&icmp), Outcome::HostUnreachable);
        let mut retried = record(tcp_state::CLOSE, 0, 0);
        retried.retransmits = 2;
        assert_eq!(classify(&retried), Outcome::Aborted);
    }

    #[test]
    fn never_started() {
        let mut r = record(0, libc::ENETUNREACH, 0);
        r.flags = attempt_flags::NEVER_STARTED;
        assert_eq!(classify(&r), Outcome::NetworkUnreachable);
        r.error = libc::EACCES;
        assert_eq!(classify(&r), Outcome::Other);
    }

    #[test]
    fn other_states() {
        assert_eq!(classify(&record(tcp_state::SYN_RECV, 0, 1)), Outcome::Other);
    }

    #[test]
    fn names_are_stable() {
        let names: Vec<_> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
        assert_eq!(
            names,
            [
                "established",
                "connection_refused",
                "timed_out",
                "host_unreachable",
                "network_unreachable",
                "aborted",
                "address_not_available",
                "other"
            ]
        );
    }
}
