//! `netdrop agent`: the node's always-on counter (a DaemonSet). The trace's start-up and event
//! pipeline ([`super::session`]) with the kernel program counting every drop and tagging the
//! observed Services' packets (`addr_mode::TAG`); the observed Services followed as they come,
//! change and go ([`super::targets::TargetMode::many`]); each scrape answered with a fresh
//! harvest of the kernel's counters ([`NodeMetrics`], exact at scrape time); `/healthz` beaten
//! every loop turn, `/readyz` once the programs are attached and the resolver synced.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::SocketAddr,
    os::unix::fs::MetadataExt as _,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use netdrop_common::addr_mode;
use tokio::{
    io::unix::AsyncFd,
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::warn;

use super::{
    recorder::{Cause, FlightRecorder},
    session::{Session, SessionArgs, pipeline::Pipeline, summarizer::Summarizer},
    targets::TargetMode,
    trace::DRAIN_INTERVAL,
};
use crate::{
    aggregate::{
        node_metrics::{self, ConntrackCounts, NodeDrop, NodeInputs, NodeMetrics, PodOwner, Scope},
        target_set::TargetSpec,
    },
    cli::{AgentArgs, EventsFormat, FilterArgs},
    probe::{DropProbe, KernelCounts},
    resolve::{Health, Resolver},
    sink::{
        JsonSink,
        metrics::{DumpRequest, Exporter, MetricsOptions, SnapshotRequest},
    },
};

/// Errors of `netdrop agent` before it runs.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// `--listen` cannot be bound (in use, not an address of this host, no permission). The
    /// reason is kept as text: tokio's error repeats itself as its own source.
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: SocketAddr, reason: String },
}

#[expect(
    clippy::too_many_lines,
    reason = "start-up, the select loop and the shutdown in the order they happen; the snapshot is Agent::metrics"
)]
pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    // First: a SIGTERM while starting (a rollout) is seen once the loop runs, and ends it
    // cleanly, rather than killing the process half attached.
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigusr1 = signal(SignalKind::user_defined1()).context("installing the SIGUSR1 handler")?;
    // Before anything is attached: a port in use is one line and nothing to undo.
    let mut listeners = Vec::new();
    for addr in &args.listen {
        let l = TcpListener::bind(addr).await.map_err(|e| AgentError::Listen {
            addr: *addr,
            reason: e.to_string(),
        })?;
        listeners.push(l);
    }
    let mut exporter = Exporter::new(
        MetricsOptions {
            pod_names: args.pod_names,
            gone_after: args.gone_after,
            ..MetricsOptions::default()
        },
        env!("CARGO_PKG_VERSION"),
    );
    let health = exporter.health();
    health.set_ready(false, "attaching the kernel programs");
    let (snapshots_tx, mut snapshots) = mpsc::channel::<SnapshotRequest>(8);
    let (dumps_tx, mut dumps) = mpsc::channel::<DumpRequest>(4);
    let node_name = crate::resolve::node_name(&crate::resolve::KubeOptions::from(&args.kube));
    let mut recorder = FlightRecorder::new(&args.recorder, &node_name);
    if recorder.is_some() {
        exporter = exporter.with_recorder(dumps_tx);
    }
    let server = tokio::spawn(exporter.serve(listeners, snapshots_tx));

    let filter = FilterArgs::default();
    let session_args = SessionArgs {
        filter: &filter,
        probe: &args.probe,
        kube: &args.kube,
        node_netns: &args.tc.node_netns,
        addr_filter: addr_mode::TAG,
    };
    let mut session = Session::start(&session_args).await?;
    let mut targets = TargetMode::many(&args.tc, &session.node, &mut session.report);
    // Benign frees (socket teardown) are counted and not exported, as summaries hide them.
    let (mut pipe, summarizer) = session.pipeline(&session_args, true)?;
    let Session {
        mut probe,
        mut counters,
        resolver,
        node,
        kube_on,
        ..
    } = session;
    pipe.nodes_given = targets.nodes_given;
    if args.events == Some(EventsFormat::Json) {
        let stdout = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout());
        pipe.sinks.push(Box::new(JsonSink::new(stdout)));
    }
    if let Some(r) = &recorder {
        pipe.sinks.push(Box::new(r.recorder.sink()));
    }
    let node_netns = match args.tc.node_netns.iter().find(|n| n.node == node) {
        Some(n) => n
            .path
            .as_deref()
            .and_then(|p| std::fs::metadata(p).ok())
            .map_or_else(crate::kernel::netns::own_netns, |m| m.ino() as u32),
        None => crate::kernel::netns::own_netns(),
    };
    if !kube_on && (!args.observe.is_empty() || args.observe_all) {
        warn!(
            "--observe and --observe-all need Kubernetes (in-cluster, --kubeconfig or --kube-snapshot): no Service is observed"
        );
    }
    // Attached: from now on readiness is Kubernetes' (each loop second after this).
    let (ready, why) = readiness(kube_on, &resolver);
    health.set_ready(ready, &why);
    let mut agent = Agent {
        observe: args.observe_names(),
        observe_all: args.observe_all,
        max_services: args.max_services,
        warned: BTreeSet::new(),
        node,
        node_netns,
        kube_on,
        started: Instant::now(),
        pod_netns: HashSet::new(),
    };
    agent.follow(&mut targets, &resolver, &mut probe);
    pipe.node_of = targets.node_of();

    let ring = probe.events.take().context("ring buffer already taken")?;
    // SAFETY: the RingBuf owns its map fd and keeps it open, unchanged, until it is dropped,
    // which happens only when the AsyncFd is.
    let mut ring = unsafe { AsyncFd::register(ring) }
        .map_err(|e| anyhow::anyhow!("registering the ring buffer with tokio: {e}"))?;
    let mut tick = tokio::time::interval(DRAIN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut second = tokio::time::interval(Duration::from_secs(1));
    second.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    eprintln!(
        "netdrop: agent on {} serving {}",
        agent.node,
        args.listen
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );

    loop {
        health.beat();
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting on the ring buffer")?;
                pipe.drain(guard.get_inner_mut())?;
                guard.clear_ready();
            }
            _ = tick.tick() => pipe.drain(ring.get_mut())?,
            _ = second.tick() => {
                agent.follow(&mut targets, &resolver, &mut probe);
                pipe.node_of = targets.node_of();
                // Folds the counts of evicted namespaces in between scrapes too.
                counters.harvest(&mut probe);
                let (ready, why) = readiness(agent.kube_on, &resolver);
                health.set_ready(ready, &why);
                if let Some(r) = &mut recorder
                    && let Some(cause) = r.check_trigger()
                {
                    let counts = counters.harvest(&mut probe).counts;
                    let summary = summarizer.summary_of(&counts, &pipe, agent.started);
                    r.write_file(cause, r.dump(cause, Some(&summary)));
                }
            }
            Some(reply) = dumps.recv(), if recorder.is_some() => {
                if let Some(r) = &recorder {
                    // Up to the request: what the kernel sent and is not read yet.
                    pipe.drain(ring.get_mut())?;
                    let counts = counters.harvest(&mut probe).counts;
                    let summary = summarizer.summary_of(&counts, &pipe, agent.started);
                    let _ = reply.send(r.dump(Cause::Http, Some(&summary)));
                }
            }
            _ = sigusr1.recv() => {
                if let Some(r) = &recorder {
                    pipe.drain(ring.get_mut())?;
                    let counts = counters.harvest(&mut probe).counts;
                    let summary = summarizer.summary_of(&counts, &pipe, agent.started);
                    r.write_file(Cause::Signal, r.dump(Cause::Signal, Some(&summary)));
                } else {
                    warn!("SIGUSR1: the flight recorder is off (--recorder-events 0 or --recorder-bytes 0)");
                }
            }
            req = snapshots.recv() => {
                let Some(reply) = req else { break };
                targets.refresh(&resolver, &mut probe);
                pipe.node_of = targets.node_of();
                let (ready, why) = readiness(agent.kube_on, &resolver);
                health.set_ready(ready, &why);
                let counts = counters.harvest(&mut probe).counts;
                let m = agent.metrics(&counts, &pipe, &summarizer, &targets, &resolver, ready);
                let _ = reply.send(m);
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    health.set_ready(false, "shutting down");
    pipe.drain(ring.get_mut())?;
    pipe.finish()?;
    targets.shutdown();
    server.abort();
    drop(probe);
    drop(counters);
    eprintln!("netdrop: agent stopped; programs and tc filters detached");
    Ok(())
}

/// Ready once the programs are attached (they are, when this is asked) and the resolver synced
/// (or resolution is off); otherwise not, and why.
fn readiness(kube_on: bool, r: &Resolver) -> (bool, String) {
    if !kube_on {
        return (true, String::new());
    }
    match r.status().health {
        // Stale: synced, then the API went away; names come from the last known state.
        Health::Synced | Health::Snapshot | Health::Stale => (true, String::new()),
        _ => (false, format!("kubernetes: {}", r.status())),
    }
}

/// The agent's state between loop turns.
struct Agent {
    /// `--observe`.
    observe: Vec<(String, String)>,
    observe_all: bool,
    max_services: usize,
    /// Services already warned about (not found, over the cap), each said once.
    warned: BTreeSet<String>,
    node: String,
    /// This node's own network namespace (its conntrack table).
    node_netns: u32,
    kube_on: bool,
    started: Instant,
    /// Network namespaces seen as this node's pods', kept while the counters hold them.
    pod_netns: HashSet<u32>,
}

impl Agent {
    /// The Services to observe now: `--observe`, the annotated ones (every one with
    /// `--observe-all`), at most `--max-services`; the kernel filter and tc destinations follow.
    fn follow(&mut self, targets: &mut TargetMode, r: &Resolver, probe: &mut DropProbe) {
        let mut names: Vec<(String, String)> = self.observe.clone();
        for n in r.observed_services(self.observe_all) {
            if !names.contains(&n) {
                names.push(n);
            }
        }
        for (ns, name) in &self.observe {
            if self.kube_on && r.status().health != Health::Syncing && r.service(ns, name).is_none() {
                let key = format!("{ns}/{name}");
                if self.warned.insert(key.clone()) {
                    warn!("--observe {key}: no such Service (yet); observed once it exists");
                }
            }
        }
        if names.len() > self.max_services {
            let key = format!("cap:{}", names.len());
            if self.warned.insert(key) {
                warn!(
                    "{} Services to observe, --max-services {}: not observed: {}",
                    names.len(),
                    self.max_services,
                    names[self.max_services..]
                        .iter()
                        .map(|(ns, n)| format!("{ns}/{n}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            names.truncate(self.max_services);
        }
        let specs: Vec<TargetSpec> = names
            .into_iter()
            .map(|(namespace, name)| TargetSpec::Svc { namespace, name })
            .collect();
        targets.set_specs(&specs, r, probe);
    }

    /// The node's snapshot from the counters just harvested.
    fn metrics(
        &mut self,
        counts: &KernelCounts,
        pipe: &Pipeline,
        summarizer: &Summarizer,
        targets: &TargetMode,
        r: &Resolver,
        ready: bool,
    ) -> NodeMetrics {
        // Exact conntrack numbers at scrape time (the sampler reads /proc on its thread).
        pipe.classifier.sampler().track(self.node_netns);
        pipe.classifier.sampler().sample_now(Duration::from_millis(500));
        let summary = summarizer.summary_of(counts, pipe, self.started);
        let node_of = &pipe.node_of;
        let mut pods: HashMap<u32, PodOwner> = HashMap::new();
        if let Some(snap) = targets.snapshot() {
            for i in &snap.interfaces {
                let Some(netns) = i.peer_netns else { continue };
                let peer = r.lookup_ifname(&i.name).or_else(|| r.lookup_netns(u64::from(netns)));
                if let Some(p) = peer
                    && let (Some(ns), Some(pod)) = (&p.namespace, &p.pod)
                {
                    pods.insert(
                        netns,
                        PodOwner {
                            namespace: ns.as_str().to_string(),
                            workload: p.workload.as_ref().map(|w| w.as_str().to_string()),
                            pod: pod.as_str().to_string(),
                        },
                    );
                }
            }
        }
        // Namespaces that were pods' and are gone, while the counters still hold them.
        self.pod_netns.extend(pods.keys().copied());
        let counted: HashSet<u32> = counts.drops.iter().map(|(k, _)| k.netns).collect();
        self.pod_netns.retain(|n| pods.contains_key(n) || counted.contains(n));
        let gone: HashSet<u32> = self
            .pod_netns
            .iter()
            .copied()
            .filter(|n| !pods.contains_key(n))
            .collect();
        let scope = Scope {
            node_of,
            pods: &pods,
            gone: &gone,
            node: &self.node,
            nodes_given: targets.nodes_given,
        };
        let drops: Vec<NodeDrop> = counts
            .drops
            .iter()
            .filter(|(_, n)| *n > 0)
            .filter_map(|(k, n)| {
                let location = summarizer.symbols.locate(k.location);
                if pipe
                    .visibility
                    .is_hidden(k.reason, k.ip_version, location.function(), k.exact_class)
                {
                    return None;
                }
                let (classification, _) = summarizer.classify(pipe, k, location.function());
                Some(NodeDrop {
                    netns: k.netns,
                    reason: summarizer.reasons.display(k.reason).to_string(),
                    classification,
                    count: *n,
                })
            })
            .collect();
        // Each Service's part from this node's rows only: another node's are its agent's.
        let mut ours = summary.clone();
        ours.drops.retain(|row| scope.holds(row.netns));
        let parts: Vec<((String, String), _)> = targets
            .build_parts(&ours, node_of, self.started)
            .into_iter()
            .filter_map(|(spec, part)| match spec {
                TargetSpec::Svc { namespace, name } => Some(((namespace.clone(), name.clone()), part)),
                _ => None,
            })
            .collect();
        let conntrack = summary
            .conntrack
            .iter()
            .find(|c| c.netns == self.node_netns)
            .map(|c| ConntrackCounts {
                entries: c.count,
                max: c.max,
                insert_failed: c.insert_failed,
                drop: c.drop,
                early_drop: c.early_drop,
                invalid: c.invalid,
                clash_resolve: c.clash_resolve,
            });
        let interfaces_attached = targets.snapshot().map_or(0, |s| s.interfaces.len() as u64);
        node_metrics::build(&NodeInputs {
            scope,
            drops: &drops,
            parts: &parts,
            conntrack,
            stats: &counts.stats,
            interfaces_attached,
            attach: &summarizer.attach,
            ready,
        })
    }
}
