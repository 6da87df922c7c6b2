//! `netdrop capture`: a trace whose dropped packets also go to a pcapng file
//! ([`crate::sink::pcapng`]), for Wireshark and for `netdrop report`. Planning, attaching and
//! the event loop are the trace's ([`super::trace::run_with`]). With `--bundle`, the node's
//! state around the run goes with it ([`crate::source::node_state`], [`crate::sink::bundle`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{File, OpenOptions, Permissions},
    io::BufWriter,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::mpsc,
    time::Instant,
};

use crate::{
    cli::{CaptureArgs, CaptureOptions, TraceArgs},
    resolve::KubeOptions,
    sink::{
        Sink,
        bundle::{self, Bundle, BundleEvents, RunRecord},
        pcapng::{Limits, PcapngSink, SNAPLEN},
    },
    source::node_state::{self, Collected, Phase},
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
    let mut sinks: Vec<Box<dyn Sink>> = vec![Box::new(sink)];
    let bundle = match &opts.bundle {
        Some(path) => Some(BundleRun::start(path, &trace, &about, &mut sinks)?),
        None => None,
    };
    let kube = KubeOptions::from(&trace.kube);
    let node = crate::resolve::node_name(&kube);
    let pattern = trace.tc.watch_options().pattern;
    if let Err(e) = super::trace::run_with(trace, sinks).await {
        if let Some(b) = bundle {
            b.abandon();
        }
        return Err(e);
    }
    match rx.try_recv() {
        Ok(stats) => eprintln!("netdrop: {}: {}", opts.file.display(), stats.describe()),
        Err(_) => eprintln!(
            "netdrop: {}: the capture ended without its summary",
            opts.file.display()
        ),
    }
    if let Some(b) = bundle {
        b.finish(&opts, &kube, &node, &|n| pattern.matches(n)).await?;
    }
    Ok(())
}

/// How long listing the Kubernetes objects may take, and the most bytes of them kept.
const KUBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
const KUBE_MAX_BYTES: usize = 64 << 20;

/// A bundle under way: the start's items are in; the run's sink reports at the end.
struct BundleRun {
    bundle: Bundle,
    rx: mpsc::Receiver<RunRecord>,
    events: PathBuf,
    nodes: Vec<(String, Option<PathBuf>)>,
    about: String,
    /// How long the start's collection took.
    start_secs: f64,
}

impl BundleRun {
    /// Creates the bundle, takes the start's conntrack statistics (the baselines of what rises
    /// during the run) and adds the sink of the run's events to `sinks`.
    fn start(path: &Path, trace: &TraceArgs, about: &str, sinks: &mut Vec<Box<dyn Sink>>) -> anyhow::Result<Self> {
        let started = Instant::now();
        let mut bundle = Bundle::create(path)?;
        let nodes: Vec<(String, Option<PathBuf>)> = trace
            .tc
            .node_netns
            .iter()
            .map(|n| (n.node.clone(), n.path.clone()))
            .collect();
        let namespaces = node_state::namespaces(&nodes, &BTreeSet::new());
        collect(&mut bundle, |out| {
            node_state::collect_netns(&namespaces, Phase::Start, &|_| false, &BTreeMap::new(), out)
        })?;
        let events = bundle.events_path();
        let file = bundle::create_private(&events).map_err(|source| CaptureError::Create {
            path: events.clone(),
            source,
        })?;
        let (tx, rx) = mpsc::channel();
        sinks.push(Box::new(BundleEvents::new(
            BufWriter::with_capacity(256 * 1024, file),
            tx,
        )));
        Ok(Self {
            bundle,
            rx,
            events,
            nodes,
            about: about.to_string(),
            start_secs: started.elapsed().as_secs_f64(),
        })
    }

    /// The run failed: no bundle is left behind (a directory keeps what it got).
    fn abandon(self) {
        if self.events != self.bundle.path().join(bundle::EVENTS) {
            let _ = std::fs::remove_file(&self.events);
        }
        self.bundle.abandon();
    }

    /// The end: the node state of every namespace involved, the Kubernetes objects, the run's
    /// files, the manifest.
    async fn finish(
        mut self,
        opts: &CaptureOptions,
        kube: &KubeOptions,
        node: &str,
        watched: &dyn Fn(&str) -> bool,
    ) -> anyhow::Result<()> {
        let end = Instant::now();
        let run = self.rx.try_recv().ok();
        if run.is_none() {
            eprintln!("netdrop: the run ended without its summary: the bundle has no summary.json");
        }
        let run = run.unwrap_or_default();
        let mut seen = run.netns.clone();
        seen.extend(run.ifaces.keys());
        let namespaces = node_state::namespaces(&self.nodes, &seen);
        collect(&mut self.bundle, |out| {
            node_state::collect_netns(&namespaces, Phase::End, watched, &run.ifaces, out)
        })?;
        collect(&mut self.bundle, |out| node_state::collect_node(&opts.cni_dir, out))?;
        self.bundle.add_collected(kube_objects(kube).await)?;
        let file_len = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
        self.bundle.add_file(bundle::CAPTURE, &opts.file)?;
        self.bundle.items.push(bundle::run_file(
            bundle::CAPTURE,
            "netdrop capture",
            file_len(&opts.file),
            None,
        ));
        self.bundle.add_file(bundle::EVENTS, &self.events)?;
        self.bundle.items.push(bundle::run_file(
            bundle::EVENTS,
            "netdrop capture (JSON lines)",
            file_len(&self.events),
            None,
        ));
        if self.events != self.bundle.path().join(bundle::EVENTS) {
            let _ = std::fs::remove_file(&self.events);
        }
        if !run.summary.is_empty() {
            self.bundle.add(bundle::SUMMARY, run.summary.as_bytes())?;
            self.bundle.items.push(bundle::run_file(
                bundle::SUMMARY,
                "netdrop capture (final summary)",
                run.summary.len() as u64,
                None,
            ));
            self.bundle.add(bundle::ATTACH, run.attach.as_bytes())?;
            self.bundle.items.push(bundle::run_file(
                bundle::ATTACH,
                "netdrop capture (attach report)",
                run.attach.len() as u64,
                None,
            ));
        }
        let items = self.bundle.items.len();
        let failed = self.bundle.items.iter().filter(|i| i.failed()).count();
        let truncated = self.bundle.items.iter().filter(|i| i.truncated).count();
        let path = self.bundle.path().to_path_buf();
        let n_ns = namespaces.len();
        let manifest = bundle::manifest(node, &self.about, namespaces);
        let size = self.bundle.finish(manifest)?;
        eprintln!(
            "netdrop: bundle {}: {items} items from {n_ns} namespaces ({failed} failed or non-zero, {truncated} cut at a cap), {size} bytes; collected in {:.1} s at the start, {:.1} s at the end",
            path.display(),
            self.start_secs,
            end.elapsed().as_secs_f64(),
        );
        Ok(())
    }
}

/// The Kubernetes objects as a `--kube-snapshot` (listed within [`KUBE_TIMEOUT`], kept up to
/// [`KUBE_MAX_BYTES`]).
async fn kube_objects(kube: &KubeOptions) -> Collected {
    let t = Instant::now();
    let listed = tokio::time::timeout(KUBE_TIMEOUT, crate::resolve::snapshot_dump(kube)).await;
    let (bytes, error) = match listed {
        Err(_) => (
            None,
            Some(format!("listing timed out after {} s", KUBE_TIMEOUT.as_secs())),
        ),
        Ok(Ok(Some(json))) if json.len() > KUBE_MAX_BYTES => (
            None,
            Some(format!(
                "{} bytes of objects, over the cap of {} MiB: not kept (a cut list is no snapshot)",
                json.len(),
                KUBE_MAX_BYTES >> 20
            )),
        ),
        Ok(Ok(Some(json))) => (Some(json), None),
        Ok(Ok(None)) => (
            None,
            Some("no Kubernetes source (--no-kube, or none configured)".to_string()),
        ),
        Ok(Err(e)) => (None, Some(e.to_string())),
    };
    let mut entry = bundle::run_file(
        bundle::KUBE,
        "list pods,services,endpointslices,nodes (all namespaces; pods slimmed to what resolution reads)",
        bytes.as_ref().map_or(0, |b| b.len() as u64),
        error,
    );
    entry.duration_ms = u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX);
    Collected {
        entry,
        stdout: bytes.unwrap_or_default(),
        stderr: Vec::new(),
    }
}

/// Runs a collection into the bundle.
fn collect(
    bundle: &mut Bundle,
    f: impl FnOnce(
        &mut dyn FnMut(Collected) -> Result<(), node_state::NodeStateError>,
    ) -> Result<(), node_state::NodeStateError>,
) -> anyhow::Result<()> {
    let mut failed = None;
    let r = f(&mut |c| {
        bundle.add_collected(c).map_err(|e| {
            let io = std::io::Error::other(e.to_string());
            failed = Some(e);
            node_state::NodeStateError::Write(io)
        })
    });
    if let Some(e) = failed {
        return Err(e.into());
    }
    r.map_err(Into::into)
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
