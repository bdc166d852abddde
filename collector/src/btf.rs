//! The kernel's BTF, read for one thing: where a struct keeps a member.
//!
//! A general BTF library builds every type of vmlinux into maps at start-up, tens of MiB for
//! a dozen lookups. This keeps the file's bytes and where each type starts, and walks them.
//! The format is `include/uapi/linux/btf.h`.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not BTF, or a layout this reader does not know: {0}")]
    Format(&'static str),
}

const MAGIC: u16 = 0xeb9f;

mod kind {
    pub const INT: u32 = 1;
    pub const ARRAY: u32 = 3;
    pub const STRUCT: u32 = 4;
    pub const UNION: u32 = 5;
    pub const ENUM: u32 = 6;
    pub const TYPEDEF: u32 = 8;
    pub const VOLATILE: u32 = 9;
    pub const CONST: u32 = 10;
    pub const RESTRICT: u32 = 11;
    pub const FUNC_PROTO: u32 = 13;
    pub const VAR: u32 = 14;
    pub const DATASEC: u32 = 15;
    pub const DECL_TAG: u32 = 17;
    pub const TYPE_TAG: u32 = 18;
    pub const ENUM64: u32 = 19;
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

pub struct Btf {
    data: Vec<u8>,
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

impl Btf {
    pub fn from_file(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(data)
    }

    pub fn parse(data: Vec<u8>) -> Result<Self, BtfError> {
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

    fn string(&self, offset: u32) -> &[u8] {
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
    pub fn member_offset(&self, name: &str, member: &str) -> Option<u32> {
        (1..=self.types.len() as u32).find_map(|id| {
            let t = self.header(id)?;
            (t.kind == kind::STRUCT && self.string(t.name) == name.as_bytes())
                .then(|| self.find_member(&t, member.as_bytes(), 0, 0))
                .flatten()
        })
    }

    fn find_member(&self, st: &TypeHeader, member: &[u8], base_bits: u32, depth: u32) -> Option<u32> {
        // Anonymous members nest a few levels deep; more is a loop in a broken file.
        if depth > 8 {
            return None;
        }
        for i in 0..st.vlen {
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
                    && let Some(found) = self.find_member(&nested, member, bits, depth + 1)
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

    fn vmlinux() -> Btf {
        Btf::from_file(Path::new("/sys/kernel/btf/vmlinux")).expect("this kernel's BTF")
    }

    #[test]
    fn members_of_this_kernel() {
        let btf = vmlinux();
        // struct sock starts with its sock_common, whose first member is the address pair.
        assert_eq!(btf.member_offset("sock", "__sk_common"), Some(0));
        assert_eq!(btf.member_offset("sock_common", "skc_daddr"), Some(0));
        assert_eq!(btf.member_offset("sock_common", "skc_rcv_saddr"), Some(4));
        // Through the anonymous unions of sock_common.
        let dport = btf.member_offset("sock_common", "skc_dport").unwrap();
        let num = btf.member_offset("sock_common", "skc_num").unwrap();
        assert_eq!(num, dport + 2, "skc_portpair is dport then num");
        assert!(btf.member_offset("sock", "sk_err").unwrap() > 0);
        assert!(btf.member_offset("inet_sock", "inet_sport").unwrap() > 0);
        assert!(btf.member_offset("task_struct", "files").is_some());
        assert_eq!(btf.member_offset("sock", "no_such_member"), None);
        assert_eq!(btf.member_offset("no_such_struct", "x"), None);
    }

    #[test]
    fn bitfields_have_no_byte_offset() {
        let btf = vmlinux();
        assert_eq!(btf.member_offset("sock", "sk_kern_sock"), None);
    }

    #[test]
    fn rejects_what_is_not_btf() {
        assert!(matches!(Btf::parse(vec![0; 64]), Err(BtfError::Format(_))));
        assert!(matches!(
            Btf::parse(vec![0x9f, 0xeb, 1]),
            Err(BtfError::Format(_))
        ));
    }
}
