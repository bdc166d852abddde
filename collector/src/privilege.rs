//! The capabilities synspan needs, checked before anything is loaded so that the error
//! names them instead of surfacing as an EPERM from deep inside the loader.

use caps::{CapSet, Capability, CapsHashSet};

#[derive(Debug, thiserror::Error)]
pub(crate) enum PrivilegeError {
    #[error(
        "missing capabilities: {missing}. synspan loads eBPF programs and attaches them to \
         tracepoints: run it as root (sudo synspan), or grant CAP_BPF and CAP_PERFMON \
         (e.g. `setcap cap_bpf,cap_perfmon+ep synspan`, or the container's capabilities)"
    )]
    Missing { missing: String },
    #[error("cannot read the capabilities of synspan itself: {0}")]
    Read(#[from] caps::errors::CapsError),
}

/// What `effective` lacks to load and attach tracing programs, if anything.
/// CAP_SYS_ADMIN stands in for both on kernels before 5.8 and for root.
pub(crate) fn missing(effective: &CapsHashSet) -> Vec<Capability> {
    if effective.contains(&Capability::CAP_SYS_ADMIN) {
        return Vec::new();
    }
    [Capability::CAP_BPF, Capability::CAP_PERFMON]
        .into_iter()
        .filter(|cap| !effective.contains(cap))
        .collect()
}

/// Capabilities kept once the programs are attached. The programs stay attached through the
/// file descriptors synspan holds, which needs no capability.
/// - CAP_BPF: reading maps. Before Linux 6.5, with unprivileged BPF disabled (the default on
///   most distributions), every bpf() call needs it, even on a descriptor we already hold.
/// - CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH: reading `/proc/<pid>/` of other users' processes
///   (executable, environment, memory maps) to name them and symbolize their stacks.
pub(crate) const KEPT: [Capability; 3] = [
    Capability::CAP_BPF,
    Capability::CAP_SYS_PTRACE,
    Capability::CAP_DAC_READ_SEARCH,
];

/// Kept as well while NAT evidence is on (`--no-nat` drops them):
/// - CAP_SYS_ADMIN: `setns()` into an attempt's network namespace;
/// - CAP_NET_ADMIN: asking conntrack over netlink, even only to read.
pub(crate) const KEPT_FOR_NAT: [Capability; 2] = [Capability::CAP_SYS_ADMIN, Capability::CAP_NET_ADMIN];

/// Drops every capability but [`KEPT`] from every set, so that a compromised agent holds
/// as little as possible. Best effort where the bounding set cannot be changed.
pub(crate) fn drop_unneeded(nat: bool) -> Result<(), caps::errors::CapsError> {
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

/// Checks the calling thread's effective set: call it on the thread that loads the programs.
pub(crate) fn check() -> Result<(), PrivilegeError> {
    let missing = missing(&caps::read(None, CapSet::Effective)?);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PrivilegeError::Missing {
            missing: missing
                .iter()
                .map(Capability::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        })
    }
}

/// This process's tgid as the kernel's programs see it, which is only known when synspan
/// runs in the initial pid namespace (as it must to read other processes' /proc anyway).
pub(crate) fn host_tgid() -> Option<u32> {
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
    fn names_what_is_missing() {
        let set = |caps: &[Capability]| caps.iter().copied().collect::<CapsHashSet>();
        use Capability::{CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN};
        assert!(missing(&set(&[CAP_SYS_ADMIN])).is_empty());
        assert!(missing(&set(&[CAP_BPF, CAP_PERFMON])).is_empty());
        assert_eq!(missing(&set(&[CAP_BPF])), [CAP_PERFMON]);
        assert_eq!(missing(&set(&[])), [CAP_BPF, CAP_PERFMON]);
    }

    /// Needs root, like the end-to-end tests.
    #[test]
    fn check_reads_the_threads_own_set() {
        check().expect("the tests run with every capability");
        // Capabilities belong to a thread: dropping them here leaves the other tests theirs.
        std::thread::scope(|s| {
            s.spawn(|| {
                for cap in [Capability::CAP_SYS_ADMIN, Capability::CAP_PERFMON] {
                    caps::drop(None, CapSet::Effective, cap).unwrap();
                }
                let err = check().unwrap_err();
                assert!(
                    matches!(&err, PrivilegeError::Missing { missing } if missing == "CAP_PERFMON"),
                    "{err}"
                );
            });
        });
    }
}
