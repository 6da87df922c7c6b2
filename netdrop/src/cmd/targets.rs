//! Target traces: `--svc`, `--pod`, `--namespace`, `--node`. Resolves the target through the
//! resolver, keeps the kernel's address filter and the tc attempt counters in step with it as
//! endpoints change, attributes drops to nodes, and produces the per-backend summaries.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::bail;

use tracing::warn;

use netdrop_common::{AddrKey, tag};

use crate::{
    aggregate::{
        ReasonRow, Summary,
        attach::{AttachHook, AttachReport, Attached, Fallback, Program},
        target_set::{TargetSet, TargetSpec},
        target_summary::{self, Observed, TargetSummary},
    },
    cli::{TargetArgs, TcArgs},
    probe::DropProbe,
    resolve::{Proto, Resolver},
    source::interfaces::{Destination, TcAccounting, TcSnapshot},
};

/// `10.96.0.10:80/TCP, [fd00:96::50]:80/TCP`.
fn frontends(f: &[(IpAddr, u16, Proto)]) -> String {
    f.iter()
        .map(|(ip, port, proto)| format!("{}/{proto}", SocketAddr::new(*ip, *port)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One target being followed: what was asked, and the addresses it stands for now (`None`
/// while it does not resolve: a Service not created yet, or deleted).
#[derive(Clone, Debug)]
pub struct Watched {
    pub spec: TargetSpec,
    pub targets: Option<TargetSet>,
}

/// Running target traces: one for `trace --svc` and the other targets, any number of Services
/// for the agent. Keeps the kernel's address filter and the tc destinations in step with their
/// endpoints.
pub struct TargetMode {
    watched: Vec<Watched>,
    /// Many targets: tags unique across them (`None`: one target, with its own tags).
    book: Option<TagBook>,
    tc: Option<TcAccounting>,
    snapshot: Option<TcSnapshot>,
    interval: Duration,
    last: Option<Instant>,
    default_node: String,
    /// This process's namespace is a node's (false when the nodes are named and it is none).
    own_netns: Option<u32>,
    /// Node namespaces were named (`--node-netns`): drops elsewhere are not this cluster's.
    pub nodes_given: bool,
}

/// Starts the tc counters on the nodes' workload interfaces (`None`: `--no-tc`); says in
/// `report` how they were attached.
fn start_tc(tc_args: Option<&TcArgs>, node: &str, report: &mut AttachReport) -> Option<TcAccounting> {
    let off = Attached::new(Program::Tc, AttachHook::Off);
    let Some(tc_args) = tc_args else {
        report.attached(off.flag("--no-tc"));
        return None;
    };
    match TcAccounting::start(&tc_args.node_netns, node, &tc_args.watch_options(), None) {
        Ok(tc) => {
            let mut a = Attached::new(Program::Tc, tc.mode());
            if let Some(error) = tc.tcx_error() {
                a = a.fallbacks(vec![Fallback {
                    hook: AttachHook::Tcx,
                    error: error.to_string(),
                }]);
            }
            if let Some(flag) = tc_args.mode_flag() {
                a = a.flag(flag);
            }
            report.attached(a);
            Some(tc)
        }
        Err(e) => {
            report.attached(off.why(e.to_string()));
            None
        }
    }
}

impl TargetMode {
    /// Resolves the target, fills the kernel's address filter and starts the tc counters
    /// (`None`: `--no-tc`); says in `report` how they were attached.
    pub fn start(
        a: &TargetArgs,
        tc_args: Option<&TcArgs>,
        r: &Resolver,
        probe: &mut DropProbe,
        node: &str,
        report: &mut AttachReport,
    ) -> anyhow::Result<Self> {
        let Some(spec) = a.spec() else { bail!("no target given") };
        let targets = match spec.resolve(r) {
            Ok(t) => t,
            Err(e) => bail!("{e}"),
        };
        probe.set_addr_filter(&targets.addr_entries())?;
        if matches!(spec, TargetSpec::Svc { .. }) && targets.backends.is_empty() {
            eprintln!(
                "netdrop: {} has no endpoints: kube-proxy rejects its packets; tracing anyway (drops show as 'no backend')",
                spec.describe()
            );
        }
        let tc = start_tc(tc_args, node, report);
        if let Some(tc) = &tc
            && let Err(e) = tc.set_destinations(&targets.destinations())
        {
            warn!("tc attempt counters: {e}");
        }
        eprintln!(
            "netdrop: tracing {}{}: {} {}{}",
            spec.describe(),
            if targets.frontends.is_empty() {
                String::new()
            } else {
                format!(" ({})", frontends(&targets.frontends))
            },
            targets.backends.len(),
            if matches!(spec, TargetSpec::Svc { .. }) {
                "backends"
            } else {
                "addresses"
            },
            tc.as_ref().map_or_else(String::new, |t| format!(
                "; attempts from tc ({}) on {} node namespace(s)",
                t.mode().name(),
                t.nodes().len()
            )),
        );
        let mut me = Self {
            watched: vec![Watched {
                spec,
                targets: Some(targets),
            }],
            book: None,
            tc,
            snapshot: None,
            interval: a.interval,
            last: None,
            default_node: node.to_string(),
            own_netns: Some(crate::kernel::netns::own_netns()),
            nodes_given: tc_args.is_some_and(|a| !a.node_netns.is_empty()),
        };
        me.snapshot = me.tc.as_ref().map(TcAccounting::snapshot);
        Ok(me)
    }

    /// Many targets at once (the agent's observed Services), none yet ([`TargetMode::set_specs`]
    /// adds them): tags unique across targets, tc counters on the nodes' workload interfaces.
    /// With nodes named, this process's own namespace is no node's.
    pub fn many(tc_args: &TcArgs, node: &str, report: &mut AttachReport) -> Self {
        let tc = start_tc(Some(tc_args), node, report);
        if let Some(tc) = &tc {
            let leftovers: usize = tc.reports().iter().map(|r| r.leftovers_removed).sum();
            let interfaces: usize = tc.reports().iter().map(|r| r.interfaces).sum();
            eprintln!(
                "netdrop: tc counters ({}) on {interfaces} interfaces{}",
                tc.mode().name(),
                if leftovers > 0 {
                    format!("; removed {leftovers} filters left by killed earlier runs")
                } else {
                    String::new()
                }
            );
        }
        let nodes_given = !tc_args.node_netns.is_empty();
        let mut me = Self {
            watched: Vec::new(),
            book: Some(TagBook::default()),
            tc,
            snapshot: None,
            interval: Duration::from_secs(1),
            last: None,
            default_node: node.to_string(),
            own_netns: (!nodes_given).then(crate::kernel::netns::own_netns),
            nodes_given,
        };
        me.snapshot = me.tc.as_ref().map(TcAccounting::snapshot);
        me
    }

    /// The targets followed, each with what it resolves to now.
    pub fn watched(&self) -> &[Watched] {
        &self.watched
    }

    /// The tc counters, when attached.
    pub fn tc(&self) -> Option<&TcAccounting> {
        self.tc.as_ref()
    }

    /// The tc counters read at the last refresh.
    pub fn snapshot(&self) -> Option<&TcSnapshot> {
        self.snapshot.as_ref()
    }

    /// Follows exactly `specs` from now on (those already followed keep their state); the
    /// kernel's filter and the tc destinations follow at once.
    pub fn set_specs(&mut self, specs: &[TargetSpec], r: &Resolver, probe: &mut DropProbe) {
        let before = self.watched.len();
        self.watched.retain(|w| specs.contains(&w.spec));
        let mut changed = self.watched.len() != before;
        for s in specs {
            if !self.watched.iter().any(|w| &w.spec == s) {
                self.watched.push(Watched {
                    spec: s.clone(),
                    targets: None,
                });
                changed = true;
            }
        }
        self.follow(r, probe, changed);
    }

    /// Follows endpoint changes (the kernel filter and the tc destinations), reads tc counters.
    pub fn refresh(&mut self, r: &Resolver, probe: &mut DropProbe) {
        self.follow(r, probe, false);
    }

    fn follow(&mut self, r: &Resolver, probe: &mut DropProbe, mut changed: bool) {
        for w in &mut self.watched {
            let now = w.spec.resolve(r).ok();
            // One target (a trace) keeps its last addresses while it does not resolve.
            let keep = self.book.is_none() && now.is_none();
            if keep || now == w.targets {
                continue;
            }
            if let Some(t) = &now {
                eprintln!(
                    "netdrop: {} {}: now {} backends/addresses",
                    w.spec.describe(),
                    if w.targets.is_some() { "changed" } else { "found" },
                    t.backends.len()
                );
            } else {
                eprintln!(
                    "netdrop: {} not found (yet): not observed until it is",
                    w.spec.describe()
                );
            }
            w.targets = now;
            changed = true;
        }
        if changed {
            let sets: Vec<&TargetSet> = self.watched.iter().filter_map(|w| w.targets.as_ref()).collect();
            let entries = match &mut self.book {
                Some(book) => book.entries(&sets),
                None => sets.iter().flat_map(|t| t.addr_entries()).collect(),
            };
            if let Err(e) = probe.set_addr_filter(&entries) {
                warn!("updating the address filter: {e}");
            }
            if let Some(tc) = &self.tc {
                let mut dests: Vec<Destination> = sets.iter().flat_map(|t| t.destinations()).collect();
                dests.sort_by_key(|d| (d.ip, d.port, d.proto));
                dests.dedup();
                if let Err(e) = tc.set_destinations(&dests) {
                    warn!("updating tc destinations: {e}");
                }
            }
        }
        self.snapshot = self.tc.as_ref().map(TcAccounting::snapshot);
    }

    /// Network namespace → node: the watched node namespaces and the pods behind their
    /// interfaces; this process's own namespace is the default node (unless nodes were named
    /// and it is none of them, for many targets).
    pub fn node_of(&self) -> HashMap<u32, String> {
        let mut m = HashMap::new();
        if let Some(own) = self.own_netns {
            m.insert(own, self.default_node.clone());
        }
        if let Some(tc) = &self.tc {
            for (node, netns) in tc.nodes() {
                m.insert(netns, node);
            }
        }
        if let Some(s) = &self.snapshot {
            for i in &s.interfaces {
                if let Some(p) = i.peer_netns {
                    m.insert(p, i.node.clone());
                }
            }
        }
        m
    }

    /// Whether a periodic summary is due.
    pub fn due(&mut self) -> bool {
        let due = self
            .last
            .is_none_or(|l| l.elapsed() + Duration::from_millis(50) >= self.interval);
        if due {
            self.last = Some(Instant::now());
        }
        due
    }

    /// The (one) target's summary.
    pub fn build(
        &self,
        summary: &Summary,
        node_of: &HashMap<u32, String>,
        started: Instant,
        is_final: bool,
    ) -> TargetSummary {
        let lookup = |n: u32| node_of.get(&n).cloned();
        let empty = TargetSet {
            service: String::new(),
            frontends: Vec::new(),
            backends: Vec::new(),
        };
        let targets = self.watched.first().and_then(|w| w.targets.as_ref()).unwrap_or(&empty);
        target_summary::build(
            targets,
            &self.observed(summary, &summary.drops, &lookup, started, is_final),
        )
    }

    /// Each resolved target's part as this node counted it ([`target_summary::build_part`]),
    /// from the rows carrying its tags.
    pub fn build_parts(
        &self,
        summary: &Summary,
        node_of: &HashMap<u32, String>,
        started: Instant,
    ) -> Vec<(&TargetSpec, TargetSummary)> {
        let lookup = |n: u32| node_of.get(&n).cloned();
        self.watched
            .iter()
            .filter_map(|w| Some((&w.spec, w.targets.as_ref()?)))
            .map(|(spec, t)| {
                let rows = match &self.book {
                    Some(book) => book.rows_of(t, &summary.drops),
                    None => summary.drops.clone(),
                };
                let o = self.observed(summary, &rows, &lookup, started, false);
                (spec, target_summary::build_part(t, &o))
            })
            .collect()
    }

    fn observed<'a>(
        &'a self,
        summary: &'a Summary,
        rows: &'a [ReasonRow],
        node_of: &'a dyn Fn(u32) -> Option<String>,
        started: Instant,
        is_final: bool,
    ) -> Observed<'a> {
        Observed {
            rows,
            tc: self.snapshot.as_ref(),
            node_of,
            nodes_given: self.nodes_given,
            lost_events: summary.lost_events,
            conntrack: &summary.conntrack,
            duration_s: started.elapsed().as_secs_f64(),
            time: summary.time.clone(),
            is_final,
        }
    }

    pub fn shutdown(&mut self) {
        if let Some(tc) = self.tc.take() {
            tc.shutdown();
        }
    }
}

/// Tags unique across many targets: one per address-filter key (an endpoint's address, port and
/// protocol, or a frontend's), kept while the key is watched and never reused, so the kernel's
/// running counts under a tag stay the same endpoint's. Two Services sharing an endpoint share
/// its tag; [`TagBook::rows_of`] maps it back to each of them.
#[derive(Debug, Default)]
pub struct TagBook {
    tags: HashMap<AddrKey, u32>,
    next_backend: u32,
    next_frontend: u32,
}

impl TagBook {
    /// `ADDR_FILTER` entries for all `sets`, allocating tags for new keys and forgetting keys
    /// no set has any more. Backends are numbered from [`tag::FIRST_BACKEND`], frontends from
    /// [`tag::FRONTEND`] + 1.
    pub fn entries(&mut self, sets: &[&TargetSet]) -> Vec<(AddrKey, u32)> {
        let mut out: HashMap<AddrKey, u32> = HashMap::new();
        for t in sets {
            for (key, local) in t.addr_entries() {
                if out.contains_key(&key) {
                    continue;
                }
                let global = *self.tags.entry(key).or_insert_with(|| {
                    if local == tag::FRONTEND {
                        self.next_frontend += 1;
                        tag::FRONTEND + self.next_frontend
                    } else {
                        self.next_backend += 1;
                        tag::FIRST_BACKEND - 1 + self.next_backend
                    }
                });
                out.insert(key, global);
            }
        }
        self.tags.retain(|k, _| out.contains_key(k));
        let mut v: Vec<(AddrKey, u32)> = out.into_iter().collect();
        v.sort_by_key(|(_, t)| *t);
        v
    }

    /// The rows of `t`'s tags, with the tags `t` itself gives its members (and
    /// [`tag::FRONTEND`] for its frontends), as [`target_summary::build_part`] expects them.
    pub fn rows_of(&self, t: &TargetSet, rows: &[ReasonRow]) -> Vec<ReasonRow> {
        let local: HashMap<u32, u32> = t
            .addr_entries()
            .into_iter()
            .filter_map(|(key, local)| Some((*self.tags.get(&key)?, local)))
            .collect();
        rows.iter()
            .filter_map(|r| {
                let l = *local.get(&r.tag)?;
                let mut r = r.clone();
                r.tag = l;
                Some(r)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frontends_are_written_as_socket_addresses() {
        let f = [
            ("10.96.0.10".parse().expect("ip"), 80, Proto::Tcp),
            ("fd00:96::50".parse().expect("ip"), 53, Proto::Udp),
        ];
        assert_eq!(frontends(&f), "10.96.0.10:80/TCP, [fd00:96::50]:53/UDP");
    }

    fn set(service: &str, frontend: &str, backends: &[(&str, &str)]) -> TargetSet {
        TargetSet {
            service: service.into(),
            frontends: vec![(frontend.parse().expect("ip"), 80, Proto::Tcp)],
            backends: backends
                .iter()
                .enumerate()
                .map(|(i, (label, ip))| crate::aggregate::target_set::TargetMember {
                    label: (*label).into(),
                    node: Some("node-a".into()),
                    ip: ip.parse().expect("ip"),
                    ports: vec![(8080, Proto::Tcp)],
                    ready: true,
                    tag: tag::FIRST_BACKEND + i as u32,
                })
                .collect(),
        }
    }

    fn row(tag: u32, count: u64) -> ReasonRow {
        ReasonRow {
            reason: "NETFILTER_DROP".into(),
            reason_code: 12,
            location: "nft_do_chain+0x3f1".into(),
            netns: 1,
            ip: "ipv4",
            count,
            hidden: false,
            classification: "netfilter_rule".into(),
            certainty: crate::enrich::classify::Certainty::Exact,
            conntrack: "unconfirmed",
            effect: crate::enrich::classify::Effect::Attempt,
            tag,
        }
    }

    #[test]
    fn tags_are_unique_across_services_and_shared_endpoints_map_to_each() {
        let web = set(
            "default/web",
            "10.96.0.20",
            &[("default/web-0", "10.244.1.5"), ("default/web-1", "10.244.1.6")],
        );
        // api shares web-1's endpoint (same address, port and protocol).
        let api = set(
            "default/api",
            "10.96.0.30",
            &[("default/web-1", "10.244.1.6"), ("default/api-0", "10.244.2.7")],
        );
        let mut book = TagBook::default();
        let entries = book.entries(&[&web, &api]);
        let tags: std::collections::HashSet<u32> = entries.iter().map(|(_, t)| *t).collect();
        assert_eq!(entries.len(), 5, "two frontends, three distinct endpoints: {entries:?}");
        assert_eq!(tags.len(), 5, "one tag per key");
        let frontends: Vec<u32> = tags.iter().copied().filter(|t| *t > tag::FRONTEND).collect();
        assert_eq!(frontends.len(), 2, "each Service's frontend has its own tag");
        let tag_of = |ip: &str| {
            let ip: IpAddr = ip.parse().expect("ip");
            let want = web
                .addr_entries()
                .into_iter()
                .chain(api.addr_entries())
                .find(|(k, _)| {
                    k.addr[..4]
                        == match ip {
                            IpAddr::V4(v) => v.octets(),
                            IpAddr::V6(_) => unreachable!(),
                        }
                })
                .expect("key")
                .0;
            entries.iter().find(|(k, _)| *k == want).expect("entry").1
        };
        let (web0, shared, api0) = (tag_of("10.244.1.5"), tag_of("10.244.1.6"), tag_of("10.244.2.7"));
        let (web_fe, api_fe) = (tag_of("10.96.0.20"), tag_of("10.96.0.30"));
        let rows = [
            row(web0, 1),
            row(shared, 10),
            row(api0, 100),
            row(web_fe, 1000),
            row(api_fe, 10_000),
            row(0, 7),
        ];
        let local = |t: &TargetSet| {
            let mut v: Vec<(u32, u64)> = book.rows_of(t, &rows).iter().map(|r| (r.tag, r.count)).collect();
            v.sort_unstable();
            v
        };
        // web: web-0 is its member 1, web-1 its member 2; api: web-1 is its member 1. The shared
        // endpoint's drops are each Service's.
        assert_eq!(local(&web), vec![(1, 1), (2, 10), (tag::FRONTEND, 1000)]);
        assert_eq!(local(&api), vec![(1, 10), (2, 100), (tag::FRONTEND, 10_000)]);
        // Stable: the same keys keep their tags; a new endpoint gets a fresh one; a gone one is forgotten.
        let again = book.entries(&[&web, &api]);
        let mut a = again.clone();
        let mut b = entries.clone();
        a.sort_by_key(|(_, t)| *t);
        b.sort_by_key(|(_, t)| *t);
        assert_eq!(a, b);
        let web2 = set(
            "default/web",
            "10.96.0.20",
            &[("default/web-0", "10.244.1.5"), ("default/web-9", "10.244.1.9")],
        );
        let later = book.entries(&[&web2]);
        assert_eq!(later.len(), 3);
        assert!(later.iter().any(|(_, t)| *t == web0), "web-0 keeps its tag");
        assert!(
            later.iter().all(|(_, t)| *t != shared && *t != api0),
            "no reuse: {later:?}"
        );
    }
}
