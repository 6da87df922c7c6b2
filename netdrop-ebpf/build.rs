//! Rebuild the programs when bpf-linker changes. A missing bpf-linker is not an error here:
//! `cargo xtask setup` installs it, and AYA_BUILD_SKIP builds never link this crate.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
