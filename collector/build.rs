use anyhow::{Context as _, anyhow};

/// The nightly that compiles the kernel programs. Its LLVM must match bpf-linker's; both are
/// pinned in scripts/setup.sh.
const EBPF_TOOLCHAIN: &str = "nightly-2026-06-20";

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("collector has no parent directory"))?
        .join("collector-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", root.display()))?;
    // The shared crate is part of the kernel programs too.
    println!("cargo:rerun-if-changed={manifest_dir}/../shared/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "synspan-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(EBPF_TOOLCHAIN),
    )
}
