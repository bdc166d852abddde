//! Kernel timestamps (`bpf_ktime_get_ns`, CLOCK_MONOTONIC) to wall-clock time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The offset between CLOCK_REALTIME and CLOCK_MONOTONIC, re-sampled now and then so that
/// NTP slews and steps reach the spans.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WallClock {
    /// realtime - monotonic, in nanoseconds.
    offset_ns: i128,
    sampled_at_mono_ns: u64,
}

/// Re-sample at most this often.
const RESAMPLE_NS: u64 = 1_000_000_000;

fn now_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer; both clocks exist on every Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

impl WallClock {
    pub(crate) fn sample() -> Self {
        // Bracket the monotonic read between two realtime reads and keep the tightest of a
        // few tries: the error is then half the bracket, well under a microsecond.
        let mut best: Option<(i128, i128)> = None;
        for _ in 0..5 {
            let before = now_ns(libc::CLOCK_REALTIME);
            let mono = now_ns(libc::CLOCK_MONOTONIC);
            let after = now_ns(libc::CLOCK_REALTIME);
            let width = after - before;
            let offset = before + width / 2 - mono;
            if best.is_none_or(|(w, _)| width < w) {
                best = Some((width, offset));
            }
        }
        let (_, offset_ns) = best.unwrap_or((0, 0));
        Self {
            offset_ns,
            sampled_at_mono_ns: now_ns(libc::CLOCK_MONOTONIC) as u64,
        }
    }

    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn from_offset(offset_ns: i128) -> Self {
        Self {
            offset_ns,
            sampled_at_mono_ns: 0,
        }
    }

    /// Re-samples if the last sample is older than a second, as seen from `mono_ns`.
    pub(crate) fn refresh(&mut self, mono_ns: u64) {
        if mono_ns.saturating_sub(self.sampled_at_mono_ns) >= RESAMPLE_NS {
            *self = Self::sample();
        }
    }

    pub(crate) fn to_system_time(self, mono_ns: u64) -> SystemTime {
        let unix_ns = mono_ns as i128 + self.offset_ns;
        if unix_ns <= 0 {
            return UNIX_EPOCH;
        }
        UNIX_EPOCH + Duration::from_nanos(u64::try_from(unix_ns).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_with_offset() {
        let clock = WallClock::from_offset(1_700_000_000_000_000_000);
        let t = clock.to_system_time(5_000_000_123);
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap(),
            Duration::from_nanos(1_700_000_005_000_000_123)
        );
    }

    #[test]
    fn sampled_clock_matches_now() {
        let clock = WallClock::sample();
        let mono = now_ns(libc::CLOCK_MONOTONIC) as u64;
        let converted = clock.to_system_time(mono);
        let now = SystemTime::now();
        let skew = now.duration_since(converted).unwrap_or_else(|e| e.duration());
        assert!(skew < Duration::from_millis(1), "skew {skew:?}");
    }

    #[test]
    fn clamps_before_epoch() {
        let clock = WallClock::from_offset(-10);
        assert_eq!(clock.to_system_time(5), UNIX_EPOCH);
    }
}
