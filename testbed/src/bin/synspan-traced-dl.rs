//! The traced application (see `synspan_testbed::traced`) with `otel_thread_ctx_v1` in a
//! shared library it loads with `dlopen` after start: `--lib tlsdesc` (built with
//! `-mtls-dialect=gnu2`) or `--lib gd` (`-mtls-dialect=gnu`, `__tls_get_addr`); with
//! `--load-later`, only when told (see `synspan_testbed::traced`). The remaining arguments
//! are the application's.

use std::ffi::{CStr, CString, c_void};

use anyhow::{Context as _, bail};
use synspan_testbed::traced::Publish;

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let at = args
        .iter()
        .position(|a| a == "--lib")
        .context("--lib tlsdesc|gd is required")?;
    let which = args.get(at + 1).context("--lib tlsdesc|gd")?.clone();
    args.drain(at..at + 2);
    let path = match which.as_str() {
        "tlsdesc" => env!("SYNSPAN_TESTBED_TLSDESC_LIB"),
        "gd" => env!("SYNSPAN_TESTBED_GD_LIB"),
        other => bail!("--lib {other}: expected tlsdesc or gd"),
    };
    let path = CString::new(path)?;
    synspan_testbed::traced::run(args.into_iter(), move || load(&path))
}

/// Loads the library and finds its publisher.
fn load(path: &CStr) -> anyhow::Result<Publish> {
    // SAFETY: a library of this crate's own build; RTLD_NOW resolves its TLS entries before
    // any thread uses them, and it is never closed.
    let lib = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if lib.is_null() {
        bail!("dlopen {path:?} failed");
    }
    // SAFETY: a NUL-terminated literal, looked up in the library just loaded.
    let publish = unsafe { libc::dlsym(lib, c"synspan_testbed_publish".as_ptr()) };
    if publish.is_null() {
        bail!("{path:?} has no synspan_testbed_publish");
    }
    // SAFETY: the symbol is `void synspan_testbed_publish(void *)` in thread_context.c.
    Ok(unsafe { std::mem::transmute::<*mut c_void, Publish>(publish) })
}
