//! Names for the addresses of kernel and user stacks.
//!
//! A stack as `bpf_get_stackid` returns it holds, innermost first, where the thread was, then
//! return addresses. A return address points after its call, and when the call is the last
//! instruction of a function (a call that never returns) that is already the next function.
//! So every frame but the first is looked up one byte earlier, and shown with its offset from
//! the address itself, as perf does.
//!
//! User stacks are symbolized with blazesym, from the very files the process had mapped. A
//! process may exit, or a package upgrade replace its libraries, before its stack is
//! symbolized: [`StackNormalizer::normalize`] captures what is needed (each address as an
//! offset in a file, and that file held open) while the process lives;
//! [`UserSymbolizer::symbolize_normalized`] names the frames any time later.

use std::{
    collections::HashMap,
    ffi::OsStr,
    fs::{File, Metadata},
    io,
    num::NonZeroUsize,
    ops::Range,
    os::{
        fd::AsRawFd,
        unix::{ffi::OsStrExt, fs::MetadataExt},
    },
    path::{Path, PathBuf},
    sync::{Arc, Weak},
};

use blazesym::symbolize::{
    CodeInfo, Input, Symbolized, Symbolizer, evict,
    source::{Elf, Source},
};
use lru::LruCache;
use object::{Object, read::ReadCache};
use synspan_shared::{BuildIdFrame, build_id_status};

#[derive(Debug, thiserror::Error)]
pub(crate) enum SymbolError {
    #[error("process {0} has exited")]
    Gone(u32),
    #[error("reading {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "/proc/kallsyms shows every address as 0: kernel.kptr_restrict is set, or synspan lacks CAP_SYSLOG"
    )]
    KernelAddressesHidden,
}

/// The address to look up for the `index`-th frame of a stack.
pub(super) fn lookup_address(index: usize, addr: u64) -> u64 {
    if index == 0 { addr } else { addr.saturating_sub(1) }
}

/// A line of `/proc/<pid>/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Mapping {
    pub(crate) start: u64,
    pub(crate) end: u64,
    /// Where in the file the mapping starts.
    pub(crate) offset: u64,
    /// Mapped executable: code, where stacks point.
    pub(crate) executable: bool,
    /// The path of the file, or a name such as `[vdso]`; `None` for anonymous memory.
    pub(crate) name: Option<PathBuf>,
    /// The file was unlinked since it was mapped: its path may now name another file.
    pub(crate) deleted: bool,
}

pub(crate) fn parse_maps(bytes: &[u8]) -> Vec<Mapping> {
    bytes.split(|&b| b == b'\n').filter_map(parse_maps_line).collect()
}

/// `start-end perms offset dev inode   name`; the name may hold spaces.
fn parse_maps_line(line: &[u8]) -> Option<Mapping> {
    let hex = |field: &[u8]| u64::from_str_radix(std::str::from_utf8(field).ok()?, 16).ok();
    let mut fields = line.splitn(6, |&b| b == b' ');
    let range = fields.next()?;
    let dash = range.iter().position(|&b| b == b'-')?;
    let perms = fields.next()?;
    let offset = hex(fields.next()?)?;
    let _dev = fields.next()?;
    let _inode = fields.next()?;
    let name = fields.next().unwrap_or_default().trim_ascii_start();
    let (name, deleted) = match name.strip_suffix(b" (deleted)") {
        Some(name) => (name, true),
        None => (name, false),
    };
    Some(Mapping {
        start: hex(&range[..dash])?,
        end: hex(&range[dash + 1..])?,
        offset,
        executable: perms.get(2) == Some(&b'x'),
        name: (!name.is_empty()).then(|| PathBuf::from(OsStr::from_bytes(name))),
        deleted,
    })
}

#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn mapping_of(mappings: &[Mapping], addr: u64) -> Option<&Mapping> {
    mappings.get(mapping_index(mappings, addr)?)
}

/// Where in `mappings` (sorted by address, as the kernel lists them) `addr` is.
fn mapping_index(mappings: &[Mapping], addr: u64) -> Option<usize> {
    let at = mappings.partition_point(|m| m.start <= addr).checked_sub(1)?;
    (addr < mappings.get(at)?.end).then_some(at)
}

/// What makes a file the same file: a path can be replaced, an inode number reused.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub(crate) struct FileIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
}

impl FileIdentity {
    fn of(metadata: &Metadata) -> Self {
        Self {
            dev: metadata.dev(),
            ino: metadata.ino(),
            size: metadata.size(),
            mtime: metadata.mtime(),
            mtime_nsec: metadata.mtime_nsec(),
        }
    }
}

/// A file a process had mapped, held open: it stays readable after the process exits, and
/// after the file is deleted or replaced.
#[derive(Debug)]
pub(crate) struct Module {
    /// The path as the process saw it, in its own mount namespace.
    pub(crate) path: PathBuf,
    pub(crate) build_id: Option<Arc<[u8]>>,
    file: File,
    identity: FileIdentity,
}

/// Names the held file whatever its path has become, from any mount namespace.
fn fd_path(file: &File) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// The same code has the same build id in every container that ships it; a file without one
/// is known by its identity.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub(crate) enum ModuleKey {
    BuildId(Arc<[u8]>),
    File(FileIdentity),
}

impl Module {
    /// The held file.
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    pub(crate) fn key(&self) -> ModuleKey {
        match &self.build_id {
            Some(id) => ModuleKey::BuildId(id.clone()),
            None => ModuleKey::File(self.identity),
        }
    }
}

/// One frame of a user stack, with what naming it takes once the process is gone.
#[derive(Clone, Debug)]
pub(crate) struct NormalizedFrame {
    /// The address as the stack held it.
    pub(crate) addr: u64,
    pub(crate) location: Location,
    /// Looked up one byte earlier: see the module documentation.
    return_address: bool,
}

#[derive(Clone, Debug)]
pub(crate) enum Location {
    /// In a mapped file: the file, and the offset of the address in it.
    File { module: Arc<Module>, offset: u64 },
    /// In a mapping that is not a file synspan could open, such as `[vdso]`: its name in
    /// `/proc/<pid>/maps`, and the offset of the address in it.
    Named { name: PathBuf, offset: u64 },
    /// In anonymous memory (JIT-compiled code), or in no mapping at all.
    Unknown,
}

/// Build ids remembered, one per file that processes had mapped: executables and libraries,
/// of which even a host full of containers has a few thousand. One forgotten costs a read of
/// the file's notes.
const MAX_BUILD_IDS: NonZeroUsize = NonZeroUsize::new(4096).unwrap();

/// Code mappings kept per process, and files held open for them. A process maps a few dozen
/// files at most (a browser: a few hundred); the bounds are for one that maps thousands.
const MAX_CODE_MAPPINGS: usize = 4096;
const MAX_CODE_FILES: usize = 1024;

/// The code a process had mapped when it was read, each file held open.
#[derive(Debug)]
pub(crate) struct ProcessImage {
    /// Executable mappings, by address.
    mappings: Vec<Mapping>,
    /// The file of each mapping, when it could be opened.
    modules: Vec<Option<Arc<Module>>>,
}

impl ProcessImage {
    /// Where each address of a user stack lives, innermost frame first.
    pub(crate) fn normalize(&self, addrs: &[u64]) -> Vec<NormalizedFrame> {
        addrs
            .iter()
            .enumerate()
            .map(|(i, &addr)| {
                let lookup = lookup_address(i, addr);
                let location = match mapping_index(&self.mappings, lookup) {
                    Some(at) => {
                        let mapping = &self.mappings[at];
                        let offset = addr - mapping.start + mapping.offset;
                        match (&self.modules[at], &mapping.name) {
                            (Some(module), _) => Location::File {
                                module: module.clone(),
                                offset,
                            },
                            (None, Some(name)) => Location::Named {
                                name: name.clone(),
                                offset,
                            },
                            (None, None) => Location::Unknown,
                        }
                    }
                    None => Location::Unknown,
                };
                NormalizedFrame {
                    addr,
                    location,
                    return_address: lookup != addr,
                }
            })
            .collect()
    }

    /// Each code mapping with its file.
    pub(crate) fn code(&self) -> impl Iterator<Item = (&Mapping, &Arc<Module>)> {
        self.mappings
            .iter()
            .zip(&self.modules)
            .filter_map(|(mapping, module)| Some((mapping, module.as_ref()?)))
    }
}

/// Captures, while a process lives, what symbolizing its stacks takes. It holds no blazesym
/// state, so it can live on another thread than the [`UserSymbolizer`].
#[derive(Debug)]
pub(crate) struct StackNormalizer {
    build_ids: LruCache<FileIdentity, Option<Arc<[u8]>>>,
    /// `/proc/<pid>/map_files/` needs `CAP_SYS_ADMIN` (or `CAP_CHECKPOINT_RESTORE`), which
    /// synspan drops once attached; after the first refusal it is not tried again.
    map_files_denied: bool,
    /// Files held by some process's image or stack, by identity.
    held: HashMap<FileIdentity, Weak<Module>>,
    /// Every file opened for some process, by build id, held open: what names the frames of
    /// a process that exited before its maps were read.
    by_build_id: LruCache<Arc<[u8]>, Arc<Module>>,
}

/// Files kept open by build id, past the processes that mapped them: as many as one process
/// may hold open at once.
const MAX_INDEXED_FILES: NonZeroUsize = NonZeroUsize::new(MAX_CODE_FILES).unwrap();

impl Default for StackNormalizer {
    fn default() -> Self {
        Self {
            build_ids: LruCache::new(MAX_BUILD_IDS),
            map_files_denied: false,
            held: HashMap::new(),
            by_build_id: LruCache::new(MAX_INDEXED_FILES),
        }
    }
}

impl StackNormalizer {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Where each address of a user stack of `pid` lives, innermost frame first. Fails with
    /// [`SymbolError::Gone`] when the process has exited (a zombie has no memory left).
    #[cfg(test)]
    pub(crate) fn normalize(&mut self, pid: u32, addrs: &[u64]) -> Result<Vec<NormalizedFrame>, SymbolError> {
        Ok(self.image(pid)?.normalize(addrs))
    }

    /// The code `pid` has mapped now, each file held open: what naming and unwinding its
    /// stacks takes, also once it has exited.
    pub(crate) fn image(&mut self, pid: u32) -> Result<ProcessImage, SymbolError> {
        let path = PathBuf::from(format!("/proc/{pid}/maps"));
        let bytes = std::fs::read(&path).map_err(|source| {
            if matches!(source.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) {
                SymbolError::Gone(pid)
            } else {
                SymbolError::Io { path, source }
            }
        })?;
        let mut mappings = parse_maps(&bytes);
        if mappings.is_empty() {
            return Err(SymbolError::Gone(pid));
        }
        // Stacks point into code only.
        mappings.retain(|m| m.executable);
        mappings.truncate(MAX_CODE_MAPPINGS);
        // A deleted file and the one now at its path can both be mapped.
        let mut opened: HashMap<(PathBuf, bool), Option<Arc<Module>>> = HashMap::new();
        let mut modules = Vec::with_capacity(mappings.len());
        for mapping in &mappings {
            let module = match &mapping.name {
                Some(name) if name.is_absolute() && opened.len() < MAX_CODE_FILES => opened
                    .entry((name.clone(), mapping.deleted))
                    .or_insert_with(|| self.open_module(pid, mapping, name))
                    .clone(),
                Some(name) => opened.get(&(name.clone(), mapping.deleted)).cloned().flatten(),
                None => None,
            };
            modules.push(module);
        }
        Ok(ProcessImage { mappings, modules })
    }

    fn open_module(&mut self, pid: u32, mapping: &Mapping, name: &Path) -> Option<Arc<Module>> {
        let file = self.open_mapped_file(pid, mapping, name)?;
        let identity = FileIdentity::of(&file.metadata().ok()?);
        // One descriptor per file however many processes map it.
        if let Some(module) = self.held.get(&identity).and_then(Weak::upgrade)
            && module.path == name
        {
            self.index(&module);
            return Some(module);
        }
        let build_id = self.build_id(&file, identity);
        let module = Arc::new(Module {
            path: name.to_owned(),
            build_id,
            file,
            identity,
        });
        if self.held.len() >= MAX_BUILD_IDS.get() {
            self.held.retain(|_, module| module.strong_count() > 0);
        }
        self.held.insert(identity, Arc::downgrade(&module));
        self.index(&module);
        Some(module)
    }

    fn index(&mut self, module: &Arc<Module>) {
        if let Some(id) = &module.build_id {
            self.by_build_id.put(id.clone(), module.clone());
        }
    }

    /// The code of a process that exited before its maps were read, as far as its stack
    /// shows it: each frame the kernel gave with a build id and file offset (`build_ids`,
    /// the same walk as `walked`) places its file at `walked[i] - offset`, the file's load
    /// bias, which also places the unwound frames of that file. A file never indexed is
    /// named by its build id.
    pub(crate) fn image_from_build_ids(
        &mut self,
        walked: &[u64],
        build_ids: &[BuildIdFrame],
    ) -> ProcessImage {
        let mut placed: Vec<(Mapping, Option<Arc<Module>>)> = Vec::new();
        for (&addr, frame) in walked.iter().zip(build_ids) {
            if frame.status != build_id_status::VALID {
                continue;
            }
            let Some(start) = addr.checked_sub(frame.offset_or_ip) else {
                continue;
            };
            if placed.iter().any(|(m, _)| m.start <= addr && addr < m.end) {
                continue;
            }
            let id: Arc<[u8]> = Arc::from(&frame.build_id[..build_id_len(&frame.build_id)]);
            let module = self.by_build_id.get(&id).cloned();
            // An unindexed file's length is unknown: it covers its frame alone (a return
            // address is looked up a byte before it).
            let (start, end, offset, name) = match &module {
                Some(module) => {
                    let len = module.file.metadata().map_or(0, |m| m.len());
                    let end = start.saturating_add(len).max(addr.saturating_add(1));
                    (start, end, 0, module.path.clone())
                }
                None => (
                    addr.saturating_sub(1),
                    addr.saturating_add(1),
                    frame.offset_or_ip.saturating_sub(1),
                    PathBuf::from(hex(&id)),
                ),
            };
            placed.push((
                Mapping {
                    start,
                    end,
                    offset,
                    executable: true,
                    name: Some(name),
                    deleted: false,
                },
                module,
            ));
        }
        placed.sort_by_key(|(m, _)| m.start);
        // Files placed from inconsistent frames would overlap: the later one is dropped.
        let mut mappings: Vec<Mapping> = Vec::with_capacity(placed.len());
        let mut modules = Vec::with_capacity(placed.len());
        for (mapping, module) in placed {
            if mappings.last().is_some_and(|last| mapping.start < last.end) {
                continue;
            }
            mappings.push(mapping);
            modules.push(module);
        }
        ProcessImage { mappings, modules }
    }

    fn open_mapped_file(&mut self, pid: u32, mapping: &Mapping, name: &Path) -> Option<File> {
        // The file the process mapped, even deleted since.
        if !self.map_files_denied {
            let map_file = format!("/proc/{pid}/map_files/{:x}-{:x}", mapping.start, mapping.end);
            match File::open(&map_file) {
                Ok(file) => return Some(file),
                Err(err) if err.raw_os_error() == Some(libc::EPERM) => {
                    tracing::debug!("{map_file}: {err}; opening mapped files by path from now on");
                    self.map_files_denied = true;
                }
                Err(err) => tracing::debug!("{map_file}: {err}"),
            }
        }
        if mapping.deleted {
            return None;
        }
        // The path in the process's own mount namespace: a container's files are not at that
        // path on the host.
        let in_root = Path::new(&format!("/proc/{pid}/root")).join(name.strip_prefix("/").ok()?);
        File::open(&in_root)
            .inspect_err(|err| tracing::debug!("{}: {err}", in_root.display()))
            .ok()
    }

    fn build_id(&mut self, file: &File, identity: FileIdentity) -> Option<Arc<[u8]>> {
        if let Some(build_id) = self.build_ids.get(&identity) {
            return build_id.clone();
        }
        let build_id = match blazesym::helper::read_elf_build_id(&fd_path(file)) {
            Ok(build_id) => build_id.map(|id| Arc::from(&*id)),
            Err(err) => {
                tracing::debug!("no build id: {err}");
                None
            }
        };
        self.build_ids.put(identity, build_id.clone());
        build_id
    }
}

/// The kernel pads a build id shorter than 20 bytes (an MD5 or UUID one, 16) with zeros.
fn build_id_len(id: &[u8; 20]) -> usize {
    id.iter()
        .rposition(|&b| b != 0)
        .map_or(0, |last| if last < 16 { 16 } else { 20 })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Files blazesym holds open and parsed (symbols, DWARF): the few hundred libraries and
/// executables a host's connecting code lives in. Each can take megabytes, so this bound, not
/// the others, sets what symbolization costs in memory.
const MAX_SOURCES: NonZeroUsize = NonZeroUsize::new(256).unwrap();
/// Symbolized offsets remembered: four new frames for each stack remembered. Each is a name
/// and a place, about a hundred bytes.
const MAX_FOUND: NonZeroUsize = super::MAX_STACKS.saturating_mul(NonZeroUsize::new(4).unwrap());

/// Where a file's names are read from. DWARF only from a file that carries its own, as an
/// application built with `-g` does: that is where `file:line` names the calling code. A
/// distribution's separate debug files (`/usr/lib/debug/.build-id/…`) give their symbol
/// tables only: parsing their DWARF for `file:line` inside libc cost 10 MiB of the agent's
/// heap on this machine (Debian's libc6-dbg, zlib-compressed sections decompressed whole,
/// heaptrack over the churn soak), and its symbol table names the same functions.
#[derive(Clone, Debug)]
enum Names {
    Dwarf,
    /// The file's own symbol table (`.symtab`, or `.dynsym` when stripped).
    Symbols,
    /// The symbol table of the debug file for its build id, asked by the address the code is
    /// linked at: a debug file's segments hold no bytes, so a file offset means nothing there.
    DebugFile {
        path: PathBuf,
        /// Loadable segments of the file itself: file range, and the address it is linked at.
        segments: Arc<[(Range<u64>, u64)]>,
    },
}

/// Where separate debug files are looked for, by build id, as gdb and blazesym look.
const DEBUG_DIRS: [&str; 2] = ["/usr/lib/debug", "/lib/debug"];

impl Names {
    fn of(module: &Module) -> Self {
        let cache = ReadCache::new(&module.file);
        let Ok(elf) = object::File::parse(&cache) else {
            return Self::Symbols;
        };
        if elf.section_by_name(".debug_info").is_some() {
            return Self::Dwarf;
        }
        let Some(build_id) = module.build_id.as_deref().filter(|id| id.len() > 1) else {
            return Self::Symbols;
        };
        let hex = hex(build_id);
        let Some(path) = DEBUG_DIRS
            .iter()
            .map(|dir| PathBuf::from(format!("{dir}/.build-id/{}/{}.debug", &hex[..2], &hex[2..])))
            .find(|path| path.is_file())
        else {
            return Self::Symbols;
        };
        Self::DebugFile {
            path,
            segments: super::unwind::loadable_segments(&elf).into(),
        }
    }
}

/// What blazesym found at an offset.
#[derive(Clone, Debug)]
struct Found {
    name: String,
    /// From the start of the symbol to the offset looked up.
    pub(crate) offset: u64,
    /// `file:line`, from DWARF.
    code: Option<String>,
}

/// Symbolizes user stacks with blazesym, remembering what it found for each offset of each
/// file, so a storm of failing connects from the same code costs one lookup per frame.
///
/// blazesym's symbolizer is neither `Send` nor `Sync`: create this on the thread that uses it.
#[derive(Debug)]
pub(crate) struct UserSymbolizer {
    symbolizer: Symbolizer,
    /// Paths given to `symbolizer`, which holds each file open and parsed, with the file
    /// each named then: a `/proc/self/fd/` path names another file once its descriptor is
    /// reused.
    sources: LruCache<PathBuf, (FileIdentity, Names)>,
    found: LruCache<(ModuleKey, u64), Option<Found>>,
    #[cfg(test)]
    normalizer: StackNormalizer,
}

fn new_symbolizer() -> Symbolizer {
    // One line per frame: the functions inlined at an address are not reported.
    Symbolizer::builder().enable_inlined_fns(false).build()
}

fn code_location(code: &CodeInfo<'_>) -> String {
    let path = code.to_path();
    match code.line {
        Some(line) => format!("{}:{line}", path.display()),
        None => path.display().to_string(),
    }
}

impl Default for UserSymbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl UserSymbolizer {
    pub(crate) fn new() -> Self {
        Self {
            symbolizer: new_symbolizer(),
            sources: LruCache::new(MAX_SOURCES),
            found: LruCache::new(MAX_FOUND),
            #[cfg(test)]
            normalizer: StackNormalizer::new(),
        }
    }

    /// Symbolizes a stack of a live process: normalizes it, then symbolizes that, so what is
    /// found is shared with every other process running the same files.
    #[cfg(test)]
    pub(crate) fn symbolize_process(&mut self, pid: u32, addrs: &[u64]) -> Result<Vec<String>, SymbolError> {
        let frames = self.normalizer.normalize(pid, addrs)?;
        Ok(self.symbolize_normalized(&frames))
    }

    /// One line per frame: `my_function+0x1a (src/main.rs:42)` with DWARF line information,
    /// `my_function+0x1a (/usr/bin/app)` without, `0x7f3a... (/usr/lib/libc.so.6+0x1234)` for
    /// an address in a file without a symbol for it, the bare address when nothing is known.
    pub(crate) fn symbolize_normalized(&mut self, frames: &[NormalizedFrame]) -> Vec<String> {
        frames
            .iter()
            .map(|frame| {
                let back = u64::from(frame.return_address);
                match &frame.location {
                    Location::File { module, offset } => match self.find(module, offset - back) {
                        Some(found) => {
                            let place = found.code.unwrap_or_else(|| module.path.display().to_string());
                            format!("{}+{:#x} ({place})", found.name, found.offset + back)
                        }
                        None => format!("{:#x} ({}+{offset:#x})", frame.addr, module.path.display()),
                    },
                    Location::Named { name, offset } => {
                        format!("{:#x} ({}+{offset:#x})", frame.addr, name.display())
                    }
                    Location::Unknown => format!("{:#x}", frame.addr),
                }
            })
            .collect()
    }

    fn find(&mut self, module: &Module, offset: u64) -> Option<Found> {
        // A name found is shared by every file of the same build; a name not found only by
        // the same file: a stripped copy keeps its build id, and must not hide the names of
        // the unstripped one.
        let key = (module.key(), offset);
        if let Some(Some(found)) = self.found.get(&key) {
            return Some(found.clone());
        }
        let file_key = (ModuleKey::File(module.identity), offset);
        if let Some(None) = self.found.get(&file_key) {
            return None;
        }
        let (source, input) = self.source(module, offset)?;
        let found = match self.symbolizer.symbolize_single(&source, input) {
            Ok(Symbolized::Sym(sym)) => Some(Found {
                name: sym.name.into_owned(),
                offset: sym.offset as u64,
                code: sym.code_info.as_deref().map(code_location),
            }),
            Ok(Symbolized::Unknown(_)) => None,
            Err(err) => {
                tracing::debug!("symbolizing {} at {offset:#x}: {err}", module.path.display());
                None
            }
        };
        match &found {
            Some(_) => self.found.put(key, found.clone()),
            None => self.found.put(file_key, None),
        };
        found
    }

    /// What to ask blazesym for a module's offset: the process's own path when it names the
    /// held file from here too (a process on the host: one name for every stack), else the
    /// held file itself; or the file's separate debug file (see [`Names`]).
    fn source(&mut self, module: &Module, offset: u64) -> Option<(Source<'static>, Input<u64>)> {
        let by_name = std::fs::metadata(&module.path).is_ok_and(|m| FileIdentity::of(&m) == module.identity);
        let path = if by_name {
            module.path.clone()
        } else {
            fd_path(&module.file)
        };
        let names = match self.sources.get(&path) {
            Some((identity, names)) if *identity == module.identity => names.clone(),
            stale => {
                // Another file by now: what blazesym holds for the path is stale.
                if let Some((_, names)) = stale.cloned() {
                    self.forget_source(&path, &names);
                }
                let names = Names::of(module);
                if let Some((pushed_out, (_, its_names))) =
                    self.sources.push(path.clone(), (module.identity, names.clone()))
                    && pushed_out != path
                {
                    self.forget_source(&pushed_out, &its_names);
                }
                names
            }
        };
        let elf = |path: PathBuf, debug_syms: bool| {
            let mut elf = Elf::new(path);
            elf.debug_syms = debug_syms;
            Source::Elf(elf)
        };
        Some(match names {
            Names::Dwarf => (elf(path, true), Input::FileOffset(offset)),
            Names::Symbols => (elf(path, false), Input::FileOffset(offset)),
            Names::DebugFile { path, segments } => {
                let (range, linked) = segments.iter().find(|(range, _)| range.contains(&offset))?;
                (
                    elf(path, false),
                    Input::VirtOffset(linked + (offset - range.start)),
                )
            }
        })
    }

    /// Closes the files blazesym holds for a path, and drops what it parsed of them.
    fn forget_source(&mut self, path: &Path, names: &Names) {
        let mut forget = |path: &Path| {
            if let Err(err) = self.symbolizer.evict(&evict::Evict::Elf(evict::Elf::new(path))) {
                tracing::debug!("closing {}: {err}", path.display());
            }
        };
        forget(path);
        if let Names::DebugFile { path, .. } = names {
            forget(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead, BufReader},
        process::{Child, Command, Stdio},
    };

    use super::*;
    use crate::enrich::tests::TempDir;

    #[unsafe(no_mangle)]
    #[inline(never)]
    pub(crate) extern "C" fn synspan_symbol_probe() -> u64 {
        std::hint::black_box(42)
    }

    fn probe_addr() -> u64 {
        synspan_symbol_probe as *const () as u64
    }

    #[test]
    fn maps_lines() {
        let maps =
            b"559ab8ca8000-559ab8caa000 r--p 00000000 fe:00 247282                     /usr/bin/head\n\
559ab8caa000-559ab8cb0000 r-xp 00002000 fe:00 247282                     /usr/bin/head\n\
7f16ec200000-7f16ec3e8000 r-xp 00028000 fe:00 1234                       /opt/my app/lib.so (deleted)\n\
7f16ec3e8000-7f16ec3ea000 r-xp 00000000 00:00 0                          [vdso]\n\
7f16ec400000-7f16ec500000 rwxp 00000000 00:00 0 \n";
        let mappings = parse_maps(maps);
        assert_eq!(mappings.len(), 5);
        assert_eq!(
            mappings[1],
            Mapping {
                start: 0x559ab8caa000,
                end: 0x559ab8cb0000,
                offset: 0x2000,
                executable: true,
                name: Some(PathBuf::from("/usr/bin/head")),
                deleted: false,
            }
        );
        assert_eq!(mappings[2].name.as_deref(), Some(Path::new("/opt/my app/lib.so")));
        assert!(mappings[2].deleted);
        assert_eq!(mappings[3].name.as_deref(), Some(Path::new("[vdso]")));
        assert_eq!(mappings[4].name, None);

        assert_eq!(mapping_of(&mappings, 0x559ab8caa000).unwrap().offset, 0x2000);
        assert_eq!(mapping_of(&mappings, 0x559ab8ca9fff).unwrap().offset, 0);
        assert_eq!(mapping_of(&mappings, 0x559ab8cb0000), None);
        assert_eq!(mapping_of(&mappings, 0x1000), None);
    }

    #[test]
    fn symbolizes_the_running_test_binary() {
        let exe = std::env::current_exe().unwrap();
        let mut symbolizer = UserSymbolizer::new();
        let lines = symbolizer
            .symbolize_process(std::process::id(), &[probe_addr(), probe_addr() + 1, 0x10])
            .unwrap();
        // No debug information in a release test binary: the file stands in for the line.
        assert_eq!(
            lines[..2],
            [
                format!("synspan_symbol_probe+0x0 ({})", exe.display()),
                format!("synspan_symbol_probe+0x1 ({})", exe.display()),
            ]
        );
        assert_eq!(lines[2], "0x10");
    }

    #[test]
    fn normalizes_now_and_symbolizes_later() {
        let mut normalizer = StackNormalizer::new();
        let frames = normalizer
            .normalize(std::process::id(), &[probe_addr() + 3])
            .unwrap();
        let Location::File { module, offset } = &frames[0].location else {
            panic!("{frames:?}");
        };
        assert_eq!(module.path, std::env::current_exe().unwrap());
        assert!(*offset > 0);
        let lines = UserSymbolizer::new().symbolize_normalized(&frames);
        assert!(lines[0].starts_with("synspan_symbol_probe+0x3 ("), "{lines:?}");
    }

    /// What names the frames of a process gone before its maps were read: the build id and
    /// file offset of each walked frame, against the files indexed from other processes.
    #[test]
    fn frames_named_by_build_id_and_offset() {
        let mut normalizer = StackNormalizer::new();
        let addr = probe_addr() + 3;
        let frames = normalizer.normalize(std::process::id(), &[addr]).unwrap();
        let Location::File { module, offset } = &frames[0].location else {
            panic!("{frames:?}");
        };
        let mut build_id = [0; 20];
        let id = module
            .build_id
            .as_deref()
            .expect("the test binary has a build id");
        build_id[..id.len()].copy_from_slice(id);
        let unknown = 0x1000_0000;
        let walked = [addr, unknown, 0x10];
        let kernel_frames = [
            BuildIdFrame {
                status: build_id_status::VALID,
                build_id,
                offset_or_ip: *offset,
            },
            BuildIdFrame {
                status: build_id_status::VALID,
                build_id: [0xab; 20],
                offset_or_ip: 0x1234,
            },
            // The kernel could not read this frame's file: the address alone.
            BuildIdFrame {
                status: build_id_status::IP,
                build_id: [0; 20],
                offset_or_ip: 0x10,
            },
        ];
        let image = normalizer.image_from_build_ids(&walked, &kernel_frames);
        let lines = UserSymbolizer::new().symbolize_normalized(&image.normalize(&walked));
        assert!(lines[0].starts_with("synspan_symbol_probe+0x3 ("), "{lines:?}");
        assert_eq!(lines[1], format!("{unknown:#x} ({}+0x1234)", "ab".repeat(20)));
        assert_eq!(lines[2], "0x10");
        // The file placed from one frame also places the other addresses in it.
        let lines = UserSymbolizer::new().symbolize_normalized(&image.normalize(&[probe_addr()]));
        assert!(lines[0].starts_with("synspan_symbol_probe+0x0 ("), "{lines:?}");
    }

    /// Frames that place files over each other, or below address 0, are not trusted.
    #[test]
    fn inconsistent_build_id_frames_place_nothing() {
        let mut normalizer = StackNormalizer::new();
        let frame = |offset_or_ip| BuildIdFrame {
            status: build_id_status::VALID,
            build_id: [0xcd; 20],
            offset_or_ip,
        };
        let image = normalizer.image_from_build_ids(
            &[0x100, 0x2000, 0x2000],
            &[frame(0x200), frame(0x10), frame(0x11)],
        );
        let lines = UserSymbolizer::new().symbolize_normalized(&image.normalize(&[0x100, 0x2000]));
        assert_eq!(lines[0], "0x100");
        assert_eq!(lines[1], format!("0x2000 ({}+0x10)", "cd".repeat(20)));
    }

    #[test]
    fn vdso_and_unknown_addresses() {
        let maps = std::fs::read("/proc/self/maps").unwrap();
        let vdso = parse_maps(&maps)
            .into_iter()
            .find(|m| m.name.as_deref() == Some(Path::new("[vdso]")))
            .expect("a vDSO");
        let frames = StackNormalizer::new()
            .normalize(std::process::id(), &[vdso.start + 0x10, 8])
            .unwrap();
        let lines = UserSymbolizer::new().symbolize_normalized(&frames);
        assert_eq!(
            lines,
            [
                format!("{:#x} ([vdso]+0x10)", vdso.start + 0x10),
                "0x8".to_owned()
            ]
        );
    }

    #[test]
    fn normalize_a_process_that_is_gone() {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(matches!(
            StackNormalizer::new().normalize(pid, &[0x1000]),
            Err(SymbolError::Gone(p)) if p == pid
        ));
    }

    /// A C program built with DWARF that prints the address of its function and waits.
    const PROBE_C: &str = "#include <stdio.h>\n#include <unistd.h>\n\
__attribute__((noinline)) void synspan_c_probe(void) { printf(\"%p\\n\", (void *)synspan_c_probe); fflush(stdout); pause(); }\n\
int main(void) { synspan_c_probe(); return 0; }\n";

    fn build_c_probe(dir: &Path) -> PathBuf {
        let source = dir.join("probe.c");
        std::fs::write(&source, PROBE_C).unwrap();
        let binary = dir.join("probe");
        let status = Command::new("cc")
            .args(["-g", "-O0", "-o"])
            .arg(&binary)
            .arg(&source)
            .status()
            .expect("cc, the linker Rust uses, is installed");
        assert!(status.success());
        binary
    }

    /// Starts the probe; returns it and the address of its function.
    fn start_c_probe(binary: &Path) -> (Child, u64) {
        let mut child = Command::new(binary).stdout(Stdio::piped()).spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = u64::from_str_radix(line.trim().trim_start_matches("0x"), 16).unwrap();
        (child, addr)
    }

    #[test]
    fn another_process_with_dwarf_after_it_exits_and_its_binary_is_deleted() {
        let dir = TempDir::new();
        let binary = build_c_probe(dir.path());
        let (mut child, addr) = start_c_probe(&binary);
        let pid = child.id();
        let expected = format!("synspan_c_probe+0x4 ({}:3)", dir.path().join("probe.c").display());

        let mut symbolizer = UserSymbolizer::new();
        assert_eq!(
            symbolizer.symbolize_process(pid, &[addr + 4]).unwrap(),
            [expected.as_str()]
        );

        let frames = StackNormalizer::new().normalize(pid, &[addr + 4]).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        std::fs::remove_file(&binary).unwrap();
        assert!(matches!(
            StackNormalizer::new().normalize(pid, &[addr + 4]),
            Err(SymbolError::Gone(_))
        ));
        // A new symbolizer, so nothing comes from a cache: the held file is read again.
        assert_eq!(UserSymbolizer::new().symbolize_normalized(&frames), [expected]);
    }

    #[test]
    fn without_map_files_the_file_is_opened_in_the_process_root() {
        let dir = TempDir::new();
        let binary = build_c_probe(dir.path());
        let (mut child, addr) = start_c_probe(&binary);
        let pid = child.id();
        // As after synspan dropped CAP_SYS_ADMIN.
        let mut normalizer = StackNormalizer {
            map_files_denied: true,
            ..StackNormalizer::default()
        };
        let frames = normalizer.normalize(pid, &[addr + 4]).unwrap();
        assert!(matches!(&frames[0].location, Location::File { .. }), "{frames:?}");
        let lines = UserSymbolizer::new().symbolize_normalized(&frames);
        assert!(lines[0].starts_with("synspan_c_probe+0x4 ("), "{lines:?}");

        // Deleted: its path no longer names what the process runs, so it is not opened.
        std::fs::remove_file(&binary).unwrap();
        let frames = normalizer.normalize(pid, &[addr + 4]).unwrap();
        let Location::Named { name, offset } = &frames[0].location else {
            panic!("{frames:?}");
        };
        assert_eq!(name, &binary);
        let lines = UserSymbolizer::new().symbolize_normalized(&frames);
        assert_eq!(
            lines,
            [format!("{:#x} ({}+{offset:#x})", addr + 4, binary.display())]
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn same_code_in_two_processes_is_symbolized_once() {
        let dir = TempDir::new();
        let binary = build_c_probe(dir.path());
        let (mut first, first_addr) = start_c_probe(&binary);
        let (mut second, second_addr) = start_c_probe(&binary);
        let mut symbolizer = UserSymbolizer::new();
        let a = symbolizer
            .symbolize_process(first.id(), &[first_addr + 4])
            .unwrap();
        let b = symbolizer
            .symbolize_process(second.id(), &[second_addr + 4])
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(symbolizer.found.len(), 1);
        assert_eq!(symbolizer.sources.len(), 1);
        for child in [&mut first, &mut second] {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Descriptors of this process open on `path`.
    fn descriptors_on(path: &Path) -> usize {
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
            .filter(|target| target == path)
            .count()
    }

    #[test]
    fn a_file_pushed_out_of_the_symbolizer_is_closed_and_read_again_when_needed() {
        let dir = TempDir::new();
        let binary = build_c_probe(dir.path());
        let (mut child, addr) = start_c_probe(&binary);
        let mut symbolizer = UserSymbolizer {
            sources: LruCache::new(NonZeroUsize::MIN),
            ..UserSymbolizer::new()
        };
        let theirs = symbolizer.symbolize_process(child.id(), &[addr + 4]);
        let held_while_needed = descriptors_on(&binary);
        let ours = symbolizer.symbolize_process(std::process::id(), &[probe_addr()]);
        let held_when_pushed_out = descriptors_on(&binary);
        // An offset not looked up before needs the file again.
        let again = symbolizer.symbolize_process(child.id(), &[addr + 5]);
        child.kill().unwrap();
        child.wait().unwrap();

        let (theirs, ours, again) = (theirs.unwrap(), ours.unwrap(), again.unwrap());
        assert!(theirs[0].starts_with("synspan_c_probe+0x4 ("), "{theirs:?}");
        // The normalizer holds its own descriptor on the file, by build id, for the frames of
        // processes that exit before they are read; bounded apart from blazesym's.
        let indexed = symbolizer
            .normalizer
            .by_build_id
            .iter()
            .filter(|(_, module)| module.path == binary)
            .count();
        assert_eq!(indexed, 1);
        assert_eq!(held_while_needed, 1 + indexed, "blazesym holds the file it read");
        assert!(ours[0].starts_with("synspan_symbol_probe+0x0 ("), "{ours:?}");
        assert_eq!(held_when_pushed_out, indexed, "pushed out, yet still open");
        assert!(again[0].starts_with("synspan_c_probe+0x5 ("), "{again:?}");
        assert_eq!(symbolizer.sources.len(), 1);
    }

    /// libc's local functions are named from Debian's debug file (libc6-dbg, which the test
    /// setup installs) by its symbol table: no DWARF, so no `file:line`. libc's own `.dynsym`
    /// does not name `__libc_start_call_main`.
    #[test]
    fn libc_is_named_from_its_debug_file_without_dwarf() {
        let connect = libc::connect as *const () as u64;
        let mut symbolizer = UserSymbolizer::new();
        let lines = symbolizer
            .symbolize_process(std::process::id(), &[connect])
            .unwrap();
        let libc_path = symbolizer
            .sources
            .iter()
            .map(|(path, _)| path.clone())
            .next()
            .unwrap();
        assert_eq!(lines, [format!("connect+0x0 ({})", libc_path.display())]);
        let (_, names) = symbolizer.sources.peek(&libc_path).unwrap().clone();
        let Names::DebugFile { path: debug_file, .. } = names else {
            panic!("{libc_path:?}: {names:?}");
        };
        assert!(
            debug_file.starts_with("/usr/lib/debug/.build-id/"),
            "{debug_file:?}"
        );

        let data = std::fs::read(&debug_file).unwrap();
        let debug = object::File::parse(&*data).unwrap();
        let linked = |name: &str| {
            use object::ObjectSymbol;
            debug.symbols().find(|s| s.name() == Ok(name)).unwrap().address()
        };
        let local = connect - linked("connect") + linked("__libc_start_call_main");
        let lines = symbolizer
            .symbolize_process(std::process::id(), &[local])
            .unwrap();
        assert_eq!(
            lines,
            [format!("__libc_start_call_main+0x0 ({})", libc_path.display())]
        );
    }

    #[test]
    fn normalized_frames_travel_between_threads() {
        fn send_and_sync<T: Send + Sync>() {}
        send_and_sync::<NormalizedFrame>();
        fn send<T: Send>() {}
        send::<StackNormalizer>();
    }
}
