//! Debian cloud kernels for the matrix: which package each matrix entry means, fetching it with
//! `apt-get download` through a private apt configuration, unpacking it with `dpkg -x`, and
//! picking the kernel modules the tests need (with their dependencies) out of the tree.
//!
//! Every suite gets its own sources list, lists dir, package cache and (empty) dpkg status file
//! under the cache dir, so the host's apt state is neither read nor written.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};
use object::{Object as _, ObjectSection as _};

/// A Debian suite the matrix takes kernels from.
#[derive(Clone, Copy, Debug)]
enum Suite {
    Bullseye,
    Bookworm,
    Sid,
}

impl Suite {
    fn name(self) -> &'static str {
        match self {
            Suite::Bullseye => "bullseye",
            Suite::Bookworm => "bookworm",
            Suite::Sid => "sid",
        }
    }

    fn sources(self) -> &'static str {
        // Security and point-release updates carry the newest bookworm kernels; bullseye's
        // last kernels are in its main suite and sid has only one.
        match self {
            Suite::Bullseye => "deb http://deb.debian.org/debian bullseye main\n",
            Suite::Bookworm => {
                "deb http://deb.debian.org/debian bookworm main\n\
                 deb http://deb.debian.org/debian bookworm-updates main\n\
                 deb http://deb.debian.org/debian-security bookworm-security main\n"
            }
            Suite::Sid => "deb http://deb.debian.org/debian sid main\n",
        }
    }
}

/// One entry of the kernel matrix.
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    /// What `--kernel` calls it: `6.1`.
    pub name: &'static str,
    suite: Suite,
    /// The meta package whose dependency names the current image package of that line.
    meta: &'static str,
}

/// The matrix, oldest first: bullseye's 5.10 (no drop reasons, no module BTF), bookworm's 6.1 and
/// backported 6.12 (before and after TCX and kprobe.multi), and sid's newest.
pub const MATRIX: [Spec; 4] = [
    Spec {
        name: "5.10",
        suite: Suite::Bullseye,
        meta: "linux-image-cloud-amd64",
    },
    Spec {
        name: "6.1",
        suite: Suite::Bookworm,
        meta: "linux-image-cloud-amd64",
    },
    Spec {
        name: "6.12",
        suite: Suite::Bookworm,
        meta: "linux-image-6.12-cloud-amd64",
    },
    Spec {
        name: "7.2",
        suite: Suite::Sid,
        meta: "linux-image-cloud-amd64",
    },
];

pub fn spec(name: &str) -> Option<Spec> {
    MATRIX.iter().copied().find(|s| s.name == name)
}

/// Module name and decompressed `.ko` file, in load order.
pub type ModuleList = Vec<(String, PathBuf)>;

/// A fetched and unpacked kernel.
pub struct Kernel {
    pub spec: Spec,
    /// `uname -r` of the kernel: `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// The Debian package version: `6.1.192-2`.
    pub package_version: String,
    pub vmlinuz: PathBuf,
    modules_dir: PathBuf,
    module_cache: PathBuf,
}

/// Where kernels, package lists and unpacked trees live between runs: `~/.cache/netdrop/vm`.
pub fn cache_dir() -> anyhow::Result<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(std::env::var_os("HOME").context("HOME is not set; cannot place the kernel cache")?)
            .join(".cache"),
    };
    Ok(base.join("netdrop").join("vm"))
}

/// Package lists younger than this are used as they are, so warm runs need no network.
const LISTS_MAX_AGE: Duration = Duration::from_hours(24);

struct Apt {
    suite: Suite,
    dir: PathBuf,
}

impl Apt {
    fn new(cache: &Path, suite: Suite) -> anyhow::Result<Self> {
        let dir = cache.join("apt").join(suite.name());
        for sub in ["parts", "lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(dir.join(sub)).with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
        let sources: String = suite
            .sources()
            .lines()
            .map(|l| l.replacen("deb ", &format!("deb [signed-by={keyring}] "), 1) + "\n")
            .collect();
        fs::write(dir.join("sources.list"), sources)?;
        fs::write(dir.join("status"), "")?;
        Ok(Self { suite, dir })
    }

    fn command(&self, tool: &str) -> Command {
        let mut cmd = netdrop_tools::tool(tool);
        let d = &self.dir;
        let opts = [
            format!("Dir::Etc::sourcelist={}", d.join("sources.list").display()),
            format!("Dir::Etc::sourceparts={}", d.join("parts").display()),
            format!("Dir::State::Lists={}", d.join("lists").display()),
            format!("Dir::State::status={}", d.join("status").display()),
            format!("Dir::Cache={}", d.join("cache").display()),
            // Only the Packages indexes: no translations, no AppStream metadata.
            "Acquire::Languages=none".to_owned(),
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".to_owned(),
            "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false".to_owned(),
        ];
        for o in opts {
            cmd.arg("-o").arg(o);
        }
        // The `_apt` sandbox user cannot write into root's cache dir.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            cmd.args(["-o", "APT::Sandbox::User=root"]);
        }
        cmd
    }

    fn lists_age(&self) -> Option<Duration> {
        fs::read_dir(self.dir.join("lists"))
            .ok()?
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().contains("_Packages"))
            .filter_map(|e| e.metadata().ok()?.modified().ok())
            .max()
            .map(|t| SystemTime::now().duration_since(t).unwrap_or_default())
    }

    /// Refreshes the package lists when they are missing or older than a day; with old lists and
    /// no network it goes on with the old lists.
    fn update(&self) -> anyhow::Result<()> {
        let age = self.lists_age();
        if age.is_some_and(|a| a < LISTS_MAX_AGE) {
            return Ok(());
        }
        eprintln!("vm-test: refreshing the {} package lists", self.suite.name());
        let out = self
            .command("apt-get")
            .args(["-q", "update"])
            .output()
            .context("running apt-get update")?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let failed = !out.status.success()
            || stderr
                .lines()
                .any(|l| l.starts_with("W: Failed") || l.starts_with("E:"));
        if failed {
            let why = apt_error(&stderr);
            if age.is_some() {
                eprintln!(
                    "vm-test: warning: could not refresh the {} package lists ({why}); using the old ones",
                    self.suite.name()
                );
            } else {
                bail!(
                    "cannot download the {} package lists from deb.debian.org: {why}",
                    self.suite.name()
                );
            }
        }
        Ok(())
    }

    /// The `Depends` of the candidate version of `package`, alternatives flattened, and the
    /// candidate's version.
    fn depends(&self, package: &str) -> anyhow::Result<(String, Vec<String>)> {
        let out = self
            .command("apt-cache")
            .args(["show", "--no-all-versions", package])
            .output()
            .context("running apt-cache")?;
        if !out.status.success() || out.stdout.is_empty() {
            bail!(
                "kernel package {package} is not in {}: {}",
                self.suite.name(),
                apt_error(&String::from_utf8_lossy(&out.stderr))
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name).map(str::trim).map(str::to_owned))
                .unwrap_or_default()
        };
        let deps = field("Depends:")
            .split([',', '|'])
            .filter_map(|d| d.split_whitespace().next().map(str::to_owned))
            .collect();
        Ok((field("Version:"), deps))
    }

    fn download(&self, packages: &[String], into: &Path) -> anyhow::Result<()> {
        let out = self
            .command("apt-get")
            .arg("-q")
            .arg("download")
            .args(packages)
            .current_dir(into)
            .output()
            .context("running apt-get download")?;
        if !out.status.success() {
            bail!(
                "cannot fetch kernel package {} from {}: {}",
                packages.join(" "),
                self.suite.name(),
                apt_error(&String::from_utf8_lossy(&out.stderr))
            );
        }
        Ok(())
    }
}

/// apt's most telling error line, for one-line messages: a failed fetch names the URL and the
/// cause ("Could not resolve ..."), which the closing summary line does not.
fn apt_error(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let pick = |p: &str| lines.iter().find(|l| l.starts_with(p)).copied();
    pick("E: Failed to fetch")
        .or_else(|| pick("W: Failed to fetch"))
        .or_else(|| pick("E:"))
        .or_else(|| pick("W:"))
        .or_else(|| lines.last().copied())
        .unwrap_or("no output from apt")
        .to_owned()
}

/// Fetches (or finds in the cache) the current kernel of `spec`'s line and unpacks it.
pub fn fetch(spec: Spec, cache: &Path) -> anyhow::Result<Kernel> {
    let apt = Apt::new(cache, spec.suite)?;
    apt.update()?;
    let (_, meta_deps) = apt.depends(spec.meta)?;
    let image = meta_deps
        .into_iter()
        .find(|d| d.starts_with("linux-image-") && d.ends_with("-cloud-amd64"))
        .with_context(|| {
            format!(
                "{} in {} names no linux-image-*-cloud-amd64 package",
                spec.meta,
                spec.suite.name()
            )
        })?;
    if !image.starts_with(&format!("linux-image-{}.", spec.name)) {
        bail!(
            "{} in {} now points to {image}, not a {} kernel; update the matrix in xtask/src/vm/kernel.rs",
            spec.meta,
            spec.suite.name(),
            spec.name
        );
    }
    let (version, image_deps) = apt.depends(&image)?;
    // Since 6.13 (sid) the image package is empty and depends on the binary and modules halves.
    let mut packages = vec![image.clone()];
    packages.extend(
        image_deps
            .into_iter()
            .filter(|d| d.starts_with("linux-binary-") || d.starts_with("linux-modules-")),
    );

    let tree = cache.join("kernels").join(format!("{image}_{version}"));
    let stamp = tree.join(".unpacked");
    if !stamp.exists() {
        let debs = cache.join("debs");
        fs::create_dir_all(&debs)?;
        let missing: Vec<String> = packages
            .iter()
            .filter(|p| deb_path(&debs, p, &version).is_none())
            .cloned()
            .collect();
        if !missing.is_empty() {
            eprintln!("vm-test: downloading {}", missing.join(" "));
            apt.download(&missing, &debs)?;
        }
        let _ = fs::remove_dir_all(&tree);
        fs::create_dir_all(&tree)?;
        for p in &packages {
            let deb = deb_path(&debs, p, &version)
                .with_context(|| format!("cannot fetch kernel package {p}: apt-get download left no .deb"))?;
            let status = netdrop_tools::try_tool("dpkg")?
                .arg("-x")
                .arg(&deb)
                .arg(&tree)
                .status()
                .context("running dpkg -x")?;
            if !status.success() {
                bail!("cannot unpack kernel package {p} ({}): dpkg -x failed", deb.display());
            }
        }
        fs::write(&stamp, "")?;
    }
    Kernel::from_tree(spec, &tree, version, cache)
}

/// The downloaded .deb of `package` at `version` (apt escapes `:` in versions as `%3a`).
fn deb_path(dir: &Path, package: &str, version: &str) -> Option<PathBuf> {
    let name = format!("{package}_{}_amd64.deb", version.replace(':', "%3a"));
    let path = dir.join(name);
    path.exists().then_some(path)
}

impl Kernel {
    fn from_tree(spec: Spec, tree: &Path, package_version: String, cache: &Path) -> anyhow::Result<Self> {
        // Older packages install into /lib/modules and /boot, newer ones into /usr/lib/modules
        // with vmlinuz next to the modules.
        let modules_root = ["usr/lib/modules", "lib/modules"]
            .iter()
            .map(|d| tree.join(d))
            .find(|d| d.is_dir())
            .with_context(|| format!("{} has no lib/modules", tree.display()))?;
        let modules_dir = fs::read_dir(&modules_root)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.join("kernel").is_dir())
            .with_context(|| format!("{} holds no kernel release", modules_root.display()))?;
        let release = modules_dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let vmlinuz = [
            modules_dir.join("vmlinuz"),
            tree.join("boot").join(format!("vmlinuz-{release}")),
        ]
        .into_iter()
        .find(|p| p.exists())
        .with_context(|| format!("no vmlinuz for {release} in {}", tree.display()))?;
        let module_cache = cache.join("modules").join(&release);
        Ok(Self {
            spec,
            release,
            package_version,
            vmlinuz,
            modules_dir,
            module_cache,
        })
    }

    /// The modules to insmod, dependencies first, decompressed into the cache; and the wanted
    /// modules this kernel has neither as a file nor built in.
    pub fn modules(&self, wanted: &[&str]) -> anyhow::Result<(ModuleList, Vec<String>)> {
        let mut files = BTreeMap::new();
        index_modules(&self.modules_dir.join("kernel"), &mut files)?;
        let builtin: BTreeSet<String> = fs::read_to_string(self.modules_dir.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| Path::new(l).file_name())
            .map(|f| module_name(&f.to_string_lossy()))
            .collect();
        fs::create_dir_all(&self.module_cache)?;
        let mut resolver = Resolver {
            kernel: self,
            files,
            builtin,
            order: Vec::new(),
            seen: BTreeSet::new(),
            missing: Vec::new(),
        };
        for name in wanted {
            resolver.visit(&module_name(name))?;
        }
        Ok((resolver.order, resolver.missing))
    }

    /// `modules.dep`-style text of the modules picked, for the work dir (debugging aid).
    pub fn describe(order: &[(String, PathBuf)], missing: &[String]) -> String {
        let mut s = String::new();
        for (i, (name, _)) in order.iter().enumerate() {
            let _ = writeln!(s, "{i:03} {name}");
        }
        for m in missing {
            let _ = writeln!(s, "missing {m}");
        }
        s
    }
}

/// Module names treat `-` and `_` alike; the kernel reports `_`.
fn module_name(file: &str) -> String {
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

fn index_modules(dir: &Path, into: &mut BTreeMap<String, PathBuf>) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            index_modules(&path, into)?;
        } else if let Some(f) = path.file_name().map(|f| f.to_string_lossy().into_owned())
            && f.contains(".ko")
        {
            into.insert(module_name(&f), path);
        }
    }
    Ok(())
}

struct Resolver<'k> {
    kernel: &'k Kernel,
    files: BTreeMap<String, PathBuf>,
    builtin: BTreeSet<String>,
    order: ModuleList,
    seen: BTreeSet<String>,
    missing: Vec<String>,
}

impl Resolver<'_> {
    fn visit(&mut self, name: &str) -> anyhow::Result<()> {
        if !self.seen.insert(name.to_owned()) || self.builtin.contains(name) {
            return Ok(());
        }
        let Some(src) = self.files.get(name).cloned() else {
            self.missing.push(name.to_owned());
            return Ok(());
        };
        let ko = self.decompressed(name, &src)?;
        for dep in depends(&ko)? {
            self.visit(&dep)?;
        }
        self.order.push((name.to_owned(), ko));
        Ok(())
    }

    /// busybox's insmod reads plain ELF only; Debian compresses modules with xz since 6.x.
    fn decompressed(&self, name: &str, src: &Path) -> anyhow::Result<PathBuf> {
        let dst = self.kernel.module_cache.join(format!("{name}.ko"));
        if dst.exists() {
            return Ok(dst);
        }
        let file = src.to_string_lossy();
        let tool = if file.ends_with(".xz") {
            Some("xz")
        } else if file.ends_with(".zst") {
            Some("zstd")
        } else if file.ends_with(".gz") {
            Some("gzip")
        } else {
            None
        };
        let tmp = dst.with_extension("ko.tmp");
        match tool {
            None => {
                fs::copy(src, &tmp)?;
            }
            Some(tool) => {
                let out = netdrop_tools::try_tool(tool)?
                    .args(["-dc"])
                    .arg(src)
                    .output()
                    .with_context(|| {
                        format!("running {tool} to decompress {} (is {tool} installed?)", src.display())
                    })?;
                if !out.status.success() {
                    bail!("{tool} could not decompress {}", src.display());
                }
                fs::write(&tmp, out.stdout)?;
            }
        }
        fs::rename(&tmp, &dst)?;
        Ok(dst)
    }
}

/// The `depends=` entry of a module's `.modinfo` section (what depmod turns into modules.dep).
fn depends(ko: &Path) -> anyhow::Result<Vec<String>> {
    let data = fs::read(ko)?;
    let elf = object::read::elf::ElfFile64::<object::Endianness>::parse(&*data)
        .with_context(|| format!("{} is not an ELF module", ko.display()))?;
    let Some(section) = elf.section_by_name(".modinfo") else {
        return Ok(Vec::new());
    };
    let info = section.data()?;
    Ok(info
        .split(|b| *b == 0)
        .filter_map(|kv| kv.strip_prefix(b"depends="))
        .flat_map(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter(|d| !d.is_empty())
        .map(|d| module_name(&d))
        .collect())
}
