//! The event pipeline: ring buffer → decode → visibility → node → classify → Kubernetes names
//! → sinks, for each event the kernel sent.

use std::collections::HashMap;

use aya::maps::{MapData, RingBuf};
use netdrop_common::ct;

use crate::{
    enrich::{
        classify,
        decode::{self, Decoder},
        kube::resolve_record,
        record::DropRecord,
        visibility::Visibility,
    },
    resolve::Resolver,
    sink::Sink,
    source::conntrack::{CtMonitor, Evidence},
};

/// decode → classify → sinks, for each event the kernel sent.
pub(super) struct Pipeline {
    pub(super) decoder: Decoder,
    pub(super) visibility: Visibility,
    pub(super) monitor: CtMonitor,
    pub(super) conntrack: bool,
    /// Kubernetes names for addresses, when resolution is on.
    pub(super) resolver: Option<Resolver>,
    pub(super) sinks: Vec<Box<dyn Sink>>,
    pub(super) shown: u64,
    /// Node of each network namespace (node namespaces and their pods'), for multi-node traces.
    pub(super) node_of: HashMap<u32, String>,
    /// Nodes were named (`--node-netns`): events in namespaces of none of them are another
    /// cluster's on this host and are left out, as the target summary leaves their counts out.
    pub(super) nodes_given: bool,
}

impl Pipeline {
    /// Reads every waiting event.
    pub(super) fn drain(&mut self, ring: &mut RingBuf<MapData>) -> anyhow::Result<()> {
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
            && r.raw.kernel_class == 0
            && !function
                .is_some_and(|f| classify::RULE_ENGINES.contains(&f) && r.raw.ct_state & ct::STATE_MASK != ct::NONE);
        let evidence = if needs_evidence {
            self.monitor.around(netns, at_ns)
        } else {
            Evidence::default()
        };
        (r.classification, r.certainty) =
            classify::classify(&r.reason, function, r.raw.ct_state, r.raw.kernel_class, &evidence);
    }
}
