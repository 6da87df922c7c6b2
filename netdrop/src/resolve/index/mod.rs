//! The compact indexes lookups read: one table per kind, patched in place by watch events and
//! replaced whole after a (re)list.
//!
//! Entries are `Arc`s shared between a table's maps; names are interned `Arc<str>`s, so a lookup
//! result costs a few reference-count increments and no allocation.

mod nodes;
mod pods;
mod services;
mod slices;

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use super::{
    calico::{self},
    model::{Backend, Name, Peer, PeerKind, Proto, ServiceInfo, ServicePort},
};

pub(super) type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
pub(super) type Key = (Name, Name);

/// Interns namespace, node, workload and port names: thousands of pods share a few of each.
#[derive(Default)]
pub(super) struct Interner(HashSet<Name, foldhash::fast::RandomState>);

impl Interner {
    fn get(&mut self, s: &str) -> Name {
        if let Some(n) = self.0.get(s) {
            return n.clone();
        }
        let n = Name::new(s);
        self.0.insert(n.clone());
        n
    }
}

pub(super) fn key_of<'a>(ns: Option<&'a str>, name: Option<&'a str>) -> Option<(&'a str, &'a str)> {
    Some((ns.unwrap_or(""), name.filter(|n| !n.is_empty())?))
}

use self::slices::SlicePort;
pub(crate) use self::{
    nodes::NodeTable,
    pods::PodTable,
    services::SvcTable,
    slices::{SliceEntry, SliceTable},
};

// ---------------------------------------------------------------------------------------------
// The index

/// The four kinds the resolver watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Pods,
    Services,
    EndpointSlices,
    Nodes,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Pods, Kind::Services, Kind::EndpointSlices, Kind::Nodes];

    /// The resource name as RBAC rules spell it.
    pub fn resource(self) -> &'static str {
        match self {
            Self::Pods => "pods",
            Self::Services => "services",
            Self::EndpointSlices => "endpointslices.discovery.k8s.io",
            Self::Nodes => "nodes",
        }
    }

    pub(crate) fn idx(self) -> usize {
        self as usize
    }
}

/// Counts of what the index holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct IndexStats {
    pub pods: usize,
    pub pod_ips: usize,
    pub services: usize,
    pub endpointslices: usize,
    pub backends: usize,
    pub nodes: usize,
}

#[derive(Default)]
pub(crate) struct Index {
    pub pods: PodTable,
    pub services: SvcTable,
    pub slices: SliceTable,
    pub nodes: NodeTable,
    /// Which kinds hold a complete list (a sync finished once, or a snapshot was loaded).
    pub synced: [bool; 4],
    /// Network namespace inode → pod, registered by whoever learns it (the tracer, from a pod's
    /// interface); the API does not publish it.
    pub netns: Map<u64, Key>,
}

impl Index {
    fn none_or_external(&self, needs: &[Kind]) -> Peer {
        if needs.iter().all(|k| self.synced[k.idx()]) {
            Peer::external()
        } else {
            Peer::unresolved()
        }
    }

    /// Resolves an address, with the port and protocol when the packet has them.
    pub fn lookup(&self, ip: IpAddr, port: Option<(u16, Proto)>) -> Peer {
        if let Some(svc) = self.services.by_ip.get(&ip) {
            let sp = port.and_then(|(p, pr)| svc.port(p, pr));
            return Peer {
                kind: PeerKind::Service,
                namespace: Some(svc.namespace.clone()),
                service: Some(svc.full.clone()),
                service_port: sp.map(|p| p.label.clone()),
                ..Peer::default()
            };
        }
        let mut peer = if let Some(pod) = self.pods.by_ip.get(&ip) {
            pod.peer()
        } else if let Some(node) = self.nodes.by_ip.get(&ip) {
            Peer {
                kind: PeerKind::Node,
                node: Some(node.name.clone()),
                ..Peer::default()
            }
        } else {
            self.none_or_external(&[Kind::Pods, Kind::Services, Kind::Nodes])
        };
        let Some((p, pr)) = port else {
            return peer;
        };
        if let Some(refs) = self.slices.by_backend.get(&(ip, p, pr)) {
            let r = refs.first();
            let slice = &r.slice;
            let ep = &slice.endpoints[r.ep as usize];
            peer.service.clone_from(&slice.service_full);
            peer.service_port = self.backend_port_label(slice, &slice.ports[r.port as usize]);
            peer.ready = Some(ep.ready);
            if peer.kind != PeerKind::Pod {
                // hostNetwork backends and endpoints outside the pod network: name what the slice says.
                if let Some((ns, pod)) = &ep.pod {
                    peer.namespace = Some(ns.clone());
                    peer.pod = Some(pod.clone());
                }
                if peer.node.is_none() {
                    peer.node.clone_from(&ep.node);
                }
                if peer.kind == PeerKind::Unresolved {
                    peer.kind = PeerKind::External;
                }
            }
        } else if peer.kind == PeerKind::Node
            && let Some(svc) = self.services.by_node_port.get(&(p, pr))
        {
            peer.service = Some(svc.full.clone());
            peer.namespace = Some(svc.namespace.clone());
            peer.service_port = svc
                .ports
                .iter()
                .find(|sp| sp.node_port == Some(p) && sp.proto == pr)
                .map(|sp| sp.label.clone());
        }
        peer
    }

    /// A slice port's name is its Service port's name; an unnamed one means the Service has a
    /// single port (the API requires names otherwise), so show that port's number.
    fn backend_port_label(&self, slice: &SliceEntry, port: &SlicePort) -> Option<Name> {
        if let Some(n) = &port.name {
            return Some(n.clone());
        }
        let svc = self
            .services
            .by_key
            .get(&(slice.namespace.clone(), slice.service.clone()?))?;
        svc.ports.first().map(|p| p.label.clone())
    }

    pub fn lookup_ifname(&self, ifname: &str) -> Option<Peer> {
        let k = calico::parse_ifname(ifname)?;
        self.pods.by_if.get(&k).map(|p| p.peer())
    }

    pub fn lookup_netns(&self, ino: u64) -> Option<Peer> {
        let (ns, name) = self.netns.get(&ino)?;
        self.pods.by_key.get(&(ns.clone(), name.clone())).map(|p| p.peer())
    }

    /// `(namespace, name)` of the annotated Services (every one with `all`), sorted.
    pub fn observed_services(&self, all: bool) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = self
            .services
            .by_key
            .values()
            .filter(|s| all || s.observe)
            .map(|s| (s.namespace.as_str().to_string(), s.name.as_str().to_string()))
            .collect();
        v.sort();
        v
    }

    pub fn service_info(&self, namespace: &str, name: &str) -> Option<ServiceInfo> {
        let key = (Name::new(namespace), Name::new(name));
        let svc = self.services.by_key.get(&key)?;
        let mut backends = Vec::new();
        for slice in self.slices.by_service.get(&key).into_iter().flatten() {
            for ep in &slice.endpoints {
                for ip in &ep.addrs {
                    let pod_entry = match &ep.pod {
                        Some((ns, n)) => self.pods.by_key.get(&(ns.clone(), n.clone())),
                        None => self.pods.by_ip.get(ip),
                    };
                    for port in &slice.ports {
                        backends.push(Backend {
                            pod: ep
                                .pod
                                .as_ref()
                                .map(|p| p.1.clone())
                                .or_else(|| pod_entry.map(|p| p.name.clone())),
                            namespace: ep
                                .pod
                                .as_ref()
                                .map(|p| p.0.clone())
                                .or_else(|| pod_entry.map(|p| p.namespace.clone())),
                            node: ep.node.clone().or_else(|| pod_entry.and_then(|p| p.node.clone())),
                            ip: *ip,
                            port: port.port,
                            port_name: port.name.clone(),
                            protocol: port.proto,
                            ready: ep.ready,
                            serving: ep.serving,
                            terminating: ep.terminating,
                        });
                    }
                }
            }
        }
        backends.sort_by(|a, b| (&a.namespace, &a.pod, a.ip, a.port).cmp(&(&b.namespace, &b.pod, b.ip, b.port)));
        backends.dedup();
        Some(ServiceInfo {
            namespace: svc.namespace.clone(),
            name: svc.name.clone(),
            type_: svc.type_.clone(),
            cluster_ips: svc.cluster_ips.to_vec(),
            external_ips: svc.external_ips.to_vec(),
            ports: svc
                .ports
                .iter()
                .map(|p| ServicePort {
                    name: p.name.clone(),
                    port: p.port,
                    protocol: p.proto,
                    target_port: p.target.clone(),
                    node_port: p.node_port,
                })
                .collect(),
            backends,
        })
    }

    /// Pods matching an optional namespace and node, as peers with their IPs (for `--pod`,
    /// `--namespace`, `--node` entry points).
    pub fn pods(&self, namespace: Option<&str>, node: Option<&str>, name: Option<&str>) -> Vec<(Peer, Vec<IpAddr>)> {
        if let (Some(ns), Some(n)) = (namespace, name) {
            return self
                .pods
                .get(ns, n)
                .filter(|p| node.is_none_or(|want| p.node.as_deref() == Some(want)))
                .map(|p| vec![(p.peer(), p.ips.to_vec())])
                .unwrap_or_default();
        }
        let mut out: Vec<_> = self
            .pods
            .by_key
            .values()
            .filter(|p| namespace.is_none_or(|ns| &*p.namespace == ns))
            .filter(|p| node.is_none_or(|want| p.node.as_deref() == Some(want)))
            .filter(|p| name.is_none_or(|n| &*p.name == n))
            .map(|p| (p.peer(), p.ips.to_vec()))
            .collect();
        out.sort_by(|a, b| (&a.0.namespace, &a.0.pod).cmp(&(&b.0.namespace, &b.0.pod)));
        out
    }

    /// A node's addresses by name.
    pub fn node_ips(&self, name: &str) -> Option<Vec<IpAddr>> {
        self.nodes
            .by_name
            .get(name)
            .map(|n| n.addrs.iter().map(|a| a.0).collect())
    }

    pub fn stats(&self) -> IndexStats {
        IndexStats {
            pods: self.pods.len(),
            pod_ips: self.pods.by_ip.len(),
            services: self.services.len(),
            endpointslices: self.slices.len(),
            backends: self.slices.by_backend.len(),
            nodes: self.nodes.len(),
        }
    }

    /// Some addresses the index knows (for benchmarks): pod IPs, ClusterIP:port pairs, node IPs.
    pub fn sample_addresses(&self, n: usize) -> Vec<(IpAddr, Option<(u16, Proto)>)> {
        let mut out = Vec::with_capacity(n);
        out.extend(self.pods.by_ip.keys().take(n / 2).map(|ip| (*ip, None)));
        out.extend(
            self.slices
                .by_backend
                .keys()
                .take(n / 4)
                .map(|(ip, p, pr)| (*ip, Some((*p, *pr)))),
        );
        out.extend(self.services.by_key.values().take(n / 8).filter_map(|s| {
            let p = s.ports.first()?;
            Some((*s.cluster_ips.first()?, Some((p.port, p.proto))))
        }));
        out.extend(self.nodes.by_ip.keys().take(n / 16).map(|ip| (*ip, None)));
        out
    }
}
