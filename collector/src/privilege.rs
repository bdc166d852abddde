//! The capabilities synspan needs, checked before anything is loaded so that the error
//! names them instead of surfacing as an EPERM from deep inside the loader.

use std::fs;

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error(
        "missing capabilities: {missing}. synspan loads eBPF programs and attaches them to \
         tracepoints: run it as root (sudo synspan), or grant CAP_BPF and CAP_PERFMON \
         (e.g. `setcap cap_bpf,cap_perfmon+ep synspan`, or the container's capabilities)"
    )]
    Missing { missing: String },
    #[error("cannot read /proc/self/status to check capabilities: {0}")]
    Status(#[from] std::io::Error),
}

/// Effective capability bits of this process.
pub fn effective() -> Result<u64, PrivilegeError> {
    let status = fs::read_to_string("/proc/self/status")?;
    Ok(parse_cap_eff(&status).unwrap_or(0))
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// What is missing from `caps` to load and attach tracing programs, if anything.
/// CAP_SYS_ADMIN stands in for both on kernels before 5.8 and for root.
pub fn missing(caps: u64) -> Vec<&'static str> {
    let has = |cap: u32| caps & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) {
        return Vec::new();
    }
    let mut missing = Vec::new();
    if !has(CAP_BPF) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) {
        missing.push("CAP_PERFMON");
    }
    missing
}

pub fn check() -> Result<(), PrivilegeError> {
    let missing = missing(effective()?);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PrivilegeError::Missing {
            missing: missing.join(", "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_effective_set() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
    }

    #[test]
    fn names_what_is_missing() {
        assert!(missing(1 << CAP_SYS_ADMIN).is_empty());
        assert!(missing((1 << CAP_BPF) | (1 << CAP_PERFMON)).is_empty());
        assert_eq!(missing(1 << CAP_BPF), ["CAP_PERFMON"]);
        assert_eq!(missing(0), ["CAP_BPF", "CAP_PERFMON"]);
    }
}
