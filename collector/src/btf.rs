//! The kernel's BTF, mapped once at start-up and read for two things: where a struct keeps a
//! member (the layout the programs are given), and aya's own parse of it, whose type ids attach
//! the BTF tracepoints.
//!
//! A general BTF library builds every type of vmlinux into memory at start-up, tens of MiB
//! for a dozen lookups. This keeps where each type starts in the mapped bytes, and walks them.
//! The format is `include/uapi/linux/btf.h`.
//!
//! Measured on Linux 6.18 (x86-64, 2 shared cores, 5.3 MiB of vmlinux BTF), medians of 5
//! runs, one process each: peak RSS added and time for the layout's 18 member lookups, then
//! the peak with aya's parse, which attaching the BTF tracepoints needs whatever reads the
//! members.
//!
//! | reader | layout: peak RSS, time | with aya's parse |
//! |---|---:|---:|
//! | this one over the mapped file, aya parsing the same mapping | +0.6 MiB, 1.5 ms | +13.1 MiB |
//! | this one over the file read into memory, aya reading it again | +5.8 MiB, 6 ms | +22.3 MiB |
//! | btf-rs 2.0 `Backend::Mmap`, aya over a mapping of its own | +1.0 MiB, 13 ms | +13.1 MiB |
//! | btf-rs 2.0 `Backend::Cache` | +38.7 MiB, 195 ms | +38.6 MiB |
//! | aya-obj 0.6 `Btf` | none: it finds type ids by name, its members are private | +18.2 MiB |
//!
//! synspan's own start-up peak (VmHWM at "synspan ready") went from 39.6 MiB (file read
//! twice) to 29.1 MiB (mapped once). btf-rs ties on memory, but is slower, keeps its mapping
//! to itself, and is LGPL-2.1, which would come along into this crate's binary.

use std::{fs::File, io::Read, path::Path};

/// Where the running kernel publishes its BTF.
const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub(crate) enum BtfError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not BTF, or a layout this reader does not know: {0}")]
    Format(&'static str),
    #[error("aya cannot parse it: {0}")]
    Aya(#[source] aya::BtfError),
}

/// The bytes of one BTF file: mapped where the kernel allows it (6.18 does, kernels from before
/// mid-2025 do not), and then the pages are the kernel's own and cost this process no memory;
/// read into memory elsewhere.
pub(crate) struct KernelBtf {
    bytes: Bytes,
}

enum Bytes {
    Mapped(memmap2::Mmap),
    Read(Vec<u8>),
}

impl KernelBtf {
    pub(crate) fn from_sys_fs() -> Result<Self, BtfError> {
        Self::open(Path::new(VMLINUX))
    }

    pub(crate) fn open(path: &Path) -> Result<Self, BtfError> {
        let error = |source| BtfError::Read {
            path: path.display().to_string(),
            source,
        };
        let mut file = File::open(path).map_err(error)?;
        // SAFETY: a private read-only mapping of a file nobody writes: the kernel's BTF does not
        // change while it runs (the tests map a fixture of the source tree).
        let bytes = match unsafe { memmap2::MmapOptions::new().map_copy_read_only(&file) } {
            Ok(map) => Bytes::Mapped(map),
            Err(err) => {
                tracing::debug!("cannot map {} ({err}), reading it", path.display());
                let mut data = Vec::new();
                file.read_to_end(&mut data).map_err(error)?;
                Bytes::Read(data)
            }
        };
        Ok(Self { bytes })
    }

    fn bytes(&self) -> &[u8] {
        match &self.bytes {
            Bytes::Mapped(map) => map,
            Bytes::Read(data) => data,
        }
    }

    /// This reader's index of the types, for member lookups.
    pub(crate) fn types(&self) -> Result<Btf<'_>, BtfError> {
        Btf::parse(self.bytes())
    }

    /// aya's parse of the same bytes, for the loader and the BTF tracepoints.
    pub(crate) fn for_aya(&self) -> Result<aya::Btf, BtfError> {
        aya::Btf::parse(self.bytes(), aya::Endianness::default()).map_err(BtfError::Aya)
    }
}

const MAGIC: u16 = 0xeb9f;

mod kind {
    pub(crate) const INT: u32 = 1;
    pub(crate) const ARRAY: u32 = 3;
    pub(crate) const STRUCT: u32 = 4;
    pub(crate) const UNION: u32 = 5;
    pub(crate) const ENUM: u32 = 6;
    pub(crate) const TYPEDEF: u32 = 8;
    pub(crate) const VOLATILE: u32 = 9;
    pub(crate) const CONST: u32 = 10;
    pub(crate) const RESTRICT: u32 = 11;
    pub(crate) const FUNC_PROTO: u32 = 13;
    pub(crate) const VAR: u32 = 14;
    pub(crate) const DATASEC: u32 = 15;
    pub(crate) const DECL_TAG: u32 = 17;
    pub(crate) const TYPE_TAG: u32 = 18;
    pub(crate) const ENUM64: u32 = 19;
}

/// The last kind this reader knows (`BTF_KIND_ENUM64`).
const MAX_KIND: u32 = 19;

/// Bytes that follow a type's 12-byte header, by kind and member count; `None` for a kind
/// this reader does not know, whose size it cannot skip.
fn extra_len(kind: u32, vlen: usize) -> Option<usize> {
    Some(match kind {
        kind::INT | kind::VAR | kind::DECL_TAG => 4,
        kind::ARRAY => 12,
        kind::STRUCT | kind::UNION | kind::DATASEC | kind::ENUM64 => 12 * vlen,
        kind::ENUM | kind::FUNC_PROTO => 8 * vlen,
        1..=MAX_KIND => 0,
        _ => return None,
    })
}

/// Members one lookup may look at. `struct sock` with everything nested in it is a few hundred;
/// a broken file can nest a struct in itself under many anonymous members, which without a
/// bound is tens of members to the power of the nesting depth.
const MAX_MEMBERS_VISITED: usize = 1 << 16;

pub(crate) struct Btf<'a> {
    data: &'a [u8],
    /// Where the string section starts in `data`.
    strings: usize,
    /// Where each type starts in `data`; type id `n` is `types[n - 1]` (0 is `void`).
    types: Vec<u32>,
}

struct TypeHeader {
    name: u32,
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    /// The referenced type, for typedefs, qualifiers and the like.
    refers_to: u32,
    /// Where the members start.
    body: usize,
}

impl<'a> Btf<'a> {
    pub(crate) fn parse(data: &'a [u8]) -> Result<Self, BtfError> {
        let u16_at = |at: usize| data.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        let u32_at = |at: usize| {
            data.get(at..at + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        if u16_at(0) != Some(MAGIC) {
            return Err(BtfError::Format("no little-endian BTF magic"));
        }
        let header = |at| {
            u32_at(at)
                .map(|v| v as usize)
                .ok_or(BtfError::Format("short header"))
        };
        let hdr_len = header(4)?;
        let (type_off, type_len, str_off) = (header(8)?, header(12)?, header(16)?);
        let type_start = hdr_len + type_off;
        let type_end = type_start + type_len;
        let strings = hdr_len + str_off;
        if type_end > data.len() || strings > data.len() {
            return Err(BtfError::Format("sections past the end of the file"));
        }
        let mut types = Vec::new();
        let mut at = type_start;
        while at < type_end {
            let info = u32_at(at + 4).ok_or(BtfError::Format("truncated type"))?;
            types.push(u32::try_from(at).map_err(|_| BtfError::Format("file too large"))?);
            at += 12
                + extra_len((info >> 24) & 0x1f, (info & 0xffff) as usize)
                    .ok_or(BtfError::Format("a type of a kind newer than this reader"))?;
        }
        if at != type_end {
            return Err(BtfError::Format("a type runs past the type section"));
        }
        Ok(Self { data, strings, types })
    }

    fn u32_at(&self, at: usize) -> u32 {
        self.data
            .get(at..at + 4)
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn string(&self, offset: u32) -> &'a [u8] {
        let start = self.strings + offset as usize;
        let rest = self.data.get(start..).unwrap_or_default();
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    }

    fn header(&self, id: u32) -> Option<TypeHeader> {
        let at = *self.types.get(id.checked_sub(1)? as usize)? as usize;
        let info = self.u32_at(at + 4);
        Some(TypeHeader {
            name: self.u32_at(at),
            kind: (info >> 24) & 0x1f,
            vlen: (info & 0xffff) as usize,
            kind_flag: info >> 31 == 1,
            refers_to: self.u32_at(at + 8),
            body: at + 12,
        })
    }

    /// Byte offset of `member` in `struct name`, looking through anonymous structs and
    /// unions; `None` if there is no such member or it is a bitfield (no byte to read at).
    pub(crate) fn member_offset(&self, name: &str, member: &str) -> Option<u32> {
        (1..=self.types.len() as u32).find_map(|id| {
            let t = self.header(id)?;
            (t.kind == kind::STRUCT && self.string(t.name) == name.as_bytes())
                .then(|| {
                    let mut budget = MAX_MEMBERS_VISITED;
                    self.find_member(&t, member.as_bytes(), 0, 0, &mut budget)
                })
                .flatten()
        })
    }

    /// The constants of `enum name` (32 or 64 bits), as (name, value); `None` if there is no
    /// such enum. Names that are not UTF-8 are left out.
    pub(crate) fn enum_values(&self, name: &str) -> Option<Vec<(&'a str, u64)>> {
        let t = (1..=self.types.len() as u32).find_map(|id| {
            let t = self.header(id)?;
            (matches!(t.kind, kind::ENUM | kind::ENUM64) && self.string(t.name) == name.as_bytes())
                .then_some(t)
        })?;
        let width = if t.kind == kind::ENUM { 8 } else { 12 };
        let values = (0..t.vlen)
            .filter_map(|i| {
                let at = t.body + width * i;
                let low = u64::from(self.u32_at(at + 4));
                let value = if t.kind == kind::ENUM {
                    low
                } else {
                    low | u64::from(self.u32_at(at + 8)) << 32
                };
                Some((std::str::from_utf8(self.string(self.u32_at(at))).ok()?, value))
            })
            .collect();
        Some(values)
    }

    fn find_member(
        &self,
        st: &TypeHeader,
        member: &[u8],
        base_bits: u32,
        depth: u32,
        budget: &mut usize,
    ) -> Option<u32> {
        // Anonymous members nest a few levels deep; more is a loop in a broken file.
        if depth > 8 {
            return None;
        }
        for i in 0..st.vlen {
            *budget = budget.checked_sub(1)?;
            let at = st.body + 12 * i;
            let (name, ty, offset) = (self.u32_at(at), self.u32_at(at + 4), self.u32_at(at + 8));
            // With kind_flag the top byte is the bitfield size, the rest the bit offset.
            let (bits, bitfield) = if st.kind_flag {
                (offset & 0x00ff_ffff, offset >> 24)
            } else {
                (offset, 0)
            };
            let bits = base_bits.checked_add(bits)?;
            let member_name = self.string(name);
            if member_name == member {
                return (bitfield == 0 && bits.is_multiple_of(8)).then_some(bits / 8);
            }
            if member_name.is_empty() {
                let nested = self.resolve(ty)?;
                if matches!(nested.kind, kind::STRUCT | kind::UNION)
                    && let Some(found) = self.find_member(&nested, member, bits, depth + 1, budget)
                {
                    return Some(found);
                }
            }
        }
        None
    }

    /// The type behind typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Option<TypeHeader> {
        // A chain longer than this is a loop in a broken file.
        for _ in 0..32 {
            let t = self.header(id)?;
            match t.kind {
                kind::TYPEDEF | kind::VOLATILE | kind::CONST | kind::RESTRICT | kind::TYPE_TAG => {
                    id = t.refers_to
                }
                _ => return Some(t),
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `btf/fixture.c` as pahole encodes it; `btf/fixture.c` says how to make it again.
    const FIXTURE: &[u8] = include_bytes!("btf/fixture.btf");

    fn fixture() -> Btf<'static> {
        Btf::parse(FIXTURE).expect("the fixture is BTF")
    }

    /// Asserts each (struct, member, offset) of `expected`, `None` where there is no byte offset.
    fn assert_offsets(expected: &[(&str, &str, Option<u32>)]) {
        let btf = fixture();
        for &(name, member, offset) in expected {
            assert_eq!(btf.member_offset(name, member), offset, "{name}::{member}");
        }
    }

    #[test]
    fn members_at_their_offsets() {
        assert_offsets(&[
            ("sock", "__sk_common", Some(0)),
            // A member of a const type.
            ("sock", "sk_rcvbuf", Some(56)),
            ("sock", "sk_err", Some(60)),
            ("sock", "sk_err_soft", Some(64)),
            ("sock", "sk_protocol", Some(72)),
            ("inet_sock", "inet_sport", Some(84)),
            ("task_struct", "files", Some(16)),
            ("files_struct", "fdt", Some(8)),
            ("fdtable", "fd", Some(8)),
            ("file", "private_data", Some(8)),
            ("socket", "sk", Some(16)),
        ]);
    }

    #[test]
    fn members_of_anonymous_unions_and_structs() {
        assert_offsets(&[
            // A struct inside a union inside sock_common, as the kernel nests the address pair.
            ("sock_common", "skc_daddr", Some(0)),
            ("sock_common", "skc_rcv_saddr", Some(4)),
            ("sock_common", "skc_hash", Some(8)),
            ("sock_common", "skc_dport", Some(12)),
            ("sock_common", "skc_num", Some(14)),
            // The named members after the anonymous ones.
            ("sock_common", "skc_bound_dev_if", Some(20)),
            ("sock_common", "skc_v6_daddr", Some(24)),
            ("sock_common", "skc_v6_rcv_saddr", Some(40)),
            // Named members are not looked through: u6_addr8 is in skc_v6_daddr.in6_u.
            ("sock_common", "u6_addr8", None),
            ("in6_addr", "u6_addr8", None),
            ("sock", "skc_num", None),
        ]);
    }

    #[test]
    fn bitfields_have_no_byte_offset() {
        assert_offsets(&[
            ("sock", "sk_gso_disabled", None),
            ("sock", "sk_kern_sock", None),
            ("sock_common", "skc_reuse", None),
            // The members either side of bitfields have their bytes.
            ("sock_common", "skc_state", Some(18)),
            ("sock", "sk_type", Some(70)),
        ]);
    }

    #[test]
    fn what_is_not_there() {
        assert_offsets(&[
            ("sock", "no_such_member", None),
            ("no_such_struct", "sk", None),
            // A typedef names no members, and a member's name is not a struct's.
            ("__be32", "sk", None),
            ("in6_u", "u6_addr8", None),
        ]);
    }

    #[test]
    fn rejects_what_is_not_btf() {
        assert!(matches!(Btf::parse(&[0; 64]), Err(BtfError::Format(_))));
        assert!(matches!(Btf::parse(&[0x9f, 0xeb, 1]), Err(BtfError::Format(_))));
        assert!(matches!(
            Btf::parse(&FIXTURE[..FIXTURE.len() / 2]),
            Err(BtfError::Format(_))
        ));
    }

    /// BTF of one struct `s` with `vlen` anonymous members, each of type `s` itself.
    fn self_nesting_struct(vlen: u32) -> Vec<u8> {
        let mut types = Vec::new();
        // name "s" at string offset 1, kind STRUCT, vlen members, size 4.
        for word in [1, (kind::STRUCT << 24) | vlen, 4] {
            types.extend_from_slice(&u32::to_le_bytes(word));
        }
        for _ in 0..vlen {
            // name "" (offset 0), type id 1 (the struct), bit offset 0.
            for word in [0u32, 1, 0] {
                types.extend_from_slice(&word.to_le_bytes());
            }
        }
        let strings = b"\0s\0";
        let mut data = Vec::new();
        data.extend_from_slice(&MAGIC.to_le_bytes());
        data.extend_from_slice(&[1, 0]); // version, flags
        let header = [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ];
        for word in header {
            data.extend_from_slice(&word.to_le_bytes());
        }
        data.extend_from_slice(&types);
        data.extend_from_slice(strings);
        data
    }

    #[test]
    fn a_struct_nested_in_itself_is_looked_through_in_bounded_time() {
        let data = self_nesting_struct(64);
        let btf = Btf::parse(&data).unwrap();
        let started = std::time::Instant::now();
        assert_eq!(btf.member_offset("s", "missing"), None);
        // Unbounded, this is 64^9 member visits.
        assert!(
            started.elapsed() < std::time::Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn aya_parses_the_same_bytes_to_the_same_ids() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/btf/fixture.btf");
        let btf = KernelBtf::open(&path).unwrap();
        assert!(matches!(btf.bytes, Bytes::Mapped(_)), "a regular file maps");
        assert_eq!(btf.bytes(), FIXTURE);
        let aya = btf.for_aya().unwrap();
        // bpftool btf dump file src/btf/fixture.btf: [28] STRUCT 'sock'.
        assert_eq!(
            aya.id_by_type_name_kind("sock", aya_obj::btf::BtfKind::Struct)
                .unwrap(),
            28
        );
        assert_eq!(btf.types().unwrap().member_offset("sock", "sk_err"), Some(60));
    }

    #[test]
    fn open_reads_what_it_cannot_map() {
        // procfs has no mmap, nor has vmlinux on kernels from before mid-2025: the file is read.
        let btf = KernelBtf::open(Path::new("/proc/self/stat")).unwrap();
        assert!(matches!(&btf.bytes, Bytes::Read(data) if !data.is_empty()));
        assert!(matches!(btf.types(), Err(BtfError::Format(_))));
        assert!(matches!(
            KernelBtf::open(Path::new("/nonexistent/btf")),
            Err(BtfError::Read { .. })
        ));
    }

    #[test]
    fn drop_reasons_of_this_kernel() {
        if !Path::new(VMLINUX).exists() {
            eprintln!("skipped: this kernel has no {VMLINUX}");
            return;
        }
        let vmlinux = KernelBtf::from_sys_fs().unwrap();
        let btf = vmlinux.types().unwrap();
        let reasons = btf.enum_values("skb_drop_reason").unwrap();
        let value = |n: &str| reasons.iter().find(|(name, _)| *name == n).map(|(_, v)| *v);
        assert_eq!(value("SKB_NOT_DROPPED_YET"), Some(0));
        assert!(value("SKB_DROP_REASON_NETFILTER_DROP").is_some(), "{reasons:?}");
        assert!(btf.enum_values("no_such_enum").is_none());
    }

    #[test]
    fn members_of_this_kernel() {
        if !Path::new(VMLINUX).exists() {
            eprintln!("skipped: this kernel has no {VMLINUX}");
            return;
        }
        let vmlinux = KernelBtf::from_sys_fs().expect("this kernel's BTF");
        assert_eq!(
            vmlinux.bytes(),
            std::fs::read(VMLINUX).unwrap(),
            "mapped or read alike"
        );
        let btf = vmlinux.types().unwrap();
        assert_eq!(btf.member_offset("sock", "__sk_common"), Some(0));
        assert_eq!(btf.member_offset("sock_common", "skc_daddr"), Some(0));
        assert_eq!(btf.member_offset("sock_common", "skc_rcv_saddr"), Some(4));
        let dport = btf.member_offset("sock_common", "skc_dport").unwrap();
        let num = btf.member_offset("sock_common", "skc_num").unwrap();
        assert_eq!(num, dport + 2, "skc_portpair is dport then num");
        assert!(btf.member_offset("sock", "sk_err").unwrap() > 0);
        assert!(btf.member_offset("inet_sock", "inet_sport").unwrap() > 0);
        assert!(btf.member_offset("task_struct", "files").is_some());
        assert_eq!(btf.member_offset("sock", "sk_kern_sock"), None, "a bitfield");
        // What the BTF tracepoints attach by.
        let aya = vmlinux.for_aya().unwrap();
        assert!(
            aya.id_by_type_name_kind("btf_trace_inet_sock_set_state", aya_obj::btf::BtfKind::Typedef)
                .is_ok()
        );
    }
}
