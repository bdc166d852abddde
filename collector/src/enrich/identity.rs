//! The identity of one attempt: the process, its service and container, and its stacks as
//! text. Everything is cached: a connect storm from one code path costs a few map reads per
//! attempt, not a symbolization.

use std::{
    collections::HashMap,
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use aya::maps::{MapData, StackTraceMap};
use synspan_shared::ProcessNote;

use super::{
    ProcessCache,
    container::{container_id, k8s_pod_uid},
    process::{ProcessInfo, ReadOptions},
    symbols::{KernelSymbols, NormalizedFrame, StackNormalizer, UserSymbolizer},
};
use crate::attempt::Attempt;

/// Who made an attempt and from where. Every part may be missing: the process can be gone
/// before synspan ever saw it, and stacks can be off.
#[derive(Clone, Debug, Default)]
pub struct Identity {
    pub process: Option<Arc<Process>>,
    /// One frame per line, innermost first.
    pub user_stack: Option<Arc<str>>,
    pub kernel_stack: Option<Arc<str>>,
    pub end_kernel_stack: Option<Arc<str>>,
}

/// A process with what is derived from it once.
#[derive(Debug)]
pub struct Process {
    pub info: Arc<ProcessInfo>,
    pub container_id: Option<String>,
    pub k8s_pod_uid: Option<String>,
    /// Its network namespace, held open: evidence is looked up there after the attempt
    /// ends, when the process (and its `/proc/<pid>/ns/net`) may be gone.
    pub netns: Option<Arc<File>>,
}

impl Process {
    /// A path that opens the process's network namespace, while synspan holds it.
    pub fn netns_path(&self) -> PathBuf {
        match &self.netns {
            Some(file) => PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd())),
            None => PathBuf::from(format!("/proc/{}/ns/net", self.info.pid)),
        }
    }
}

/// A process is re-read from `/proc` at most this often; in between, its cached identity
/// stands. A pid reused within this window would be misnamed, which needs 4 million forks.
const RECHECK: Duration = Duration::from_secs(1);
/// Rendered stacks and normalized user stacks kept. Past it, the cache starts over.
const MAX_STACKS: usize = 16384;

pub struct Enricher {
    processes: ProcessCache,
    known: HashMap<u32, (Arc<Process>, Instant)>,
    stacks: Option<StackTraceMap<MapData>>,
    /// Stacks read from the map during the current batch, by id: a storm from one code path
    /// shares a few ids, and each read is a syscall. Emptied by [`Enricher::new_batch`]: the
    /// kernel reuses an id when a new stack hashes to it.
    read_stacks: HashMap<u32, Option<Arc<[u64]>>>,
    kernel: Option<KernelSymbols>,
    normalizer: StackNormalizer,
    user: UserSymbolizer,
    /// User stacks normalized while their process was alive, by (pid, addresses).
    normalized: HashMap<(u32, Arc<[u64]>), Vec<NormalizedFrame>>,
    rendered_user: HashMap<(u32, Arc<[u64]>), Arc<str>>,
    rendered_kernel: HashMap<Arc<[u64]>, Arc<str>>,
    /// One open descriptor per network namespace, shared by its processes: a namespace is
    /// kept alive only while a known process uses it.
    netns: HashMap<u64, std::sync::Weak<File>>,
}

/// Frames kept per stack, innermost first, and characters kept per frame. Demangled
/// generic Rust or C++ names run to kilobytes; a span carries a stack to be read, not a
/// debugger's worth of it, and every byte is paid for in the queue and on the wire.
const MAX_FRAMES: usize = 32;
const MAX_FRAME_CHARS: usize = 240;

/// One frame per line, each cut to `MAX_FRAME_CHARS` (with `…`), at most `MAX_FRAMES` of them.
fn stack_text(frames: &[String]) -> Arc<str> {
    let mut text = String::new();
    for (i, frame) in frames.iter().take(MAX_FRAMES).enumerate() {
        if i > 0 {
            text.push('\n');
        }
        match frame.char_indices().nth(MAX_FRAME_CHARS) {
            Some((cut, _)) => {
                text.push_str(&frame[..cut]);
                text.push('…');
            }
            None => text.push_str(frame),
        }
    }
    if frames.len() > MAX_FRAMES {
        text.push_str(&format!("\n… {} more frames", frames.len() - MAX_FRAMES));
    }
    text.into()
}

fn bounded_insert<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>, key: K, value: V) {
    if map.len() >= MAX_STACKS {
        map.clear();
    }
    map.insert(key, value);
}

impl Enricher {
    /// `stacks` is `None` with `--no-stacks`. Kernel symbols must be read before capabilities
    /// are dropped: without CAP_SYSLOG the kernel hides the addresses.
    pub fn new(stacks: Option<StackTraceMap<MapData>>, options: ReadOptions) -> Self {
        let kernel = stacks.as_ref().and_then(|_| match KernelSymbols::load() {
            Ok(symbols) => Some(symbols),
            Err(err) => {
                tracing::warn!("kernel stacks will show addresses only: {err}");
                None
            }
        });
        Self {
            processes: ProcessCache::new(super::DEFAULT_MAX_PROCESSES, options),
            known: HashMap::new(),
            stacks,
            read_stacks: HashMap::new(),
            kernel,
            normalizer: StackNormalizer::new(),
            user: UserSymbolizer::new(),
            normalized: HashMap::new(),
            rendered_user: HashMap::new(),
            rendered_kernel: HashMap::new(),
            netns: HashMap::new(),
        }
    }

    /// The kernel saw a process (or a new code path of one) start an attempt: read what
    /// might be gone by the time the attempt ends.
    pub fn on_note(&mut self, note: &ProcessNote) {
        self.known.remove(&note.pid);
        let _ = self.process(note.pid);
        if let Some(addrs) = self.stack(u32::try_from(note.user_stack_id).ok()) {
            self.normalize(note.pid, addrs);
        }
    }

    pub fn identify(&mut self, attempt: &Attempt) -> Identity {
        let process = self.process(attempt.pid);
        let user_stack = self
            .stack(attempt.user_stack_id)
            .and_then(|addrs| self.render_user(attempt.pid, addrs));
        let kernel_stack = self.stack(attempt.kernel_stack_id).map(|a| self.render_kernel(a));
        let end_kernel_stack = self
            .stack(attempt.end_kernel_stack_id)
            .map(|a| self.render_kernel(a));
        Identity {
            process,
            user_stack,
            kernel_stack,
            end_kernel_stack,
        }
    }

    /// Starts a batch of records read together: stacks are read from the map afresh.
    pub fn new_batch(&mut self) {
        self.read_stacks.clear();
    }

    /// Forgets processes that have exited. Call now and then.
    pub fn sweep(&mut self) {
        self.processes.sweep();
        self.known
            .retain(|pid, _| Path::new("/proc").join(pid.to_string()).exists());
        self.normalized
            .retain(|(pid, _), _| Path::new("/proc").join(pid.to_string()).exists());
    }

    fn process(&mut self, pid: u32) -> Option<Arc<Process>> {
        if let Some((process, checked)) = self.known.get(&pid)
            && checked.elapsed() < RECHECK
        {
            return Some(process.clone());
        }
        let info = self.processes.lookup_or_load(pid)?;
        let process = match self.known.get(&pid) {
            Some((known, _)) if Arc::ptr_eq(&known.info, &info) => known.clone(),
            _ => Arc::new(Process {
                container_id: container_id(&info.cgroup_paths),
                k8s_pod_uid: k8s_pod_uid(&info.cgroup_paths),
                netns: self.netns_of(&info),
                info,
            }),
        };
        if self.known.len() >= super::DEFAULT_MAX_PROCESSES {
            self.known.clear();
        }
        self.known.insert(pid, (process.clone(), Instant::now()));
        Some(process)
    }

    fn netns_of(&mut self, info: &ProcessInfo) -> Option<Arc<File>> {
        let inode = info.netns_inode?;
        if let Some(file) = self.netns.get(&inode).and_then(std::sync::Weak::upgrade) {
            return Some(file);
        }
        let file = Arc::new(File::open(format!("/proc/{}/ns/net", info.pid)).ok()?);
        self.netns.retain(|_, weak| weak.strong_count() > 0);
        self.netns.insert(inode, Arc::downgrade(&file));
        Some(file)
    }

    fn stack(&mut self, id: Option<u32>) -> Option<Arc<[u64]>> {
        let map = self.stacks.as_ref()?;
        let id = id?;
        self.read_stacks
            .entry(id)
            .or_insert_with(|| {
                let trace = map.get(&id, 0).ok()?;
                Some(trace.frames().iter().map(|f| f.ip).collect())
            })
            .clone()
    }

    fn normalize(&mut self, pid: u32, addrs: Arc<[u64]>) {
        let key = (pid, addrs);
        if self.normalized.contains_key(&key) {
            return;
        }
        match self.normalizer.normalize(pid, &key.1) {
            Ok(frames) => bounded_insert(&mut self.normalized, key, frames),
            Err(err) => tracing::debug!("user stack of {pid}: {err}"),
        }
    }

    fn render_user(&mut self, pid: u32, addrs: Arc<[u64]>) -> Option<Arc<str>> {
        let key = (pid, addrs);
        if let Some(text) = self.rendered_user.get(&key) {
            return Some(text.clone());
        }
        // Normalized while the process lived (at its note), else now, if it still does.
        if !self.normalized.contains_key(&key) {
            self.normalize(pid, key.1.clone());
        }
        let frames = self.normalized.get(&key)?;
        let text = stack_text(&self.user.symbolize_normalized(frames));
        bounded_insert(&mut self.rendered_user, key, text.clone());
        Some(text)
    }

    fn render_kernel(&mut self, addrs: Arc<[u64]>) -> Arc<str> {
        if let Some(text) = self.rendered_kernel.get(&addrs) {
            return text.clone();
        }
        let lines = match &self.kernel {
            Some(symbols) => symbols.symbolize(&addrs),
            None => addrs.iter().map(|a| format!("{a:#x}")).collect(),
        };
        let text = stack_text(&lines);
        bounded_insert(&mut self.rendered_kernel, addrs, text.clone());
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stacks_are_bounded_and_readable() {
        let frames: Vec<String> = (0..40)
            .map(|i| format!("f{i}+0x1 ({})", "x".repeat(300)))
            .collect();
        let text = stack_text(&frames);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), MAX_FRAMES + 1);
        assert!(lines[0].starts_with("f0+0x1 (") && lines[0].ends_with('…'));
        assert_eq!(lines[0].chars().count(), MAX_FRAME_CHARS + 1);
        assert_eq!(lines[MAX_FRAMES], "… 8 more frames");
        assert_eq!(&*stack_text(&["a+0x1".into(), "b+0x2".into()]), "a+0x1\nb+0x2");
    }
}
