//! The container image: `buildah from scratch`, the netdrop binary at `/usr/bin/netdrop` and the
//! shared libraries it links (as `ldd` lists them), nothing else — no shell, no package
//! manager, nothing pulled. `cargo xtask image` builds it from the release binary and saves an
//! OCI archive; the image test builds one from the binary under test.

use std::{
    fmt,
    path::{Path, PathBuf},
    process::Command,
};

use crate::tool;

/// Why the image could not be built.
#[derive(Debug)]
pub struct ImageError(String);

impl fmt::Display for ImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ImageError {}

fn run(mut cmd: Command, what: &str) -> Result<String, ImageError> {
    let out = cmd.output().map_err(|e| ImageError(format!("{what}: {e}")))?;
    if !out.status.success() {
        return Err(ImageError(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The absolute paths of the shared libraries `binary` links, its loader included.
pub fn linked_libraries(binary: &Path) -> Result<Vec<PathBuf>, ImageError> {
    let mut ldd = tool("ldd");
    ldd.arg(binary);
    let text = run(ldd, "ldd")?;
    if text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)`, `/lib64/ld-linux-x86-64.so.2 (0x...)`,
        // `linux-vdso.so.1 (0x...)` (in the kernel, not a file).
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        } else if line.contains("not found") {
            return Err(ImageError(format!("ldd {}: {}", binary.display(), line.trim())));
        }
    }
    Ok(libs)
}

/// What went into an image.
#[derive(Debug, Clone)]
pub struct Image {
    pub tag: String,
    pub files: Vec<PathBuf>,
}

/// Builds `tag` from scratch with `binary` as `/usr/bin/netdrop` (the entrypoint) and its
/// libraries, and commits it to the local container storage (podman sees it).
pub fn build(binary: &Path, tag: &str, version: &str) -> Result<Image, ImageError> {
    let mut from = tool("buildah");
    from.args(["from", "--quiet", "scratch"]);
    let ctr = run(from, "buildah from scratch")?;
    let result = assemble(&ctr, binary, tag, version);
    let mut rm = tool("buildah");
    rm.args(["rm", &ctr]);
    let _ = run(rm, "buildah rm");
    result
}

fn assemble(ctr: &str, binary: &Path, tag: &str, version: &str) -> Result<Image, ImageError> {
    let mut files = vec![PathBuf::from("/usr/bin/netdrop")];
    let copy = |src: &Path, dst: &Path| -> Result<(), ImageError> {
        let mut c = tool("buildah");
        c.args(["copy", "--quiet", "--chmod", "0755", ctr]).arg(src).arg(dst);
        run(c, &format!("buildah copy {}", src.display())).map(|_| ())
    };
    copy(binary, Path::new("/usr/bin/netdrop"))?;
    for lib in linked_libraries(binary)? {
        // Copied to the path the binary asks for (the loader's path is fixed in the ELF
        // header); buildah copy follows the symlink to the file itself.
        copy(&lib, &lib)?;
        files.push(lib);
    }
    let mut config = tool("buildah");
    config
        .args(["config", "--entrypoint", r#"["/usr/bin/netdrop"]"#, "--user", "0:0"])
        .args(["--label", &format!("org.opencontainers.image.version={version}")])
        .args(["--label", "org.opencontainers.image.title=netdrop"])
        .args([
            "--label",
            "org.opencontainers.image.description=eBPF packet-drop tracer for Kubernetes nodes",
        ])
        .arg(ctr);
    run(config, "buildah config")?;
    let mut commit = tool("buildah");
    commit.args(["commit", "--quiet", ctr, tag]);
    run(commit, "buildah commit")?;
    Ok(Image {
        tag: tag.to_owned(),
        files,
    })
}

/// Saves `tag` as an OCI archive at `path`.
pub fn save_oci_archive(tag: &str, path: &Path) -> Result<(), ImageError> {
    let _ = std::fs::remove_file(path);
    let mut push = tool("buildah");
    push.args(["push", "--quiet", tag])
        .arg(format!("oci-archive:{}", path.display()));
    run(push, "buildah push").map(|_| ())
}
