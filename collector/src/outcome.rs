//! Why an attempt ended, from what the kernel showed.

use synspan_shared::{AttemptRecord, outcome};
#[cfg(test)]
use synspan_shared::{attempt_flags, tcp_state};

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
        outcome::from_errno(errno).map(Self::from_code)
    }

    /// The outcome the kernel's code (`synspan_shared::outcome`) stands for.
    pub(crate) fn from_code(code: u8) -> Self {
        match code {
            outcome::ESTABLISHED => Outcome::Established,
            outcome::CONNECTION_REFUSED => Outcome::ConnectionRefused,
            outcome::TIMED_OUT => Outcome::TimedOut,
            outcome::HOST_UNREACHABLE => Outcome::HostUnreachable,
            outcome::NETWORK_UNREACHABLE => Outcome::NetworkUnreachable,
            outcome::ABORTED => Outcome::Aborted,
            outcome::ADDRESS_NOT_AVAILABLE => Outcome::AddressNotAvailable,
            _ => Outcome::Other,
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Classifies a finished attempt, as the kernel does when it counts it
/// (`synspan_shared::outcome::classify`).
pub(crate) fn classify(record: &AttemptRecord) -> Outcome {
    Outcome::from_code(outcome::classify(record))
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
    fn kernel_codes_round_trip() {
        for (code, o) in Outcome::ALL.iter().enumerate() {
            assert_eq!(Outcome::from_code(code as u8), *o);
        }
        assert_eq!(Outcome::ALL.len(), outcome::LEN as usize);
        // The shared crate has no libc: its errno numbers must be this platform's.
        assert_eq!(
            Outcome::from_errno(libc::ECONNREFUSED),
            Some(Outcome::ConnectionRefused)
        );
        assert_eq!(Outcome::from_errno(libc::ETIMEDOUT), Some(Outcome::TimedOut));
        assert_eq!(
            Outcome::from_errno(libc::EHOSTUNREACH),
            Some(Outcome::HostUnreachable)
        );
        assert_eq!(
            Outcome::from_errno(libc::ENETUNREACH),
            Some(Outcome::NetworkUnreachable)
        );
        assert_eq!(
            Outcome::from_errno(libc::EADDRNOTAVAIL),
            Some(Outcome::AddressNotAvailable)
        );
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
