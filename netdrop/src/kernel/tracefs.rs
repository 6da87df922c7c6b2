//! tracefs: where it is mounted, and the `skb/kfree_skb` tracepoint's record layout.

use std::{collections::HashMap, fs, io, path::PathBuf};

use netdrop_common::{ABSENT, TracepointLayout};

const CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// tracefs could not be found or read.
#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    #[error(
        "tracefs is not mounted and mounting it at /sys/kernel/tracing failed ({0}); mount it: mount -t tracefs tracefs /sys/kernel/tracing"
    )]
    NotMounted(#[source] nix::Error),
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: field {field} missing from the kfree_skb record")]
    MissingField { path: PathBuf, field: &'static str },
}

/// The tracefs root, mounting it at /sys/kernel/tracing when it is not mounted (needs root).
pub fn root() -> Result<PathBuf, TracefsError> {
    for c in CANDIDATES {
        if fs::metadata(format!("{c}/events")).is_ok() {
            return Ok(PathBuf::from(c));
        }
    }
    nix::mount::mount(
        Some("tracefs"),
        CANDIDATES[0],
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(TracefsError::NotMounted)?;
    Ok(PathBuf::from(CANDIDATES[0]))
}

/// The text of `events/skb/kfree_skb/format`.
pub fn kfree_skb_format() -> Result<(PathBuf, String), TracefsError> {
    let path = root()?.join("events/skb/kfree_skb/format");
    let text = fs::read_to_string(&path).map_err(|source| TracefsError::Read {
        path: path.clone(),
        source,
    })?;
    Ok((path, text))
}

/// `field:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;` → {"skbaddr": 8}
pub fn field_offsets(format_text: &str) -> HashMap<String, u32> {
    let mut out = HashMap::new();
    for line in format_text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let mut parts = rest.split(';');
        let decl = parts.next().unwrap_or_default();
        let name = decl.rsplit([' ', '*']).next().unwrap_or_default();
        let name = name.split('[').next().unwrap_or_default();
        for p in parts {
            if let Some(off) = p.trim().strip_prefix("offset:")
                && let Ok(off) = off.parse()
            {
                out.insert(name.to_string(), off);
            }
        }
    }
    out
}

/// The classic tracepoint's record layout; `reason` is [`ABSENT`] before Linux 5.17, `rx_sk`
/// before 6.11.
pub fn kfree_skb_layout(path: &std::path::Path, format_text: &str) -> Result<TracepointLayout, TracefsError> {
    let f = field_offsets(format_text);
    let get = |field: &'static str| {
        f.get(field).copied().ok_or_else(|| TracefsError::MissingField {
            path: path.into(),
            field,
        })
    };
    Ok(TracepointLayout {
        skbaddr: get("skbaddr")?,
        location: get("location")?,
        reason: f.get("reason").copied().unwrap_or(ABSENT),
        rx_sk: f.get("rx_sk").copied().unwrap_or(ABSENT),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORMAT_6_18: &str = "name: kfree_skb\nID: 2310\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;\n\tfield:void * location;\toffset:16;\tsize:8;\tsigned:0;\n\tfield:void * rx_sk;\toffset:24;\tsize:8;\tsigned:0;\n\tfield:unsigned short protocol;\toffset:32;\tsize:2;\tsigned:0;\n\tfield:enum skb_drop_reason reason;\toffset:36;\tsize:4;\tsigned:0;\n";
    const FORMAT_5_10: &str = "format:\n\tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;\n\tfield:void * location;\toffset:16;\tsize:8;\tsigned:0;\n\tfield:unsigned short protocol;\toffset:24;\tsize:2;\tsigned:0;\n";

    #[test]
    fn layout_with_reason() {
        let l = kfree_skb_layout("x".as_ref(), FORMAT_6_18).expect("layout");
        assert_eq!((l.skbaddr, l.location, l.reason, l.rx_sk), (8, 16, 36, 24));
    }

    #[test]
    fn layout_without_reason() {
        let l = kfree_skb_layout("x".as_ref(), FORMAT_5_10).expect("layout");
        assert_eq!((l.skbaddr, l.location, l.reason, l.rx_sk), (8, 16, ABSENT, ABSENT));
    }
}
