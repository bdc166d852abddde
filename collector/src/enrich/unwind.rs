//! The innermost frames of a user stack, unwound from the registers and the top of the stack
//! the kernel copied at SYN_SENT, with the call frame information (`.eh_frame`) of the files
//! they are in, then joined to the kernel's frame-pointer walk.
//!
//! Why: code built without frame pointers (Debian's glibc, whose `connect()` wrapper makes the
//! syscall without a frame of its own) is invisible to a frame-pointer walk, which then skips
//! the very function that called `connect()`. The unwinding itself is framehop's; this module
//! gives it each file's sections and the copied bytes, and decides where its frames end and the
//! walk's take over.
//!
//! Everything here is hostile input: the stack bytes are whatever the process had there, and
//! the files are whatever it mapped. Reads are bounded by the copied bytes, sections by
//! [`MAX_SECTION_BYTES`], frames by [`MAX_UNWOUND_FRAMES`].

use std::{fs::File, num::NonZeroUsize, ops::Range, sync::Arc};

use framehop::{
    ExplicitModuleSectionInfo, Unwinder,
    x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64},
};
use lru::LruCache;
use object::{Object, ObjectSection, ObjectSegment, read::ReadCache};

use super::symbols::{Mapping, Module, ModuleKey};
use crate::attempt::UserFrame;

/// Frames unwound from the copied bytes at most. 256 bytes of stack hold far fewer frames
/// than this; the bound is for bytes crafted to loop.
pub(crate) const MAX_UNWOUND_FRAMES: usize = 16;

/// A larger `.eh_frame` or `.eh_frame_hdr` is not read: the largest libraries of a desktop
/// (a browser's) carry a few MiB.
const MAX_SECTION_BYTES: u64 = 16 << 20;

/// Files whose unwind sections are held: the few hundred libraries and executables connecting
/// code lives in. Each holds its `.eh_frame` (libc's: 0.1 MiB).
const MAX_UNWIND_FILES: NonZeroUsize = NonZeroUsize::new(512).unwrap();

impl UserFrame {
    /// The 8 bytes at `addr`, if the copy holds them.
    fn read(&self, addr: u64) -> Result<u64, ()> {
        let at = usize::try_from(addr.checked_sub(self.sp).ok_or(())?).map_err(|_| ())?;
        let bytes = self.stack.get(at..at.checked_add(8).ok_or(())?).ok_or(())?;
        Ok(u64::from_le_bytes(bytes.try_into().map_err(|_| ())?))
    }
}

/// What framehop needs of one file: its unwind sections and where its segments load.
#[derive(Debug)]
pub(crate) struct UnwindSections {
    eh_frame: Option<(Range<u64>, Arc<[u8]>)>,
    eh_frame_hdr: Option<(Range<u64>, Arc<[u8]>)>,
    text: Option<Range<u64>>,
    got: Option<Range<u64>>,
    /// Loadable segments: file range, and the address it is linked at.
    segments: Vec<(Range<u64>, u64)>,
}

/// Loadable segments kept per file; an ELF file has a handful.
const MAX_SEGMENTS: usize = 64;

/// An ELF file's loadable segments: file range, and the address it is linked at.
pub(crate) fn loadable_segments<'data, R: object::ReadRef<'data>>(
    elf: &object::File<'data, R>,
) -> Vec<(Range<u64>, u64)> {
    elf.segments()
        .take(MAX_SEGMENTS)
        .filter_map(|segment| {
            let (offset, size) = segment.file_range();
            Some((offset..offset.checked_add(size)?, segment.address()))
        })
        .collect()
}

impl UnwindSections {
    /// Reads the sections of an ELF file. `None` for anything that is not one.
    pub(crate) fn read(file: &File) -> Option<Self> {
        let cache = ReadCache::new(file);
        let elf = object::File::parse(&cache).ok()?;
        let section = |name: &str| {
            let section = elf.section_by_name(name)?;
            let range = section.address()..section.address().checked_add(section.size())?;
            if section.size() > MAX_SECTION_BYTES {
                return None;
            }
            let data = section.data().ok()?;
            Some((range, Arc::<[u8]>::from(data)))
        };
        let range = |name: &str| {
            let section = elf.section_by_name(name)?;
            Some(section.address()..section.address().checked_add(section.size())?)
        };
        let segments = loadable_segments(&elf);
        Some(Self {
            eh_frame: section(".eh_frame"),
            eh_frame_hdr: section(".eh_frame_hdr"),
            text: range(".text"),
            got: range(".got"),
            segments,
        })
    }

    /// The address the file is linked at for `offset`: where framehop's addresses start.
    fn bias(&self, mapping_start: u64, mapping_offset: u64) -> Option<u64> {
        let (range, vaddr) = self
            .segments
            .iter()
            .find(|(range, _)| {
                range.start <= mapping_offset && mapping_offset < range.end.max(range.start + 1)
            })
            .or_else(|| self.segments.first())?;
        let linked = vaddr.checked_add(mapping_offset.checked_sub(range.start)?)?;
        mapping_start.checked_sub(linked)
    }
}

/// One code mapping of a process as framehop sees it.
fn framehop_module(
    mapping: &Mapping,
    module: &Module,
    sections: &UnwindSections,
) -> Option<framehop::Module<Arc<[u8]>>> {
    sections.eh_frame.as_ref()?;
    let bias = sections.bias(mapping.start, mapping.offset)?;
    let info = ExplicitModuleSectionInfo {
        base_svma: 0,
        text_svma: sections.text.clone(),
        got_svma: sections.got.clone(),
        eh_frame_svma: sections.eh_frame.as_ref().map(|(r, _)| r.clone()),
        eh_frame: sections.eh_frame.as_ref().map(|(_, d)| d.clone()),
        eh_frame_hdr_svma: sections.eh_frame_hdr.as_ref().map(|(r, _)| r.clone()),
        eh_frame_hdr: sections.eh_frame_hdr.as_ref().map(|(_, d)| d.clone()),
        ..Default::default()
    };
    Some(framehop::Module::new(
        module.path.display().to_string(),
        mapping.start..mapping.end,
        bias,
        info,
    ))
}

/// A process's code as framehop unwinds through it.
pub(crate) type ProcessUnwinder = UnwinderX86_64<Arc<[u8]>>;

/// Unwind sections by file, and framehop's cache of rules by address.
pub(crate) struct FrameUnwinder {
    sections: LruCache<ModuleKey, Option<Arc<UnwindSections>>>,
    cache: CacheX86_64,
}

impl std::fmt::Debug for FrameUnwinder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameUnwinder")
            .field("files", &self.sections.len())
            .finish_non_exhaustive()
    }
}

impl Default for FrameUnwinder {
    fn default() -> Self {
        Self {
            sections: LruCache::new(MAX_UNWIND_FILES),
            cache: CacheX86_64::new(),
        }
    }
}

impl FrameUnwinder {
    /// An unwinder for the code mappings of one process, each with its file.
    pub(crate) fn for_process<'a>(
        &mut self,
        code: impl IntoIterator<Item = (&'a Mapping, &'a Arc<Module>)>,
    ) -> ProcessUnwinder {
        let mut unwinder = ProcessUnwinder::new();
        for (mapping, module) in code {
            let sections = self
                .sections
                .get_or_insert(module.key(), || UnwindSections::read(module.file()).map(Arc::new))
                .clone();
            if let Some(module) = sections.and_then(|s| framehop_module(mapping, module, &s)) {
                unwinder.add_module(module);
            }
        }
        unwinder
    }

    /// The frames framehop unwinds from `frame`, innermost first: where the thread was, then
    /// return addresses, as far as the copied bytes reach.
    pub(crate) fn unwind(&mut self, unwinder: &ProcessUnwinder, frame: &UserFrame) -> Vec<u64> {
        unwind_with(unwinder, &mut self.cache, frame)
    }
}

/// The registers and stack bytes come from the process, the call frame information from its
/// files: both are hostile input. framehop subtracts from a CFA computed from them without a
/// check (`cfa - 8`, found by the `user_stack_unwind` fuzz target), which panics where
/// overflow checks are on. A panic there costs the unwound frames, never the agent: the
/// frame-pointer walk stands in.
fn unwind_with(unwinder: &ProcessUnwinder, cache: &mut CacheX86_64, frame: &UserFrame) -> Vec<u64> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut read = |addr| frame.read(addr);
        let regs = UnwindRegsX86_64::new(frame.ip, frame.sp, frame.bp);
        let mut frames = unwinder.iter_frames(frame.ip, regs, cache, &mut read);
        let mut addrs = Vec::new();
        while addrs.len() < MAX_UNWOUND_FRAMES {
            match frames.next() {
                Ok(Some(address)) => addrs.push(address.address()),
                Ok(None) | Err(_) => break,
            }
        }
        addrs
    }))
    .unwrap_or_default()
}

/// The unwound frames, then the frame-pointer walk's past the deepest frame both have. The
/// walk skips frames without a frame pointer, so each of its frames is one of the real ones,
/// and the unwound frames are the real innermost ones: where the two share an address they
/// agree from there on. When they share none, the walk's frames are deeper than the copied
/// bytes reached (or are what a frame pointer register used for something else pointed at),
/// and follow the unwound ones.
pub(crate) fn join(unwound: &[u64], walked: &[u64]) -> Vec<u64> {
    if unwound.len() <= 1 {
        return walked.to_vec();
    }
    let deepest_shared = unwound.iter().enumerate().skip(1).rev().find_map(|(k, addr)| {
        let j = walked.iter().skip(1).position(|a| a == addr)? + 1;
        Some((k, j))
    });
    let (unwound_end, walked_from) = match deepest_shared {
        Some((k, j)) => (k + 1, j + 1),
        None => (unwound.len(), 1),
    };
    let mut addrs = unwound[..unwound_end].to_vec();
    addrs.extend(walked.iter().skip(walked_from));
    addrs
}

/// For the fuzz target: framehop over one module, then the join. `data` is the registers
/// (ip, sp, bp), the address `.eh_frame` is linked at and its length (five little-endian
/// words), then that `.eh_frame` and the stack bytes.
#[cfg(feature = "fuzzing")]
pub(crate) fn fuzz(data: &[u8]) -> Vec<u64> {
    const HEADER: usize = 40;
    let word = |at: usize| {
        data.get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u64::from_le_bytes)
    };
    let (ip, sp, bp, eh_frame_at) = (word(0), word(8), word(16), word(24));
    let rest = data.get(HEADER..).unwrap_or_default();
    let split = usize::try_from(word(32)).unwrap_or(usize::MAX).min(rest.len());
    let (eh_frame, stack) = rest.split_at(split);
    let stack = &stack[..stack.len().min(synspan_shared::USER_STACK_BYTES)];
    let info = ExplicitModuleSectionInfo {
        base_svma: 0,
        eh_frame_svma: eh_frame_at
            .checked_add(eh_frame.len() as u64)
            .map(|end| eh_frame_at..end),
        eh_frame: Some(Arc::<[u8]>::from(eh_frame)),
        ..Default::default()
    };
    let mut unwinder = ProcessUnwinder::new();
    unwinder.add_module(framehop::Module::new(
        "fuzz".into(),
        0..u64::from(u32::MAX),
        0,
        info,
    ));
    let frame = UserFrame {
        ip,
        sp,
        bp,
        stack: stack.into(),
    };
    let unwound = unwind_with(&unwinder, &mut CacheX86_64::new(), &frame);
    let walked: Vec<u64> = stack
        .chunks_exact(8)
        .filter_map(|c| Some(u64::from_le_bytes(c.try_into().ok()?)))
        .collect();
    join(&unwound, &walked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwound_frames_lead_and_the_walk_follows_past_the_deepest_shared_frame() {
        // The walk skipped the frameless caller 0xc1 of 0xa0.
        assert_eq!(
            join(&[0xa0, 0xc1, 0xd2], &[0xa0, 0xd2, 0xe3]),
            [0xa0, 0xc1, 0xd2, 0xe3]
        );
        // Nothing shared: the walk went deeper than the copied bytes.
        assert_eq!(join(&[0xa0, 0xc1], &[0xa0, 0xd2, 0xe3]), [0xa0, 0xc1, 0xd2, 0xe3]);
        // Nothing unwound past where the thread was: the walk as it is.
        assert_eq!(join(&[0xa0], &[0xa0, 0xd2]), [0xa0, 0xd2]);
        assert_eq!(join(&[], &[0xa0, 0xd2]), [0xa0, 0xd2]);
        // Both agree on everything: no frame twice.
        assert_eq!(join(&[0xa0, 0xd2, 0xe3], &[0xa0, 0xd2, 0xe3]), [0xa0, 0xd2, 0xe3]);
    }

    #[test]
    fn reads_stay_inside_the_copied_bytes() {
        let frame = UserFrame {
            ip: 1,
            sp: 0x1000,
            bp: 0,
            stack: (0u8..16).collect::<Vec<_>>().into(),
        };
        assert_eq!(frame.read(0x1000), Ok(0x0706_0504_0302_0100));
        assert_eq!(frame.read(0x1008), Ok(0x0f0e_0d0c_0b0a_0908));
        assert_eq!(frame.read(0x1009), Err(()));
        assert_eq!(frame.read(0xff8), Err(()));
        assert_eq!(frame.read(u64::MAX), Err(()));
    }
}
