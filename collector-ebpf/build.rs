use which::which;

/// aya-build compiles this crate with bpf-linker. Cargo does not know that, so a new
/// bpf-linker would not trigger a rebuild without this line.
fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => println!("cargo:warning=bpf-linker not found ({err}): run scripts/setup.sh"),
    }
}
