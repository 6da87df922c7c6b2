//! `netdrop trace`: plan → probe → source → enrich → aggregate → sinks, until Ctrl-C, SIGTERM
//! or `--duration`. The select loop over the ring buffer, the timers and the signals is here;
//! the stages are in [`plan`], [`pipeline`], [`summarizer`] and [`targets`].

mod pipeline;
mod plan;
mod summarizer;
pub mod targets;

use std::{
    io::IsTerminal as _,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};
use tracing::warn;

use self::{
    pipeline::Pipeline,
    plan::{Plan, Timewait, is_too_large, plan},
    summarizer::Summarizer,
    targets::TargetMode,
};
use crate::{
    aggregate::attach::{AttachHook, AttachReport, Attached, DegradedMode, Fallback, Program},
    cli::{CtHookArg, Format, TraceArgs, TwHookArg},
    enrich::{
        classify::Classifier,
        decode::{self, Decoder},
        visibility::Visibility,
    },
    kernel::{KernelInfo, symbols::KernelSymbols},
    probe::{self, AttachOptions, DropProbe, PreciseHook},
    resolve::{Health, KubeOptions, Resolver},
    sink::{JsonSink, LiveTable, Sink, TextSink},
    source::{conntrack::CtSampler, counters::DropCounters},
};

/// How often the reader drains the ring buffer without a wakeup (the kernel wakes it early
/// only once `plan::WAKEUP_BYTES` are waiting): the longest an event waits to be shown.
const DRAIN_INTERVAL: Duration = Duration::from_millis(100);

pub async fn run(args: TraceArgs) -> anyhow::Result<()> {
    run_with(args, Vec::new()).await
}

/// A trace whose events and final summary also go to `extra` sinks (`capture` adds its file);
/// it stops early once one of them is [`Sink::done`].
#[expect(
    clippy::too_many_lines,
    reason = "attach, the select loop and the final summary in the order they happen; the stages live in plan, pipeline and summarizer"
)]
pub async fn run_with(args: TraceArgs, extra: Vec<Box<dyn Sink>>) -> anyhow::Result<()> {
    let kernel = KernelInfo::discover()?;
    let Plan {
        spec,
        mut config,
        conntrack_on,
        timewait,
        counts_only,
    } = plan(&args, &kernel)?;
    let mut report = AttachReport::default();
    if let Some(why) = counts_only {
        report.degrade(DegradedMode::CountsOnly, why);
    }
    let attach_opts = AttachOptions {
        hook: args.probe.hook.map(Into::into),
        ring_bytes: args.probe.ring_kib * 1024,
    };
    let mut probe = match probe::attach(&kernel, &config, attach_opts) {
        // The verifier's limit (1M instructions processed) is reached on some kernels (Debian
        // 6.1) by the per-drop effect decision: the same program without it, named.
        Err(e) if is_too_large(&e) => {
            config.effects = 0;
            report.degrade(DegradedMode::DropEffectsOff, e.to_string());
            probe::attach(&kernel, &config, attach_opts)?
        }
        r => r?,
    };
    report.attached(drop_hook(&probe, &args));
    report.attached(conntrack_hook(&mut probe, &kernel, conntrack_on, &args));
    report.attached(timewait_hook(&mut probe, timewait, &args));
    // Keys carry namespaces only where the program reads the skb; cookies where BTF has them.
    let mut counters = DropCounters::start(
        config.read_skb == 1,
        config.offsets.net_cookie != netdrop_common::ABSENT,
    );
    let kube = KubeOptions::from(&args.kube);
    let node = crate::resolve::node_name(&kube);
    let resolver = match Resolver::start(&kube).await {
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
        Some(TargetMode::start(
            &args.target,
            tc,
            &resolver,
            &mut probe,
            &node,
            &mut report,
        )?)
    } else {
        None
    };
    let symbols = Arc::new(load_symbols());
    let reasons = Arc::new(kernel.reasons.clone());
    let decoder = Decoder {
        reasons: reasons.clone(),
        symbols: symbols.clone(),
        clock_offset_ns: decode::clock_offset_ns(),
        node: node.clone(),
        conntrack: conntrack_on,
    };
    let sampler = if conntrack_on {
        // Baselines before the first drop, and before "attached" (callers start traffic on
        // that line): the summary reports rises over the whole run. Our namespace (or the
        // traced one), and the nodes named with --node-netns: their conntrack (a node's SNAT, a
        // resolved clash) counts from the start, not from their first drop.
        let mut initial = vec![spec.netns.unwrap_or_else(crate::kernel::netns::own_netns)];
        initial.extend(args.tc.node_netns.iter().filter_map(|n| {
            n.path
                .as_deref()
                .and_then(|p| std::fs::metadata(p).ok())
                .map(|m| std::os::unix::fs::MetadataExt::ino(&m) as u32)
        }));
        CtSampler::start(&initial).context("starting the conntrack sampler thread")?
    } else {
        CtSampler::idle()
    };
    for notice in report.notices() {
        eprintln!("netdrop: {notice}");
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
    let mut pipe = Pipeline::new(
        decoder,
        Visibility::new(&config, hide_teardown),
        Classifier::new(conntrack_on, sampler),
    );
    pipe.resolver = kube_on.then(|| resolver.clone());
    pipe.nodes_given = targets.as_ref().is_some_and(|t| t.nodes_given);
    let mut live_table = (targets.is_some() && std::io::stdout().is_terminal() && args.output != Some(Format::Json))
        .then(LiveTable::default);
    let format = match (args.output, &targets) {
        (Some(f), _) => f,
        // A target trace piped somewhere: JSON lines, as the table is for terminals.
        (None, Some(_)) if !std::io::stdout().is_terminal() => Format::Json,
        (None, _) => Format::Text,
    };
    pipe.sinks.push(match (format, &live_table) {
        (Format::Text, Some(live)) => Box::new(live.recent_sink()),
        (Format::Text, None) => Box::new(TextSink::for_stdout(stdout)),
        (Format::Json, _) => Box::new(JsonSink::new(stdout)),
    });
    pipe.sinks.extend(extra);

    let summarizer = Summarizer {
        reasons: reasons.clone(),
        symbols: symbols.clone(),
        node: node.clone(),
        attach: report,
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

    while !pipe.sinks.iter().any(|s| s.done()) {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting on the ring buffer")?;
                pipe.drain(guard.get_inner_mut())?;
                guard.clear_ready();
            }
            _ = tick.tick() => pipe.drain(ring.get_mut())?,
            _ = second.tick() => {
                let counts = counters.harvest(&mut probe).counts;
                if let Some(t) = &mut targets {
                    t.refresh(&resolver, &mut probe);
                    pipe.node_of = t.node_of();
                    if t.due() {
                        let summary = summarizer.summary_of(&counts, &pipe, started);
                        let svc = t.build(&summary, &pipe.node_of, started, false);
                        if let Some(live) = &mut live_table {
                            live.redraw(&svc)?;
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
    pipe.finish()?;

    let counts = counters.harvest(&mut probe).counts;
    if conntrack_on {
        // The final numbers, and baselines of namespaces seen only in the counters.
        for (key, _) in &counts.drops {
            if key.reason == config.netfilter_drop_reason {
                pipe.classifier.sampler().track(key.netns);
            }
        }
        pipe.classifier.sampler().sample_now(Duration::from_secs(5));
    }
    let summary = summarizer.summary_of(&counts, &pipe, started);
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
            summarizer.summary_of(&ours, &pipe, started)
        } else {
            summary
        });
        for s in &mut pipe.sinks {
            s.on_target_summary(&svc)?;
        }
        if let Some(live) = &live_table {
            // The table is the terminal's; the final one and the diagnosis stay on screen.
            print!("{}", live.final_text(&svc));
        }
        t.shutdown();
    } else {
        for s in &mut pipe.sinks {
            s.on_summary(&summary)?;
        }
    }
    Ok(())
}

/// The kernel's symbol table for naming drop locations; says in one line which capability is
/// missing when the kernel hides the addresses.
fn load_symbols() -> KernelSymbols {
    match KernelSymbols::load() {
        Ok(s) if s.is_empty() => {
            // The kernel shows every address as 0 to a reader without CAP_SYSLOG when
            // kptr_restrict is 1, or perf_event_paranoid > 1 (kallsyms_show_value()).
            let missing = crate::kernel::caps::Caps::effective().missing(&[crate::kernel::caps::Cap::Syslog]);
            if missing.is_empty() {
                warn!("/proc/kallsyms shows no addresses (kptr_restrict=2?): locations print as addresses");
            } else {
                warn!(
                    "netdrop needs CAP_SYSLOG to read kernel symbol addresses (/proc/kallsyms under kptr_restrict or perf_event_paranoid > 1): locations print as addresses; run it as root, or add CAP_SYSLOG"
                );
            }
            s
        }
        Ok(s) => s,
        Err(e) => {
            warn!("cannot read /proc/kallsyms ({e}): locations print as addresses");
            KernelSymbols::default()
        }
    }
}

fn fallbacks(tried: probe::Tried) -> Vec<Fallback> {
    tried
        .into_iter()
        .map(|(hook, error)| Fallback {
            hook: hook.into(),
            error,
        })
        .collect()
}

/// The drop hook the probe attached, and the tp_btf error when it fell back.
fn drop_hook(probe: &DropProbe, args: &TraceArgs) -> Attached {
    let mut a = Attached::new(Program::KfreeSkb, probe.hook);
    if let Some(error) = &probe.fallback {
        a = a.fallbacks(vec![Fallback {
            hook: AttachHook::TpBtf,
            error: error.clone(),
        }]);
    }
    match args.probe.hook {
        Some(h) => a.flag(h.flag()),
        None => a,
    }
}

/// Attaches the conntrack verdict hooks when conntrack classification is on.
fn conntrack_hook(probe: &mut DropProbe, kernel: &KernelInfo, on: bool, args: &TraceArgs) -> Attached {
    let off = Attached::new(Program::Conntrack, AttachHook::Off);
    match (&kernel.conntrack, on) {
        (Err(why), _) => off.why(why.clone()),
        (Ok(()), false) => match args.probe.ct_hook {
            Some(f) => off.flag(f.flag()),
            None => off,
        },
        (Ok(()), true) => {
            let (hook, tried) = probe::attach_conntrack(probe, args.probe.ct_hook.and_then(CtHookArg::hook));
            let a = Attached::new(Program::Conntrack, hook).fallbacks(fallbacks(tried));
            match args.probe.ct_hook {
                Some(f) => a.flag(f.flag()),
                None => a,
            }
        }
    }
}

/// How segments freed by TIME_WAIT sockets are told; attaches their hooks when planned.
fn timewait_hook(probe: &mut DropProbe, timewait: Timewait, args: &TraceArgs) -> Attached {
    let flag = args.probe.tw_hook.map(TwHookArg::flag);
    let a = match timewait {
        Timewait::RxSk => Attached::new(Program::Timewait, AttachHook::RxSk),
        Timewait::Flags(None) => Attached::new(Program::Timewait, AttachHook::Flags),
        Timewait::Flags(Some(why)) => Attached::new(Program::Timewait, AttachHook::Flags).why(why),
        Timewait::Hooks(want) => {
            let (hook, tried) = probe::attach_timewait(probe, want);
            let hook = match hook {
                PreciseHook::Inferred => AttachHook::Flags,
                h => h.into(),
            };
            Attached::new(Program::Timewait, hook).fallbacks(fallbacks(tried))
        }
    };
    match flag {
        Some(f) => a.flag(f),
        None => a,
    }
}
