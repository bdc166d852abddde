//! Where a process's threads publish their OpenTelemetry thread context (OTEP 4947): the
//! `otel_thread_ctx_v1` TLS variable, found per process in its ELF files and handed to the
//! kernel, which reads it at SYN_SENT in the calling thread; and the record's attribute bytes
//! the kernel copied, decoded.
//!
//! The variable is exported in `.dynsym` (`STT_TLS`) of the main executable or of a shared
//! library. How a thread finds it depends on how it was linked:
//!
//! - in the main executable (initial-exec or local-exec): at a fixed offset below the thread
//!   pointer (x86-64 TLS variant II), from the executable's `PT_TLS` segment;
//! - in a shared library, the dynamic loader resolved a GOT entry for it, which the agent
//!   reads from the process's memory: a TLSDESC descriptor (`R_X86_64_TLSDESC`) whose
//!   argument is either a static-TLS offset from the thread pointer or a pointer to a
//!   (module id, offset) pair; a module id and offset (`R_X86_64_DTPMOD64`/`DTPOFF64`, the
//!   legacy general-dynamic model); or a thread-pointer offset (`R_X86_64_TPOFF64`,
//!   initial-exec in a library). A module id goes through the thread's DTV in the kernel.
//!
//! glibc and musl agree on all of this on x86-64 (TLS variant II, the DTV pointer at
//! `tp + 8`, a dynamic TLSDESC argument pointing at {module id, offset}) except the DTV's
//! shape, so the process's dynamic loader is told apart: musl's when the executable's
//! `PT_INTERP` (or the executable itself, run through it) is `ld-musl-*`.
//!
//! ELF files, the GOT and the record all come from another process: hostile input. Every
//! size is bounded, every read checked, nothing here panics.

use std::{
    collections::HashMap,
    fs::File,
    num::NonZeroUsize,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, MapData};
use lru::LruCache;
use object::{
    elf,
    read::elf::{FileHeader as _, ProgramHeader as _, Rela as _, SectionHeader as _, Sym as _},
};
use synspan_shared::{ThreadContextTls, tls_kind};

use super::{
    process_context::Memory,
    symbols::{Mapping, parse_maps},
};

/// The variable's name, version 1 of the format.
pub(crate) const SYMBOL: &str = "otel_thread_ctx_v1";

/// The process-context attribute naming the attribute keys, by index.
pub(crate) const KEY_MAP: &str = "threadlocal.attribute_key_map";

/// Files larger than this are not looked into: no executable or library with a thread
/// context is, and a mapping of it would be read as root.
const MAX_ELF_BYTES: u64 = 1 << 30;

/// A process in which no variable was found is looked at again this often while it keeps
/// connecting (a library it loads later with `dlopen`), and only if its maps changed.
const RETRY: Duration = Duration::from_secs(1);

/// Processes and files remembered.
const MAX_PROCESSES: NonZeroUsize = NonZeroUsize::new(8192).unwrap();
const MAX_FILES: NonZeroUsize = NonZeroUsize::new(4096).unwrap();

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum TlsError {
    #[error("not an ELF file this reader knows: {0}")]
    Elf(String),
    #[error("{0} is defined but the file has no PT_TLS segment")]
    NoTlsSegment(&'static str),
    #[error("PT_TLS has an alignment of {0}, not a power of two")]
    Alignment(u64),
    #[error("the loader has not resolved its TLS entry yet")]
    Unresolved,
    #[error("unreadable process memory")]
    Unreadable,
}

/// What an ELF file says about the variable, when it defines it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TlsSymbol {
    /// `st_value`: the offset into the module's TLS block.
    pub(crate) value: u64,
    /// `PT_TLS`: `p_vaddr`, `p_memsz`, `p_align`.
    pub(crate) tls_vaddr: u64,
    pub(crate) tls_memsz: u64,
    pub(crate) tls_align: u64,
    /// The lowest `PT_LOAD` address, page-aligned: what the mapping at file offset 0 maps.
    pub(crate) first_load: u64,
    /// Dynamic relocations against the symbol: (type, offset of the GOT entry, addend).
    pub(crate) relocations: Vec<(u32, u64, i64)>,
}

/// Looks for the variable in an ELF file's dynamic symbols. `Ok(None)`: not defined there.
pub(crate) fn tls_symbol(data: &[u8]) -> Result<Option<TlsSymbol>, TlsError> {
    let bad = |e: object::Error| TlsError::Elf(e.to_string());
    let header = elf::FileHeader64::<object::Endianness>::parse(data).map_err(bad)?;
    let endian = header.endian().map_err(bad)?;
    let sections = header.sections(endian, data).map_err(bad)?;
    let symbols = sections.symbols(endian, data, elf::SHT_DYNSYM).map_err(bad)?;
    let Some((index, symbol)) = symbols.iter().enumerate().find(|(_, sym)| {
        sym.st_type() == elf::STT_TLS
            && !sym.is_undefined(endian)
            && symbols
                .symbol_name(endian, sym)
                .is_ok_and(|name| name == SYMBOL.as_bytes())
    }) else {
        return Ok(None);
    };
    let mut tls = None;
    let mut first_load = u64::MAX;
    for ph in header.program_headers(endian, data).map_err(bad)? {
        match ph.p_type(endian) {
            elf::PT_TLS => tls = Some((ph.p_vaddr(endian), ph.p_memsz(endian), ph.p_align(endian))),
            elf::PT_LOAD => first_load = first_load.min(ph.p_vaddr(endian) & !0xfff),
            _ => {}
        }
    }
    let (tls_vaddr, tls_memsz, tls_align) = tls.ok_or(TlsError::NoTlsSegment(SYMBOL))?;
    // Every relocation section tied to the dynamic symbols: `.rela.dyn` and `.rela.plt`.
    let mut relocations = Vec::new();
    for section in sections.iter() {
        let Ok(Some((relas, link))) = section.rela(endian, data) else {
            continue;
        };
        if link != symbols.section() {
            continue;
        }
        relocations.extend(
            relas
                .iter()
                .filter(|r| r.r_sym(endian, false) as usize == index)
                .map(|r| (r.r_type(endian, false).0, r.r_offset(endian), r.r_addend(endian)))
                .take(16),
        );
    }
    Ok(Some(TlsSymbol {
        value: symbol.st_value(endian),
        tls_vaddr,
        tls_memsz,
        tls_align,
        first_load: if first_load == u64::MAX { 0 } else { first_load },
        relocations,
    }))
}

/// The variable in the main executable: static TLS, the executable's block ending at the
/// thread pointer. glibc and musl place it at `tp - offset`, `offset` the block's size
/// rounded up to its alignment, minus the block's first byte's misalignment (zero when
/// `p_vaddr` is aligned, as linkers make it).
pub(crate) fn executable_location(symbol: &TlsSymbol) -> Result<ThreadContextTls, TlsError> {
    let align = symbol.tls_align.max(1);
    if !align.is_power_of_two() {
        return Err(TlsError::Alignment(align));
    }
    let first_byte = symbol.tls_vaddr.wrapping_neg() & (align - 1);
    let block = symbol
        .tls_memsz
        .checked_sub(first_byte)
        .and_then(|size| size.checked_next_multiple_of(align))
        .and_then(|size| size.checked_add(first_byte))
        .ok_or(TlsError::Elf("PT_TLS size overflows".into()))?;
    Ok(ThreadContextTls {
        kind: tls_kind::STATIC,
        _pad: 0,
        module: 0,
        offset: (symbol.value as i64).wrapping_sub(block as i64),
    })
}

const R_X86_64_DTPMOD64: u32 = 16;
const R_X86_64_DTPOFF64: u32 = 17;
const R_X86_64_TPOFF64: u32 = 18;
const R_X86_64_TLSDESC: u32 = 36;

/// A module id is small: the count of modules with TLS the process has loaded.
const MAX_MODULE: u64 = 1 << 16;
/// A static-TLS offset lies within the static block, well within this of the thread pointer.
const MAX_STATIC_OFFSET: i64 = 1 << 32;

/// The C library whose dynamic loader laid out a process's TLS: it decides the DTV's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Loader {
    Glibc,
    Musl,
}

impl Loader {
    /// The loader named by `path`: musl's is `ld-musl-<arch>.so.1`, everything else is
    /// taken for glibc's.
    pub(crate) fn named(path: &[u8]) -> Self {
        let name = path.rsplit(|b| *b == b'/').next().unwrap_or(path);
        if name.starts_with(b"ld-musl-") {
            Self::Musl
        } else {
            Self::Glibc
        }
    }

    fn dtv_kind(self) -> u32 {
        match self {
            Self::Glibc => tls_kind::DTV,
            Self::Musl => tls_kind::MUSL_DTV,
        }
    }
}

/// Longest `PT_INTERP` looked at: a path.
const MAX_INTERP: u64 = 4096;

/// An ELF file's `PT_INTERP`, the path of its dynamic loader without the NUL; `None` for a
/// static executable, a library, or a file this reader does not know.
pub(crate) fn interpreter(data: &[u8]) -> Option<&[u8]> {
    let header = elf::FileHeader64::<object::Endianness>::parse(data).ok()?;
    let endian = header.endian().ok()?;
    let interp = header
        .program_headers(endian, data)
        .ok()?
        .iter()
        .find(|ph| ph.p_type(endian) == elf::PT_INTERP)?;
    let size = interp.p_filesz(endian).min(MAX_INTERP);
    let start = usize::try_from(interp.p_offset(endian)).ok()?;
    let bytes = data.get(start..start.checked_add(usize::try_from(size).ok()?)?)?;
    Some(bytes.split(|b| *b == 0).next().unwrap_or(bytes))
}

/// The variable in a shared library loaded at `bias` by `loader`: what the loader wrote
/// into the GOT.
pub(crate) fn library_location(
    symbol: &TlsSymbol,
    bias: u64,
    loader: Loader,
    memory: &impl Memory,
) -> Result<ThreadContextTls, TlsError> {
    let read = |addr: u64| -> Result<u64, TlsError> {
        let mut raw = [0u8; 8];
        memory
            .read_exact_at(&mut raw, addr)
            .map_err(|_| TlsError::Unreadable)?;
        Ok(u64::from_ne_bytes(raw))
    };
    let got = |offset: u64| bias.wrapping_add(offset);
    let statically = |offset: i64| -> Result<ThreadContextTls, TlsError> {
        if !(-MAX_STATIC_OFFSET..0).contains(&offset) {
            return Err(TlsError::Unresolved);
        }
        Ok(ThreadContextTls {
            kind: tls_kind::STATIC,
            _pad: 0,
            module: 0,
            offset,
        })
    };
    let dynamically = |module: u64, offset: u64| -> Result<ThreadContextTls, TlsError> {
        if module == 0 || module >= MAX_MODULE || offset >= MAX_STATIC_OFFSET as u64 {
            return Err(TlsError::Unresolved);
        }
        Ok(ThreadContextTls {
            kind: loader.dtv_kind(),
            _pad: 0,
            module,
            offset: offset as i64,
        })
    };
    let find = |kind: u32| symbol.relocations.iter().find(|(t, _, _)| *t == kind);
    if let Some(&(_, at, _)) = find(R_X86_64_TLSDESC) {
        // { entry, argument }: the argument is the offset from the thread pointer when the
        // loader resolved it to static TLS (negative, variant II), else a pointer to the
        // (module id, offset) pair its dynamic resolver takes (glibc's `tlsdesc_dynamic_arg`
        // and musl's `td_index` both begin with it).
        let argument = read(got(at).wrapping_add(8))?;
        if (argument as i64) < 0 {
            return statically(argument as i64);
        }
        return dynamically(read(argument)?, read(argument.wrapping_add(8))?);
    }
    if let Some(&(_, at, _)) = find(R_X86_64_DTPMOD64) {
        let offset = match find(R_X86_64_DTPOFF64) {
            Some(&(_, at, _)) => read(got(at))?,
            None => symbol.value,
        };
        return dynamically(read(got(at))?, offset);
    }
    if let Some(&(_, at, _)) = find(R_X86_64_TPOFF64) {
        return statically(read(got(at))? as i64);
    }
    Err(TlsError::Unresolved)
}

/// The entries of a record's `attrs-data`: `[key index][length][length bytes]`, packed.
/// Parsing stops at the first entry the bytes cannot hold whole; a key given twice keeps its
/// last value; values that are not UTF-8 are skipped.
pub(crate) fn attributes(bytes: &[u8]) -> Vec<(u8, &str)> {
    let mut found: Vec<(u8, &str)> = Vec::new();
    let mut rest = bytes;
    while let [key, len, tail @ ..] = rest {
        let Some((value, next)) = tail.split_at_checked(usize::from(*len)) else {
            break;
        };
        rest = next;
        let Ok(value) = std::str::from_utf8(value) else {
            continue;
        };
        found.retain(|(k, _)| k != key);
        found.push((*key, value));
    }
    found
}

/// What was found for one process.
#[derive(Debug)]
struct Looked {
    at: Instant,
    /// The process's start time: the same pid with another one is another process.
    start_time: u64,
    /// The mapped files when it was looked at: a look is only repeated once they change.
    files: Vec<PathBuf>,
    found: bool,
}

/// A file as its inode and version: processes share their libraries.
type FileKey = (u64, u64, i64, u64);

/// Resolves where processes keep the variable, and keeps the kernel's map of it.
pub(crate) struct ThreadContexts {
    map: BpfHashMap<MapData, u32, ThreadContextTls>,
    processes: LruCache<u32, Looked>,
    files: LruCache<FileKey, Option<TlsSymbol>>,
    proc_root: PathBuf,
}

impl ThreadContexts {
    pub(crate) fn new(map: BpfHashMap<MapData, u32, ThreadContextTls>) -> Self {
        Self {
            map,
            processes: LruCache::new(MAX_PROCESSES),
            files: LruCache::new(MAX_FILES),
            proc_root: PathBuf::from("/proc"),
        }
    }

    /// Looks for the variable in the process `pid` started at `start_time` if it was never
    /// looked at, or if it was not found and the last look is older than [`RETRY`] (a library
    /// loaded since, a context published).
    pub(crate) fn look(&mut self, pid: u32, start_time: u64) {
        match self.processes.get(&pid) {
            Some(looked) if looked.start_time != start_time => {
                // The pid was reused: the kernel must not read the old process's location in
                // the new one, whatever the look below finds.
                if self.processes.pop(&pid).is_some_and(|l| l.found) {
                    let _ = self.map.remove(&pid);
                }
            }
            Some(looked) if looked.found || looked.at.elapsed() < RETRY => return,
            _ => {}
        }
        let Ok(maps) = std::fs::read(self.proc_root.join(pid.to_string()).join("maps")) else {
            return;
        };
        let mappings = parse_maps(&maps);
        let files = files_of(&mappings);
        let paths: Vec<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
        if let Some(looked) = self.processes.get_mut(&pid)
            && looked.files == paths
        {
            looked.at = Instant::now();
            return;
        }
        // Room first: the kernel's map holds as many processes as this cache, so a full cache
        // of processes that publish leaves no kernel entry for a new one until one goes.
        if !self.processes.contains(&pid)
            && self.processes.len() == self.processes.cap().get()
            && let Some((evicted, old)) = self.processes.pop_lru()
            && old.found
        {
            let _ = self.map.remove(&evicted);
        }
        let found = match self.resolve(pid, &files) {
            // Said once the kernel has it: from then on its attempts find their parents.
            Ok(Some((path, location))) => match self.map.insert(&pid, &location, 0) {
                Ok(()) => {
                    tracing::info!(
                        "process {pid} publishes its thread context: {SYMBOL} in {}, {}",
                        path.display(),
                        describe(&location)
                    );
                    true
                }
                Err(err) => {
                    tracing::debug!("process {pid}: thread context not handed to the kernel: {err}");
                    false
                }
            },
            Ok(None) => false,
            Err(err) => {
                tracing::debug!("process {pid}: thread context not usable yet: {err}");
                false
            }
        };
        self.processes.put(
            pid,
            Looked {
                at: Instant::now(),
                start_time,
                files: paths,
                found,
            },
        );
    }

    /// Forgets processes that have exited, in the kernel too: their pid may be reused.
    pub(crate) fn sweep(&mut self) {
        let gone: Vec<u32> = self
            .processes
            .iter()
            .map(|(pid, _)| *pid)
            .filter(|pid| !self.proc_root.join(pid.to_string()).exists())
            .collect();
        for pid in gone {
            if self.processes.pop(&pid).is_some_and(|l| l.found) {
                let _ = self.map.remove(&pid);
            }
        }
    }

    fn resolve(
        &mut self,
        pid: u32,
        files: &[(PathBuf, u64)],
    ) -> Result<Option<(PathBuf, ThreadContextTls)>, TlsError> {
        let root = self.proc_root.join(pid.to_string());
        let exe = std::fs::read_link(root.join("exe")).ok();
        for (path, start) in files {
            let Some(symbol) = self.symbol_of(&root, path) else {
                continue;
            };
            let location = if exe.as_deref() == Some(path.as_path()) {
                executable_location(&symbol)?
            } else {
                let memory = File::open(root.join("mem")).map_err(|_| TlsError::Unreadable)?;
                let loader = loader_of(&root, exe.as_deref());
                library_location(&symbol, start.wrapping_sub(symbol.first_load), loader, &memory)?
            };
            return Ok(Some((path.clone(), location)));
        }
        Ok(None)
    }

    /// The variable in the file at `path` as `root` (a process's `/proc` directory) sees it,
    /// read once per file version.
    fn symbol_of(&mut self, root: &Path, path: &Path) -> Option<TlsSymbol> {
        let file_path = root.join("root").join(path.strip_prefix("/").unwrap_or(path));
        let file = File::open(&file_path).ok()?;
        let meta = file.metadata().ok()?;
        let key = (meta.dev(), meta.ino(), meta.mtime(), meta.size());
        if let Some(known) = self.files.get(&key) {
            return known.clone();
        }
        let symbol = if meta.size() > MAX_ELF_BYTES {
            None
        } else {
            // SAFETY: read-only private mapping of a file; a file truncated under us would
            // fault, as for the symbolizer's mappings of the same files.
            let data = unsafe { memmap2::Mmap::map(&file) }.ok()?;
            match tls_symbol(&data) {
                Ok(symbol) => symbol,
                Err(err) => {
                    tracing::debug!("{}: {err}", path.display());
                    None
                }
            }
        };
        self.files.put(key, symbol.clone());
        symbol
    }
}

/// The dynamic loader of the process whose `/proc` directory is `root`: the executable's
/// `PT_INTERP`, or the executable itself when it is the loader (`ld-musl-x86_64.so.1 PROGRAM`).
fn loader_of(root: &Path, exe: Option<&Path>) -> Loader {
    if let Some(exe) = exe
        && Loader::named(exe.as_os_str().as_encoded_bytes()) == Loader::Musl
    {
        return Loader::Musl;
    }
    let Ok(file) = File::open(root.join("exe")) else {
        return Loader::Glibc;
    };
    if file.metadata().map_or(true, |m| m.len() > MAX_ELF_BYTES) {
        return Loader::Glibc;
    }
    // SAFETY: read-only private mapping of a file, as in `symbol_of`.
    let Ok(data) = (unsafe { memmap2::Mmap::map(&file) }) else {
        return Loader::Glibc;
    };
    interpreter(&data).map_or(Loader::Glibc, Loader::named)
}

fn describe(location: &ThreadContextTls) -> String {
    match location.kind {
        tls_kind::STATIC if location.offset < 0 => {
            format!("static TLS at tp-{:#x}", location.offset.unsigned_abs())
        }
        tls_kind::STATIC => format!("static TLS at tp+{:#x}", location.offset),
        tls_kind::MUSL_DTV => format!(
            "dynamic TLS through musl's DTV, module {} offset {:#x}",
            location.module, location.offset
        ),
        _ => format!(
            "dynamic TLS, module {} offset {:#x}",
            location.module, location.offset
        ),
    }
}

/// Each mapped file once, with the start of its mapping at file offset 0 (where its ELF
/// header is), in the order of the maps.
fn files_of(mappings: &[Mapping]) -> Vec<(PathBuf, u64)> {
    let mut starts: HashMap<&Path, u64> = HashMap::new();
    let mut order = Vec::new();
    for m in mappings {
        let Some(name) = m.name.as_deref() else { continue };
        if m.deleted || m.offset != 0 || !name.is_absolute() {
            continue;
        }
        if !starts.contains_key(name) {
            starts.insert(name, m.start);
            order.push((name.to_path_buf(), m.start));
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, collections::BTreeMap, io};

    use super::*;

    #[test]
    fn attributes_are_entries_until_one_does_not_fit() {
        let bytes = [
            0, 3, b'G', b'E', b'T', 1, 2, b'/', b'x', 0, 4, b'P', b'O', b'S', b'T', 2, 9, b'c',
        ];
        assert_eq!(attributes(&bytes), [(1, "/x"), (0, "POST")]);
        assert!(attributes(&[]).is_empty());
        assert!(attributes(&[7]).is_empty());
        assert_eq!(attributes(&[3, 0]), [(3, "")]);
        assert_eq!(attributes(&[3, 1, 0xff, 4, 1, b'a']), [(4, "a")]);
    }

    fn symbol(value: u64, memsz: u64, align: u64, vaddr: u64) -> TlsSymbol {
        TlsSymbol {
            value,
            tls_vaddr: vaddr,
            tls_memsz: memsz,
            tls_align: align,
            first_load: 0,
            relocations: Vec::new(),
        }
    }

    #[test]
    fn the_executable_block_ends_at_the_thread_pointer_rounded_to_its_alignment() {
        let at = |s: &TlsSymbol| executable_location(s).unwrap().offset;
        assert_eq!(at(&symbol(0, 8, 8, 0x3de0)), -8);
        // p_memsz not a multiple of p_align: the block is rounded up.
        assert_eq!(at(&symbol(8, 0x14, 16, 0x3de0)), 8 - 0x20);
        assert_eq!(at(&symbol(0x10, 0x18, 64, 0x3dc0)), 0x10 - 0x40);
        assert_eq!(
            executable_location(&symbol(0, 8, 24, 0)),
            Err(TlsError::Alignment(24))
        );
        assert!(executable_location(&symbol(0, u64::MAX, 16, 0)).is_err());
    }

    /// A process's memory as a few 8-byte words.
    struct Words(RefCell<BTreeMap<u64, u64>>);

    impl Memory for Words {
        fn read_exact_at(&self, buf: &mut [u8], addr: u64) -> io::Result<()> {
            let word = self.0.borrow().get(&addr).copied();
            let word = word.ok_or_else(|| io::Error::other("unmapped"))?;
            buf.copy_from_slice(&word.to_ne_bytes()[..buf.len()]);
            Ok(())
        }
    }

    fn with(relocations: Vec<(u32, u64, i64)>) -> TlsSymbol {
        TlsSymbol {
            relocations,
            ..symbol(0x10, 0x20, 8, 0)
        }
    }

    #[test]
    fn a_library_location_is_what_the_loader_resolved() {
        let bias = 0x7f00_0000_0000;
        let memory = Words(RefCell::new(BTreeMap::from([
            // TLSDESC resolved to static TLS: { entry, -0x80 }.
            (bias + 0x4000, 0x7f00_1234_5678),
            (bias + 0x4008, (-0x80i64) as u64),
            // TLSDESC resolved dynamically: { entry, &{ module 3, offset 0x10 } }.
            (bias + 0x5000, 0x7f00_1234_5678),
            (bias + 0x5008, 0x5555_0000),
            (0x5555_0000, 3),
            (0x5555_0008, 0x10),
            // General dynamic: module 4, offset 0x18.
            (bias + 0x6000, 4),
            (bias + 0x6008, 0x18),
            // A lazy descriptor not resolved yet: its argument points at garbage.
            (bias + 0x7008, 0x5555_1000),
            (0x5555_1000, u64::MAX),
            (0x5555_1008, 0),
        ])));
        let at = |relocations| library_location(&with(relocations), bias, Loader::Glibc, &memory);
        let l = at(vec![(R_X86_64_TLSDESC, 0x4000, 0)]).unwrap();
        assert_eq!((l.kind, l.offset), (tls_kind::STATIC, -0x80));
        let l = at(vec![(R_X86_64_TLSDESC, 0x5000, 0)]).unwrap();
        assert_eq!((l.kind, l.module, l.offset), (tls_kind::DTV, 3, 0x10));
        let l = at(vec![
            (R_X86_64_DTPMOD64, 0x6000, 0),
            (R_X86_64_DTPOFF64, 0x6008, 0),
        ])
        .unwrap();
        assert_eq!((l.kind, l.module, l.offset), (tls_kind::DTV, 4, 0x18));
        assert_eq!(at(vec![(R_X86_64_TLSDESC, 0x7000, 0)]), Err(TlsError::Unresolved));
        assert_eq!(at(vec![(R_X86_64_TLSDESC, 0x9000, 0)]), Err(TlsError::Unreadable));
        assert_eq!(at(vec![]), Err(TlsError::Unresolved));
        // musl: the same GOT, its own DTV; static TLS is static TLS.
        let musl = |relocations| library_location(&with(relocations), bias, Loader::Musl, &memory);
        let l = musl(vec![(R_X86_64_TLSDESC, 0x5000, 0)]).unwrap();
        assert_eq!((l.kind, l.module, l.offset), (tls_kind::MUSL_DTV, 3, 0x10));
        let l = musl(vec![(R_X86_64_TLSDESC, 0x4000, 0)]).unwrap();
        assert_eq!((l.kind, l.offset), (tls_kind::STATIC, -0x80));
    }

    #[test]
    fn the_loader_is_named_by_the_interpreter() {
        assert_eq!(Loader::named(b"/lib/ld-musl-x86_64.so.1"), Loader::Musl);
        assert_eq!(Loader::named(b"ld-musl-aarch64.so.1"), Loader::Musl);
        assert_eq!(Loader::named(b"/lib64/ld-linux-x86-64.so.2"), Loader::Glibc);
        assert_eq!(Loader::named(b""), Loader::Glibc);
        let exe = std::fs::read("/proc/self/exe").unwrap();
        let interp = interpreter(&exe).expect("this test binary is dynamically linked");
        assert!(
            interp.ends_with(b".so.2"),
            "{:?}",
            String::from_utf8_lossy(interp)
        );
        assert_eq!(interpreter(b"\x7fELF garbage"), None);
    }

    #[test]
    fn files_that_are_not_elf_are_refused() {
        assert!(tls_symbol(b"").is_err());
        assert!(tls_symbol(b"\x7fELF garbage").is_err());
    }

    #[test]
    fn a_library_without_the_variable_has_none() {
        let exe = std::fs::read("/proc/self/exe").unwrap();
        assert_eq!(tls_symbol(&exe), Ok(None));
    }
}
