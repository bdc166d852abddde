//! What `synspan-storm` reports and `synspan-bench` reads: one JSON line per storm.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The load generator's modes.
pub const SUCCESS: &str = "success";
pub const REFUSED: &str = "refused";
/// `success`, each worker thread inside a span it publishes as OpenTelemetry thread context.
pub const SUCCESS_IN_SPAN: &str = "success-in-span";
/// `success`, while a thread sends UDP datagrams to a closed port of 127.0.0.1 at
/// [`UNRELATED_DROPS_PER_SECOND`]: every one is a packet the kernel drops (NO_SOCKET), so
/// the drop-reason program runs for packets that belong to no attempt.
pub const SUCCESS_WITH_DROPS: &str = "success-with-drops";
/// The pace of the unrelated drops of [`SUCCESS_WITH_DROPS`].
pub const UNRELATED_DROPS_PER_SECOND: u64 = 20_000;

/// The one line `synspan-storm` prints on stdout when it is done.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StormReport {
    /// `success` or `refused`.
    pub mode: String,
    /// `connect()` calls made: each one puts a socket in SYN_SENT.
    pub attempts: u64,
    /// Attempts that ended as the mode expects: connected (`success`), or refused with
    /// ECONNREFUSED (`refused`).
    pub ok: u64,
    /// Every other attempt; `errors` says why.
    pub failed: u64,
    /// From the start of the workers to the end of the last one.
    pub seconds: f64,
    pub per_second: f64,
    /// Worker threads.
    #[serde(default)]
    pub threads: u32,
    /// Failed attempts by errno name (`EADDRNOTAVAIL`, ...).
    #[serde(default)]
    pub errors: BTreeMap<String, u64>,
    /// Datagrams sent to a closed port (`success-with-drops`): packets the kernel dropped.
    #[serde(default)]
    pub unrelated_drops: u64,
}

/// A short name for an errno the storm may meet.
pub fn errno_name(errno: i32) -> String {
    match errno {
        libc::ECONNREFUSED => "ECONNREFUSED".into(),
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL".into(),
        libc::ETIMEDOUT => "ETIMEDOUT".into(),
        libc::EINPROGRESS => "EINPROGRESS".into(),
        libc::EAGAIN => "EAGAIN".into(),
        libc::ECONNRESET => "ECONNRESET".into(),
        libc::EMFILE => "EMFILE".into(),
        libc::ENFILE => "ENFILE".into(),
        libc::ENOBUFS => "ENOBUFS".into(),
        0 => "connected".into(),
        other => format!("errno{other}"),
    }
}
