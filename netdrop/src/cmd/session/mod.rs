//! The start-up every command that runs the kernel programs shares (`trace`, `capture`,
//! `agent`): kernel discovery, the plan, attaching (with the verifier fallback) and the attach
//! report, the drop counters, the resolver; then the decoder, the conntrack sampler and the event
//! pipeline. Commands put their own steps between the two halves (`trace` starts its target
//! there) and run their own loop.

pub(crate) mod pipeline;
pub(crate) mod plan;
pub(crate) mod summarizer;

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use netdrop_common::Config;
use tracing::warn;

use self::{
    pipeline::Pipeline,
    plan::{Plan, Timewait, is_too_large, plan},
    summarizer::Summarizer,
};
use crate::{
    aggregate::attach::{AttachHook, AttachReport, Attached, DegradedMode, Fallback, Program},
    cli::{CtHookArg, FilterArgs, KubeArgs, ProbeArgs, TwHookArg},
    enrich::{
        classify::Classifier,
        decode::{self, Decoder},
        visibility::Visibility,
    },
    kernel::{KernelInfo, symbols::KernelSymbols},
    probe::{self, AttachOptions, DropProbe, PreciseHook, filter::FilterSpec},
    resolve::{Health, KubeOptions, Resolver},
    source::{conntrack::CtSampler, counters::DropCounters, interfaces::NodeNetns},
};

/// What the session's start-up reads from the command's flags.
pub(crate) struct SessionArgs<'a> {
    pub(crate) filter: &'a FilterArgs,
    pub(crate) probe: &'a ProbeArgs,
    pub(crate) kube: &'a KubeArgs,
    /// `--node-netns`: their conntrack is sampled from the start.
    pub(crate) node_netns: &'a [NodeNetns],
    /// The `ADDR_FILTER` mode (`netdrop_common::addr_mode`).
    pub(crate) addr_filter: u32,
}

/// The kernel programs attached, the counters and the resolver started.
pub(crate) struct Session {
    pub(crate) kernel: KernelInfo,
    pub(crate) spec: FilterSpec,
    pub(crate) config: Config,
    pub(crate) conntrack_on: bool,
    pub(crate) probe: DropProbe,
    /// What was attached; commands add theirs (tc) before [`Session::pipeline`] takes it.
    pub(crate) report: AttachReport,
    pub(crate) counters: DropCounters,
    /// This node's name (`--node-name`, `NODE_NAME`, the hostname).
    pub(crate) node: String,
    pub(crate) resolver: Resolver,
    /// Kubernetes resolution is on.
    pub(crate) kube_on: bool,
}

impl Session {
    /// Plans, attaches the drop, conntrack and timewait programs, starts the counters and the
    /// resolver (waiting briefly for its first lists).
    pub(crate) async fn start(a: &SessionArgs<'_>) -> anyhow::Result<Self> {
        let kernel = KernelInfo::discover()?;
        let Plan {
            spec,
            mut config,
            conntrack_on,
            timewait,
            counts_only,
        } = plan(a.filter, a.probe, a.addr_filter, &kernel)?;
        let mut report = AttachReport::default();
        if let Some(why) = counts_only {
            report.degrade(DegradedMode::CountsOnly, why);
        }
        let attach_opts = AttachOptions {
            hook: a.probe.hook.map(Into::into),
            ring_bytes: a.probe.ring_kib * 1024,
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
        report.attached(drop_hook(&probe, a.probe));
        report.attached(conntrack_hook(&mut probe, &kernel, conntrack_on, a.probe));
        report.attached(timewait_hook(&mut probe, timewait, a.probe));
        // Keys carry namespaces only where the program reads the skb; cookies where BTF has them.
        let counters = DropCounters::start(
            config.read_skb == 1,
            config.offsets.net_cookie != netdrop_common::ABSENT,
        );
        let kube = KubeOptions::from(a.kube);
        let node = crate::resolve::node_name(&kube);
        let resolver = Resolver::start(&kube).await?;
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
        Ok(Self {
            kernel,
            spec,
            config,
            conntrack_on,
            probe,
            report,
            counters,
            node,
            resolver,
            kube_on,
        })
    }

    /// The symbols, decoder, conntrack sampler and event pipeline (no sinks yet), and the
    /// summarizer, which takes the attach report; says on stderr what was attached.
    pub(crate) fn pipeline(
        &mut self,
        a: &SessionArgs<'_>,
        hide_teardown: bool,
    ) -> anyhow::Result<(Pipeline, Summarizer)> {
        let symbols = Arc::new(load_symbols());
        let reasons = Arc::new(self.kernel.reasons.clone());
        let decoder = Decoder {
            reasons: reasons.clone(),
            symbols: symbols.clone(),
            clock_offset_ns: decode::clock_offset_ns(),
            node: self.node.clone(),
            conntrack: self.conntrack_on,
        };
        let sampler = if self.conntrack_on {
            // Baselines before the first drop, and before "attached" (callers start traffic on
            // that line): the summary reports rises over the whole run. Our namespace (or the
            // traced one), and the nodes named with --node-netns: their conntrack (a node's SNAT, a
            // resolved clash) counts from the start, not from their first drop.
            let mut initial = vec![self.spec.netns.unwrap_or_else(crate::kernel::netns::own_netns)];
            initial.extend(a.node_netns.iter().filter_map(|n| {
                n.path
                    .as_deref()
                    .and_then(|p| std::fs::metadata(p).ok())
                    .map(|m| std::os::unix::fs::MetadataExt::ino(&m) as u32)
            }));
            CtSampler::start(&initial).context("starting the conntrack sampler thread")?
        } else {
            CtSampler::idle()
        };
        for notice in self.report.notices() {
            eprintln!("netdrop: {notice}");
        }
        eprintln!(
            "netdrop: attached {} on {} (kernel {}; {} drop reasons from {:?})",
            self.probe.hook.name(),
            self.node,
            self.kernel.release,
            reasons.iter().count(),
            reasons.source()
        );
        let mut pipe = Pipeline::new(
            decoder,
            Visibility::new(&self.config, hide_teardown),
            Classifier::new(self.conntrack_on, sampler),
        );
        pipe.resolver = self.kube_on.then(|| self.resolver.clone());
        let summarizer = Summarizer {
            reasons,
            symbols,
            node: self.node.clone(),
            attach: std::mem::take(&mut self.report),
            conntrack: self.conntrack_on,
            netfilter_drop_reason: self.config.netfilter_drop_reason,
        };
        Ok((pipe, summarizer))
    }
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
fn drop_hook(probe: &DropProbe, args: &ProbeArgs) -> Attached {
    let mut a = Attached::new(Program::KfreeSkb, probe.hook);
    if let Some(error) = &probe.fallback {
        a = a.fallbacks(vec![Fallback {
            hook: AttachHook::TpBtf,
            error: error.clone(),
        }]);
    }
    match args.hook {
        Some(h) => a.flag(h.flag()),
        None => a,
    }
}

/// Attaches the conntrack verdict hooks when conntrack classification is on.
fn conntrack_hook(probe: &mut DropProbe, kernel: &KernelInfo, on: bool, args: &ProbeArgs) -> Attached {
    let off = Attached::new(Program::Conntrack, AttachHook::Off);
    match (&kernel.conntrack, on) {
        (Err(why), _) => off.why(why.clone()),
        (Ok(()), false) => match args.ct_hook {
            Some(f) => off.flag(f.flag()),
            None => off,
        },
        (Ok(()), true) => {
            let (hook, tried) = probe::attach_conntrack(probe, args.ct_hook.and_then(CtHookArg::hook));
            let a = Attached::new(Program::Conntrack, hook).fallbacks(fallbacks(tried));
            match args.ct_hook {
                Some(f) => a.flag(f.flag()),
                None => a,
            }
        }
    }
}

/// How segments freed by TIME_WAIT sockets are told; attaches their hooks when planned.
fn timewait_hook(probe: &mut DropProbe, timewait: Timewait, args: &ProbeArgs) -> Attached {
    let flag = args.tw_hook.map(TwHookArg::flag);
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
