//! Summaries from the drop counters (`source::counters`, exact, with the counts of evicted
//! namespaces): at exit, and each second for target traces.

use std::{sync::Arc, time::Instant};

use super::pipeline::Pipeline;
use crate::{
    aggregate::{self, SummaryContext, attach::AttachReport},
    enrich::classify::Facts,
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
    pub(super) fn summary_of(
        &self,
        counts: &probe::KernelCounts,
        pipe: &Pipeline,
        started: Instant,
    ) -> aggregate::Summary {
        let sampler = pipe.classifier.sampler();
        if self.conntrack {
            for (key, _) in &counts.drops {
                if key.reason == self.netfilter_drop_reason {
                    sampler.track(key.netns);
                }
            }
        }
        let ct_report = if self.conntrack { sampler.report() } else { Vec::new() };
        let classifier = &pipe.classifier;
        let classify_row = |k: &netdrop_common::DropKey, function: Option<&str>| {
            let reason = self.reasons.reason(k.reason);
            let facts = Facts {
                reason: &reason,
                function,
                ct_state: k.ct_state,
                kernel_class: k.exact_class,
            };
            classifier.row(&facts, k)
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
