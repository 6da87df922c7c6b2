//! Builds the kernel programs (`netdrop-ebpf`, nightly + bpf-linker) and leaves the object in
//! OUT_DIR for `include_bytes_aligned!`. `cargo xtask setup` installs what this needs.
//!
//! With `AYA_BUILD_SKIP=1` (unit tests on a machine without the eBPF toolchain) an empty object is
//! written instead; loading it then fails with a clear error, and nothing that needs it runs.
use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        fs::write(out.join("netdrop"), [])?;
        return Ok(());
    }
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../netdrop-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "netdrop-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}
