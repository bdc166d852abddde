//! Entry points for the fuzz targets in `fuzz/`: one per parser of bytes that another process
//! or the kernel hands synspan. Each takes any bytes and must neither panic nor hang; what it
//! returns is thrown away, so each runs the parser as far as the agent would.

use std::{hint::black_box, io};

use crate::{
    attempt::{Attempt, read_record},
    btf::Btf,
    clock::WallClock,
    enrich::{container, process, process_context, symbols, thread_context, unwind},
    evidence::listener,
    kernel_layout,
    otlp::{self, settings},
};

/// A ring-buffer record: copied out, then decoded into an [`Attempt`], with the wall-clock
/// offset taken from the bytes after the record so that time conversions are fuzzed too. The
/// offset is the clock's realtime - monotonic, which fits an `i64` of nanoseconds.
pub fn ring_buffer_record(data: &[u8]) {
    let Ok(record) = read_record(data) else {
        return;
    };
    let rest = data
        .get(size_of::<synspan_shared::AttemptRecord>()..)
        .unwrap_or_default();
    let offset = rest
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, |b| i128::from(i64::from_le_bytes(b)));
    if let Ok(attempt) = Attempt::decode(&record, &WallClock::from_offset(offset)) {
        black_box(attempt.duration());
    }
}

/// A process note: decoded, its executable name and build-id frames taken as the agent takes
/// them, and the frames placed against the addresses in the bytes after the note.
pub fn process_note(data: &[u8]) {
    let Some(note) = crate::enrich::read_note(data) else {
        return;
    };
    let vanished = crate::enrich::Vanished::from_note(&note);
    black_box(&vanished.exe_name);
    let walked: Vec<u64> = data[size_of::<synspan_shared::ProcessNote>()..]
        .chunks_exact(8)
        .take(synspan_shared::MAX_BUILD_ID_FRAMES)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
        .collect();
    let image = symbols::StackNormalizer::new().image_from_build_ids(&walked, &vanished.frames);
    black_box(image.normalize(&walked));
}

/// The kernel's BTF: indexed, then every member lookup the kernel layout makes.
pub fn btf(data: &[u8]) {
    let Ok(btf) = Btf::parse(data) else {
        return;
    };
    black_box(kernel_layout::sock_fields(&btf));
    black_box(kernel_layout::tuple_fields(&btf));
    black_box(kernel_layout::fd_path_fields(&btf));
}

/// `/proc/<pid>/stat`.
pub fn proc_stat(data: &[u8]) {
    black_box(process::parse_stat(data));
}

/// A `sock_diag` datagram answering a dump of listeners, for the port in its first two bytes;
/// and the same bytes as `/proc/net/netstat`.
pub fn sock_diag_answer(data: &[u8]) {
    let port = data.get(..2).map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
    let mut listeners = Vec::new();
    black_box(listener::answer(data.get(2..).unwrap_or_default(), port, &mut listeners).is_ok());
    black_box(listener::netstat_counter(
        &String::from_utf8_lossy(data),
        "TcpExt:",
        "ListenOverflows",
    ));
}

/// `/proc/<pid>/environ`, whole and as if cut at the read bound.
pub fn proc_environ(data: &[u8]) {
    black_box(process::service_from_environ(data, false));
    black_box(process::service_from_environ(data, true));
}

/// `/proc/<pid>/cgroup`, then the container id and pod uid in its paths, as the agent reads
/// them.
pub fn proc_cgroup(data: &[u8]) {
    let paths = process::cgroup_paths(&String::from_utf8_lossy(data));
    black_box(container::container_id(&paths));
    black_box(container::k8s_pod_uid(&paths));
}

/// Cgroup paths, one a line, straight to the container-id and pod-uid extraction.
pub fn container_ids(data: &[u8]) {
    let paths: Vec<String> = String::from_utf8_lossy(data).lines().map(str::to_owned).collect();
    black_box(container::container_id(&paths));
    black_box(container::k8s_pod_uid(&paths));
}

/// `/proc/<pid>/maps`: the mappings a user stack is normalized against, each looked up at its
/// ends, and the process-context mapping.
pub fn proc_maps(data: &[u8]) {
    let mappings = symbols::parse_maps(data);
    for mapping in &mappings {
        for addr in [mapping.start, mapping.end, mapping.end.wrapping_sub(1)] {
            black_box(symbols::mapping_of(&mappings, addr));
        }
    }
    black_box(process_context::find_mapping(data));
}

/// The value of `OTEL_RESOURCE_ATTRIBUTES` in a traced process's environment.
pub fn resource_attributes(data: &[u8]) {
    black_box(process::parse_resource_attributes(&String::from_utf8_lossy(data)));
}

/// The value of `OTEL_EXPORTER_OTLP_HEADERS`, resolved with the rest of the export settings.
pub fn otlp_headers(data: &[u8]) {
    let headers = String::from_utf8_lossy(data);
    let env = |var: &str| match var {
        "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://127.0.0.1:4317".to_owned()),
        "OTEL_EXPORTER_OTLP_HEADERS" => Some(headers.clone().into_owned()),
        _ => None,
    };
    let _ = black_box(settings::resolve(&settings::Flags::default(), &env));
}

/// An OTLP/HTTP collector's refusal: the first two bytes pick the status code, the bytes up
/// to the first newline are its `Retry-After`, the rest its body.
pub fn otlp_http_answer(data: &[u8]) {
    let (code, rest) = match data {
        [a, b, rest @ ..] => (u16::from_le_bytes([*a, *b]), rest),
        _ => (503, data),
    };
    let status =
        http::StatusCode::from_u16(100 + code % 500).unwrap_or(http::StatusCode::SERVICE_UNAVAILABLE);
    let (retry_after, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let mut headers = http::HeaderMap::new();
    if let Ok(value) = http::HeaderValue::from_bytes(retry_after) {
        headers.insert(http::header::RETRY_AFTER, value);
    }
    let err = otlp::http::failure(status, &headers, body, std::time::SystemTime::now());
    black_box(otlp::retry::classify(&err));
    black_box(err.to_string());
}

/// A process's memory holding its process context: the header at address 0 and whatever it
/// points at, read with the protocol's retries.
pub fn process_context_memory(data: &[u8]) {
    let _ = black_box(process_context::read(&Memory(data), 0));
}

/// The protobuf payload of a process context.
pub fn process_context_payload(data: &[u8]) {
    let _ = black_box(process_context::decode(data, 1));
}

/// The attribute bytes of a thread-context record, as the kernel copied them.
pub fn thread_context_attributes(data: &[u8]) {
    black_box(thread_context::attributes(data));
}

/// An ELF file mapped by a traced process: its interpreter, the thread-context variable, its
/// TLS segment and relocations looked up; then where it is, in the executable, and in a library whose GOT
/// and descriptors are the same bytes read as the process's memory.
pub fn elf_tls(data: &[u8]) {
    let loader = thread_context::interpreter(data).map_or(thread_context::Loader::Glibc, |path| {
        thread_context::Loader::named(black_box(path))
    });
    let Ok(Some(symbol)) = thread_context::tls_symbol(data) else {
        return;
    };
    let _ = black_box(thread_context::executable_location(&symbol));
    let _ = black_box(thread_context::library_location(
        &symbol,
        0,
        loader,
        &Memory(data),
    ));
}

/// Another process's memory as bytes from address 0; reads outside it fail, as they do in a
/// real process's unmapped pages.
struct Memory<'a>(&'a [u8]);

impl process_context::Memory for Memory<'_> {
    fn read_exact_at(&self, buf: &mut [u8], addr: u64) -> io::Result<()> {
        let src = usize::try_from(addr)
            .ok()
            .and_then(|at| self.0.get(at..at.checked_add(buf.len())?))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// The registers and stack bytes of a record with a file's `.eh_frame`: unwound by framehop,
/// then joined to a frame-pointer walk (see `enrich::unwind::fuzz` for the layout).
pub fn user_stack_unwind(data: &[u8]) {
    black_box(unwind::fuzz(data));
}
