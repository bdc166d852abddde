//! Builds the C thread-context publisher: an object linked into `synspan-traced` and
//! `synspan-storm` (static TLS in the executable) and two shared libraries for `synspan-traced-dl` to `dlopen`, one per
//! TLS dialect. Their paths reach the binaries as compile-time environment variables.

use std::{path::PathBuf, process::Command};

const SOURCE: &str = "src/thread_context.c";

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let objects = cc::Build::new()
        .file(SOURCE)
        .pic(true)
        .opt_level(2)
        .compile_intermediates();
    // The traced application, and the storm, whose threads can publish too (the benchmark).
    for bin in ["synspan-traced", "synspan-storm"] {
        for object in &objects {
            println!("cargo:rustc-link-arg-bin={bin}={}", object.display());
        }
        // The specification: the variable in .dynsym, even in an executable.
        println!("cargo:rustc-link-arg-bin={bin}=-Wl,--export-dynamic-symbol=otel_thread_ctx_v1");
    }
    let compiler = cc::Build::new().get_compiler();
    for (name, dialect, var) in [
        ("libsynspan_tlsdesc.so", "gnu2", "SYNSPAN_TESTBED_TLSDESC_LIB"),
        ("libsynspan_tls_gd.so", "gnu", "SYNSPAN_TESTBED_GD_LIB"),
    ] {
        let lib = out.join(name);
        let status = Command::new(compiler.path())
            .args(["-shared", "-fPIC", "-O2", &format!("-mtls-dialect={dialect}")])
            // Relocations resolved at dlopen, so the descriptor is final before any access.
            .arg("-Wl,-z,now")
            .arg("-o")
            .arg(&lib)
            .arg(SOURCE)
            .status()
            .expect("running the C compiler");
        assert!(status.success(), "building {name} failed");
        println!("cargo:rustc-env={var}={}", lib.display());
    }
}
