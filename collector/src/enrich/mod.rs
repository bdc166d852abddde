//! Who made an attempt and from where: the process behind a pid ([`process`]), its container
//! and pod ([`container`]), and names for its kernel and user stacks ([`symbols`]), put
//! together by the [`Enricher`] into an attempt's [`Identity`](identity::Identity).
//!
//! Everything here reads `/proc` after the kernel reported the attempt, so the process may
//! have exited by then: every lookup can come back empty, and none of it may hold up an
//! attempt. Everything is cached: a connect storm from one code path costs a few map reads per
//! attempt, not a symbolization.

pub(crate) mod container;
pub(crate) mod identity;
pub(crate) mod kallsyms;
pub(crate) mod process;
pub(crate) mod process_cache;
pub(crate) mod process_context;
pub(crate) mod symbols;
pub(crate) mod thread_context;
pub(crate) mod unwind;

use std::{cell::RefCell, collections::HashMap, num::NonZeroUsize, path::Path, sync::Arc};

use aya::maps::{MapData, StackTraceMap};
use lru::LruCache;
use synspan_shared::{MAX_BUILD_ID_FRAMES, ProcessNote, ThreadContextTls, VanishingProcess};

use crate::attempt::{Attempt, UserFrame};
use identity::Identity;
use kallsyms::KernelSymbols;
use process::ReadOptions;
use process_cache::{MAX_PROCESSES, ProcessCache};
use symbols::{ProcessImage, StackNormalizer, UserSymbolizer};
use thread_context::ThreadContexts;
use unwind::{FrameUnwinder, ProcessUnwinder};

/// Processes whose code is remembered: those that made attempts lately, until they are swept
/// after they exit. Each holds its files open (shared with every other process that maps them).
const MAX_IMAGES: NonZeroUsize = NonZeroUsize::new(4096).unwrap();

/// A process's code as read while it lived, and framehop's view of it.
struct Image {
    code: ProcessImage,
    unwinder: ProcessUnwinder,
}

/// Processes remembered that exited before `/proc/<pid>` could be read, with what the kernel
/// recorded of them: a churn of short-lived clients puts one here each, about 1.1 KiB.
const MAX_VANISHED: NonZeroUsize = NonZeroUsize::new(1024).unwrap();

/// A process note as the kernel wrote it into its ring buffer; `None` if it is too short.
pub(crate) fn read_note(bytes: &[u8]) -> Option<ProcessNote> {
    if bytes.len() < size_of::<ProcessNote>() {
        return None;
    }
    // SAFETY: ProcessNote is plain old data (integers and arrays of them, any bit pattern a
    // value) and the length was checked.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<ProcessNote>()) })
}

/// What names a process and its frames once it is gone, as its note carried it.
pub(crate) struct Vanished {
    pub(crate) exe_name: Option<Arc<str>>,
    user_stack_id: i32,
    pub(crate) frames: Vec<synspan_shared::BuildIdFrame>,
}

impl Vanished {
    /// Bounded by the note's own arrays whatever counts the kernel wrote.
    pub(crate) fn from_note(note: &ProcessNote) -> Self {
        let v: &VanishingProcess = &note.vanishing;
        let name = &v.exe_name[..v
            .exe_name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(v.exe_name.len())];
        let count = (v.frame_count as usize).min(MAX_BUILD_ID_FRAMES);
        Self {
            exe_name: (!name.is_empty()).then(|| String::from_utf8_lossy(name).into()),
            user_stack_id: note.user_stack_id,
            frames: v.frames[..count].to_vec(),
        }
    }
}

/// Stacks remembered, normalized and rendered: as many as the kernel's stack map holds ids,
/// so a cache holds every stack the map can report at once.
pub(crate) const MAX_STACKS: NonZeroUsize = NonZeroUsize::new(16384).unwrap();

/// Rendered user stacks kept, by process and stack. Each holds up to `MAX_FRAMES` named frames
/// with their files, often a KiB or more, and a host's churn of short-lived processes puts one
/// entry per process here: at `MAX_STACKS` entries the churn soak (`collector/tests/churn.rs`)
/// filled the cache and peaked at 65.4 MiB RSS, over the 64 MiB the agent keeps to.
const MAX_RENDERED_USER: NonZeroUsize = NonZeroUsize::new(4096).unwrap();

/// A user stack as the kernel reported it for one process: its addresses mean something only
/// in that process's memory map.
type UserStackKey = (u32, Arc<[u64]>);

thread_local! {
    /// blazesym's symbolizer holds `Rc`s, so it cannot move between threads; one per thread,
    /// made on first use, keeps the [`Enricher`] `Send`, free to be made on one thread (where
    /// the capabilities to read the kernel's symbols are held) and run on another.
    static USER_SYMBOLIZER: RefCell<UserSymbolizer> = RefCell::new(UserSymbolizer::new());
}

pub(crate) struct Enricher {
    processes: ProcessCache,
    stacks: Option<StackTraceMap<MapData>>,
    /// Stacks read from the map during the current batch, by id: a storm from one code path
    /// shares a few ids, and each read is a syscall. Emptied by [`Enricher::new_batch`]: the
    /// kernel reuses an id when a new stack hashes to it.
    read_stacks: HashMap<u32, Option<Arc<[u64]>>>,
    kernel: Option<KernelSymbols>,
    normalizer: StackNormalizer,
    unwinder: FrameUnwinder,
    /// The code of processes, read while they were alive (at their notes) or at their first
    /// attempt.
    images: LruCache<u32, Arc<Image>>,
    rendered_user: LruCache<UserStackKey, Arc<str>>,
    rendered_kernel: LruCache<Arc<[u64]>, Arc<str>>,
    /// Where processes publish their thread context; `None` when it is not read.
    thread_contexts: Option<ThreadContexts>,
    vanished: LruCache<u32, Arc<Vanished>>,
}

// It may be made on one thread and run on another.
const _: fn() = || {
    fn send<T: Send>() {}
    send::<Enricher>();
};

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

impl Enricher {
    /// `stacks` is `None` with `--no-stacks`. Kernel symbols are read for the stacks, and for
    /// `drop_locations` (where dropped packets died), before capabilities are dropped: without
    /// CAP_SYSLOG the kernel hides the addresses.
    pub(crate) fn new(
        stacks: Option<StackTraceMap<MapData>>,
        options: ReadOptions,
        drop_locations: bool,
    ) -> Self {
        let wanted = stacks.is_some() || drop_locations;
        let kernel = wanted.then(KernelSymbols::load).and_then(|loaded| match loaded {
            Ok(symbols) => {
                let (count, bytes) = symbols.footprint();
                tracing::debug!(
                    "kernel symbols: {count} in {:.1} MiB",
                    bytes as f64 / (1 << 20) as f64
                );
                Some(symbols)
            }
            Err(err) => {
                tracing::warn!("kernel stacks and drop locations will show addresses only: {err}");
                None
            }
        });
        Self {
            processes: ProcessCache::new(MAX_PROCESSES, options),
            stacks,
            read_stacks: HashMap::new(),
            kernel,
            normalizer: StackNormalizer::new(),
            unwinder: FrameUnwinder::default(),
            images: LruCache::new(MAX_IMAGES),
            rendered_user: LruCache::new(MAX_RENDERED_USER),
            rendered_kernel: LruCache::new(MAX_STACKS),
            thread_contexts: None,
            vanished: LruCache::new(MAX_VANISHED),
        }
    }

    /// Looks for the thread context of every process seen, and hands the kernel where each
    /// keeps it in `map`.
    pub(crate) fn find_thread_contexts(&mut self, map: aya::maps::HashMap<MapData, u32, ThreadContextTls>) {
        self.thread_contexts = Some(ThreadContexts::new(map));
    }

    /// The kernel saw a process (or a new code path of one) start an attempt: read what
    /// might be gone by the time the attempt ends.
    pub(crate) fn on_note(&mut self, note: &ProcessNote) {
        let process = self.processes.check(note.pid);
        if let (Some(contexts), Some(p)) = (&mut self.thread_contexts, &process) {
            contexts.look(note.pid, p.info.start_time);
        }
        // A new code path may run in a library loaded since the process was last read.
        let image = (note.user_stack_id >= 0)
            .then(|| self.read_image(note.pid))
            .flatten();
        // Gone already: only what the kernel put in the note is left of it.
        if process.is_none() || (note.user_stack_id >= 0 && image.is_none()) {
            self.vanished.put(note.pid, Arc::new(Vanished::from_note(note)));
        }
    }

    /// The process at `pid`, as the cache has it.
    pub(crate) fn process(&mut self, pid: u32) -> Option<Arc<identity::Process>> {
        self.processes.get(pid)
    }

    /// The kernel function `addr` is in, without the offset: `nf_hook_slow`.
    pub(crate) fn kernel_function(&self, addr: u64) -> Option<Arc<str>> {
        Some(self.kernel.as_ref()?.resolve(addr)?.name.into())
    }

    pub(crate) fn identify(&mut self, attempt: &Attempt) -> Identity {
        let process = self.processes.get(attempt.pid);
        // A process not resolved yet is looked at again, at most once a RETRY: a library it
        // loaded since, a process context it published since.
        if let (Some(contexts), Some(p)) = (&mut self.thread_contexts, &process) {
            contexts.look(attempt.pid, p.info.start_time);
        }
        let user_stack = self
            .stack(attempt.user_stack_id)
            .zip(attempt.user_stack_id)
            .map(|(addrs, id)| self.render_user(attempt.pid, id, addrs, attempt.user_frame.as_ref()));
        let kernel_stack = self.stack(attempt.kernel_stack_id).map(|a| self.render_kernel(a));
        let end_kernel_stack = self
            .stack(attempt.end_kernel_stack_id)
            .map(|a| self.render_kernel(a));
        let exe_name = match &process {
            Some(_) => None,
            None => self.vanished.peek(&attempt.pid).and_then(|v| v.exe_name.clone()),
        };
        Identity {
            process,
            user_stack,
            kernel_stack,
            end_kernel_stack,
            exe_name,
        }
    }

    /// Starts a batch of records read together: stacks are read from the map afresh.
    pub(crate) fn new_batch(&mut self) {
        self.read_stacks.clear();
    }

    /// How full each cache is, as `name=entries/capacity`, for the log.
    pub(crate) fn cache_use(&self) -> String {
        let caches = [
            ("processes", self.processes.len(), self.processes.capacity()),
            ("process_images", self.images.len(), self.images.cap().get()),
            (
                "user_stacks",
                self.rendered_user.len(),
                self.rendered_user.cap().get(),
            ),
            (
                "kernel_stacks",
                self.rendered_kernel.len(),
                self.rendered_kernel.cap().get(),
            ),
        ];
        caches
            .iter()
            .map(|(name, len, cap)| format!("{name}={len}/{cap}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Forgets processes that have exited. Call now and then.
    pub(crate) fn sweep(&mut self) {
        self.processes.sweep();
        if let Some(contexts) = &mut self.thread_contexts {
            contexts.sweep();
        }
        // Images hold the process's files open.
        let gone: Vec<u32> = self
            .images
            .iter()
            .filter(|(pid, _)| !Path::new("/proc").join(pid.to_string()).exists())
            .map(|(pid, _)| *pid)
            .collect();
        for pid in &gone {
            self.images.pop(pid);
        }
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

    /// Reads the code `pid` has mapped now, in place of what was read before.
    fn read_image(&mut self, pid: u32) -> Option<Arc<Image>> {
        match self.normalizer.image(pid) {
            Ok(code) => {
                let unwinder = self.unwinder.for_process(code.code());
                let image = Arc::new(Image { code, unwinder });
                self.images.put(pid, image.clone());
                Some(image)
            }
            Err(err) => {
                tracing::debug!("user stack of {pid}: {err}");
                None
            }
        }
    }

    /// The user stack: the innermost frames unwound from the registers and stack bytes the
    /// kernel copied, joined to its frame-pointer walk `walked`, each frame named from the
    /// files the process had mapped when it was read (at its note, or now). A process gone
    /// before it could be read still shows its walked frames, as addresses.
    fn render_user(
        &mut self,
        pid: u32,
        stack_id: u32,
        walked: Arc<[u64]>,
        frame: Option<&UserFrame>,
    ) -> Arc<str> {
        let image = match self.images.get(&pid) {
            Some(image) => Some(image.clone()),
            None => self
                .read_image(pid)
                .or_else(|| self.vanished_image(pid, stack_id, &walked)),
        };
        let addrs: Arc<[u64]> = match (&image, frame) {
            (Some(image), Some(frame)) => {
                unwind::join(&self.unwinder.unwind(&image.unwinder, frame), &walked).into()
            }
            _ => walked,
        };
        let key = (pid, addrs);
        if let Some(text) = self.rendered_user.get(&key) {
            return text.clone();
        }
        let lines = match &image {
            Some(image) => {
                let frames = image.code.normalize(&key.1);
                USER_SYMBOLIZER.with_borrow_mut(|user| user.symbolize_normalized(&frames))
            }
            None => key.1.iter().map(|addr| format!("{addr:#x}")).collect(),
        };
        let text = stack_text(&lines);
        self.rendered_user.put(key, text.clone());
        text
    }

    /// The code of a process that exited before it was read, placed from the build ids of
    /// the frames of `stack_id` its note carried; not remembered as the process's image, which
    /// another stack of the same process would place differently.
    fn vanished_image(&mut self, pid: u32, stack_id: u32, walked: &[u64]) -> Option<Arc<Image>> {
        let vanished = self.vanished.peek(&pid)?.clone();
        if vanished.user_stack_id as u32 != stack_id || vanished.frames.is_empty() {
            return None;
        }
        let code = self.normalizer.image_from_build_ids(walked, &vanished.frames);
        tracing::debug!(
            "user stack of {pid}: placed from the build ids of {} frames",
            vanished.frames.len()
        );
        let unwinder = self.unwinder.for_process(code.code());
        Some(Arc::new(Image { code, unwinder }))
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
        self.rendered_kernel.put(addrs, text.clone());
        text
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

    pub(crate) fn reap(mut child: Child) {
        child.kill().unwrap();
        child.wait().unwrap();
    }

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

    #[test]
    fn a_noted_process_is_identified_after_it_exits_until_swept() {
        let mut enricher = Enricher::new(None, ReadOptions::default(), false);
        let child = running_cat(&[], &[("OTEL_SERVICE_NAME", "checkout")]);
        let pid = child.id();
        enricher.on_note(&ProcessNote {
            pid,
            user_stack_id: -1,
            vanishing: VanishingProcess::EMPTY,
        });
        reap(child);
        let mut attempt = crate::span::tests::timed_out();
        attempt.pid = pid;
        let identity = enricher.identify(&attempt);
        let process = identity.process.expect("remembered after it exited");
        assert_eq!(process.info.service.name.as_deref(), Some("checkout"));
        assert!(identity.user_stack.is_none() && identity.kernel_stack.is_none());
        enricher.sweep();
        assert!(enricher.identify(&attempt).process.is_none());
    }

    #[test]
    fn a_process_gone_before_its_note_keeps_the_kernels_name_for_it() {
        let mut enricher = Enricher::new(None, ReadOptions::default(), false);
        let child = running_cat(&[], &[]);
        let pid = child.id();
        reap(child);
        let mut vanishing = VanishingProcess::EMPTY;
        // Unterminated: the name is bounded by its array.
        vanishing.exe_name = [b'x'; synspan_shared::EXE_NAME_LEN];
        vanishing.exe_name[..6].copy_from_slice(b"client");
        // More frames than the array holds are not read past it.
        vanishing.frame_count = u32::MAX;
        enricher.on_note(&ProcessNote {
            pid,
            user_stack_id: 7,
            vanishing,
        });
        let mut attempt = crate::span::tests::timed_out();
        attempt.pid = pid;
        let identity = enricher.identify(&attempt);
        assert!(identity.process.is_none());
        let name = identity.exe_name.expect("the kernel's name");
        assert!(
            name.starts_with("client") && name.len() == synspan_shared::EXE_NAME_LEN,
            "{name}"
        );
        vanishing.exe_name = [0; synspan_shared::EXE_NAME_LEN];
        enricher.on_note(&ProcessNote {
            pid,
            user_stack_id: 7,
            vanishing,
        });
        assert!(enricher.identify(&attempt).exe_name.is_none());
    }
}
