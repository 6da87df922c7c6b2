//! `cargo xtask image`: the release binary in an image built from scratch (no base image, nothing
//! pulled), committed as `localhost/netdrop:<version>` (deploy/base's image) and saved as an OCI
//! archive under target/image/ (`podman load -i`, `skopeo copy oci-archive:...` to publish).

use crate::setup;

pub fn run() -> anyhow::Result<()> {
    let binary = setup::release_netdrop()?;
    let root = setup::workspace_root();
    let version = env!("CARGO_PKG_VERSION");
    let tag = format!("localhost/netdrop:{version}");
    let image = netdrop_tools::image::build(&binary, &tag, version)?;
    let dir = root.join("target/image");
    std::fs::create_dir_all(&dir)?;
    let archive = dir.join(format!("netdrop-{version}.oci.tar"));
    netdrop_tools::image::save_oci_archive(&tag, &archive)?;
    let size = std::fs::metadata(&archive).map_or(0, |m| m.len());
    println!("image {tag}: {} files", image.files.len());
    for f in &image.files {
        println!("  {}", f.display());
    }
    #[expect(clippy::cast_precision_loss, reason = "a size in MiB for people")]
    let mib = size as f64 / 1_048_576.0;
    println!("saved {} ({mib:.1} MiB)", archive.display());
    Ok(())
}
