//! Nodes: by address, and their addresses by name.

use std::{net::IpAddr, sync::Arc};

use super::Map;
use crate::resolve::{
    model::Name,
    objects::{NodeAddrType, SlimNode},
};

pub(crate) struct NodeEntry {
    pub(super) name: Name,
    pub(super) addrs: Box<[(IpAddr, NodeAddrType)]>,
}

#[derive(Default)]
pub(crate) struct NodeTable {
    pub(super) by_name: Map<Name, Arc<NodeEntry>>,
    pub(super) by_ip: Map<IpAddr, Arc<NodeEntry>>,
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

    pub(super) fn unlink(&mut self, old: &Arc<NodeEntry>) {
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
