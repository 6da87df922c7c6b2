//! `netdrop trace`: probe → decode → sinks, until Ctrl-C, SIGTERM or `--duration`.

use std::{
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

use crate::{
    aggregate::{self, SummaryContext, Visibility},
    cli::TraceArgs,
    decode::{self, Decoder},
    output::{Format, JsonSink, Sink, TextSink},
    probe::{self, AttachOptions, KernelInfo},
    symbols::KernelSymbols,
};

/// How often the reader drains the ring buffer without a wakeup (the kernel wakes it early
/// only once `WAKEUP_BYTES` are waiting): the longest an event waits to be shown.
const DRAIN_INTERVAL: Duration = Duration::from_millis(100);
const WAKEUP_BYTES: u32 = 256 * 1024;

/// This node's name: the flag, else the hostname.
pub fn node_name(flag: Option<&str>) -> String {
    flag.map(String::from).unwrap_or_else(|| {
        nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default()
    })
}

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
                return Err(crate::filter::FilterError::NeedsBtf(why).into());
            }
            eprintln!("netdrop: degraded mode \"counts only\": no kernel BTF ({why}); drops are counted by reason and location, no per-packet events");
        }
    }
    if let Some(tp) = kernel.tracepoint {
        config.tracepoint = tp;
    }
    config.btf_has_reason = u32::from(kernel.btf_has_reason);
    let cpus = aya::util::nr_cpus().map_or(1, |n| n.max(1)) as u32;
    config.events_per_cpu_sec = if args.event_rate == 0 { 0 } else { args.event_rate.div_ceil(cpus) };
    config.wakeup_bytes = WAKEUP_BYTES.min(args.ring_kib * 1024 / 4);

    let mut probe = probe::attach(
        &kernel,
        &config,
        AttachOptions { hook: args.hook, ring_bytes: args.ring_kib * 1024 },
    )?;
    let node = node_name(args.node_name.as_deref());
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
    };
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
    let visibility = Visibility::new(&config, hide_teardown, symbols.clone());
    let mut sinks: Vec<Box<dyn Sink>> = vec![match args.output {
        Format::Text => Box::new(TextSink::new(stdout)),
        Format::Json => Box::new(JsonSink::new(stdout)),
    }];

    let ring = probe.events.take().context("ring buffer already taken")?;
    // SAFETY: the RingBuf owns its map fd and keeps it open, unchanged, until it is dropped,
    // which happens only when the AsyncFd is.
    let mut ring = unsafe { AsyncFd::register(ring) }
        .map_err(|e| anyhow::anyhow!("registering the ring buffer with tokio: {e}"))?;
    let started = Instant::now();
    let mut shown = 0u64;
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

    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting on the ring buffer")?;
                shown += drain(guard.get_inner_mut(), &decoder, &visibility, &mut sinks)?;
                guard.clear_ready();
            }
            _ = tick.tick() => {
                shown += drain(ring.get_mut(), &decoder, &visibility, &mut sinks)?;
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            () = &mut deadline => break,
        }
    }
    shown += drain(ring.get_mut(), &decoder, &visibility, &mut sinks)?;

    let counts = probe.counts();
    let ctx = SummaryContext {
        reasons: &reasons,
        symbols: &symbols,
        visibility: &visibility,
        node: &node,
        hook: probe.hook.name(),
    };
    let summary = aggregate::summarize(&counts, &ctx, started.elapsed().as_secs_f64(), shown);
    for s in &mut sinks {
        s.on_summary(&summary)?;
    }
    Ok(())
}

/// Reads every waiting event. Returns how many were shown.
fn drain(
    ring: &mut RingBuf<MapData>,
    decoder: &Decoder,
    visibility: &Visibility,
    sinks: &mut [Box<dyn Sink>],
) -> anyhow::Result<u64> {
    let mut n = 0;
    while let Some(item) = ring.next() {
        let ev = decode::parse_event(&item)?;
        drop(item);
        let ip_version = match (ev.header_len, ev.l3_proto) {
            (0, _) => 0,
            (_, 0x0800) => 4,
            _ => 6,
        };
        if visibility.is_hidden(ev.reason, ip_version, ev.location) {
            continue;
        }
        let record = decoder.decode(&ev);
        for s in sinks.iter_mut() {
            s.on_drop(&record)?;
        }
        n += 1;
    }
    if n > 0 {
        for s in sinks.iter_mut() {
            s.flush()?;
        }
    }
    Ok(n)
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
                    serde_json::json!({"code": code, "name": name, "hidden_by_default": crate::classify::is_benign(name)})
                })
                .collect();
            let doc = serde_json::json!({"kernel": kernel.release, "source": t.source(), "reasons": list});
            writeln!(out, "{doc}")?;
        }
        Format::Text => {
            writeln!(out, "drop reasons of kernel {} (from {:?}); * = benign, hidden by default", kernel.release, t.source())?;
            for (code, name) in t.iter() {
                let mark = if crate::classify::is_benign(name) { "*" } else { " " };
                writeln!(out, "{code:>8} {mark} {name}")?;
            }
        }
    }
    out.flush()?;
    Ok(())
}
