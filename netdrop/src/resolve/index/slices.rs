//! `EndpointSlice`s: backends by address and port, and each Service's endpoints.

use std::{net::IpAddr, sync::Arc};

use super::{Interner, Key, Map, key_of};
use crate::resolve::{
    model::{Name, Proto},
    objects::SlimEndpointSlice,
};

pub(super) struct EpEntry {
    pub(super) addrs: Box<[IpAddr]>,
    pub(super) ready: bool,
    pub(super) serving: bool,
    pub(super) terminating: bool,
    pub(super) node: Option<Name>,
    /// (namespace, name) of the Pod in `targetRef`.
    pub(super) pod: Option<Key>,
}

pub(super) struct SlicePort {
    pub(super) name: Option<Name>,
    pub(super) port: u16,
    pub(super) proto: Proto,
}

pub(crate) struct SliceEntry {
    pub(super) namespace: Name,
    pub(super) name: Name,
    /// The owning Service's name (label `kubernetes.io/service-name`).
    pub(super) service: Option<Name>,
    /// `namespace/service`.
    pub(super) service_full: Option<Name>,
    pub(super) endpoints: Box<[EpEntry]>,
    pub(super) ports: Box<[SlicePort]>,
}

impl SliceEntry {
    /// Every (ip, port, proto) this slice publishes, with the endpoint and port indexes.
    pub(super) fn backends(&self) -> impl Iterator<Item = ((IpAddr, u16, Proto), u32, u32)> + '_ {
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
pub(super) struct BackendRef {
    pub(super) slice: Arc<SliceEntry>,
    pub(super) ep: u32,
    pub(super) port: u32,
}

impl BackendRef {
    pub(super) fn ready(&self) -> bool {
        self.slice.endpoints[self.ep as usize].ready
    }

    /// When Services share a backend the packet alone cannot say which one it came through (the
    /// conntrack original destination can): answer deterministically, ready endpoints first, then
    /// by Service name.
    pub(super) fn order(a: &Self, b: &Self) -> std::cmp::Ordering {
        (!a.ready(), &a.slice.service_full).cmp(&(!b.ready(), &b.slice.service_full))
    }
}

/// Most backend addresses belong to one Service; several Services selecting the same pods share it.
pub(super) enum Refs {
    One(BackendRef),
    Many(Vec<BackendRef>),
}

impl Refs {
    pub(super) fn first(&self) -> &BackendRef {
        match self {
            Self::One(r) => r,
            Self::Many(v) => &v[0],
        }
    }
}

#[derive(Default)]
pub(crate) struct SliceTable {
    pub(super) by_key: Map<Key, Arc<SliceEntry>>,
    pub(super) by_service: Map<Key, Vec<Arc<SliceEntry>>>,
    pub(super) by_backend: Map<(IpAddr, u16, Proto), Refs>,
    pub(super) names: Interner,
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

    pub(super) fn link(&mut self, e: &Arc<SliceEntry>) {
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

    pub(super) fn unlink(&mut self, old: &Arc<SliceEntry>) {
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
