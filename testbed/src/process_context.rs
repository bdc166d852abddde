//! A publisher of the OpenTelemetry process context (OTEP 4719), written from the
//! specification, for the tests: an application that tells out-of-process readers its
//! resource. Also publishes the malformed contexts a hostile or buggy process could leave.

use std::{
    io,
    sync::atomic::{Ordering, fence},
};

use opentelemetry_proto::tonic::{
    common::v1::{AnyValue, ArrayValue, KeyValue, any_value},
    resource::v1::Resource,
};
use prost::Message as _;

/// The thread-context attribute names the test bed's applications use, by key index
/// (`threadlocal.attribute_key_map`).
pub const THREAD_ATTRIBUTE_KEYS: [&str; 2] = ["http.route", "http.request.method"];

const SIGNATURE: &[u8; 8] = b"OTEL_CTX";
const HEADER_LEN: usize = 32;
const VERSION: u32 = 2;
/// The mapping: the header, then the payload right after it.
const MAPPING_LEN: usize = 64 * 1024;

/// The payload message, `ProcessContext { Resource resource = 1; repeated KeyValue attributes = 2; }`.
#[derive(Clone, PartialEq, prost::Message)]
struct Payload {
    #[prost(message, optional, tag = "1")]
    resource: Option<Resource>,
    #[prost(message, repeated, tag = "2")]
    attributes: Vec<KeyValue>,
}

/// How a published context can be wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformed {
    /// The mapping is there, its first bytes are not `OTEL_CTX`.
    Signature,
    /// `payload_size` far past any sane bound.
    HugePayload,
    /// The payload stops in the middle of a message.
    Truncated,
    /// `published_at_ns` stays 0: an update that never ends.
    NeverSettled,
}

impl std::str::FromStr for Malformed {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "signature" => Self::Signature,
            "huge-payload" => Self::HugePayload,
            "truncated" => Self::Truncated,
            "never-settled" => Self::NeverSettled,
            other => return Err(format!("unknown malformed context {other}")),
        })
    }
}

/// The context this process publishes, for as long as this lives.
pub struct Published {
    base: *mut u8,
}

// SAFETY: the mapping belongs to this value alone; it is written only through `&mut self`.
unsafe impl Send for Published {}

fn string(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

fn encode(resource: &[(String, String)]) -> Vec<u8> {
    Payload {
        resource: Some(Resource {
            attributes: resource.iter().map(|(k, v)| string(k, v)).collect(),
            ..Default::default()
        }),
        attributes: vec![
            string("threadlocal.schema_version", "tlsdesc_v1_dev"),
            KeyValue {
                key: "threadlocal.attribute_key_map".into(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::ArrayValue(ArrayValue {
                        values: THREAD_ATTRIBUTE_KEYS
                            .iter()
                            .map(|k| AnyValue {
                                value: Some(any_value::Value::StringValue((*k).into())),
                            })
                            .collect(),
                    })),
                }),
                ..Default::default()
            },
        ],
    }
    .encode_to_vec()
}

fn boottime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: plain syscall writing into a local.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

impl Published {
    /// Publishes `resource` as the specification's publication protocol says: a memfd named
    /// `OTEL_CTX`, mapped, not inherited by children, the header written with the signature
    /// last, and the mapping named where the kernel can.
    pub fn publish(resource: &[(String, String)]) -> io::Result<Self> {
        Self::publish_with(resource, None)
    }

    pub fn publish_malformed(resource: &[(String, String)], how: Malformed) -> io::Result<Self> {
        Self::publish_with(resource, Some(how))
    }

    fn publish_with(resource: &[(String, String)], how: Option<Malformed>) -> io::Result<Self> {
        // SAFETY: plain syscalls; the name is a NUL-terminated literal, the fd is closed once
        // mapped, and the mapping is checked before use.
        let base = unsafe {
            let fd = libc::memfd_create(c"OTEL_CTX".as_ptr(), libc::MFD_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::ftruncate(fd, MAPPING_LEN as libc::off_t) != 0 {
                let err = io::Error::last_os_error();
                libc::close(fd);
                return Err(err);
            }
            let base = libc::mmap(
                std::ptr::null_mut(),
                MAPPING_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            libc::close(fd);
            if base == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            libc::madvise(base, MAPPING_LEN, libc::MADV_DONTFORK);
            base.cast::<u8>()
        };
        let mut published = Self { base };
        let mut payload = encode(resource);
        if how == Some(Malformed::Truncated) {
            payload.truncate(payload.len() / 2);
        }
        let size = match how {
            Some(Malformed::HugePayload) => u32::MAX - 7,
            _ => payload.len() as u32,
        };
        let at = match how {
            Some(Malformed::NeverSettled) => 0,
            _ => boottime_ns(),
        };
        published.write_payload(&payload, size, at);
        fence(Ordering::SeqCst);
        let signature = if how == Some(Malformed::Signature) {
            b"OTEL_CTY"
        } else {
            SIGNATURE
        };
        published.write(0, signature);
        published.name();
        Ok(published)
    }

    /// Replaces the resource with the updating protocol: `published_at_ns` is 0 while the
    /// payload changes, then a new timestamp.
    pub fn update(&mut self, resource: &[(String, String)]) {
        self.write(16, &0u64.to_ne_bytes());
        fence(Ordering::SeqCst);
        let payload = encode(resource);
        // A new timestamp even within one clock tick, so that readers see a change.
        let at = boottime_ns().max(self.published_at() + 1);
        self.write_payload(&payload, payload.len() as u32, 0);
        fence(Ordering::SeqCst);
        self.write(16, &at.to_ne_bytes());
        self.name();
    }

    fn published_at(&self) -> u64 {
        let mut raw = [0u8; 8];
        // SAFETY: within the mapping, which lives as long as self.
        unsafe { std::ptr::copy_nonoverlapping(self.base.add(16), raw.as_mut_ptr(), 8) };
        u64::from_ne_bytes(raw)
    }

    /// The header's version, size and pointer, the payload after the header, then the
    /// timestamp (0 leaves it as it is).
    fn write_payload(&mut self, payload: &[u8], size: u32, at: u64) {
        assert!(
            HEADER_LEN + payload.len() <= MAPPING_LEN,
            "payload too large for the test mapping"
        );
        self.write(8, &VERSION.to_ne_bytes());
        self.write(HEADER_LEN, payload);
        self.write(12, &size.to_ne_bytes());
        let payload_addr = self.base as u64 + HEADER_LEN as u64;
        self.write(24, &payload_addr.to_ne_bytes());
        if at != 0 {
            fence(Ordering::SeqCst);
            self.write(16, &at.to_ne_bytes());
        }
    }

    fn write(&mut self, at: usize, bytes: &[u8]) {
        assert!(at + bytes.len() <= MAPPING_LEN);
        // SAFETY: within the mapping (checked), which lives as long as self.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(at), bytes.len()) };
    }

    /// Names the mapping; kernels without CONFIG_ANON_VMA_NAME refuse, which readers expect.
    fn name(&self) {
        // SAFETY: plain syscall on our own mapping with a NUL-terminated literal.
        unsafe {
            libc::prctl(
                libc::PR_SET_VMA,
                libc::PR_SET_VMA_ANON_NAME,
                self.base as libc::c_ulong,
                MAPPING_LEN as libc::c_ulong,
                c"OTEL_CTX".as_ptr() as libc::c_ulong,
            )
        };
    }
}

impl Drop for Published {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `publish`, unmapped once.
        unsafe { libc::munmap(self.base.cast(), MAPPING_LEN) };
    }
}

/// `KEY=VALUE,KEY=VALUE` as pairs.
pub fn parse_pairs(text: &str) -> Result<Vec<(String, String)>, String> {
    text.split(',')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| format!("expected KEY=VALUE, got {kv}"))
        })
        .collect()
}
