//! `netdrop trace`: probe → decode → sinks, until Ctrl-C, SIGTERM or `--duration`.

pub mod targets;

use std::{
    collections::HashMap,
    io::IsTerminal as _,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use netdrop_common::Config;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};
use tracing::warn;

use netdrop_common::ct;

use crate::{
    aggregate::{self, SummaryContext, Visibility},
    cli::{CtHookArg, TraceArgs, TwHookArg},
    cmd::trace::targets::TargetMode,
    enrich::classify,
    enrich::decode::{self, Decoder},
    enrich::record::DropRecord,
    kernel::reasons::ReasonTable,
    kernel::symbols::KernelSymbols,
    probe::{self, AttachOptions, KernelInfo, PreciseHook},
    resolve::{Health, Proto, Resolver},
    sink::{Format, JsonSink, Sink, TextSink},
    source::conntrack::{CtMonitor, Evidence},
};

/// How often the reader drains the ring buffer without a wakeup (the kernel wakes it early
/// only once `WAKEUP_BYTES` are waiting): the longest an event waits to be shown.
const DRAIN_INTERVAL: Duration = Duration::from_millis(100);
const WAKEUP_BYTES: u32 = 256 * 1024;

pub async fn run(args: TraceArgs) -> anyhow::Result<()> {
    let kernel = KernelInfo::discover()?;
    let spec = args.filter.to_spec();
    let mut config = Config::DEFAULT;
    spec.apply(&mut config, &kernel.reasons)?;
    match kernel.offsets {
        Some(o) => {
            config.offsets = o;
            config.read_skb = 1;
        }
        None => {
            let why = kernel.btf_error.clone().unwrap_or_default();
            if spec.needs_packet() {
                return Err(probe::filter::FilterError::NeedsBtf(why).into());
            }
            eprintln!(
                "netdrop: degraded mode \"counts only\": no kernel BTF ({why}); drops are counted by reason and location, no per-packet events"
            );
        }
    }
    if let Some(tp) = kernel.tracepoint {
        config.tracepoint = tp;
    }
    config.btf_has_reason = u32::from(kernel.btf_has_reason);
    let conntrack_on = config.read_skb == 1 && kernel.conntrack.is_ok() && args.ct_hook != Some(CtHookArg::Off);
    config.conntrack = u32::from(conntrack_on);
    config.netfilter_drop_reason = kernel
        .reasons
        .lookup("NETFILTER_DROP")
        .unwrap_or(netdrop_common::ABSENT);
    // Without reasons (before 5.17) every drop is 0, and the TCP flags help classify all of them.
    config.not_specified_reason = kernel.reasons.not_specified().unwrap_or(netdrop_common::ABSENT);
    set_effect_reasons(&mut config, &kernel.reasons);
    // The kfree_skb program consults the precise hooks' marks only for NETFILTER_DROP.
    config.precise_conntrack = config.conntrack;
    let timewait = timewait_source(&kernel, &mut config, args.tw_hook)?;
    let cpus = aya::util::nr_cpus().map_or(1, |n| n.max(1)) as u32;
    config.events_per_cpu_sec = if args.event_rate == 0 {
        0
    } else {
        args.event_rate.div_ceil(cpus)
    };
    config.wakeup_bytes = WAKEUP_BYTES.min(args.ring_kib * 1024 / 4);
    config.addr_filter = u32::from(args.target.any());

    let attach_opts = AttachOptions {
        hook: args.hook,
        ring_bytes: args.ring_kib * 1024,
    };
    let mut probe = match probe::attach(&kernel, &config, attach_opts) {
        // The verifier's limit (1M instructions processed) is reached on some kernels (Debian
        // 6.1) by the per-drop effect decision: the same program without it, named.
        Err(e) if is_too_large(&e) => {
            config.effects = 0;
            eprintln!(
                "netdrop: drop effects off (lossless/reset discards counted as drops, effect \"unknown\"): this kernel's verifier refused the full program ({e})"
            );
            probe::attach(&kernel, &config, attach_opts)?
        }
        r => r?,
    };
    let ct_hook = match (&kernel.conntrack, conntrack_on) {
        (Err(why), _) => {
            eprintln!("netdrop: conntrack classification off: {why}");
            "off"
        }
        (Ok(()), false) => "off",
        (Ok(()), true) => {
            let want = args.ct_hook.and_then(CtHookArg::hook);
            let (hook, why) = probe::attach_conntrack(&mut probe, want);
            match hook {
                PreciseHook::Fexit => eprintln!("netdrop: conntrack verdicts via fexit (exact)"),
                PreciseHook::Kprobe => eprintln!(
                    "netdrop: conntrack verdicts via kprobe (exact; {})",
                    why.unwrap_or_default()
                ),
                PreciseHook::Inferred => eprintln!(
                    "netdrop: conntrack classification inferred from conntrack state and statistics ({})",
                    why.unwrap_or_else(|| "--ct-hook inferred".into())
                ),
            }
            hook.name()
        }
    };
    let timewait_hook = match timewait {
        Timewait::RxSk => "rx_sk",
        Timewait::Flags => "flags",
        Timewait::Hooks(want) => match probe::attach_timewait(&mut probe, want) {
            (PreciseHook::Inferred, why) => {
                timewait_by_flags(&why.unwrap_or_default());
                "flags"
            }
            (hook, _) => hook.name(),
        },
    };
    let node = crate::resolve::node_name(&args.kube);
    let resolver = match Resolver::start(&args.kube).await {
        Ok(r) => r,
        Err(e) => return Err(e.into()),
    };
    let kube_on = !matches!(resolver.status().health, Health::Off);
    if kube_on {
        // Resolve the first drops too: wait briefly for the first lists (the trace runs anyway).
        if !resolver.wait_synced(Duration::from_secs(5)).await {
            eprintln!(
                "netdrop: kubernetes not synced yet ({}); tracing anyway, names appear once it is",
                resolver.status()
            );
        }
    }
    let mut targets = if args.target.any() {
        if !kube_on {
            anyhow::bail!(
                "--svc/--pod/--node/--namespace need Kubernetes: pass --kubeconfig FILE or --kube-snapshot FILE"
            );
        }
        let tc = (!args.no_tc).then_some(&args.tc);
        Some(TargetMode::start(&args.target, tc, &resolver, &mut probe, &node)?)
    } else {
        None
    };
    let symbols = Arc::new(KernelSymbols::load().unwrap_or_else(|e| {
        warn!("cannot read /proc/kallsyms ({e}): locations print as addresses");
        KernelSymbols::default()
    }));
    let reasons = Arc::new(kernel.reasons.clone());
    let decoder = Decoder {
        reasons: reasons.clone(),
        symbols: symbols.clone(),
        clock_offset_ns: decode::clock_offset_ns(),
        node: node.clone(),
        conntrack: conntrack_on,
    };
    let mut monitor = CtMonitor::new();
    if conntrack_on {
        // Baselines before the first drop, and before "attached" (callers start traffic on
        // that line): the summary reports rises over the whole run.
        monitor.track(spec.netns.unwrap_or_else(crate::source::conntrack::own_netns));
        // And the nodes named with --node-netns: their conntrack (a node's SNAT, a resolved
        // clash) counts from the start, not from their first drop.
        for n in &args.tc.node_netns {
            if let Some(inode) = n
                .path
                .as_deref()
                .and_then(|p| std::fs::metadata(p).ok())
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m) as u32)
            {
                monitor.track(inode);
            }
        }
    }
    if let Some(why) = &probe.fallback {
        eprintln!("netdrop: tp_btf/kfree_skb not usable ({why}); using the tracepoint fallback");
    }
    eprintln!(
        "netdrop: attached {} on {} (kernel {}; {} drop reasons from {:?})",
        probe.hook.name(),
        node,
        kernel.release,
        reasons.iter().count(),
        reasons.source()
    );

    let stdout = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout());
    let hide_teardown = !spec.all_reasons && spec.reasons.is_empty();
    let mut pipe = Pipeline {
        decoder,
        visibility: Visibility::new(&config, hide_teardown, symbols.clone()),
        monitor,
        conntrack: conntrack_on,
        resolver: kube_on.then(|| resolver.clone()),
        sinks: Vec::new(),
        shown: 0,
        node_of: HashMap::new(),
        nodes_given: targets.as_ref().is_some_and(|t| t.nodes_given),
    };
    let live_table = targets.is_some() && std::io::stdout().is_terminal() && args.output != Some(Format::Json);
    let format = match (args.output, &targets) {
        (Some(f), _) => f,
        // A target trace piped somewhere: JSON lines, as the table is for terminals.
        (None, Some(_)) if !std::io::stdout().is_terminal() => Format::Json,
        (None, _) => Format::Text,
    };
    pipe.sinks.push(match (format, live_table) {
        (Format::Text, true) => Box::new(crate::sink::RecentSink::new(
            targets.as_ref().map(|t| t.recent.clone()).unwrap_or_default(),
        )),
        (Format::Text, false) => Box::new(TextSink::for_stdout(stdout)),
        (Format::Json, _) => Box::new(JsonSink::new(stdout)),
    });

    let summarizer = Summarizer {
        reasons: reasons.clone(),
        symbols: symbols.clone(),
        node: node.clone(),
        hook: probe.hook.name(),
        ct_hook,
        timewait_hook,
        conntrack: conntrack_on,
        netfilter_drop_reason: config.netfilter_drop_reason,
    };
    // Namespace → node before the first event: drops in the first second are on a node too.
    if let Some(t) = &mut targets {
        t.refresh(&resolver, &mut probe);
        pipe.node_of = t.node_of();
    }
    let ring = probe.events.take().context("ring buffer already taken")?;
    // SAFETY: the RingBuf owns its map fd and keeps it open, unchanged, until it is dropped,
    // which happens only when the AsyncFd is.
    let mut ring = unsafe { AsyncFd::register(ring) }
        .map_err(|e| anyhow::anyhow!("registering the ring buffer with tokio: {e}"))?;
    let started = Instant::now();
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let deadline = async {
        match args.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(DRAIN_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut second = tokio::time::interval(Duration::from_secs(1));
    second.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting on the ring buffer")?;
                pipe.drain(guard.get_inner_mut())?;
                guard.clear_ready();
            }
            _ = tick.tick() => pipe.drain(ring.get_mut())?,
            _ = second.tick() => {
                pipe.monitor.sample_all();
                if let Some(t) = &mut targets {
                    t.refresh(&resolver, &mut probe);
                    pipe.node_of = t.node_of();
                    if t.due() {
                        let summary = summarizer.summary(&probe, &mut pipe, started);
                        let svc = t.build(&summary, &pipe.node_of, started, false);
                        if live_table {
                            t.redraw(&svc)?;
                        } else {
                            for s in &mut pipe.sinks {
                                s.on_target_summary(&svc)?;
                            }
                        }
                    }
                }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            () = &mut deadline => break,
        }
    }
    pipe.drain(ring.get_mut())?;

    let counts = probe.counts();
    let summary = summarizer.summary_of(&counts, &mut pipe, started);
    if let Some(t) = &mut targets {
        let mut svc = t.build(&summary, &pipe.node_of, started, true);
        // The full drop summary as the target's: with the nodes named, without the namespaces of
        // none of them (counted as `other_namespaces`), as their drops are no events either.
        svc.detail = Some(if pipe.nodes_given {
            let ours = probe::KernelCounts {
                drops: counts
                    .drops
                    .iter()
                    .filter(|(k, _)| pipe.node_of.contains_key(&k.netns))
                    .copied()
                    .collect(),
                stats: counts.stats,
            };
            summarizer.summary_of(&ours, &mut pipe, started)
        } else {
            summary
        });
        for s in &mut pipe.sinks {
            s.on_target_summary(&svc)?;
        }
        if live_table {
            // The table is the terminal's; the final one and the diagnosis stay on screen.
            print!("{}", t.final_text(&svc));
        }
        t.shutdown();
    } else {
        for s in &mut pipe.sinks {
            s.on_summary(&summary)?;
        }
    }
    Ok(())
}

/// The verifier gave up on the program's size (`E2BIG`, "BPF program is too large").
fn is_too_large(e: &probe::ProbeError) -> bool {
    let text = format!("{e}");
    text.contains("too large") || text.contains("Argument list too long")
}

/// How segments a TIME_WAIT socket answered and freed are told from drops.
enum Timewait {
    /// The `kfree_skb` tracepoint's receiving socket is in TIME_WAIT (6.11+).
    RxSk,
    /// Marks from hooks on `tcp_timewait_state_process` (`None`: fexit, else kprobes).
    Hooks(Option<PreciseHook>),
    /// FIN/RST flags only.
    Flags,
}

/// Picks the way to tell timewait segments and sets the config for it; `--tw-hook` forces one.
fn timewait_source(kernel: &KernelInfo, config: &mut Config, want: Option<TwHookArg>) -> anyhow::Result<Timewait> {
    let rx_sk = config.read_skb == 1 && kernel.has_rx_sk();
    let source = match want {
        None | Some(TwHookArg::RxSk) if rx_sk => Timewait::RxSk,
        Some(TwHookArg::RxSk) => {
            anyhow::bail!(
                "--tw-hook rx-sk: this kernel's kfree_skb passes no receiving socket (Linux 6.11+); use fexit or kprobe"
            )
        }
        Some(TwHookArg::Flags) => Timewait::Flags,
        _ if config.read_skb == 0 => Timewait::Flags,
        None => Timewait::Hooks(None),
        Some(TwHookArg::Fexit) => Timewait::Hooks(Some(PreciseHook::Fexit)),
        Some(TwHookArg::Kprobe) => Timewait::Hooks(Some(PreciseHook::Kprobe)),
    };
    // The receiving socket is read whenever the kernel passes it (the drop's namespace, a
    // LISTEN socket's reset); it tells TIME_WAIT segments only when chosen for that.
    config.btf_has_rx_sk = u32::from(rx_sk && kernel.btf_has_rx_sk);
    if !rx_sk {
        config.tracepoint.rx_sk = netdrop_common::ABSENT;
    }
    config.rx_sk_timewait = u32::from(matches!(source, Timewait::RxSk));
    if let Timewait::Hooks(_) = source {
        match &kernel.timewait {
            Ok(f) => {
                config.timewait_marks = 1;
                config.tw_syn_status = f.syn_status;
            }
            Err(why) => {
                timewait_by_flags(why);
                return Ok(Timewait::Flags);
            }
        }
    }
    Ok(source)
}

/// The reasons the kernel program needs to tell what a drop cost (`netdrop_common::effect`).
fn set_effect_reasons(config: &mut Config, reasons: &ReasonTable) {
    let absent = netdrop_common::ABSENT;
    // Data the receiver already had: entirely below `rcv_nxt` (OLD_DATA) or `rcv_wup`
    // (OLD_SEQUENCE), already in the out-of-order queue (OFOMERGE), or an old duplicate by its
    // timestamp (PAWS).
    let stale = [
        "TCP_OLD_DATA",
        "TCP_OLD_SEQUENCE",
        "TCP_OFOMERGE",
        "TCP_RFC7323_PAWS",
        "TCP_RFC7323_PAWS_ACK",
    ];
    for (slot, name) in config.stale_reasons.iter_mut().zip(stale) {
        *slot = reasons.lookup(name).unwrap_or(absent);
    }
    // A bare ACK out of the window or acknowledging old data is stale; with data the same
    // reasons lose the data (the sender retransmits it).
    let stale_ack = [
        "TCP_INVALID_SEQUENCE",
        "TCP_OLD_ACK",
        "TCP_TOO_OLD_ACK",
        "TCP_INVALID_ACK_SEQUENCE",
    ];
    for (slot, name) in config.stale_ack_reasons.iter_mut().zip(stale_ack) {
        *slot = reasons.lookup(name).unwrap_or(absent);
    }
    config.set_stale_bits();
    config.tcp_flags_reason = reasons.lookup("TCP_FLAGS").unwrap_or(absent);
    config.no_socket_reason = reasons.lookup("NO_SOCKET").unwrap_or(absent);
}

/// The degraded mode when no socket-aware way works.
fn timewait_by_flags(why: &str) {
    eprintln!("netdrop: segments freed by TIME_WAIT sockets told by TCP flags only, a bare ACK stays visible ({why})");
}

/// Builds summaries from the kernel's counters (at exit, and each second for target traces).
struct Summarizer {
    reasons: Arc<ReasonTable>,
    symbols: Arc<KernelSymbols>,
    node: String,
    hook: &'static str,
    ct_hook: &'static str,
    timewait_hook: &'static str,
    conntrack: bool,
    netfilter_drop_reason: u32,
}

impl Summarizer {
    fn summary(&self, probe: &probe::DropProbe, pipe: &mut Pipeline, started: Instant) -> aggregate::Summary {
        self.summary_of(&probe.counts(), pipe, started)
    }

    fn summary_of(&self, counts: &probe::KernelCounts, pipe: &mut Pipeline, started: Instant) -> aggregate::Summary {
        if self.conntrack {
            for (key, _) in &counts.drops {
                if key.reason == self.netfilter_drop_reason {
                    pipe.monitor.track(key.netns);
                }
            }
        }
        let ct_report = if self.conntrack {
            pipe.monitor.report()
        } else {
            Vec::new()
        };
        let monitor = &pipe.monitor;
        let classify_row = |k: &netdrop_common::DropKey| {
            let reason = self.reasons.display(k.reason).to_string();
            let function = self.symbols.function(k.location);
            classify::classify(&reason, function, k.ct_state, k.exact_class, &monitor.over_run(k.netns))
        };
        let ctx = SummaryContext {
            reasons: &self.reasons,
            symbols: &self.symbols,
            visibility: &pipe.visibility,
            node: &self.node,
            hook: self.hook,
            conntrack_hook: self.ct_hook,
            timewait_hook: self.timewait_hook,
            classify: &classify_row,
            conntrack: ct_report,
        };
        aggregate::summarize(counts, &ctx, started.elapsed().as_secs_f64(), pipe.shown)
    }
}

/// decode → classify → sinks, for each event the kernel sent.
struct Pipeline {
    decoder: Decoder,
    visibility: Visibility,
    monitor: CtMonitor,
    conntrack: bool,
    /// Kubernetes names for addresses, when resolution is on.
    resolver: Option<Resolver>,
    sinks: Vec<Box<dyn Sink>>,
    shown: u64,
    /// Node of each network namespace (node namespaces and their pods'), for multi-node traces.
    node_of: HashMap<u32, String>,
    /// Nodes were named (`--node-netns`): events in namespaces of none of them are another
    /// cluster's on this host and are left out, as the target summary leaves their counts out.
    nodes_given: bool,
}

impl Pipeline {
    /// Reads every waiting event.
    fn drain(&mut self, ring: &mut RingBuf<MapData>) -> anyhow::Result<()> {
        let mut n = 0;
        while let Some(item) = ring.next() {
            let ev = decode::parse_event(&item)?;
            drop(item);
            let ip_version = match (ev.header_len, ev.l3_proto) {
                (0, _) => 0,
                (_, 0x0800) => 4,
                _ => 6,
            };
            if self
                .visibility
                .is_hidden(ev.reason, ip_version, ev.location, ev.exact_class)
            {
                continue;
            }
            if self.nodes_given && !self.node_of.contains_key(&ev.netns) {
                continue;
            }
            let mut record = self.decoder.decode(&ev);
            if let Some(n) = self.node_of.get(&ev.netns) {
                record.node.clone_from(n);
            }
            self.classify(&mut record, ev.netns, ev.ts_ns);
            if let Some(r) = &self.resolver {
                resolve_record(r, &mut record);
            }
            for s in &mut self.sinks {
                s.on_drop(&record)?;
            }
            n += 1;
        }
        if n > 0 {
            for s in &mut self.sinks {
                s.flush()?;
            }
        }
        self.shown += n;
        Ok(())
    }

    fn classify(&mut self, r: &mut DropRecord, netns: u32, at_ns: u64) {
        let function = self.decoder.symbols.function(r.raw.location);
        // Statistics are read only when the packet itself cannot tell.
        let needs_evidence = self.conntrack
            && r.reason == "NETFILTER_DROP"
            && r.raw.exact_class == 0
            && !function
                .is_some_and(|f| classify::RULE_ENGINES.contains(&f) && r.raw.ct_state & ct::STATE_MASK != ct::NONE);
        let evidence = if needs_evidence {
            self.monitor.around(netns, at_ns)
        } else {
            Evidence::default()
        };
        (r.classification, r.certainty) =
            classify::classify(&r.reason, function, r.raw.ct_state, r.raw.exact_class, &evidence);
    }
}

/// This node's name: `flag` (`--node-name`/`$NODE_NAME`), else the hostname.
pub fn node_name(flag: Option<&str>) -> String {
    crate::resolve::node_name(&crate::resolve::KubeArgs {
        node_name: flag.map(String::from),
        ..Default::default()
    })
}

/// Names both ends (and the pre-NAT ends) of a drop.
pub fn resolve_record(r: &Resolver, d: &mut DropRecord) {
    let proto = match d.protocol.as_str() {
        "tcp" => Some(Proto::Tcp),
        "udp" => Some(Proto::Udp),
        "sctp" => Some(Proto::Sctp),
        _ => None,
    };
    for e in [&mut d.src, &mut d.dst, &mut d.orig_src, &mut d.orig_dst]
        .into_iter()
        .flatten()
    {
        let port = e.port.zip(proto);
        e.k8s = Some(r.lookup_opt(e.ip, port));
    }
}

/// `netdrop reasons`.
pub fn reasons(args: &crate::cli::ReasonsArgs) -> anyhow::Result<()> {
    use std::io::Write as _;
    let kernel = KernelInfo::discover()?;
    let t = &kernel.reasons;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    match args.output {
        Format::Json => {
            let list: Vec<_> = t
                .iter()
                .map(|(code, name)| {
                    serde_json::json!({"code": code, "name": name, "hidden_by_default": classify::is_benign(name)})
                })
                .collect();
            let doc = serde_json::json!({"kernel": kernel.release, "source": t.source(), "reasons": list});
            writeln!(out, "{doc}")?;
        }
        Format::Text => {
            writeln!(
                out,
                "drop reasons of kernel {} (from {:?}); * = benign, hidden by default",
                kernel.release,
                t.source()
            )?;
            for (code, name) in t.iter() {
                let mark = if classify::is_benign(name) { "*" } else { " " };
                writeln!(out, "{code:>8} {mark} {name}")?;
            }
        }
    }
    out.flush()?;
    Ok(())
}
