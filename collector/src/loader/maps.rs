//! Typed access to the object's maps: the allow-lists the agent fills before attaching, the
//! rings and the stack map it takes to read, and the in-flight map it counts.

use std::{net::IpAddr, os::unix::fs::MetadataExt, path::Path};

use aya::maps::{
    HashMap, Map, MapData, MapError, RingBuf, StackTraceMap,
    lpm_trie::{Key, LpmTrie},
};
use synspan_shared::{AttemptRecord, MAX_FILTER_ENTRIES, names::map};

use super::{KernelObject, LoadError};

/// The allow-lists of the in-kernel filter; empty lists are off.
#[derive(Debug, Default)]
pub(crate) struct Filters {
    pub(crate) pids: Vec<u32>,
    pub(crate) cgroup_ids: Vec<u64>,
    pub(crate) ports: Vec<u16>,
    pub(crate) dests: Vec<ipnet::IpNet>,
}

/// The id the kernel gives a cgroup v2 directory: its inode number.
pub(crate) fn cgroup_id(path: &Path) -> Result<u64, LoadError> {
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
    // SAFETY: as above; the kernel writes at most `size_of::<statfs>()` bytes into `fs`.
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

/// IPv4 networks live in the trie as IPv4-mapped IPv6 (`::ffff:0:0/96`).
fn dest_key(net: &ipnet::IpNet) -> Key<[u8; 16]> {
    match net.addr() {
        IpAddr::V4(v4) => Key::new(96 + u32::from(net.prefix_len()), v4.to_ipv6_mapped().octets()),
        IpAddr::V6(v6) => Key::new(u32::from(net.prefix_len()), v6.octets()),
    }
}

fn map_error(name: &'static str) -> impl Fn(MapError) -> LoadError {
    move |source| LoadError::Map { name, source }
}

impl KernelObject {
    /// Map `name`, borrowed as its typed form.
    pub(super) fn map<'a, M>(&'a self, name: &'static str) -> Result<M, LoadError>
    where
        M: TryFrom<&'a Map, Error = MapError>,
    {
        let map = self.ebpf.map(name).ok_or(LoadError::NoMap(name))?;
        M::try_from(map).map_err(map_error(name))
    }

    pub(super) fn map_mut<'a, M>(&'a mut self, name: &'static str) -> Result<M, LoadError>
    where
        M: TryFrom<&'a mut Map, Error = MapError>,
    {
        let map = self.ebpf.map_mut(name).ok_or(LoadError::NoMap(name))?;
        M::try_from(map).map_err(map_error(name))
    }

    /// Takes map `name` out of the object as its typed form.
    fn take<M: TryFrom<Map, Error = MapError>>(&mut self, name: &'static str) -> Result<M, LoadError> {
        let map = self.ebpf.take_map(name).ok_or(LoadError::NoMap(name))?;
        M::try_from(map).map_err(map_error(name))
    }

    /// Fills the allow-lists. Call before [`KernelObject::attach`].
    pub(crate) fn set_filters(&mut self, filters: &Filters) -> Result<(), LoadError> {
        self.fill_allow_list(map::ALLOW_PIDS, &filters.pids)?;
        self.fill_allow_list(map::ALLOW_CGROUPS, &filters.cgroup_ids)?;
        self.fill_allow_list(map::ALLOW_PORTS, &filters.ports)?;
        let name = map::ALLOW_DESTS;
        if filters.dests.len() > MAX_FILTER_ENTRIES as usize {
            return Err(LoadError::TooManyFilters { what: name });
        }
        let mut trie: LpmTrie<_, [u8; 16], u8> = self.map_mut(name)?;
        for net in &filters.dests {
            trie.insert(&dest_key(&net.trunc()), &1, 0)
                .map_err(map_error(name))?;
        }
        Ok(())
    }

    fn fill_allow_list<K: aya::Pod>(&mut self, name: &'static str, keys: &[K]) -> Result<(), LoadError> {
        if keys.len() > MAX_FILTER_ENTRIES as usize {
            return Err(LoadError::TooManyFilters { what: name });
        }
        let mut map: HashMap<_, K, u8> = self.map_mut(name)?;
        for key in keys {
            map.insert(key, &1, 0).map_err(map_error(name))?;
        }
        Ok(())
    }

    pub(crate) fn take_attempts(&mut self) -> Result<RingBuf<MapData>, LoadError> {
        self.take(map::ATTEMPTS)
    }

    pub(crate) fn take_process_notes(&mut self) -> Result<RingBuf<MapData>, LoadError> {
        self.take(map::PROCESS_NOTES)
    }

    pub(crate) fn take_thread_context_tls(
        &mut self,
    ) -> Result<HashMap<MapData, u32, synspan_shared::ThreadContextTls>, LoadError> {
        self.take(map::THREAD_CONTEXT_TLS)
    }

    pub(crate) fn take_stacks(&mut self) -> Result<StackTraceMap<MapData>, LoadError> {
        self.take(map::STACKS)
    }

    /// Attempts still waiting in SYN_SENT.
    pub(crate) fn in_flight(&self) -> Result<u64, LoadError> {
        let in_flight: HashMap<_, u64, AttemptRecord> = self.map(map::IN_FLIGHT)?;
        Ok(in_flight.keys().filter(Result::is_ok).count() as u64)
    }
}
