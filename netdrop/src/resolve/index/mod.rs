//! The compact indexes lookups read: one table per kind, patched in place by watch events and
//! replaced whole after a (re)list.
//!
//! Entries are `Arc`s shared between a table's maps; names are interned `Arc<str>`s, so a lookup
//! result costs a few reference-count increments and no allocation.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use super::{
    calico::{self, IfKey},
    model::{Backend, Name, Peer, PeerKind, Proto, ServiceInfo, ServicePort},
    objects::{NodeAddrType, OwnerRef, SlimEndpointSlice, SlimNode, SlimPod, SlimService},
};

type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type Key = (Name, Name);

/// Interns namespace, node, workload and port names: thousands of pods share a few of each.
#[derive(Default)]
struct Interner(HashSet<Name, foldhash::fast::RandomState>);

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

fn key_of<'a>(ns: Option<&'a str>, name: Option<&'a str>) -> Option<(&'a str, &'a str)> {
    Some((ns.unwrap_or(""), name.filter(|n| !n.is_empty())?))
}

// ---------------------------------------------------------------------------------------------
// Pods

pub(crate) struct PodEntry {
    pub namespace: Name,
    pub name: Name,
    pub node: Option<Name>,
    pub workload: Option<Name>,
    pub ips: Box<[IpAddr]>,
    pub host_network: bool,
    pub terminating: bool,
    pub finished: bool,
}

impl PodEntry {
    fn peer(&self) -> Peer {
        Peer {
            kind: PeerKind::Pod,
            pod: Some(self.name.clone()),
            namespace: Some(self.namespace.clone()),
            node: self.node.clone(),
            workload: self.workload.clone(),
            ..Peer::default()
        }
    }
}

/// `pod-template-hash` values are rendered with apimachinery's `rand.SafeEncodeString`, whose
/// alphabet has no vowels and no 0/1/3 (k8s.io/apimachinery/pkg/util/rand/rand.go, `alphanums`).
fn looks_like_template_hash(s: &str) -> bool {
    (1..=10).contains(&s.len()) && s.bytes().all(|c| b"bcdfghjklmnpqrstvwxz2456789".contains(&c))
}

/// The workload a pod belongs to, as `Kind/name`: `ReplicaSets` named `<deployment>-<hash>` are
/// reported as their Deployment, Jobs named `<cronjob>-<minutes since epoch>` as their `CronJob`
/// (the `CronJob` controller's naming: `pkg/controller/cronjob/utils.go` `getJobName`).
pub(crate) fn workload_of(owners: &[OwnerRef]) -> Option<(&str, &str)> {
    let o = owners
        .iter()
        .find(|o| o.controller == Some(true))
        .or_else(|| owners.first())?;
    let (prefix, suffix) = o.name.rsplit_once('-').unwrap_or(("", ""));
    Some(match o.kind.as_str() {
        "ReplicaSet" if !prefix.is_empty() && looks_like_template_hash(suffix) => ("Deployment", prefix),
        "Job" if !prefix.is_empty() && suffix.len() >= 8 && suffix.bytes().all(|c| c.is_ascii_digit()) => {
            ("CronJob", prefix)
        }
        kind => (kind, o.name.as_str()),
    })
}

#[derive(Default)]
pub(crate) struct PodTable {
    by_key: Map<Key, Arc<PodEntry>>,
    by_ip: Map<IpAddr, Arc<PodEntry>>,
    by_if: Map<IfKey, Arc<PodEntry>>,
    names: Interner,
}

impl PodTable {
    pub fn apply(&mut self, p: SlimPod) {
        let Some((ns, name)) = key_of(p.metadata.namespace.as_deref(), p.metadata.name.as_deref()) else {
            return;
        };
        let workload = workload_of(&p.owners).map(|(k, n)| self.names.get(&format!("{k}/{n}")));
        let entry = Arc::new(PodEntry {
            namespace: self.names.get(ns),
            name: Name::new(name),
            node: p.node_name.as_deref().map(|n| self.names.get(n)),
            workload,
            ips: p.ips.into_boxed_slice(),
            host_network: p.host_network,
            terminating: p.terminating,
            finished: p.finished,
        });
        let key = (entry.namespace.clone(), entry.name.clone());
        if let Some(old) = self.by_key.insert(key, entry.clone()) {
            self.unlink(&old);
        }
        self.link(&entry);
    }

    pub fn delete(&mut self, p: &SlimPod) {
        let Some((ns, name)) = key_of(p.metadata.namespace.as_deref(), p.metadata.name.as_deref()) else {
            return;
        };
        if let Some(old) = self.by_key.remove(&(Name::new(ns), Name::new(name))) {
            self.unlink(&old);
        }
    }

    fn unlink(&mut self, old: &Arc<PodEntry>) {
        for ip in &old.ips {
            if self.by_ip.get(ip).is_some_and(|cur| Arc::ptr_eq(cur, old)) {
                self.by_ip.remove(ip);
            }
        }
        let k = calico::if_key(&old.namespace, &old.name);
        if self.by_if.get(&k).is_some_and(|cur| Arc::ptr_eq(cur, old)) {
            self.by_if.remove(&k);
        }
    }

    fn link(&mut self, e: &Arc<PodEntry>) {
        if e.host_network {
            // A hostNetwork pod has no interface or IP of its own: its address is the node's.
            return;
        }
        self.by_if.insert(calico::if_key(&e.namespace, &e.name), e.clone());
        if e.finished {
            // Succeeded/Failed pods have given their IPs back to IPAM, which may hand them to a new
            // pod (Calico makes the same call: conversion.go `IsFinished`).
            return;
        }
        for ip in &e.ips {
            match self.by_ip.get(ip) {
                // IP reuse: a terminating pod does not take an address back from a live one.
                Some(cur) if e.terminating && !cur.terminating && !Arc::ptr_eq(cur, e) => {}
                _ => {
                    self.by_ip.insert(*ip, e.clone());
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    fn get(&self, ns: &str, name: &str) -> Option<&Arc<PodEntry>> {
        self.by_key.get(&(Name::new(ns), Name::new(name)))
    }
}

// ---------------------------------------------------------------------------------------------
// Services

struct SvcPort {
    name: Option<Name>,
    /// The name, or the number when unnamed: what `service_port` shows.
    label: Name,
    port: u16,
    proto: Proto,
    target: String,
    node_port: Option<u16>,
}

pub(crate) struct SvcEntry {
    namespace: Name,
    name: Name,
    /// `namespace/name`.
    full: Name,
    type_: Option<Name>,
    cluster_ips: Box<[IpAddr]>,
    external_ips: Box<[IpAddr]>,
    ports: Box<[SvcPort]>,
}

impl SvcEntry {
    fn port(&self, port: u16, proto: Proto) -> Option<&SvcPort> {
        self.ports.iter().find(|p| p.port == port && p.proto == proto)
    }
}

#[derive(Default)]
pub(crate) struct SvcTable {
    by_key: Map<Key, Arc<SvcEntry>>,
    by_ip: Map<IpAddr, Arc<SvcEntry>>,
    by_node_port: Map<(u16, Proto), Arc<SvcEntry>>,
    names: Interner,
}

impl SvcTable {
    pub fn apply(&mut self, s: SlimService) {
        let Some((ns, name)) = key_of(s.metadata.namespace.as_deref(), s.metadata.name.as_deref()) else {
            return;
        };
        let namespace = self.names.get(ns);
        let ports = s
            .ports
            .iter()
            .filter_map(|p| {
                let proto = Proto::from_k8s(p.protocol.as_deref())?;
                let pname = p.name.as_deref().filter(|n| !n.is_empty()).map(|n| self.names.get(n));
                let label = pname.clone().unwrap_or_else(|| self.names.get(&p.port.to_string()));
                Some(SvcPort {
                    name: pname,
                    label,
                    port: p.port,
                    proto,
                    target: p
                        .target_port
                        .as_ref()
                        .map_or_else(|| p.port.to_string(), ToString::to_string),
                    node_port: p.node_port.filter(|&n| n != 0),
                })
            })
            .collect();
        let entry = Arc::new(SvcEntry {
            full: Name::new(&format!("{ns}/{name}")),
            namespace,
            name: Name::new(name),
            type_: s.type_.as_deref().map(|t| self.names.get(t)),
            cluster_ips: s.cluster_ips.into_boxed_slice(),
            external_ips: s.external_ips.into_boxed_slice(),
            ports,
        });
        let key = (entry.namespace.clone(), entry.name.clone());
        if let Some(old) = self.by_key.insert(key, entry.clone()) {
            self.unlink(&old);
        }
        for ip in entry.cluster_ips.iter().chain(entry.external_ips.iter()) {
            self.by_ip.insert(*ip, entry.clone());
        }
        for p in &entry.ports {
            if let Some(np) = p.node_port {
                self.by_node_port.insert((np, p.proto), entry.clone());
            }
        }
    }

    pub fn delete(&mut self, s: &SlimService) {
        let Some((ns, name)) = key_of(s.metadata.namespace.as_deref(), s.metadata.name.as_deref()) else {
            return;
        };
        if let Some(old) = self.by_key.remove(&(Name::new(ns), Name::new(name))) {
            self.unlink(&old);
        }
    }

    fn unlink(&mut self, old: &Arc<SvcEntry>) {
        for ip in old.cluster_ips.iter().chain(old.external_ips.iter()) {
            if self.by_ip.get(ip).is_some_and(|cur| Arc::ptr_eq(cur, old)) {
                self.by_ip.remove(ip);
            }
        }
        for p in &old.ports {
            if let Some(np) = p.node_port {
                let k = (np, p.proto);
                if self.by_node_port.get(&k).is_some_and(|cur| Arc::ptr_eq(cur, old)) {
                    self.by_node_port.remove(&k);
                }
            }
        }
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }
}

// ---------------------------------------------------------------------------------------------
// EndpointSlices

struct EpEntry {
    addrs: Box<[IpAddr]>,
    ready: bool,
    serving: bool,
    terminating: bool,
    node: Option<Name>,
    /// (namespace, name) of the Pod in `targetRef`.
    pod: Option<Key>,
}

struct SlicePort {
    name: Option<Name>,
    port: u16,
    proto: Proto,
}

pub(crate) struct SliceEntry {
    namespace: Name,
    name: Name,
    /// The owning Service's name (label `kubernetes.io/service-name`).
    service: Option<Name>,
    /// `namespace/service`.
    service_full: Option<Name>,
    endpoints: Box<[EpEntry]>,
    ports: Box<[SlicePort]>,
}

impl SliceEntry {
    /// Every (ip, port, proto) this slice publishes, with the endpoint and port indexes.
    fn backends(&self) -> impl Iterator<Item = ((IpAddr, u16, Proto), u32, u32)> + '_ {
        self.endpoints.iter().enumerate().flat_map(move |(ei, ep)| {
            ep.addrs.iter().flat_map(move |ip| {
                self.ports
                    .iter()
                    .enumerate()
                    .map(move |(pi, p)| ((*ip, p.port, p.proto), ei as u32, pi as u32))
            })
        })
    }
}

#[derive(Clone)]
struct BackendRef {
    slice: Arc<SliceEntry>,
    ep: u32,
    port: u32,
}

impl BackendRef {
    fn ready(&self) -> bool {
        self.slice.endpoints[self.ep as usize].ready
    }

    /// When Services share a backend the packet alone cannot say which one it came through (the
    /// conntrack original destination can): answer deterministically, ready endpoints first, then
    /// by Service name.
    fn order(a: &Self, b: &Self) -> std::cmp::Ordering {
        (!a.ready(), &a.slice.service_full).cmp(&(!b.ready(), &b.slice.service_full))
    }
}

/// Most backend addresses belong to one Service; several Services selecting the same pods share it.
enum Refs {
    One(BackendRef),
    Many(Vec<BackendRef>),
}

impl Refs {
    fn first(&self) -> &BackendRef {
        match self {
            Self::One(r) => r,
            Self::Many(v) => &v[0],
        }
    }
}

#[derive(Default)]
pub(crate) struct SliceTable {
    by_key: Map<Key, Arc<SliceEntry>>,
    by_service: Map<Key, Vec<Arc<SliceEntry>>>,
    by_backend: Map<(IpAddr, u16, Proto), Refs>,
    names: Interner,
}

impl SliceTable {
    pub fn apply(&mut self, s: SlimEndpointSlice) {
        let Some((ns, name)) = key_of(s.metadata.namespace.as_deref(), s.metadata.name.as_deref()) else {
            return;
        };
        let namespace = self.names.get(ns);
        let endpoints = s
            .endpoints
            .into_iter()
            .map(|e| EpEntry {
                addrs: e.addresses.into_boxed_slice(),
                ready: e.ready,
                serving: e.serving,
                terminating: e.terminating,
                node: e.node_name.as_deref().map(|n| self.names.get(n)),
                pod: e.pod.map(|(pns, pname)| {
                    (
                        pns.map_or_else(|| namespace.clone(), |p| self.names.get(&p)),
                        Name::new(&pname),
                    )
                }),
            })
            .collect();
        let ports = s
            .ports
            .iter()
            .filter_map(|p| {
                Some(SlicePort {
                    name: p.name.as_deref().filter(|n| !n.is_empty()).map(|n| self.names.get(n)),
                    port: p.port?,
                    proto: Proto::from_k8s(p.protocol.as_deref())?,
                })
            })
            .collect();
        let service = s.service.as_deref().map(|n| self.names.get(n));
        let entry = Arc::new(SliceEntry {
            service_full: service.as_ref().map(|svc| self.names.get(&format!("{ns}/{svc}"))),
            service,
            namespace,
            name: Name::new(name),
            endpoints,
            ports,
        });
        let key = (entry.namespace.clone(), entry.name.clone());
        if let Some(old) = self.by_key.insert(key, entry.clone()) {
            self.unlink(&old);
        }
        self.link(&entry);
    }

    pub fn delete(&mut self, s: &SlimEndpointSlice) {
        let Some((ns, name)) = key_of(s.metadata.namespace.as_deref(), s.metadata.name.as_deref()) else {
            return;
        };
        if let Some(old) = self.by_key.remove(&(Name::new(ns), Name::new(name))) {
            self.unlink(&old);
        }
    }

    fn link(&mut self, e: &Arc<SliceEntry>) {
        if let Some(svc) = &e.service {
            self.by_service
                .entry((e.namespace.clone(), svc.clone()))
                .or_default()
                .push(e.clone());
        }
        for (k, ep, port) in e.backends() {
            let r = BackendRef {
                slice: e.clone(),
                ep,
                port,
            };
            match self.by_backend.get_mut(&k) {
                None => {
                    self.by_backend.insert(k, Refs::One(r));
                }
                Some(Refs::Many(v)) => {
                    v.push(r);
                    v.sort_by(BackendRef::order);
                }
                Some(slot @ Refs::One(_)) => {
                    let Refs::One(first) = std::mem::replace(slot, Refs::Many(Vec::new())) else {
                        unreachable!("matched One")
                    };
                    let mut v = vec![first, r];
                    v.sort_by(BackendRef::order);
                    *slot = Refs::Many(v);
                }
            }
        }
    }

    fn unlink(&mut self, old: &Arc<SliceEntry>) {
        if let Some(svc) = &old.service {
            let k = (old.namespace.clone(), svc.clone());
            if let Some(v) = self.by_service.get_mut(&k) {
                v.retain(|s| !Arc::ptr_eq(s, old));
                if v.is_empty() {
                    self.by_service.remove(&k);
                }
            }
        }
        for (k, _, _) in old.backends() {
            let remove = match self.by_backend.get_mut(&k) {
                Some(Refs::One(r)) => Arc::ptr_eq(&r.slice, old),
                Some(Refs::Many(v)) => {
                    v.retain(|r| !Arc::ptr_eq(&r.slice, old));
                    if v.len() == 1 {
                        let only = v.pop().expect("one left");
                        self.by_backend.insert(k, Refs::One(only));
                        false
                    } else {
                        v.is_empty()
                    }
                }
                None => false,
            };
            if remove {
                self.by_backend.remove(&k);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }
}

// ---------------------------------------------------------------------------------------------
// Nodes

pub(crate) struct NodeEntry {
    name: Name,
    addrs: Box<[(IpAddr, NodeAddrType)]>,
}

#[derive(Default)]
pub(crate) struct NodeTable {
    by_name: Map<Name, Arc<NodeEntry>>,
    by_ip: Map<IpAddr, Arc<NodeEntry>>,
}

impl NodeTable {
    pub fn apply(&mut self, n: SlimNode) {
        let Some(name) = n.metadata.name.as_deref().filter(|s| !s.is_empty()) else {
            return;
        };
        let entry = Arc::new(NodeEntry {
            name: Name::new(name),
            addrs: n.addresses.into_boxed_slice(),
        });
        if let Some(old) = self.by_name.insert(entry.name.clone(), entry.clone()) {
            self.unlink(&old);
        }
        // InternalIP first so it wins over an ExternalIP another node might also list.
        for (ip, t) in entry
            .addrs
            .iter()
            .filter(|a| a.1 == NodeAddrType::Internal)
            .chain(entry.addrs.iter().filter(|a| a.1 == NodeAddrType::External))
        {
            if *t == NodeAddrType::Internal || !self.by_ip.contains_key(ip) {
                self.by_ip.insert(*ip, entry.clone());
            }
        }
    }

    pub fn delete(&mut self, n: &SlimNode) {
        if let Some(name) = n.metadata.name.as_deref()
            && let Some(old) = self.by_name.remove(name)
        {
            self.unlink(&old);
        }
    }

    fn unlink(&mut self, old: &Arc<NodeEntry>) {
        for (ip, _) in &old.addrs {
            if self.by_ip.get(ip).is_some_and(|cur| Arc::ptr_eq(cur, old)) {
                self.by_ip.remove(ip);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }
}

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
