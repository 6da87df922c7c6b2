//! The guests' root file system: a tree of host files, symlinks and generated files, written as
//! a `newc` cpio archive the kernel unpacks into its rootfs. The cloud kernels have neither 9p
//! nor virtiofs, so the test payload travels as a second archive appended to the first.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    io::{self, BufWriter, Write},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};

enum Entry {
    Dir,
    File { src: PathBuf, mode: u32 },
    Data { data: Vec<u8>, mode: u32 },
    Symlink(String),
    CharDev { major: u32, minor: u32 },
}

/// Paths in the guest (absolute) to what they hold.
#[derive(Default)]
pub struct Tree {
    entries: BTreeMap<String, Entry>,
    /// Host ELF files whose libraries were added already.
    linked: BTreeSet<PathBuf>,
}

impl Tree {
    pub fn contains(&self, guest: &str) -> bool {
        self.entries.contains_key(guest)
    }

    fn insert(&mut self, guest: &str, entry: Entry) {
        let mut parent = Path::new(guest).parent();
        while let Some(p) = parent {
            let s = p.to_string_lossy();
            if s != "/" {
                self.entries.entry(s.into_owned()).or_insert(Entry::Dir);
            }
            parent = p.parent();
        }
        self.entries.insert(guest.to_owned(), entry);
    }

    pub fn dir(&mut self, guest: &str) {
        self.insert(guest, Entry::Dir);
    }

    pub fn symlink(&mut self, guest: &str, target: &str) {
        self.insert(guest, Entry::Symlink(target.to_owned()));
    }

    pub fn data(&mut self, guest: &str, data: impl Into<Vec<u8>>, mode: u32) {
        self.insert(
            guest,
            Entry::Data {
                data: data.into(),
                mode,
            },
        );
    }

    pub fn char_dev(&mut self, guest: &str, major: u32, minor: u32) {
        self.insert(guest, Entry::CharDev { major, minor });
    }

    /// A host file at a guest path of our choosing, with the libraries it links.
    pub fn file_as(&mut self, guest: &str, src: &Path, mode: u32) -> anyhow::Result<()> {
        self.insert(
            guest,
            Entry::File {
                src: src.to_owned(),
                mode,
            },
        );
        self.libraries_of(src)
    }

    /// A host file at the same path in the guest. Symlinks stay symlinks (multi-call binaries
    /// such as xtables look at argv[0]), their targets are added too, and directories are
    /// resolved so the tree matches the host's merged-/usr layout.
    pub fn host(&mut self, path: &Path) -> anyhow::Result<()> {
        let mut path = path.to_owned();
        for _ in 0..16 {
            let parent = path.parent().context("host path has no parent")?;
            let parent = fs::canonicalize(parent).with_context(|| format!("resolving {}", parent.display()))?;
            let real = parent.join(path.file_name().context("host path has no file name")?);
            let guest = real.to_string_lossy().into_owned();
            let meta = fs::symlink_metadata(&real).with_context(|| format!("reading {}", real.display()))?;
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&real)?;
                self.symlink(&guest, &target.to_string_lossy());
                path = parent.join(target);
                continue;
            }
            if meta.is_dir() {
                self.dir(&guest);
                return Ok(());
            }
            let mode = meta.permissions().mode() & 0o7777;
            let new = !self.contains(&guest);
            self.insert(
                &guest,
                Entry::File {
                    src: real.clone(),
                    mode,
                },
            );
            if new && (mode & 0o111 != 0 || real.to_string_lossy().contains(".so")) {
                self.libraries_of(&real)?;
            }
            return Ok(());
        }
        bail!("too many symlinks at {}", path.display())
    }

    /// Adds a host directory's files (not recursing), e.g. iptables' dlopen()ed extensions.
    pub fn host_dir_files(&mut self, dir: &Path) -> anyhow::Result<()> {
        for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let p = e?.path();
            if !p.is_dir() {
                self.host(&p)?;
            }
        }
        Ok(())
    }

    /// Adds a host directory tree at the same path (test fixtures the tests open by absolute
    /// path, compiled in from `CARGO_MANIFEST_DIR`).
    pub fn host_tree(&mut self, dir: &Path) -> anyhow::Result<()> {
        for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let p = e?.path();
            if p.is_dir() {
                self.host_tree(&p)?;
            } else {
                self.host(&p)?;
            }
        }
        Ok(())
    }

    /// The shared libraries `ldd` names for a host ELF file (and the dynamic loader).
    fn libraries_of(&mut self, elf: &Path) -> anyhow::Result<()> {
        if !self.linked.insert(elf.to_owned()) {
            return Ok(());
        }
        let mut magic = [0u8; 4];
        let is_elf = fs::File::open(elf)
            .and_then(|mut f| io::Read::read_exact(&mut f, &mut magic))
            .is_ok()
            && magic == *b"\x7fELF";
        if !is_elf {
            return Ok(());
        }
        let out = netdrop_tools::try_tool("ldd")?
            .arg(elf)
            .output()
            .context("running ldd")?;
        // ldd fails for static executables ("not a dynamic executable"): nothing to add.
        if !out.status.success() {
            return Ok(());
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if line.contains("not found") {
                bail!("{} needs a library the host lacks: {}", elf.display(), line.trim());
            }
            let lib = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            if let Some(lib) = lib.filter(|l| l.starts_with('/')) {
                self.host(Path::new(lib))?;
            }
        }
        Ok(())
    }

    /// Writes the tree as one `newc` archive to `out`.
    pub fn write_cpio(&self, out: impl Write) -> anyhow::Result<()> {
        let mut w = Cpio {
            out: BufWriter::new(out),
            ino: 1,
        };
        for (path, entry) in &self.entries {
            let name = path.trim_start_matches('/');
            match entry {
                Entry::Dir => w.entry(name, 0o040_755, 0, 0, &[])?,
                Entry::Symlink(target) => w.entry(name, 0o120_777, 0, 0, target.as_bytes())?,
                Entry::CharDev { major, minor } => w.entry(name, 0o020_600, *major, *minor, &[])?,
                Entry::Data { data, mode } => w.entry(name, 0o100_000 | mode, 0, 0, data)?,
                Entry::File { src, mode } => {
                    let data = fs::read(src).with_context(|| format!("reading {}", src.display()))?;
                    w.entry(name, 0o100_000 | mode, 0, 0, &data)?;
                }
            }
        }
        w.entry("TRAILER!!!", 0, 0, 0, &[])?;
        w.out.flush()?;
        Ok(())
    }
}

/// `newc` ("070701") cpio: an ASCII-hex header per entry, name and data each padded to 4 bytes.
/// The format the kernel's initramfs unpacker reads (Documentation/driver-api/early-userspace).
struct Cpio<W: Write> {
    out: W,
    ino: u32,
}

impl<W: Write> Cpio<W> {
    fn entry(&mut self, name: &str, mode: u32, rdev_major: u32, rdev_minor: u32, data: &[u8]) -> io::Result<()> {
        let name_len = name.len() + 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            if mode & 0o170_000 == 0o040_000 { 2 } else { 1 },
            0, // mtime: fixed, so archives are reproducible
            u32::try_from(data.len()).map_err(io::Error::other)?,
            0,
            0,
            rdev_major,
            rdev_minor,
            name_len as u32,
            0, // check
        ];
        self.ino += 1;
        let mut header = String::from("070701");
        for f in fields {
            let _ = write!(header, "{f:08x}");
        }
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.pad(110 + name_len)?;
        self.out.write_all(data)?;
        self.pad(data.len())
    }

    fn pad(&mut self, len: usize) -> io::Result<()> {
        let n = (4 - len % 4) % 4;
        self.out.write_all(&[0; 3][..n])
    }
}

/// Mirrors the host's merged-/usr symlinks (`/bin -> usr/bin`), so binaries' interpreter path
/// (`/lib64/ld-linux-x86-64.so.2`) and absolute symlinks resolve in the guest as on the host.
pub fn merged_usr(tree: &mut Tree) {
    for top in ["/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"] {
        if let Ok(target) = fs::read_link(top) {
            tree.symlink(top, &target.to_string_lossy());
        }
    }
}

/// busybox (Debian's busybox-static) with a symlink per applet, where the host does not provide
/// the real program: the real iproute2/iptables must win over the applets for the tests.
pub fn busybox(tree: &mut Tree) -> anyhow::Result<()> {
    let bb = netdrop_tools::path("busybox")?;
    tree.host(&bb)?;
    let bb_guest = fs::canonicalize(&bb)?.to_string_lossy().into_owned();
    let out = netdrop_tools::try_tool("busybox")?
        .arg("--list")
        .output()
        .context("running busybox --list")?;
    let applets = String::from_utf8_lossy(&out.stdout).into_owned();
    for applet in applets
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox")
    {
        let taken = ["/usr/bin", "/usr/sbin"]
            .iter()
            .any(|d| tree.contains(&format!("{d}/{applet}")));
        if !taken {
            tree.symlink(&format!("/usr/bin/{applet}"), &bb_guest);
        }
    }
    Ok(())
}
