//! `netdrop capture`: a trace whose dropped packets also go to a pcapng file
//! ([`crate::sink::pcapng`]), for Wireshark and for `netdrop report`. Planning, attaching and
//! the event loop are the trace's ([`super::trace::run_with`]).

use std::{
    fs::{File, OpenOptions, Permissions},
    io::BufWriter,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::PathBuf,
    sync::mpsc,
};

use crate::{
    cli::CaptureArgs,
    sink::pcapng::{Limits, PcapngSink, SNAPLEN},
};

/// Errors of `netdrop capture` before the trace starts.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The capture file cannot be created (directory missing, read-only, no permission).
    #[error("cannot create the capture file {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub async fn run(args: CaptureArgs) -> anyhow::Result<()> {
    let (trace, opts) = args.into_trace();
    let file = create(&opts.file)?;
    let about = format!(
        "netdrop capture: {}",
        std::env::args().skip(2).collect::<Vec<_>>().join(" ")
    );
    let (tx, rx) = mpsc::channel();
    let limits = Limits {
        count: opts.count,
        max_bytes: opts.max_size,
    };
    let sink = PcapngSink::new(BufWriter::with_capacity(256 * 1024, file), limits, &about, Some(tx))?;
    eprintln!(
        "netdrop: capturing to {} (each packet from its IP header, at most {SNAPLEN} bytes: what the kernel program copies)",
        opts.file.display()
    );
    super::trace::run_with(trace, vec![Box::new(sink)]).await?;
    match rx.try_recv() {
        Ok(stats) => eprintln!("netdrop: {}: {}", opts.file.display(), stats.describe()),
        Err(_) => eprintln!(
            "netdrop: {}: the capture ended without its summary",
            opts.file.display()
        ),
    }
    Ok(())
}

/// The file, mode 0600 (packets and names of the cluster's workloads): replaced if it exists.
fn create(path: &PathBuf) -> Result<File, CaptureError> {
    let err = |source| CaptureError::Create {
        path: path.clone(),
        source,
    };
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    // An existing file keeps its mode through open(2): set it.
    file.set_permissions(Permissions::from_mode(0o600)).map_err(err)?;
    Ok(file)
}
