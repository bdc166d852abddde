//! Who made an attempt and from where: the process behind a pid ([`process`]), its container
//! and pod ([`container`]), and names for its kernel and user stacks ([`symbols`]).
//!
//! Everything here reads `/proc` after the kernel reported the attempt, so the process may
//! have exited by then: every lookup can come back empty, and none of it may hold up an
//! attempt.

pub mod container;
pub mod identity;
pub mod process;
pub mod process_context;
pub mod symbols;

use std::{collections::HashMap, sync::Arc};

use process::{ProcessError, ProcessInfo, ReadOptions};

/// Processes remembered by default.
pub const DEFAULT_MAX_PROCESSES: usize = 8192;

/// [`ProcessInfo`] of recently seen processes. A process is its pid and its start time, so a
/// reused pid is read afresh; a process that exited since it was read is still answered for,
/// until [`ProcessCache::sweep`]: its attempts are often reported after it is gone.
#[derive(Debug)]
pub struct ProcessCache {
    entries: HashMap<u32, Arc<ProcessInfo>>,
    max_entries: usize,
    options: ReadOptions,
}

impl ProcessCache {
    pub fn new(max_entries: usize, options: ReadOptions) -> Self {
        Self {
            entries: HashMap::new(),
            max_entries: max_entries.max(1),
            options,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The process now at `pid`, or the one last seen there if it has exited; `None` when
    /// neither is known.
    pub fn lookup_or_load(&mut self, pid: u32) -> Option<Arc<ProcessInfo>> {
        let start_time = match process::read_stat(pid) {
            Ok(stat) if !stat.has_exited() => stat.start_time,
            Ok(_) | Err(ProcessError::Gone(_)) => return self.entries.get(&pid).cloned(),
            Err(err) => {
                tracing::debug!("process {pid}: {err}");
                return None;
            }
        };
        if let Some(info) = self.entries.get(&pid)
            && info.start_time == start_time
        {
            return Some(info.clone());
        }
        match ProcessInfo::read(pid, &self.options) {
            Ok(info) => {
                let info = Arc::new(info);
                // Rather than find the least useful entry, start over: the live ones come back
                // on their next attempt.
                if self.entries.len() >= self.max_entries && !self.entries.contains_key(&pid) {
                    self.entries.clear();
                }
                self.entries.insert(pid, info.clone());
                Some(info)
            }
            // Exited between the two reads: what was cached at that pid was another process.
            Err(ProcessError::Gone(_)) => {
                self.entries.remove(&pid);
                None
            }
            Err(err) => {
                tracing::debug!("process {pid}: {err}");
                None
            }
        }
    }

    /// Forgets processes that have exited, or whose pid now names another process. Returns
    /// how many. Call it now and then, after the attempts of the exited ones have been reported.
    pub fn sweep(&mut self) -> usize {
        let before = self.entries.len();
        self.entries.retain(|&pid, info| {
            matches!(process::read_stat(pid), Ok(stat) if stat.start_time == info.start_time && !stat.has_exited())
        });
        before - self.entries.len()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{
        io::{BufRead, BufReader, Write},
        path::{Path, PathBuf},
        process::{Child, Command, Stdio},
        sync::atomic::{AtomicU32, Ordering},
    };

    use super::*;

    /// A directory removed when dropped.
    pub(crate) struct TempDir(PathBuf);

    impl TempDir {
        pub(crate) fn new() -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!("synspan-test-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }

        pub(crate) fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A `cat` that has answered a line: past its exec, so `/proc` shows `cat`, its arguments
    /// and its environment. Right after spawn() it may still be mid-exec: the parent can run
    /// again before the kernel has set up the new program's arguments and environment.
    pub(crate) fn running_cat(args: &[&str], env: &[(&str, &str)]) -> Child {
        let mut child = Command::new("cat")
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.as_mut().unwrap().write_all(b"ready\n").unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "ready\n");
        child
    }

    fn sleeper() -> Child {
        running_cat(&[], &[])
    }

    fn reap(mut child: Child) {
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn loads_once_and_answers_from_the_cache() {
        let mut cache = ProcessCache::new(DEFAULT_MAX_PROCESSES, ReadOptions::default());
        let me = std::process::id();
        let first = cache.lookup_or_load(me).unwrap();
        let second = cache.lookup_or_load(me).unwrap();
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(first.pid, me);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.sweep(), 0);
    }

    #[test]
    fn exited_process_is_answered_until_swept() {
        let mut cache = ProcessCache::new(DEFAULT_MAX_PROCESSES, ReadOptions::default());
        let child = sleeper();
        let pid = child.id();
        let info = cache.lookup_or_load(pid).unwrap();
        assert_eq!(info.exe_name, "cat");
        reap(child);

        let after_exit = cache.lookup_or_load(pid).unwrap();
        assert!(Arc::ptr_eq(&info, &after_exit));
        assert_eq!(cache.sweep(), 1);
        assert!(cache.is_empty());
        assert!(cache.lookup_or_load(pid).is_none());
    }

    #[test]
    fn reused_pid_is_read_afresh() {
        let mut cache = ProcessCache::new(DEFAULT_MAX_PROCESSES, ReadOptions::default());
        let me = std::process::id();
        let real = cache.lookup_or_load(me).unwrap();
        // What a process that held this pid before us would have left.
        let earlier = || {
            let mut earlier = (*real).clone();
            earlier.start_time += 1;
            earlier.comm = "previous".into();
            Arc::new(earlier)
        };
        cache.entries.insert(me, earlier());
        let fresh = cache.lookup_or_load(me).unwrap();
        assert_eq!(fresh.comm, real.comm);
        assert_eq!(fresh.start_time, real.start_time);

        cache.entries.insert(me, earlier());
        assert_eq!(cache.sweep(), 1);
    }

    #[test]
    fn bounded() {
        let mut cache = ProcessCache::new(2, ReadOptions::default());
        let children = [sleeper(), sleeper(), sleeper()];
        for child in &children {
            assert!(cache.lookup_or_load(child.id()).is_some());
            assert!(cache.len() <= 2);
        }
        // The third started the cache over.
        assert_eq!(cache.len(), 1);
        assert!(cache.entries.contains_key(&children[2].id()));
        for child in children {
            reap(child);
        }
        assert_eq!(cache.sweep(), 1);
    }

    #[test]
    fn unknown_pid_is_none() {
        let mut cache = ProcessCache::new(DEFAULT_MAX_PROCESSES, ReadOptions::default());
        // Above the largest pid_max the kernel allows (2^22).
        assert!(cache.lookup_or_load(u32::MAX).is_none());
        assert!(cache.is_empty());
    }
}
