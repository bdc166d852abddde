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

/// Capabilities kept once the programs are attached. The programs stay attached through the
/// file descriptors synspan holds, which needs no capability.
/// - CAP_BPF: reading maps. Before Linux 6.5, with unprivileged BPF disabled (the default on
///   most distributions), every bpf() call needs it, even on a descriptor we already hold.
/// - CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH: reading `/proc/<pid>/` of other users' processes
///   (executable, environment, memory maps) to name them and symbolize their stacks.
pub const KEPT: [caps::Capability; 3] = [
    caps::Capability::CAP_BPF,
    caps::Capability::CAP_SYS_PTRACE,
    caps::Capability::CAP_DAC_READ_SEARCH,
];

/// Kept as well while NAT evidence is on (`--no-nat` drops them):
/// - CAP_SYS_ADMIN: `setns()` into an attempt's network namespace;
/// - CAP_NET_ADMIN: asking conntrack over netlink, even only to read.
pub const KEPT_FOR_NAT: [caps::Capability; 2] =
    [caps::Capability::CAP_SYS_ADMIN, caps::Capability::CAP_NET_ADMIN];

/// Drops every capability but [`KEPT`] from every set, so that a compromised agent holds
/// as little as possible. Best effort where the bounding set cannot be changed.
pub fn drop_unneeded(nat: bool) -> Result<(), caps::errors::CapsError> {
    use caps::{CapSet, Capability, CapsHashSet};
    let mut keep: CapsHashSet = KEPT.into_iter().collect();
    if nat {
        keep.extend(KEPT_FOR_NAT);
    }
    let permitted = caps::read(None, CapSet::Permitted)?;
    let still: CapsHashSet = permitted.intersection(&keep).copied().collect();
    // The bounding set needs CAP_SETPCAP, which goes with the rest below.
    if permitted.contains(&Capability::CAP_SETPCAP) {
        for cap in caps::all().difference(&keep) {
            caps::drop(None, CapSet::Bounding, *cap)?;
        }
    }
    caps::clear(None, CapSet::Ambient)?;
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new())?;
    caps::set(None, CapSet::Effective, &still)?;
    caps::set(None, CapSet::Permitted, &still)?;
    Ok(())
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

/// This process's tgid as the kernel's programs see it, which is only known when synspan
/// runs in the initial pid namespace (as it must to read other processes' /proc anyway).
pub fn host_tgid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    // PROC_PID_INIT_INO: the inode of the initial pid namespace, fixed by the kernel.
    const INITIAL_PID_NAMESPACE: u64 = 0xEFFF_FFFC;
    let ns = std::fs::metadata("/proc/self/ns/pid").ok()?;
    (ns.ino() == INITIAL_PID_NAMESPACE).then(std::process::id)
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
