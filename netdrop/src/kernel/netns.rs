//! Network namespaces by inode: this process's own, and a path that opens another.

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// A path that opens the namespace with this inode: a /run/netns bind mount, or a process in
/// it. `None` when none is found (the namespace has no name and no process left).
pub fn netns_path(inode: u32) -> Option<PathBuf> {
    let matches = |p: &Path| fs::metadata(p).is_ok_and(|m| m.ino() as u32 == inode);
    if let Ok(dir) = fs::read_dir("/run/netns") {
        for e in dir.flatten() {
            if matches(&e.path()) {
                return Some(e.path());
            }
        }
    }
    for e in fs::read_dir("/proc").ok()?.flatten() {
        let name = e.file_name();
        if name.to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())) {
            let p = e.path().join("ns/net");
            if matches(&p) {
                return Some(p);
            }
        }
    }
    None
}

/// This process's network namespace inode.
pub fn own_netns() -> u32 {
    fs::metadata("/proc/self/ns/net").map_or(0, |m| m.ino() as u32)
}
