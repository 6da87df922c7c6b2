//! Summaries from the drop counters (`source::counters`, exact, with the counts of evicted
//! namespaces): at exit, and each second for target traces.

use std::{sync::Arc, time::Instant};

use netdrop_common::DropKey;

use super::pipeline::Pipeline;
use crate::{
    aggregate::{self, SummaryContext, attach::AttachReport},
    enrich::classify::{Certainty, Classification, Facts},
    kernel::{reasons::ReasonTable, symbols::KernelSymbols},
    probe,
};

/// Builds summaries from the kernel's counters (at exit, and each second for target traces).
pub(crate) struct Summarizer {
    pub(crate) reasons: Arc<ReasonTable>,
    pub(crate) symbols: Arc<KernelSymbols>,
    pub(crate) node: String,
    /// What was attached; every summary carries it.
    pub(crate) attach: AttachReport,
    pub(crate) conntrack: bool,
    pub(crate) netfilter_drop_reason: u32,
}

impl Summarizer {
    pub(crate) fn summary_of(
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
        let classify_row = |k: &DropKey, function: Option<&str>| self.classify(pipe, k, function);
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

    /// A counter row's classification, as summaries classify rows.
    pub(crate) fn classify(&self, pipe: &Pipeline, k: &DropKey, function: Option<&str>) -> (Classification, Certainty) {
        let reason = self.reasons.reason(k.reason);
        let facts = Facts {
            reason: &reason,
            function,
            ct_state: k.ct_state,
            kernel_class: k.exact_class,
        };
        pipe.classifier.row(&facts, k)
    }
}
