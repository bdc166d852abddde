//! The traced application (see `synspan_testbed::traced`) with `otel_thread_ctx_v1` in the
//! executable itself: static TLS, at a fixed offset from the thread pointer.

use std::ffi::c_void;

unsafe extern "C" {
    /// From `thread_context.c`, linked into this binary by build.rs.
    fn synspan_testbed_publish(record: *const c_void);
}

fn main() -> anyhow::Result<()> {
    synspan_testbed::traced::run(std::env::args().skip(1), || Ok(synspan_testbed_publish))
}
