//! The kernel's connect series (`CONNECT_SERIES`, `OVERFLOW_SERIES`): read them, summed over
//! the CPUs, and take out the ones that went quiet.

use std::os::fd::{AsFd, AsRawFd};

use aya::maps::{Map, PerCpuArray, PerCpuHashMap};
use synspan_shared::{SeriesKey, SeriesValue, names::map, outcome};

use super::{KernelObject, LoadError};

/// One series summed over the CPUs.
fn sum<'a>(values: impl IntoIterator<Item = &'a SeriesValue>) -> SeriesValue {
    let mut total = SeriesValue::ZERO;
    for v in values {
        total.attempts = total.attempts.wrapping_add(v.attempts);
        total.syn_retransmits = total.syn_retransmits.wrapping_add(v.syn_retransmits);
        total.duration_ns = total.duration_ns.wrapping_add(v.duration_ns);
        for (t, b) in total.buckets.iter_mut().zip(v.buckets) {
            *t = t.wrapping_add(b);
        }
    }
    total
}

/// What the kernel has counted so far.
#[derive(Clone, Debug, Default)]
pub(crate) struct SeriesReading {
    pub(crate) series: Vec<(SeriesKey, SeriesValue)>,
    /// By outcome code: attempts whose series did not fit.
    pub(crate) overflow: Vec<SeriesValue>,
}

impl KernelObject {
    /// Every series in the kernel, and the overflow. A series made or deleted while the map
    /// is walked may be missed this time; it is read the next.
    pub(crate) fn connect_series(&self) -> Result<SeriesReading, LoadError> {
        let series: PerCpuHashMap<_, SeriesKey, SeriesValue> = self.map(map::CONNECT_SERIES)?;
        let overflow: PerCpuArray<_, SeriesValue> = self.map(map::OVERFLOW_SERIES)?;
        let series = series
            .iter()
            .filter_map(Result::ok)
            .map(|(key, values)| (key, sum(values.iter())))
            .collect();
        let overflow = (0..outcome::LEN)
            .map(|code| overflow.get(&code, 0).map(|v| sum(v.iter())).unwrap_or_default())
            .collect();
        Ok(SeriesReading { series, overflow })
    }

    /// Takes a series out of the kernel and returns what it counted up to that moment: the
    /// kernel's lookup-and-delete, so that an attempt counted after the last reading is
    /// returned, not lost. An attempt whose program found the series just before it went
    /// and adds to it just after is lost (see README, "Connect metrics").
    pub(crate) fn forget_series(&mut self, key: &SeriesKey) -> Option<SeriesValue> {
        let Map::PerCpuHashMap(data) = self.ebpf.map(map::CONNECT_SERIES)? else {
            return None;
        };
        let cpus = aya::util::nr_cpus().ok()?.get() as usize;
        // The kernel writes one value per possible CPU, each rounded up to 8 bytes.
        const _: () = assert!(size_of::<SeriesValue>().is_multiple_of(8));
        let mut values = vec![SeriesValue::ZERO; cpus];
        use aya_obj::generated::{bpf_attr, bpf_cmd};
        // SAFETY: a zeroed plain C union.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: writing the plain integer fields of the map-element member of the union.
        unsafe {
            let elem = &mut attr.__bindgen_anon_2;
            elem.map_fd = data.fd().as_fd().as_raw_fd() as u32;
            elem.key = key as *const SeriesKey as u64;
            elem.__bindgen_anon_1.value = values.as_mut_ptr() as u64;
        }
        // SAFETY: `attr` names a key of the map's key size and a buffer of one value per
        // possible CPU, both of which outlive the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                bpf_cmd::BPF_MAP_LOOKUP_AND_DELETE_ELEM as libc::c_long,
                &mut attr as *mut bpf_attr,
                size_of::<bpf_attr>(),
            )
        };
        if ret == 0 {
            return Some(sum(&values));
        }
        // Kernels before 5.14 cannot do it on a per-CPU map: read, then delete, which widens
        // the window in which an attempt can be lost to the time between the two calls.
        let mut series: PerCpuHashMap<_, SeriesKey, SeriesValue> = self.map_mut(map::CONNECT_SERIES).ok()?;
        let last = series.get(key, 0).ok().map(|v| sum(v.iter()));
        let _ = series.remove(key);
        last
    }
}
