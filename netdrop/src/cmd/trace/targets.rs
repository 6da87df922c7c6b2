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

use crate::{
    aggregate::{
        Summary,
        attach::{AttachHook, AttachReport, Attached, Fallback, Program},
        target_set::{TargetSet, TargetSpec},
        target_summary::{self, Observed, TargetSummary},
    },
    cli::{TargetArgs, TcArgs},
    probe::DropProbe,
    resolve::{Proto, Resolver},
    source::interfaces::{TcAccounting, TcSnapshot},
};

/// `10.96.0.10:80/TCP, [fd00:96::50]:80/TCP`.
fn frontends(f: &[(IpAddr, u16, Proto)]) -> String {
    f.iter()
        .map(|(ip, port, proto)| format!("{}/{proto}", SocketAddr::new(*ip, *port)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A running target trace.
pub struct TargetMode {
    spec: TargetSpec,
    pub targets: TargetSet,
    tc: Option<TcAccounting>,
    snapshot: Option<TcSnapshot>,
    interval: Duration,
    last: Option<Instant>,
    default_node: String,
    own_netns: u32,
    /// Node namespaces were named (`--node-netns`): drops elsewhere are not this cluster's.
    pub nodes_given: bool,
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
        let off = Attached::new(Program::Tc, AttachHook::Off);
        let tc = if let Some(tc_args) = tc_args {
            match TcAccounting::start(&tc_args.node_netns, node, &tc_args.watch_options(), None) {
                Ok(tc) => {
                    if let Err(e) = tc.set_destinations(&targets.destinations()) {
                        warn!("tc attempt counters: {e}");
                    }
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
        } else {
            report.attached(off.flag("--no-tc"));
            None
        };
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
            spec,
            targets,
            tc,
            snapshot: None,
            interval: a.interval,
            last: None,
            default_node: node.to_string(),
            own_netns: crate::kernel::netns::own_netns(),
            nodes_given: tc_args.is_some_and(|a| !a.node_netns.is_empty()),
        };
        me.snapshot = me.tc.as_ref().map(TcAccounting::snapshot);
        Ok(me)
    }

    /// Follows endpoint changes (the kernel filter and the tc destinations), reads tc counters.
    pub fn refresh(&mut self, r: &Resolver, probe: &mut DropProbe) {
        if let Ok(t) = self.spec.resolve(r)
            && t != self.targets
        {
            if let Err(e) = probe.set_addr_filter(&t.addr_entries()) {
                warn!("updating the address filter: {e}");
            }
            if let Some(tc) = &self.tc
                && let Err(e) = tc.set_destinations(&t.destinations())
            {
                warn!("updating tc destinations: {e}");
            }
            eprintln!(
                "netdrop: {} changed: now {} backends/addresses",
                self.spec.describe(),
                t.backends.len()
            );
            self.targets = t;
        }
        self.snapshot = self.tc.as_ref().map(TcAccounting::snapshot);
    }

    /// Network namespace → node: the watched node namespaces and the pods behind their
    /// interfaces; this process's own namespace is the default node.
    pub fn node_of(&self) -> HashMap<u32, String> {
        let mut m = HashMap::new();
        m.insert(self.own_netns, self.default_node.clone());
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

    pub fn build(
        &self,
        summary: &Summary,
        node_of: &HashMap<u32, String>,
        started: Instant,
        is_final: bool,
    ) -> TargetSummary {
        let lookup = |n: u32| node_of.get(&n).cloned();
        target_summary::build(
            &self.targets,
            &Observed {
                rows: &summary.drops,
                tc: self.snapshot.as_ref(),
                node_of: &lookup,
                nodes_given: self.nodes_given,
                lost_events: summary.lost_events,
                conntrack: &summary.conntrack,
                duration_s: started.elapsed().as_secs_f64(),
                time: summary.time.clone(),
                is_final,
            },
        )
    }

    pub fn shutdown(&mut self) {
        if let Some(tc) = self.tc.take() {
            tc.shutdown();
        }
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
}
