//! Summaries from the kernel's exact counters: at exit, and each second for target traces.

use std::{sync::Arc, time::Instant};

use super::pipeline::Pipeline;
use crate::{
    aggregate::{self, SummaryContext, attach::AttachReport},
    enrich::classify,
    kernel::{reasons::ReasonTable, symbols::KernelSymbols},
    probe,
};

/// Builds summaries from the kernel's counters (at exit, and each second for target traces).
pub(super) struct Summarizer {
    pub(super) reasons: Arc<ReasonTable>,
    pub(super) symbols: Arc<KernelSymbols>,
    pub(super) node: String,
    /// What was attached; every summary carries it.
    pub(super) attach: AttachReport,
    pub(super) conntrack: bool,
    pub(super) netfilter_drop_reason: u32,
}

impl Summarizer {
    pub(super) fn summary(
        &self,
        probe: &probe::DropProbe,
        pipe: &mut Pipeline,
        started: Instant,
    ) -> aggregate::Summary {
        self.summary_of(&probe.counts(), pipe, started)
    }

    pub(super) fn summary_of(
        &self,
        counts: &probe::KernelCounts,
        pipe: &mut Pipeline,
        started: Instant,
    ) -> aggregate::Summary {
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
            attach: &self.attach,
            classify: &classify_row,
            conntrack: ct_report,
        };
        aggregate::summarize(counts, &ctx, started.elapsed().as_secs_f64(), pipe.shown)
    }
}
