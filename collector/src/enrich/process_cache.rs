//! The processes behind recent attempts, each read from `/proc` once.

use std::{
    collections::HashMap,
    fs::File,
    num::NonZeroUsize,
    sync::{Arc, Weak},
    time::{Duration, Instant},
};

use lru::LruCache;

use super::{
    container::{container_id, k8s_pod_uid},
    identity::Process,
    process::{self, ProcessError, ProcessInfo, ReadOptions},
};

/// Processes remembered. A host seldom has this many processes making connections at once; the
/// least recently seen is forgotten first, and costs one read of `/proc` if it comes back.
pub(crate) const MAX_PROCESSES: NonZeroUsize = NonZeroUsize::new(8192).unwrap();

/// A process is re-read from `/proc` at most this often; in between, its cached identity
/// stands. A pid reused within this window would be misnamed, which needs 4 million forks.
const RECHECK: Duration = Duration::from_secs(1);

/// How often a process that published no context is looked at for one that appeared since:
/// that costs a read of its maps, where a published one costs a read of its header.
const LOOK_FOR_CONTEXT: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Entry {
    process: Arc<Process>,
    checked: Instant,
    /// When it was last looked at for a process context it published since.
    context_looked: Instant,
}

/// Recently seen processes by pid. A process is its pid and its start time, so a reused pid is
/// read afresh; a process that exited since it was read is still answered for, until
/// [`ProcessCache::sweep`]: its attempts are often reported after it is gone.
#[derive(Debug)]
pub(crate) struct ProcessCache {
    entries: LruCache<u32, Entry>,
    options: ReadOptions,
    /// One open descriptor per network namespace, shared by its processes: a namespace is
    /// kept alive only while a remembered process uses it.
    netns: HashMap<u64, Weak<File>>,
}

impl ProcessCache {
    pub(crate) fn new(capacity: NonZeroUsize, options: ReadOptions) -> Self {
        Self {
            entries: LruCache::new(capacity),
            options,
            netns: HashMap::new(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn capacity(&self) -> usize {
        self.entries.cap().get()
    }

    /// The process at `pid`, as remembered if it was checked within [`RECHECK`], else as
    /// [`ProcessCache::check`] finds it.
    pub(crate) fn get(&mut self, pid: u32) -> Option<Arc<Process>> {
        match self.entries.get(&pid) {
            Some(entry) if entry.checked.elapsed() < RECHECK => Some(entry.process.clone()),
            _ => self.check(pid),
        }
    }

    /// The process now at `pid`, or the one last seen there if it has exited; `None` when
    /// neither is known.
    pub(crate) fn check(&mut self, pid: u32) -> Option<Arc<Process>> {
        let start_time = match process::read_stat(pid) {
            Ok(stat) if !stat.has_exited() => stat.start_time,
            Ok(_) | Err(ProcessError::Gone(_)) => return self.confirm(pid),
            Err(err) => {
                tracing::debug!("process {pid}: {err}");
                return None;
            }
        };
        if let Some(entry) = self.entries.get_mut(&pid)
            && entry.process.info.start_time == start_time
        {
            let look_for_new = entry.context_looked.elapsed() >= LOOK_FOR_CONTEXT;
            if look_for_new {
                entry.context_looked = Instant::now();
            }
            if !entry.process.info.context_changed(look_for_new) {
                return self.confirm(pid);
            }
        }
        match ProcessInfo::read(pid, &self.options) {
            Ok(info) => {
                let process = Arc::new(Process {
                    container_id: container_id(&info.cgroup_paths),
                    k8s_pod_uid: k8s_pod_uid(&info.cgroup_paths),
                    netns: self.netns_of(&info),
                    info,
                });
                self.entries.put(
                    pid,
                    Entry {
                        process: process.clone(),
                        checked: Instant::now(),
                        context_looked: Instant::now(),
                    },
                );
                Some(process)
            }
            // Exited between the two reads: what was remembered at that pid was another process.
            Err(ProcessError::Gone(_)) => {
                self.entries.pop(&pid);
                None
            }
            Err(err) => {
                tracing::debug!("process {pid}: {err}");
                None
            }
        }
    }

    /// The remembered process at `pid`, found to be still the one there (or gone, with no
    /// other in its place) just now.
    fn confirm(&mut self, pid: u32) -> Option<Arc<Process>> {
        let entry = self.entries.get_mut(&pid)?;
        entry.checked = Instant::now();
        Some(entry.process.clone())
    }

    /// Forgets processes that have exited, or whose pid now names another process. Returns
    /// how many. Call it now and then, after the attempts of the exited ones have been reported.
    pub(crate) fn sweep(&mut self) -> usize {
        let gone: Vec<u32> = self
            .entries
            .iter()
            .filter(|(pid, entry)| {
                !matches!(process::read_stat(**pid),
                    Ok(stat) if stat.start_time == entry.process.info.start_time && !stat.has_exited())
            })
            .map(|(pid, _)| *pid)
            .collect();
        for pid in &gone {
            self.entries.pop(pid);
        }
        gone.len()
    }

    fn netns_of(&mut self, info: &ProcessInfo) -> Option<Arc<File>> {
        let inode = info.netns_inode?;
        if let Some(file) = self.netns.get(&inode).and_then(Weak::upgrade) {
            return Some(file);
        }
        let file = Arc::new(File::open(format!("/proc/{}/ns/net", info.pid)).ok()?);
        self.netns.retain(|_, file| file.strong_count() > 0);
        self.netns.insert(inode, Arc::downgrade(&file));
        Some(file)
    }
}

#[cfg(test)]
mod tests {
    use std::process::Child;

    use super::*;
    use crate::enrich::tests::{reap, running_cat};

    fn sleeper() -> Child {
        running_cat(&[], &[])
    }

    #[test]
    fn loads_once_and_answers_from_the_cache() {
        let mut cache = ProcessCache::new(MAX_PROCESSES, ReadOptions::default());
        let me = std::process::id();
        let first = cache.check(me).unwrap();
        let second = cache.check(me).unwrap();
        let third = cache.get(me).unwrap();
        assert!(Arc::ptr_eq(&first, &second));
        assert!(Arc::ptr_eq(&first, &third));
        assert_eq!(first.info.pid, me);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.sweep(), 0);
    }

    #[test]
    fn exited_process_is_answered_until_swept() {
        let mut cache = ProcessCache::new(MAX_PROCESSES, ReadOptions::default());
        let child = sleeper();
        let pid = child.id();
        let process = cache.check(pid).unwrap();
        assert_eq!(process.info.exe_name, "cat");
        reap(child);

        let after_exit = cache.check(pid).unwrap();
        assert!(Arc::ptr_eq(&process, &after_exit));
        assert_eq!(cache.sweep(), 1);
        assert_eq!(cache.len(), 0);
        assert!(cache.check(pid).is_none());
    }

    /// What a process that held our pid before us would have left.
    fn remember_an_earlier_process(cache: &mut ProcessCache, real: &Process) {
        let mut info = real.info.clone();
        info.start_time += 1;
        info.comm = "previous".into();
        let process = Arc::new(Process {
            info,
            container_id: None,
            k8s_pod_uid: None,
            netns: None,
        });
        let checked = Instant::now();
        let entry = Entry {
            process,
            checked,
            context_looked: checked,
        };
        cache.entries.put(real.info.pid, entry);
    }

    #[test]
    fn reused_pid_is_read_afresh() {
        let mut cache = ProcessCache::new(MAX_PROCESSES, ReadOptions::default());
        let me = std::process::id();
        let real = cache.check(me).unwrap();
        remember_an_earlier_process(&mut cache, &real);
        // Checked just now: it stands until RECHECK is over, or until asked to check.
        assert_eq!(cache.get(me).unwrap().info.comm, "previous");
        let fresh = cache.check(me).unwrap();
        assert_eq!(fresh.info.comm, real.info.comm);
        assert_eq!(fresh.info.start_time, real.info.start_time);

        remember_an_earlier_process(&mut cache, &real);
        assert_eq!(cache.sweep(), 1);
    }

    #[test]
    fn the_least_recently_seen_is_forgotten_first() {
        let mut cache = ProcessCache::new(NonZeroUsize::new(2).unwrap(), ReadOptions::default());
        let children = [sleeper(), sleeper(), sleeper()];
        let [first, second, third] = children.each_ref().map(Child::id);
        assert!(cache.check(first).is_some());
        assert!(cache.check(second).is_some());
        // Seen again: now the second is the older one.
        assert!(cache.get(first).is_some());
        assert!(cache.check(third).is_some());
        assert_eq!(cache.len(), 2);
        assert!(cache.entries.contains(&first));
        assert!(!cache.entries.contains(&second));
        assert!(cache.entries.contains(&third));
        for child in children {
            reap(child);
        }
        assert_eq!(cache.sweep(), 2);
    }

    #[test]
    fn processes_of_one_namespace_share_its_descriptor() {
        let mut cache = ProcessCache::new(MAX_PROCESSES, ReadOptions::default());
        let (a, b) = (sleeper(), sleeper());
        let netns_a = cache.check(a.id()).unwrap().netns.clone().unwrap();
        let netns_b = cache.check(b.id()).unwrap().netns.clone().unwrap();
        assert!(Arc::ptr_eq(&netns_a, &netns_b));
        let held = Arc::downgrade(&netns_a);
        drop((netns_a, netns_b));
        reap(a);
        reap(b);
        assert_eq!(cache.sweep(), 2);
        assert!(
            held.upgrade().is_none(),
            "the namespace is held after its processes are gone"
        );
    }

    #[test]
    fn unknown_pid_is_none() {
        let mut cache = ProcessCache::new(MAX_PROCESSES, ReadOptions::default());
        // Above the largest pid_max the kernel allows (2^22).
        assert!(cache.get(u32::MAX).is_none());
        assert_eq!(cache.len(), 0);
    }
}
