//! The event pipeline: ring buffer → location (looked up once) → visibility → decode → node →
//! classify → Kubernetes names → sinks, for each event the kernel sent.

use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};

use crate::{
    enrich::{
        classify::{Classifier, Facts},
        decode::{self, Decoder},
        kube::resolve_record,
        record::DropRecord,
        visibility::Visibility,
    },
    resolve::Resolver,
    sink::Sink,
};

/// The longest an event waits for the conntrack sample after its drop before it is classified
/// without it (the sampler takes one as soon as it is asked; this only bounds a stuck read).
const EVIDENCE_WAIT: Duration = Duration::from_secs(2);

/// An event whose classification waits for the conntrack sampler; the events after it wait
/// behind it, so sinks see events in the kernel's order.
struct Pending {
    record: DropRecord,
    classified: bool,
    since: Instant,
}

/// decode → classify → sinks, for each event the kernel sent.
pub(crate) struct Pipeline {
    pub(crate) decoder: Decoder,
    pub(crate) visibility: Visibility,
    pub(crate) classifier: Classifier,
    /// Kubernetes names for addresses, when resolution is on.
    pub(crate) resolver: Option<Resolver>,
    pub(crate) sinks: Vec<Box<dyn Sink>>,
    pub(crate) shown: u64,
    /// Node of each network namespace (node namespaces and their pods'), for multi-node traces.
    pub(crate) node_of: HashMap<u32, String>,
    /// Nodes were named (`--node-netns`): events in namespaces of none of them are another
    /// cluster's on this host and are left out, as the target summary leaves their counts out.
    pub(crate) nodes_given: bool,
    pending: VecDeque<Pending>,
}

impl Pipeline {
    pub(crate) fn new(decoder: Decoder, visibility: Visibility, classifier: Classifier) -> Self {
        Self {
            decoder,
            visibility,
            classifier,
            resolver: None,
            sinks: Vec::new(),
            shown: 0,
            node_of: HashMap::new(),
            nodes_given: false,
            pending: VecDeque::new(),
        }
    }

    /// Reads every waiting event, and writes out those whose classification is settled.
    pub(crate) fn drain(&mut self, ring: &mut RingBuf<MapData>) -> anyhow::Result<()> {
        let mut written = 0;
        while let Some(item) = ring.next() {
            let ev = decode::parse_event(&item)?;
            drop(item);
            let location = self.decoder.symbols.locate(ev.location);
            if self
                .visibility
                .is_hidden(ev.reason, decode::ip_version(&ev), location.function(), ev.exact_class)
            {
                continue;
            }
            if self.nodes_given && !self.node_of.contains_key(&ev.netns) {
                continue;
            }
            let mut record = self.decoder.decode(&ev, location);
            if let Some(n) = self.node_of.get(&ev.netns) {
                record.node.clone_from(n);
            }
            let classified = classify(&mut self.classifier, &mut record, false);
            self.pending.push_back(Pending {
                record,
                classified,
                since: Instant::now(),
            });
            // Nothing waits ahead of it: out now, not after the whole batch.
            if classified && self.pending.len() == 1 {
                written += self.write_ready(false)?;
            }
        }
        written += self.write_ready(false)?;
        self.flush(written)
    }

    /// At the end of the run: waits once for the sampler, then writes out every event.
    pub(crate) fn finish(&mut self) -> anyhow::Result<()> {
        if self.pending.iter().any(|p| !p.classified) {
            self.classifier.sampler().sample_now(EVIDENCE_WAIT);
        }
        let written = self.write_ready(true)?;
        self.flush(written)
    }

    /// Writes out the events at the head of the queue whose classification is settled (all of
    /// them with `force`); returns how many.
    fn write_ready(&mut self, force: bool) -> anyhow::Result<u64> {
        let mut n = 0;
        while let Some(head) = self.pending.front_mut() {
            if !head.classified {
                let now = force || head.since.elapsed() >= EVIDENCE_WAIT;
                head.classified = classify(&mut self.classifier, &mut head.record, now);
                if !head.classified {
                    break;
                }
            }
            let mut p = self.pending.pop_front().expect("a head");
            if let Some(r) = &self.resolver {
                resolve_record(r, &mut p.record);
            }
            for s in &mut self.sinks {
                s.on_drop(&p.record)?;
            }
            n += 1;
        }
        Ok(n)
    }

    fn flush(&mut self, written: u64) -> anyhow::Result<()> {
        if written > 0 {
            for s in &mut self.sinks {
                s.flush()?;
            }
        }
        self.shown += written;
        Ok(())
    }
}

/// Classifies `r`; false while its evidence is still to come (unless `now`).
fn classify(classifier: &mut Classifier, r: &mut DropRecord, now: bool) -> bool {
    let facts = Facts {
        reason: &r.reason,
        function: r.location.function(),
        ct_state: r.raw.ct_state,
        kernel_class: r.raw.kernel_class,
    };
    let (netns, addr, at) = (r.netns, r.raw.location, r.raw.ts_ns);
    let got = if now {
        Some(classifier.event_now(&facts, netns, addr, at))
    } else {
        classifier.event(&facts, netns, addr, at)
    };
    match got {
        Some((c, k)) => {
            (r.classification, r.certainty) = (c, k);
            true
        }
        None => false,
    }
}
