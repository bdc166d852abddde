//! The resource an application published for out-of-process readers (OpenTelemetry process
//! context, OTEP 4719): a mapping named `OTEL_CTX` holding a header that points at a
//! protobuf payload.
//!
//! Any process on the host can write anything there, and the agent reads it as root: every
//! size is bounded, every read is checked, nothing here panics, and a process whose context
//! cannot be read falls back to what its environment says.

use std::{fs::File, io, os::unix::fs::FileExt, path::Path};

use opentelemetry_proto::tonic::{
    common::v1::{AnyValue, KeyValue, any_value},
    resource::v1::Resource,
};
use prost::Message as _;

/// The header's first bytes once the mapping is complete.
const SIGNATURE: &[u8; 8] = b"OTEL_CTX";
/// `signature[8] version:u32 payload_size:u32 published_at_ns:u64 payload:u64`, packed.
const HEADER_LEN: usize = 32;
/// The payload format this reader knows; 1 was the development version of the same format.
const VERSIONS: [u32; 2] = [1, 2];
/// A resource is a few hundred bytes; a payload larger than this is not one.
pub(crate) const MAX_PAYLOAD: u32 = 64 * 1024;
/// Attributes kept from one payload; the rest are ignored.
pub(crate) const MAX_ATTRIBUTES: usize = 64;
/// A key or a value longer than this is cut.
const MAX_TEXT: usize = 256;
/// Reads of a header that keeps changing under us before we give up until the next look.
const MAX_TRIES: usize = 3;

/// The published context as the agent uses it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ProcessContext {
    /// `published_at_ns` of the header this was read from: a new value means a new context.
    pub(crate) published_at_ns: u64,
    /// The resource's attributes, as text, in the order published.
    pub(crate) resource: Vec<(String, String)>,
    /// The context's own attributes (`threadlocal.*`), as text.
    pub(crate) attributes: Vec<(String, String)>,
    /// `threadlocal.attribute_key_map`: thread-context attribute names by key index (an
    /// entry that is not a string is kept as an empty name, so later indexes stay right).
    pub(crate) thread_attribute_keys: Vec<String>,
}

/// Key indexes are one byte.
const MAX_THREAD_ATTRIBUTE_KEYS: usize = 256;

/// The payload message (opentelemetry-proto's `ProcessContext`, status Development).
#[derive(Clone, PartialEq, prost::Message)]
struct Payload {
    #[prost(message, optional, tag = "1")]
    resource: Option<Resource>,
    #[prost(message, repeated, tag = "2")]
    attributes: Vec<KeyValue>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum ContextError {
    #[error("no OTEL_CTX mapping")]
    NotPublished,
    #[error("bad signature")]
    Signature,
    #[error("unknown version {0}")]
    Version(u32),
    #[error("payload of {0} bytes is over the {MAX_PAYLOAD}-byte bound")]
    PayloadSize(u32),
    #[error("still being written after {MAX_TRIES} reads")]
    Unsettled,
    #[error("unreadable memory")]
    Unreadable,
    #[error("payload is not a ProcessContext: {0}")]
    Decode(String),
}

/// The start address of the first mapping named like a process context in the text of
/// `/proc/<pid>/maps`: `[anon_shmem:OTEL_CTX]`, `[anon:OTEL_CTX]` (named with `prctl`) or
/// `/memfd:OTEL_CTX (deleted)` (where the kernel cannot name mappings).
pub(crate) fn find_mapping(maps: &[u8]) -> Option<u64> {
    maps.split(|&b| b == b'\n').find_map(|line| {
        let line = std::str::from_utf8(line).ok()?;
        let mut fields = line.split_ascii_whitespace();
        let range = fields.next()?;
        // perms offset dev inode, then the name, which may hold spaces.
        let name = fields.nth(4)?;
        let named = matches!(
            name,
            "[anon_shmem:OTEL_CTX]" | "[anon:OTEL_CTX]" | "/memfd:OTEL_CTX"
        );
        if !named {
            return None;
        }
        let start = range.split_once('-')?.0;
        u64::from_str_radix(start, 16).ok()
    })
}

/// A view of another process's memory.
pub(crate) trait Memory {
    /// Fills `buf` from address `addr`, or fails.
    fn read_exact_at(&self, buf: &mut [u8], addr: u64) -> io::Result<()>;
}

impl Memory for File {
    fn read_exact_at(&self, buf: &mut [u8], addr: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, addr)
    }
}

struct Header {
    version: u32,
    payload_size: u32,
    published_at_ns: u64,
    payload: u64,
}

fn read_header(memory: &impl Memory, addr: u64) -> Result<Header, ContextError> {
    let mut raw = [0u8; HEADER_LEN];
    memory
        .read_exact_at(&mut raw, addr)
        .map_err(|_| ContextError::Unreadable)?;
    let u32_at = |at: usize| u32::from_ne_bytes(raw[at..at + 4].try_into().unwrap_or_default());
    let u64_at = |at: usize| u64::from_ne_bytes(raw[at..at + 8].try_into().unwrap_or_default());
    if &raw[..8] != SIGNATURE {
        return Err(ContextError::Signature);
    }
    Ok(Header {
        version: u32_at(8),
        payload_size: u32_at(12),
        published_at_ns: u64_at(16),
        payload: u64_at(24),
    })
}

/// Reads the context at `addr` with the specification's protocol: a header whose
/// `published_at_ns` is 0 is being written, and one that changed while the payload was read
/// was rewritten meanwhile; both are read again, a bounded number of times.
pub(crate) fn read(memory: &impl Memory, addr: u64) -> Result<ProcessContext, ContextError> {
    for _ in 0..MAX_TRIES {
        let header = read_header(memory, addr)?;
        if !VERSIONS.contains(&header.version) {
            return Err(ContextError::Version(header.version));
        }
        if header.published_at_ns == 0 {
            continue;
        }
        if header.payload_size > MAX_PAYLOAD {
            return Err(ContextError::PayloadSize(header.payload_size));
        }
        let mut payload = vec![0u8; header.payload_size as usize];
        memory
            .read_exact_at(&mut payload, header.payload)
            .map_err(|_| ContextError::Unreadable)?;
        if read_header(memory, addr)?.published_at_ns != header.published_at_ns {
            continue;
        }
        return decode(&payload, header.published_at_ns);
    }
    Err(ContextError::Unsettled)
}

/// Decodes a payload: bounded in attributes and text, whatever it claims.
pub(crate) fn decode(payload: &[u8], published_at_ns: u64) -> Result<ProcessContext, ContextError> {
    let message = Payload::decode(payload).map_err(|e| ContextError::Decode(e.to_string()))?;
    let resource = message.resource.map(|r| r.attributes).unwrap_or_default();
    let thread_attribute_keys = message
        .attributes
        .iter()
        .find(|kv| kv.key == crate::enrich::thread_context::KEY_MAP)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::ArrayValue(array) => Some(
                array
                    .values
                    .iter()
                    .take(MAX_THREAD_ATTRIBUTE_KEYS)
                    .map(|v| match &v.value {
                        Some(any_value::Value::StringValue(s)) => cut(s.clone()),
                        _ => String::new(),
                    })
                    .collect(),
            ),
            _ => None,
        })
        .unwrap_or_default();
    Ok(ProcessContext {
        published_at_ns,
        resource: texts(resource),
        attributes: texts(message.attributes),
        thread_attribute_keys,
    })
}

fn texts(kvs: Vec<KeyValue>) -> Vec<(String, String)> {
    kvs.into_iter()
        .filter(|kv| !kv.key.is_empty())
        .filter_map(|kv| Some((cut(kv.key), text(kv.value?)?)))
        .take(MAX_ATTRIBUTES)
        .collect()
}

fn cut(mut s: String) -> String {
    if s.len() > MAX_TEXT {
        let mut end = MAX_TEXT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// A value as text: strings as they are, numbers and booleans printed, an array of strings
/// (the thread-context key map) joined by commas; other kinds are not resource values.
fn text(value: AnyValue) -> Option<String> {
    let text = match value.value? {
        any_value::Value::StringValue(s) => s,
        any_value::Value::BoolValue(b) => b.to_string(),
        any_value::Value::IntValue(i) => i.to_string(),
        any_value::Value::DoubleValue(d) => d.to_string(),
        any_value::Value::ArrayValue(array) => array
            .values
            .into_iter()
            .take(MAX_ATTRIBUTES)
            .filter_map(|v| match v.value? {
                any_value::Value::StringValue(s) => Some(cut(s)),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join(","),
        _ => return None,
    };
    Some(cut(text))
}

/// Where `pid` published its context, if it did: its maps name the mapping.
pub(crate) fn locate(proc_root: &Path, pid: u32) -> Result<u64, ContextError> {
    let maps =
        std::fs::read(proc_root.join(pid.to_string()).join("maps")).map_err(|_| ContextError::Unreadable)?;
    find_mapping(&maps).ok_or(ContextError::NotPublished)
}

fn memory(proc_root: &Path, pid: u32) -> Result<File, ContextError> {
    File::open(proc_root.join(pid.to_string()).join("mem")).map_err(|_| ContextError::Unreadable)
}

/// The context `pid` published at `addr`.
pub(crate) fn read_process(proc_root: &Path, pid: u32, addr: u64) -> Result<ProcessContext, ContextError> {
    read(&memory(proc_root, pid)?, addr)
}

/// Whether the context `pid` published at `addr` is still the one published at
/// `published_at_ns`: one read of its header, cheap enough to make at every recheck.
pub(crate) fn unchanged(proc_root: &Path, pid: u32, addr: u64, published_at_ns: u64) -> bool {
    memory(proc_root, pid)
        .and_then(|memory| read_header(&memory, addr))
        .is_ok_and(|header| header.published_at_ns == published_at_ns)
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    /// A process's memory: a header at 0x1000, the payload wherever it points.
    struct Fake {
        bytes: Vec<u8>,
        base: u64,
        /// Rewrites `published_at_ns` after this many reads, to look like an update.
        changes_after: Cell<Option<usize>>,
        reads: Cell<usize>,
    }

    impl Memory for Fake {
        fn read_exact_at(&self, buf: &mut [u8], addr: u64) -> io::Result<()> {
            let reads = self.reads.get() + 1;
            self.reads.set(reads);
            let at = addr
                .checked_sub(self.base)
                .and_then(|a| usize::try_from(a).ok())
                .ok_or(io::ErrorKind::InvalidInput)?;
            let end = at.checked_add(buf.len()).ok_or(io::ErrorKind::InvalidInput)?;
            let mut src = self
                .bytes
                .get(at..end)
                .ok_or(io::ErrorKind::UnexpectedEof)?
                .to_vec();
            if self.changes_after.get().is_some_and(|n| reads > n) && at == 0 && src.len() >= 24 {
                src[16..24].copy_from_slice(&(reads as u64).to_ne_bytes());
            }
            buf.copy_from_slice(&src);
            Ok(())
        }
    }

    fn kv(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(value.into())),
            }),
            ..Default::default()
        }
    }

    fn payload() -> Vec<u8> {
        Payload {
            resource: Some(Resource {
                attributes: vec![kv("service.name", "checkout"), kv("service.instance.id", "i-1")],
                ..Default::default()
            }),
            attributes: vec![kv("threadlocal.schema_version", "tlsdesc_v1_dev")],
        }
        .encode_to_vec()
    }

    fn memory(version: u32, payload: &[u8], size: u32, published_at_ns: u64) -> Fake {
        const BASE: u64 = 0x1000;
        let mut bytes = Vec::new();
        bytes.extend_from_slice(SIGNATURE);
        bytes.extend_from_slice(&version.to_ne_bytes());
        bytes.extend_from_slice(&size.to_ne_bytes());
        bytes.extend_from_slice(&published_at_ns.to_ne_bytes());
        bytes.extend_from_slice(&(BASE + HEADER_LEN as u64).to_ne_bytes());
        bytes.extend_from_slice(payload);
        Fake {
            bytes,
            base: BASE,
            changes_after: Cell::new(None),
            reads: Cell::new(0),
        }
    }

    #[test]
    fn reads_a_published_context() {
        let p = payload();
        let m = memory(2, &p, p.len() as u32, 42);
        let ctx = read(&m, 0x1000).unwrap();
        assert_eq!(ctx.published_at_ns, 42);
        assert_eq!(
            ctx.resource,
            [
                ("service.name".to_string(), "checkout".to_string()),
                ("service.instance.id".to_string(), "i-1".to_string())
            ]
        );
        assert_eq!(ctx.attributes[0].1, "tlsdesc_v1_dev");
    }

    #[test]
    fn refuses_what_is_not_a_context() {
        let p = payload();
        let mut m = memory(2, &p, p.len() as u32, 42);
        m.bytes[0] = b'X';
        assert_eq!(read(&m, 0x1000), Err(ContextError::Signature));
        let m = memory(7, &p, p.len() as u32, 42);
        assert_eq!(read(&m, 0x1000), Err(ContextError::Version(7)));
        let m = memory(2, &p, u32::MAX, 42);
        assert_eq!(read(&m, 0x1000), Err(ContextError::PayloadSize(u32::MAX)));
        // A size within the bound that runs past the mapping.
        let m = memory(2, &p, MAX_PAYLOAD, 42);
        assert_eq!(read(&m, 0x1000), Err(ContextError::Unreadable));
        let m = memory(2, &p[..p.len() - 3], p.len() as u32 - 3, 42);
        assert!(matches!(read(&m, 0x1000), Err(ContextError::Decode(_))));
        assert_eq!(read(&m, 0x9000), Err(ContextError::Unreadable));
    }

    #[test]
    fn a_context_being_written_is_read_again_then_given_up() {
        let p = payload();
        let m = memory(2, &p, p.len() as u32, 0);
        assert_eq!(read(&m, 0x1000), Err(ContextError::Unsettled));
        assert_eq!(m.reads.get(), MAX_TRIES);
        // Rewritten between the first header read and the second: read once more.
        let m = memory(2, &p, p.len() as u32, 42);
        m.changes_after.set(Some(2));
        assert_eq!(read(&m, 0x1000), Err(ContextError::Unsettled));
        let m = memory(2, &p, p.len() as u32, 42);
        m.changes_after.set(Some(usize::MAX));
        assert!(read(&m, 0x1000).is_ok());
    }

    #[test]
    fn bounds_what_a_payload_claims() {
        let long = "x".repeat(10_000);
        let payload = Payload {
            resource: Some(Resource {
                attributes: (0..1000).map(|i| kv(&format!("k{i}"), &long)).collect(),
                ..Default::default()
            }),
            attributes: vec![],
        }
        .encode_to_vec();
        let ctx = decode(&payload, 1).unwrap();
        assert_eq!(ctx.resource.len(), MAX_ATTRIBUTES);
        assert!(ctx.resource.iter().all(|(_, v)| v.len() == MAX_TEXT));
        assert!(decode(&[0xff; 40], 1).is_err());
        assert_eq!(
            decode(&[], 1).unwrap(),
            ProcessContext {
                published_at_ns: 1,
                ..Default::default()
            }
        );
    }

    #[test]
    fn finds_the_mapping_by_any_of_its_names() {
        let maps = b"55d0c0a00000-55d0c0a01000 r--p 00000000 fe:01 1234 /usr/bin/app\n\
7f0000001000-7f0000002000 rw-s 00000000 00:01 99 /memfd:OTEL_CTX (deleted)\n";
        assert_eq!(find_mapping(maps), Some(0x7f00_0000_1000));
        assert_eq!(
            find_mapping(b"7f10-7f20 rw-s 00000000 00:01 99 [anon_shmem:OTEL_CTX]\n"),
            Some(0x7f10)
        );
        assert_eq!(
            find_mapping(b"7f10-7f20 rw-p 00000000 00:00 0 [anon:OTEL_CTX]"),
            Some(0x7f10)
        );
        assert_eq!(
            find_mapping(b"7f10-7f20 rw-s 00000000 00:01 99 /memfd:OTHER (deleted)\n"),
            None
        );
        assert_eq!(
            find_mapping(b"garbage\n\xff\xfe\nzz-yy a b c d /memfd:OTEL_CTX\n"),
            None
        );
    }
}
