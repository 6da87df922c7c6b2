//! `netdrop trace`: plan → probe → source → enrich → aggregate → sinks, until Ctrl-C, SIGTERM
//! or `--duration`. The start-up is the shared [`super::session`]; the select loop over the ring
//! buffer, the timers and the signals is here; targets are in [`super::targets`].

use std::{
    io::IsTerminal as _,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use netdrop_common::addr_mode;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use super::{
    session::{Session, SessionArgs},
    targets::TargetMode,
};
use crate::{
    cli::{Format, TraceArgs},
    probe,
    sink::{JsonSink, LiveTable, Sink, TextSink},
};

/// How often the reader drains the ring buffer without a wakeup (the kernel wakes it early
/// only once `plan::WAKEUP_BYTES` are waiting): the longest an event waits to be shown.
pub(crate) const DRAIN_INTERVAL: Duration = Duration::from_millis(100);

pub async fn run(args: TraceArgs) -> anyhow::Result<()> {
    run_with(args, Vec::new()).await
}

/// A trace whose events and final summary also go to `extra` sinks (`capture` adds its file);
/// it stops early once one of them is [`Sink::done`].
#[expect(
    clippy::too_many_lines,
    reason = "the select loop and the final summary in the order they happen; the stages live in session and targets"
)]
pub async fn run_with(args: TraceArgs, extra: Vec<Box<dyn Sink>>) -> anyhow::Result<()> {
    let session_args = SessionArgs {
        filter: &args.filter,
        probe: &args.probe,
        kube: &args.kube,
        node_netns: &args.tc.node_netns,
        addr_filter: if args.target.any() {
            addr_mode::FILTER
        } else {
            addr_mode::OFF
        },
    };
    let mut session = Session::start(&session_args).await?;
    let mut targets = if args.target.any() {
        if !session.kube_on {
            anyhow::bail!(
                "--svc/--pod/--node/--namespace need Kubernetes: pass --kubeconfig FILE or --kube-snapshot FILE"
            );
        }
        let tc = (!args.no_tc).then_some(&args.tc);
        Some(TargetMode::start(
            &args.target,
            tc,
            &session.resolver,
            &mut session.probe,
            &session.node,
            &mut session.report,
        )?)
    } else {
        None
    };
    let hide_teardown = !session.spec.all_reasons && session.spec.reasons.is_empty();
    let (mut pipe, summarizer) = session.pipeline(&session_args, hide_teardown)?;
    let Session {
        mut probe,
        mut counters,
        resolver,
        config,
        conntrack_on,
        ..
    } = session;

    let stdout = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout());
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
