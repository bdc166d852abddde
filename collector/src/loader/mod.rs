//! The kernel object: loading it, with this kernel's layouts and the policy ([`KernelObject::load`]),
//! then its [`programs`], its [`maps`] and its [`statistics`].

mod maps;
mod programs;
mod series;
mod statistics;

use aya::{Ebpf, EbpfLoader};
use synspan_shared::{
    MAX_FILTER_ENTRIES, Policy,
    names::{global, map},
};

pub(crate) use maps::{Filters, cgroup_id};
pub(crate) use programs::{OPTIONAL_HOOKS, lacking};
pub(crate) use series::SeriesReading;
pub(crate) use statistics::KernelCounters;

use crate::kernel_layout::Resolved;

/// The compiled programs, built by `build.rs` from `collector-ebpf/`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/synspan-ebpf"));

#[derive(Debug, thiserror::Error)]
pub(crate) enum LoadError {
    #[error("loading the eBPF programs failed: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("the object has no program {0}; the build is broken")]
    NoProgram(&'static str),
    #[error("the object has no map {0}; the build is broken")]
    NoMap(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("{program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("--cgroup {path}: {reason}")]
    Cgroup {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("too many {what} filters: at most {MAX_FILTER_ENTRIES}")]
    TooManyFilters { what: &'static str },
}

/// Sizes chosen on the command line.
pub(crate) struct Limits {
    pub(crate) max_in_flight: u32,
    pub(crate) ring_buffer_bytes: u32,
    /// Entries of the connect-series map; 0: counting is off, and the map holds one.
    pub(crate) max_series: u32,
}

/// The loaded object. Dropping it detaches and unloads every program.
pub(crate) struct KernelObject {
    ebpf: Ebpf,
    /// Recursion misses as they were when the programs were unloaded: the count goes with
    /// them.
    recursion_misses_at_detach: Option<u64>,
}

fn raise_memlock() {
    // Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; later ones use the memory
    // cgroup and ignore it. Without CAP_SYS_RESOURCE this fails, which is fine on the latter.
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!("setrlimit(RLIMIT_MEMLOCK): {}", std::io::Error::last_os_error());
    }
}

impl KernelObject {
    /// Loads the maps, with the layouts and the policy written into the object; the programs
    /// are loaded one by one as they are attached.
    pub(crate) fn load(
        resolved: &Resolved,
        policy: &Policy,
        limits: &Limits,
        btf: Option<&aya::Btf>,
    ) -> Result<Self, LoadError> {
        raise_memlock();
        let mut loader = EbpfLoader::new();
        // Without it, aya would read and parse the kernel's BTF again for CO-RE relocations or
        // typed kernel symbols, were the object ever to have them.
        if let Some(btf) = btf {
            loader.btf(btf);
        }
        let ebpf = loader
            .override_global(global::LAYOUT, &resolved.layout, true)
            .override_global(global::POLICY, policy, true)
            .map_max_entries(map::IN_FLIGHT, limits.max_in_flight)
            // Two entries per attempt: without its local port, and with it.
            .map_max_entries(map::ATTEMPT_TUPLES, limits.max_in_flight.saturating_mul(2))
            .map_max_entries(map::ATTEMPTS, limits.ring_buffer_bytes)
            .map_max_entries(map::CONNECT_SERIES, limits.max_series.max(1))
            .load(OBJECT)
            .map_err(LoadError::Load)?;
        Ok(Self {
            ebpf,
            recursion_misses_at_detach: None,
        })
    }
}

/// What the agent asks of the built object, checked without loading it (no root needed): a
/// program or map renamed on one side only would otherwise show first as a start-up failure.
#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use aya_obj::{
        Object, ProgramSection,
        generated::{
            PERF_MAX_STACK_DEPTH,
            bpf_map_type::{
                self, BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LPM_TRIE, BPF_MAP_TYPE_LRU_HASH,
                BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_RINGBUF,
                BPF_MAP_TYPE_STACK_TRACE,
            },
        },
    };
    use synspan_shared::{AttemptRecord, AttemptTuple, KernelLayout, SeriesKey, SeriesValue};

    use super::*;

    fn object() -> Object {
        Object::parse(OBJECT).expect("the built object parses")
    }

    #[test]
    fn every_program_the_loader_attaches_is_in_the_object_as_its_kind() {
        let object = object();
        // As `programs` attaches them: classic tracepoints by name, the rest by BTF.
        let classic = programs::CLASSIC
            .iter()
            .map(|(name, _)| *name)
            .chain(programs::SOFTIRQ_TCP.iter().map(|(_, classic)| *classic))
            .chain(programs::ATTEMPT_CLASSIC);
        let btf = programs::ATTEMPT_BTF
            .into_iter()
            .chain(programs::SOFTIRQ_TCP.iter().map(|(btf, _)| *btf))
            .chain([
                programs::ERROR_REPORT,
                programs::PACKET_DROP,
                synspan_shared::names::program::TCP_RETRANSMIT_SKB_WITHOUT_ERR,
            ]);
        let expected: Vec<(&str, bool)> = classic
            .map(|n| (n, false))
            .chain(btf.map(|n| (n, true)))
            .collect();
        for (name, is_btf) in &expected {
            let found = object
                .programs
                .get(*name)
                .unwrap_or_else(|| panic!("no program {name} in the object"));
            let kind_matches = match found.section {
                ProgramSection::TracePoint => !is_btf,
                ProgramSection::BtfTracePoint => *is_btf,
                _ => false,
            };
            assert!(kind_matches, "{name} is a {:?}", found.section);
        }
        // Detaching walks the object, attaching only what the loader names: a program it does
        // not name would be loaded for nothing and never run.
        let mut unnamed: Vec<&String> = object
            .programs
            .keys()
            .filter(|name| !expected.iter().any(|(n, _)| n == name))
            .collect();
        unnamed.sort();
        assert!(
            unnamed.is_empty(),
            "programs the loader never attaches: {unnamed:?}"
        );
    }

    #[test]
    fn every_map_the_agent_uses_is_in_the_object_with_its_layout() {
        let object = object();
        // (name, type, key size, value size): what the typed map in `maps` and `statistics`
        // checks at run time.
        let expected: [(&str, bpf_map_type, usize, usize); 13] = [
            (
                map::IN_FLIGHT,
                BPF_MAP_TYPE_LRU_HASH,
                8,
                size_of::<AttemptRecord>(),
            ),
            (
                map::ATTEMPT_TUPLES,
                BPF_MAP_TYPE_LRU_HASH,
                size_of::<AttemptTuple>(),
                8,
            ),
            (map::ATTEMPTS, BPF_MAP_TYPE_RINGBUF, 0, 0),
            (map::PROCESS_NOTES, BPF_MAP_TYPE_RINGBUF, 0, 0),
            (
                map::STACKS,
                BPF_MAP_TYPE_STACK_TRACE,
                4,
                PERF_MAX_STACK_DEPTH as usize * 8,
            ),
            (map::COUNTERS, BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8),
            (map::ALLOW_PIDS, BPF_MAP_TYPE_HASH, 4, 1),
            (map::ALLOW_CGROUPS, BPF_MAP_TYPE_HASH, 8, 1),
            (map::ALLOW_PORTS, BPF_MAP_TYPE_HASH, 2, 1),
            (map::ALLOW_DESTS, BPF_MAP_TYPE_LPM_TRIE, 4 + 16, 1),
            (
                map::CONNECT_SERIES,
                BPF_MAP_TYPE_PERCPU_HASH,
                size_of::<SeriesKey>(),
                size_of::<SeriesValue>(),
            ),
            (
                map::OVERFLOW_SERIES,
                BPF_MAP_TYPE_PERCPU_ARRAY,
                4,
                size_of::<SeriesValue>(),
            ),
            (
                map::THREAD_CONTEXT_TLS,
                BPF_MAP_TYPE_HASH,
                4,
                size_of::<synspan_shared::ThreadContextTls>(),
            ),
        ];
        for (name, kind, key_size, value_size) in expected {
            let found = object
                .maps
                .get(name)
                .unwrap_or_else(|| panic!("no map {name} in the object"));
            assert_eq!(found.map_type(), kind as u32, "type of {name}");
            assert_eq!(found.key_size() as usize, key_size, "key size of {name}");
            assert_eq!(found.value_size() as usize, value_size, "value size of {name}");
        }
    }

    #[test]
    fn the_globals_the_loader_writes_are_in_the_object_with_their_sizes() {
        let mut object = object();
        let layout = vec![0; size_of::<KernelLayout>()];
        let policy = vec![0; size_of::<Policy>()];
        // What `EbpfLoader::override_global(.., true)` does at load: a missing symbol or one
        // of another size is an error.
        object
            .patch_map_data(HashMap::from([
                (global::LAYOUT, (&layout[..], true)),
                (global::POLICY, (&policy[..], true)),
            ]))
            .expect("LAYOUT and POLICY are globals of their types' sizes");
    }
}
