//! Services: by ClusterIP/external IP and port, and by name.

use std::{net::IpAddr, sync::Arc};

use super::{Interner, Key, Map, key_of};
use crate::resolve::{
    model::{Name, Proto},
    objects::SlimService,
};

pub(super) struct SvcPort {
    pub(super) name: Option<Name>,
    /// The name, or the number when unnamed: what `service_port` shows.
    pub(super) label: Name,
    pub(super) port: u16,
    pub(super) proto: Proto,
    pub(super) target: String,
    pub(super) node_port: Option<u16>,
}

pub(crate) struct SvcEntry {
    pub(super) namespace: Name,
    pub(super) name: Name,
    /// `namespace/name`.
    pub(super) full: Name,
    pub(super) type_: Option<Name>,
    pub(super) cluster_ips: Box<[IpAddr]>,
    pub(super) external_ips: Box<[IpAddr]>,
    pub(super) ports: Box<[SvcPort]>,
    /// Annotated `netdrop.io/observe: "true"`.
    pub(super) observe: bool,
}

impl SvcEntry {
    pub(super) fn port(&self, port: u16, proto: Proto) -> Option<&SvcPort> {
        self.ports.iter().find(|p| p.port == port && p.proto == proto)
    }
}

#[derive(Default)]
pub(crate) struct SvcTable {
    pub(super) by_key: Map<Key, Arc<SvcEntry>>,
    pub(super) by_ip: Map<IpAddr, Arc<SvcEntry>>,
    pub(super) by_node_port: Map<(u16, Proto), Arc<SvcEntry>>,
    pub(super) names: Interner,
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
            observe: s.observe,
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

    pub(super) fn unlink(&mut self, old: &Arc<SvcEntry>) {
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
