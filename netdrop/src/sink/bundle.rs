//! The node-state bundle of `netdrop capture --bundle`: a gzip'd tar (or a directory) holding
//! the capture, the run's JSON lines and final summary, the attach report, the Kubernetes
//! objects and the node state ([`crate::source::node_state`]), listed in `manifest.json`.
//! [`BundleEvents`] is the sink that writes the run's part; [`Bundle`] writes the files (mode
//! 0600, directories 0700, the tarball 0600); [`read`] reads one back for `netdrop report`.
//!
//! Layout: `capture.pcapng`, `events.ndjson`, `summary.json`, `attach.json`,
//! `kube/objects.json`, `node/…` (kernel, BTF, softnet, `cni/`), `netns/LABEL/ITEM.out|.err`,
//! `start/netns/LABEL/…` (the baselines), `manifest.json` last.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File, OpenOptions, Permissions},
    io::{self, BufWriter, Read, Write},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::mpsc,
    time::{SystemTime, UNIX_EPOCH},
};

use flate2::{Compression, read::GzDecoder, write::GzEncoder};
use serde::{Deserialize, Serialize};

use super::{JsonSink, Sink};
use crate::{
    aggregate::{Summary, target_summary::TargetSummary},
    enrich::record::DropRecord,
    source::node_state::{Collected, ManifestEntry, Netns, Phase},
};

pub const MANIFEST: &str = "manifest.json";
pub const CAPTURE: &str = "capture.pcapng";
pub const EVENTS: &str = "events.ndjson";
pub const SUMMARY: &str = "summary.json";
pub const ATTACH: &str = "attach.json";
pub const KUBE: &str = "kube/objects.json";
/// Most bytes `netdrop report` reads of one bundle entry (the capture is capped by
/// `--max-size`; a bigger entry is not one netdrop wrote).
pub const READ_MAX_ENTRY: u64 = 4 << 30;

/// Errors writing or reading a bundle; each one line.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot create the bundle {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {name} into the bundle {path}")]
    Write {
        path: PathBuf,
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the bundle {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The tarball is cut short, or its bytes changed.
    #[error("{path} is damaged ({why}): truncated or corrupted; nothing was reported")]
    Damaged { path: PathBuf, why: String },
    /// A file netdrop writes is missing.
    #[error("{path} is not a netdrop bundle: {name} is missing")]
    Missing { path: PathBuf, name: &'static str },
}

/// What `manifest.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// `netdrop-bundle`.
    pub format: String,
    pub version: u32,
    /// When the bundle was finished (RFC 3339, UTC).
    pub created: String,
    pub node: String,
    /// The capture's command line.
    pub command: String,
    /// Caps of each item (seconds, bytes, lines).
    pub item_timeout_s: u64,
    pub item_max_bytes: u64,
    pub conntrack_list_lines: u64,
    pub namespaces: Vec<Netns>,
    pub items: Vec<ManifestEntry>,
}

enum Out {
    Dir(PathBuf),
    Tar(Box<tar::Builder<GzEncoder<BufWriter<File>>>>),
}

/// A bundle being written.
pub struct Bundle {
    path: PathBuf,
    out: Out,
    pub items: Vec<ManifestEntry>,
}

/// Creates `path` as a file, mode 0600, replaced if it exists.
pub fn create_private(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // An existing file keeps its mode through open(2): set it.
    file.set_permissions(Permissions::from_mode(0o600))?;
    Ok(file)
}

fn mkdir_private(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

impl Bundle {
    /// A directory when `path` ends with `/` or is one; else a gzip'd tar.
    pub fn create(path: &Path) -> Result<Self, BundleError> {
        let err = |source| BundleError::Create {
            path: path.to_path_buf(),
            source,
        };
        let is_dir = path.as_os_str().to_string_lossy().ends_with('/') || path.is_dir();
        let out = if is_dir {
            mkdir_private(path).map_err(err)?;
            fs::set_permissions(path, Permissions::from_mode(0o700)).map_err(err)?;
            Out::Dir(path.to_path_buf())
        } else {
            let file = create_private(path).map_err(err)?;
            let gz = GzEncoder::new(BufWriter::with_capacity(256 * 1024, file), Compression::default());
            let mut tar = tar::Builder::new(gz);
            tar.mode(tar::HeaderMode::Deterministic);
            Out::Tar(Box::new(tar))
        };
        Ok(Self {
            path: path.to_path_buf(),
            out,
            items: Vec::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the run's JSON lines are written while it runs: in the directory, or beside the
    /// tarball (moved into it at the end, then removed).
    pub fn events_path(&self) -> PathBuf {
        match &self.out {
            Out::Dir(d) => d.join(EVENTS),
            Out::Tar(_) => {
                let mut p = self.path.clone().into_os_string();
                p.push(".events.tmp");
                PathBuf::from(p)
            }
        }
    }

    fn header(len: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_size(len);
        h.set_mode(0o600);
        h.set_mtime(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()));
        h.set_entry_type(tar::EntryType::Regular);
        h
    }

    /// Adds `bytes` as `name` (a relative path with `/`).
    pub fn add(&mut self, name: &str, bytes: &[u8]) -> Result<(), BundleError> {
        let path = self.path.clone();
        let err = werr(&path, name);
        match &mut self.out {
            Out::Dir(d) => {
                let p = d.join(name);
                if let Some(parent) = p.parent() {
                    mkdir_private(parent).map_err(err)?;
                }
                let mut f = create_private(&p).map_err(werr(&path, name))?;
                f.write_all(bytes).map_err(werr(&path, name))
            }
            Out::Tar(t) => {
                let mut h = Self::header(bytes.len() as u64);
                t.append_data(&mut h, name, bytes).map_err(err)
            }
        }
    }

    /// Adds the file at `from` as `name`.
    pub fn add_file(&mut self, name: &str, from: &Path) -> Result<(), BundleError> {
        let path = self.path.clone();
        let err = werr(&path, name);
        match &mut self.out {
            Out::Dir(d) => {
                let to = d.join(name);
                if to == from {
                    return Ok(());
                }
                let mut src = File::open(from).map_err(err)?;
                let mut dst = create_private(&to).map_err(werr(&path, name))?;
                io::copy(&mut src, &mut dst).map(|_| ()).map_err(werr(&path, name))
            }
            Out::Tar(t) => {
                let src = File::open(from).map_err(err)?;
                let len = src.metadata().map_err(werr(&path, name))?.len();
                let mut h = Self::header(len);
                // At most the length the header says, should the file still grow.
                t.append_data(&mut h, name, src.take(len)).map_err(werr(&path, name))
            }
        }
    }

    /// Adds a collected item (its output, its stderr) and keeps its manifest entry.
    pub fn add_collected(&mut self, c: Collected) -> Result<(), BundleError> {
        self.add(&c.entry.file, &c.stdout)?;
        if let Some(e) = &c.entry.stderr_file {
            self.add(e, &c.stderr)?;
        }
        self.items.push(c.entry);
        Ok(())
    }

    /// Gives up: a tarball is removed (it would be unreadable), a directory keeps what it got.
    pub fn abandon(self) {
        if let Out::Tar(t) = self.out {
            drop(t);
            let _ = fs::remove_file(&self.path);
        }
    }

    /// Writes the manifest and closes the bundle; returns its size in bytes.
    pub fn finish(mut self, mut manifest: Manifest) -> Result<u64, BundleError> {
        manifest.items = std::mem::take(&mut self.items);
        let json = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
        self.add(MANIFEST, &json)?;
        let path = self.path.clone();
        let end = "the end of the archive";
        let err = werr(&path, end);
        match self.out {
            Out::Dir(d) => Ok(dir_size(&d)),
            Out::Tar(t) => {
                let gz = t.into_inner().map_err(err)?;
                let mut w = gz.finish().map_err(werr(&path, end))?;
                w.flush().map_err(werr(&path, end))?;
                let f = w
                    .into_inner()
                    .map_err(io::IntoInnerError::into_error)
                    .map_err(werr(&path, end))?;
                f.sync_all().map_err(werr(&path, end))?;
                Ok(f.metadata().map_or(0, |m| m.len()))
            }
        }
    }
}

fn werr(path: &Path, name: &str) -> impl FnOnce(io::Error) -> BundleError + use<> {
    let (path, name) = (path.to_path_buf(), name.to_string());
    move |source| BundleError::Write { path, name, source }
}

fn dir_size(d: &Path) -> u64 {
    fs::read_dir(d).map_or(0, |rd| {
        rd.flatten()
            .map(|e| match e.metadata() {
                Ok(m) if m.is_dir() => dir_size(&e.path()),
                Ok(m) => m.len(),
                Err(_) => 0,
            })
            .sum()
    })
}

/// What the run gives the bundle at its end.
#[derive(Debug, Default)]
pub struct RunRecord {
    /// Interfaces drops were seen on, per namespace inode.
    pub ifaces: BTreeMap<u32, BTreeSet<String>>,
    /// Namespaces of the summary's shown counter rows (drops counted, with or without an
    /// event; not the benign frees: every pod that closes a socket has those).
    pub netns: BTreeSet<u32>,
    /// The final summary line (as `-o json` prints it).
    pub summary: String,
    /// The attach report (pretty JSON).
    pub attach: String,
}

/// The sink of the run's part of a bundle: every event and summary as a JSON line, and, with the
/// final summary, a [`RunRecord`] for the node-state collection that follows.
pub struct BundleEvents<W: Write + Send> {
    json: JsonSink<W>,
    ifaces: BTreeMap<u32, BTreeSet<String>>,
    tx: Option<mpsc::Sender<RunRecord>>,
}

impl<W: Write + Send> BundleEvents<W> {
    pub fn new(out: W, tx: mpsc::Sender<RunRecord>) -> Self {
        Self {
            json: JsonSink::new(out),
            ifaces: BTreeMap::new(),
            tx: Some(tx),
        }
    }

    fn finish(&mut self, summary: String, drops: Option<&Summary>) {
        let Some(tx) = self.tx.take() else { return };
        let _ = tx.send(RunRecord {
            ifaces: std::mem::take(&mut self.ifaces),
            netns: drops
                .map(|d| d.drops.iter().filter(|r| !r.hidden).map(|r| r.netns).collect())
                .unwrap_or_default(),
            summary,
            attach: drops
                .and_then(|d| serde_json::to_string_pretty(&d.attach).ok())
                .unwrap_or_default(),
        });
    }
}

impl<W: Write + Send> Sink for BundleEvents<W> {
    fn on_drop(&mut self, drop: &DropRecord) -> io::Result<()> {
        self.ifaces.entry(drop.netns).or_default().insert(drop.ifname.clone());
        self.json.on_drop(drop)
    }

    fn on_summary(&mut self, summary: &Summary) -> io::Result<()> {
        self.json.on_summary(summary)?;
        self.finish(serde_json::to_string(summary)?, Some(summary));
        Ok(())
    }

    fn on_target_summary(&mut self, summary: &TargetSummary) -> io::Result<()> {
        self.json.on_target_summary(summary)?;
        if summary.is_final {
            self.finish(serde_json::to_string(summary)?, summary.detail.as_ref());
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.json.flush()
    }
}

/// A bundle read back: its files by name (the node state's outputs only as the manifest lists
/// them; their bytes are not needed offline).
#[derive(Debug, Default)]
pub struct BundleFiles {
    pub manifest: Option<Manifest>,
    pub capture: Option<Vec<u8>>,
    pub summary: Option<String>,
    /// Every entry's name and size.
    pub entries: BTreeMap<String, u64>,
}

/// Reads a bundle (a directory or a gzip'd tar). A tarball is read to its last byte, so a cut or
/// a changed byte anywhere (the gzip CRC) is an error.
pub fn read(path: &Path) -> Result<BundleFiles, BundleError> {
    let rerr = |source| BundleError::Read {
        path: path.to_path_buf(),
        source,
    };
    if path.is_dir() {
        let mut out = BundleFiles::default();
        let mut names = Vec::new();
        list_dir(path, path, &mut names);
        for (name, len) in names {
            out.entries.insert(name, len);
        }
        let get = |n: &str| fs::read(path.join(n));
        out.capture = get(CAPTURE).ok();
        out.summary = get(SUMMARY).ok().map(|b| String::from_utf8_lossy(&b).into_owned());
        out.manifest = Some(parse_manifest(path, &get(MANIFEST).map_err(rerr)?)?);
        return Ok(out);
    }
    let file = File::open(path).map_err(rerr)?;
    read_tar(file, path)
}

fn list_dir(root: &Path, d: &Path, out: &mut Vec<(String, u64)>) {
    let Ok(rd) = fs::read_dir(d) else { return };
    for e in rd.flatten() {
        let Ok(m) = fs::symlink_metadata(e.path()) else {
            continue;
        };
        if m.is_dir() {
            list_dir(root, &e.path(), out);
        } else if let Ok(rel) = e.path().strip_prefix(root) {
            out.push((rel.to_string_lossy().into_owned(), m.len()));
        }
    }
}

fn parse_manifest(path: &Path, bytes: &[u8]) -> Result<Manifest, BundleError> {
    serde_json::from_slice(bytes).map_err(|e| BundleError::Damaged {
        path: path.to_path_buf(),
        why: format!("{MANIFEST} does not parse: {e}"),
    })
}

/// Reads a gzip'd tar from `r` (no file system: tested on damaged bytes).
pub fn read_tar(r: impl Read, path: &Path) -> Result<BundleFiles, BundleError> {
    let damaged = |why: String| BundleError::Damaged {
        path: path.to_path_buf(),
        why,
    };
    let mut archive = tar::Archive::new(GzDecoder::new(r));
    let mut out = BundleFiles::default();
    let mut manifest = None;
    let entries = archive.entries().map_err(|e| damaged(e.to_string()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| damaged(e.to_string()))?;
        let name = entry
            .path()
            .map_err(|e| damaged(e.to_string()))?
            .to_string_lossy()
            .into_owned();
        let len = entry.header().size().map_err(|e| damaged(e.to_string()))?;
        if len > READ_MAX_ENTRY {
            return Err(damaged(format!("{name} claims {len} bytes")));
        }
        out.entries.insert(name.clone(), len);
        let wanted = matches!(name.as_str(), CAPTURE | SUMMARY | MANIFEST);
        let mut data = Vec::new();
        if wanted {
            entry
                .read_to_end(&mut data)
                .map_err(|e| damaged(format!("{name}: {e}")))?;
        } else {
            io::copy(&mut entry, &mut io::sink()).map_err(|e| damaged(format!("{name}: {e}")))?;
        }
        match name.as_str() {
            CAPTURE => out.capture = Some(data),
            SUMMARY => out.summary = Some(String::from_utf8_lossy(&data).into_owned()),
            MANIFEST => manifest = Some(data),
            _ => {}
        }
    }
    // The rest of the gzip stream: its end and CRC, so a damaged tail is found too.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(|e| damaged(format!("the end of the archive: {e}")))?;
    let manifest = manifest.ok_or(BundleError::Missing {
        path: path.to_path_buf(),
        name: MANIFEST,
    })?;
    out.manifest = Some(parse_manifest(path, &manifest)?);
    Ok(out)
}

/// A manifest without items (the caller's fields filled in by `Bundle::finish`).
pub fn manifest(node: &str, command: &str, namespaces: Vec<Netns>) -> Manifest {
    use crate::source::node_state::{CONNTRACK_LIST_LINES, ITEM_MAX_BYTES, ITEM_TIMEOUT};
    Manifest {
        format: "netdrop-bundle".into(),
        version: 1,
        created: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        node: node.into(),
        command: command.into(),
        item_timeout_s: ITEM_TIMEOUT.as_secs(),
        item_max_bytes: ITEM_MAX_BYTES as u64,
        conntrack_list_lines: CONNTRACK_LIST_LINES as u64,
        namespaces,
        items: Vec::new(),
    }
}

/// A one-item manifest entry for a file the run wrote.
pub fn run_file(file: &str, command: &str, bytes: u64, error: Option<String>) -> ManifestEntry {
    ManifestEntry {
        file: file.into(),
        stderr_file: None,
        netns: None,
        netns_inode: None,
        phase: Phase::End,
        command: command.into(),
        exit_code: None,
        error,
        bytes,
        stderr_bytes: 0,
        truncated: false,
        timed_out: false,
        redactions: 0,
        duration_ms: 0,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    fn sample(path: &Path) -> u64 {
        let mut b = Bundle::create(path).expect("create");
        b.add(CAPTURE, b"not really a pcapng").expect("add");
        b.add(SUMMARY, br#"{"type":"summary"}"#).expect("add");
        b.add_collected(Collected {
            entry: run_file("netns/host/nstat.out", "nstat -asz", 5, None),
            stdout: b"12345".to_vec(),
            stderr: Vec::new(),
        })
        .expect("add");
        b.finish(manifest("node-a", "netdrop capture", Vec::new()))
            .expect("finish")
    }

    #[test]
    fn a_tarball_and_a_directory_read_back_with_private_modes() {
        let dir = tempfile::tempdir().expect("tmp");
        let tgz = dir.path().join("b.tar.gz");
        let size = sample(&tgz);
        assert_eq!(fs::metadata(&tgz).expect("stat").len(), size);
        assert_eq!(fs::metadata(&tgz).expect("stat").mode() & 0o777, 0o600);
        let f = read(&tgz).expect("reads");
        assert_eq!(f.summary.as_deref(), Some(r#"{"type":"summary"}"#));
        assert_eq!(f.capture.as_deref(), Some(&b"not really a pcapng"[..]));
        let m = f.manifest.expect("manifest");
        assert_eq!((m.node.as_str(), m.items.len()), ("node-a", 1));
        assert_eq!(f.entries.get("netns/host/nstat.out"), Some(&5));
        let mut archive = tar::Archive::new(GzDecoder::new(File::open(&tgz).expect("open")));
        for e in archive.entries().expect("entries") {
            let e = e.expect("entry");
            assert_eq!(e.header().mode().expect("mode"), 0o600, "{:?}", e.path());
        }

        let d = dir.path().join("b.d/");
        sample(&d);
        assert_eq!(fs::metadata(&d).expect("stat").mode() & 0o777, 0o700);
        assert_eq!(
            fs::metadata(d.join("netns/host/nstat.out")).expect("stat").mode() & 0o777,
            0o600
        );
        let f = read(&d).expect("reads");
        assert_eq!(f.manifest.expect("manifest").items.len(), 1);
        assert_eq!(f.entries.get("netns/host/nstat.out"), Some(&5));
    }

    #[test]
    fn a_cut_or_changed_tarball_is_one_error_never_a_panic() {
        let dir = tempfile::tempdir().expect("tmp");
        let tgz = dir.path().join("b.tar.gz");
        sample(&tgz);
        let bytes = fs::read(&tgz).expect("read");
        for cut in 0..bytes.len() {
            match read_tar(&bytes[..cut], Path::new("t.tar.gz")) {
                Err(e) => assert!(!e.to_string().contains('\n'), "{e}"),
                Ok(_) => panic!("cut at {cut} of {} read as whole", bytes.len()),
            }
        }
        for i in (0..bytes.len()).step_by(3) {
            let mut b = bytes.clone();
            b[i] ^= 0x5a;
            // The gzip header's flags and time can change without harm; the rest is found.
            if let Ok(f) = read_tar(&b[..], Path::new("t")) {
                assert!(i < 10, "byte {i} changed and nothing noticed: {:?}", f.entries);
            }
        }
    }
}
