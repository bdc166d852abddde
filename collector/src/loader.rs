//! Loading the kernel programs, attaching them, and handing out their maps.

use std::{
    net::IpAddr,
    os::fd::AsFd,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{
        HashMap, MapData, PerCpuArray, RingBuf, StackTraceMap,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{BtfTracePoint, TracePoint},
};
use synspan_shared::{AttemptRecord, MAX_FILTER_ENTRIES, Policy, counter};

use crate::{btf::BtfError, kernel_layout::Resolved};

/// The compiled programs, built by `build.rs` from `collector-ebpf/`.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/synspan-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
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
    Cgroup { path: PathBuf, reason: String },
    #[error("too many {what} filters: at most {MAX_FILTER_ENTRIES}")]
    TooManyFilters { what: &'static str },
}

/// Sizes chosen on the command line.
pub struct Limits {
    pub max_in_flight: u32,
    pub ring_buffer_bytes: u32,
}

/// The allow-lists of the in-kernel filter; empty lists are off.
#[derive(Debug, Default)]
pub struct Filters {
    pub pids: Vec<u32>,
    pub cgroup_ids: Vec<u64>,
    pub ports: Vec<u16>,
    pub dests: Vec<ipnet::IpNet>,
}

/// The id the kernel gives a cgroup v2 directory: its inode number.
pub fn cgroup_id(path: &Path) -> Result<u64, LoadError> {
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    let err = |reason: String| LoadError::Cgroup {
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    let c_path =
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| err(e.to_string()))?;
    // SAFETY: statfs on a NUL-terminated path into a zeroed, properly sized struct.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &mut fs) } != 0 {
        return Err(err(std::io::Error::last_os_error().to_string()));
    }
    if fs.f_type as i64 != CGROUP2_SUPER_MAGIC {
        return Err(err(
            "not a cgroup v2 directory (on hybrid hosts the v2 tree is /sys/fs/cgroup/unified)".into(),
        ));
    }
    Ok(meta.ino())
}

/// `bpf_prog_info::recursion_misses` of one program, from the kernel (5.12 and later; 0 before).
fn recursion_misses(fd: std::os::fd::BorrowedFd<'_>) -> u64 {
    use std::os::fd::AsRawFd;

    use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_prog_info};
    // SAFETY: zeroed plain C structs; the kernel fills at most `info_len` bytes of `info`.
    let mut info: bpf_prog_info = unsafe { std::mem::zeroed() };
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.info.bpf_fd = fd.as_raw_fd() as u32;
    attr.info.info_len = size_of::<bpf_prog_info>() as u32;
    attr.info.info = (&mut info as *mut bpf_prog_info) as u64;
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_long,
            &mut attr as *mut bpf_attr,
            size_of::<bpf_attr>(),
        )
    };
    if ret == 0 { info.recursion_misses } else { 0 }
}

/// IPv4 networks live in the trie as IPv4-mapped IPv6 (`::ffff:0:0/96`).
fn dest_key(net: &ipnet::IpNet) -> Key<[u8; 16]> {
    match net.addr() {
        IpAddr::V4(v4) => Key::new(96 + u32::from(net.prefix_len()), v4.to_ipv6_mapped().octets()),
        IpAddr::V6(v6) => Key::new(u32::from(net.prefix_len()), v6.octets()),
    }
}

fn program_error(program: &'static str) -> impl Fn(aya::programs::ProgramError) -> LoadError {
    move |source| LoadError::Program { program, source }
}

/// Classic tracepoint programs: (program and tracepoint name, category). Each is optional:
/// a kernel without one loses what it shows, not the attempts.
const TRACEPOINTS: [(&str, &str); 5] = [
    ("tcp_retransmit_skb", "tcp"),
    ("tcp_receive_reset", "tcp"),
    ("tcp_send_reset", "tcp"),
    ("sys_enter_connect", "syscalls"),
    ("sys_exit_connect", "syscalls"),
];
/// Where attempts start and end, as BTF tracepoints, and as classic ones for kernels without
/// BTF (see `collector-ebpf/src/attempt.rs` for why the former are preferred).
const ATTEMPT_HOOK: &str = "inet_sock_set_state";
const ATTEMPT_BTF: [&str; 2] = ["attempt_start", "attempt_end"];
const ATTEMPT_CLASSIC: [&str; 2] = ["attempt_start_tp", "attempt_end_tp"];
const ERROR_REPORT: &str = "inet_sk_error_report";

/// The loaded programs. Dropping it detaches and unloads everything.
pub struct Tracer {
    ebpf: Ebpf,
    /// `skipped_runs` as it was when the programs were unloaded: the count goes with them.
    skipped_at_detach: Option<u64>,
}

/// Sums of the kernel's per-CPU counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    pub started: u64,
    pub finished: u64,
    pub filtered: u64,
    pub ringbuf_full: u64,
    pub replaced: u64,
    pub untracked_finish: u64,
    pub track_failed: u64,
    pub skipped: u64,
    pub never_started: u64,
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

impl Tracer {
    pub fn load(
        resolved: &Resolved,
        policy: &Policy,
        limits: &Limits,
        btf: Option<&Btf>,
    ) -> Result<Self, LoadError> {
        raise_memlock();
        let mut loader = EbpfLoader::new();
        // Without it, aya would read and parse the kernel's BTF again for CO-RE relocations or
        // typed kernel symbols, were the object ever to have them.
        if let Some(btf) = btf {
            loader.btf(btf);
        }
        let ebpf = loader
            .override_global("LAYOUT", &resolved.layout, true)
            .override_global("POLICY", policy, true)
            .map_max_entries("IN_FLIGHT", limits.max_in_flight)
            .map_max_entries("ATTEMPTS", limits.ring_buffer_bytes)
            .load(PROGRAMS)
            .map_err(LoadError::Load)?;
        Ok(Self {
            ebpf,
            skipped_at_detach: None,
        })
    }

    /// Fills the allow-lists. Call before [`Tracer::attach`].
    pub fn set_filters(&mut self, filters: &Filters) -> Result<(), LoadError> {
        fn fill<K: aya::Pod>(ebpf: &mut Ebpf, name: &'static str, keys: &[K]) -> Result<(), LoadError> {
            if keys.len() > MAX_FILTER_ENTRIES as usize {
                return Err(LoadError::TooManyFilters { what: name });
            }
            let map = ebpf.map_mut(name).ok_or(LoadError::NoMap(name))?;
            let mut map =
                HashMap::<_, K, u8>::try_from(map).map_err(|source| LoadError::Map { name, source })?;
            for key in keys {
                map.insert(key, &1, 0)
                    .map_err(|source| LoadError::Map { name, source })?;
            }
            Ok(())
        }
        fill(&mut self.ebpf, "ALLOW_PIDS", &filters.pids)?;
        fill(&mut self.ebpf, "ALLOW_CGROUPS", &filters.cgroup_ids)?;
        fill(&mut self.ebpf, "ALLOW_PORTS", &filters.ports)?;
        if filters.dests.len() > MAX_FILTER_ENTRIES as usize {
            return Err(LoadError::TooManyFilters { what: "ALLOW_DESTS" });
        }
        let name = "ALLOW_DESTS";
        let map = self.ebpf.map_mut(name).ok_or(LoadError::NoMap(name))?;
        let mut trie =
            LpmTrie::<_, [u8; 16], u8>::try_from(map).map_err(|source| LoadError::Map { name, source })?;
        for net in &filters.dests {
            trie.insert(&dest_key(&net.trunc()), &1, 0)
                .map_err(|source| LoadError::Map { name, source })?;
        }
        Ok(())
    }

    /// Attaches every hook this kernel has. Returns the hooks that were skipped, with why.
    /// `prefer_btf`: attach the attempt programs as BTF tracepoints where the kernel can.
    /// `btf`: aya's parse of the kernel's BTF, whose type ids the BTF tracepoints attach by.
    pub fn attach(
        &mut self,
        resolved: &Resolved,
        prefer_btf: bool,
        btf: Result<&Btf, &BtfError>,
    ) -> Result<Vec<(&'static str, String)>, LoadError> {
        let mut skipped = resolved.unavailable.clone();
        let btf_attach = match &btf {
            _ if !prefer_btf => Err("--classic-tracepoints".into()),
            Ok(btf) if resolved.layout.tuple.known != 0 => ATTEMPT_BTF
                .into_iter()
                .try_for_each(|name| self.attach_btf(name, ATTEMPT_HOOK, btf))
                .map_err(|err| err.to_string()),
            Ok(_) => Err("struct sock's tuple members are not in the kernel's BTF".into()),
            Err(err) => Err(format!("no kernel BTF: {err}")),
        };
        if let Err(why) = btf_attach {
            tracing::warn!(
                "attempts are traced with classic tracepoints ({why}): under load the kernel may \
                 skip some of them, counted as kernel_skipped_runs"
            );
            for name in ATTEMPT_BTF {
                self.unload(name);
            }
            for name in ATTEMPT_CLASSIC {
                self.attach_tracepoint(name, "sock", ATTEMPT_HOOK)?;
            }
        }
        for (name, category) in TRACEPOINTS {
            if skipped.iter().any(|(n, _)| *n == name) {
                continue;
            }
            if let Err(err) = self.attach_tracepoint(name, category, name) {
                skipped.push((name, err.to_string()));
            }
        }
        if !skipped.iter().any(|(n, _)| *n == ERROR_REPORT) {
            let attached = btf
                .as_ref()
                .map_err(|err| format!("no kernel BTF: {err}"))
                .and_then(|btf| {
                    self.attach_btf(ERROR_REPORT, ERROR_REPORT, btf)
                        .map_err(|err| err.to_string())
                });
            if let Err(why) = attached {
                skipped.push((ERROR_REPORT, why));
            }
        }
        Ok(skipped)
    }

    fn attach_tracepoint(
        &mut self,
        name: &'static str,
        category: &str,
        tracepoint: &str,
    ) -> Result<(), LoadError> {
        let program: &mut TracePoint = self.program(name)?;
        program
            .load()
            .and_then(|()| program.attach(category, tracepoint).map(drop))
            .map_err(program_error(name))
    }

    fn attach_btf(&mut self, name: &'static str, function: &str, btf: &Btf) -> Result<(), LoadError> {
        let program: &mut BtfTracePoint = self.program(name)?;
        program
            .load(function, btf)
            .and_then(|()| program.attach().map(drop))
            .map_err(program_error(name))
    }

    /// Program `name` of the object, as its kind.
    fn program<'a, P>(&'a mut self, name: &'static str) -> Result<P, LoadError>
    where
        P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
    {
        self.ebpf
            .program_mut(name)
            .ok_or(LoadError::NoProgram(name))?
            .try_into()
            .map_err(program_error(name))
    }

    fn unload(&mut self, name: &str) {
        let result = match self.ebpf.program_mut(name) {
            Some(aya::programs::Program::TracePoint(p)) => p.unload(),
            Some(aya::programs::Program::BtfTracePoint(p)) => p.unload(),
            _ => Ok(()),
        };
        if let Err(err) = result {
            tracing::debug!("unloading {name}: {err}");
        }
    }

    /// Detaches every program so that no new attempt is recorded. Maps stay readable.
    pub fn detach(&mut self) {
        self.skipped_at_detach = Some(self.skipped_runs());
        let names: Vec<String> = self.ebpf.programs().map(|(name, _)| name.to_string()).collect();
        for name in names {
            self.unload(&name);
        }
    }

    /// Takes map `name` out of the object as its typed form.
    fn take<M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
        &mut self,
        name: &'static str,
    ) -> Result<M, LoadError> {
        let map = self.ebpf.take_map(name).ok_or(LoadError::NoMap(name))?;
        M::try_from(map).map_err(|source| LoadError::Map { name, source })
    }

    pub fn take_attempts(&mut self) -> Result<RingBuf<MapData>, LoadError> {
        self.take("ATTEMPTS")
    }

    pub fn take_process_notes(&mut self) -> Result<RingBuf<MapData>, LoadError> {
        self.take("PROCESS_NOTES")
    }

    pub fn take_stacks(&mut self) -> Result<StackTraceMap<MapData>, LoadError> {
        self.take("STACKS")
    }

    pub fn counters(&self) -> Result<KernelCounters, LoadError> {
        let map = self.ebpf.map("COUNTERS").ok_or(LoadError::NoMap("COUNTERS"))?;
        let array = PerCpuArray::<_, u64>::try_from(map).map_err(|source| LoadError::Map {
            name: "COUNTERS",
            source,
        })?;
        let sum = |slot: u32| {
            array
                .get(&slot, 0)
                .map(|values| values.iter().sum::<u64>())
                .unwrap_or(0)
        };
        Ok(KernelCounters {
            started: sum(counter::STARTED),
            finished: sum(counter::FINISHED),
            filtered: sum(counter::FILTERED),
            ringbuf_full: sum(counter::RINGBUF_FULL),
            replaced: sum(counter::REPLACED),
            untracked_finish: sum(counter::UNTRACKED_FINISH),
            track_failed: sum(counter::TRACK_FAILED),
            skipped: sum(counter::SKIPPED),
            never_started: sum(counter::NEVER_STARTED),
        })
    }

    /// Runs of synspan's programs that the kernel skipped because the same program (for
    /// classic tracepoints: any tracing program) was already running on that CPU, an
    /// interrupt in the middle of it. Each may have lost an attempt's start or end: the one
    /// loss synspan cannot count attempt by attempt.
    pub fn skipped_runs(&self) -> u64 {
        if let Some(skipped) = self.skipped_at_detach {
            return skipped;
        }
        self.ebpf
            .programs()
            .filter_map(|(_, program)| program.fd().ok())
            .map(|fd| recursion_misses(fd.as_fd()))
            .sum()
    }

    /// Attempts still waiting in SYN_SENT.
    pub fn in_flight(&self) -> Result<u64, LoadError> {
        let map = self.ebpf.map("IN_FLIGHT").ok_or(LoadError::NoMap("IN_FLIGHT"))?;
        let in_flight = HashMap::<_, u64, AttemptRecord>::try_from(map).map_err(|source| LoadError::Map {
            name: "IN_FLIGHT",
            source,
        })?;
        Ok(in_flight.keys().filter(Result::is_ok).count() as u64)
    }
}
