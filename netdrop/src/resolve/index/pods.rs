//! Pods: by address, by name, by network namespace and by Calico interface name.

use std::{net::IpAddr, sync::Arc};

use super::{Interner, Key, Map, key_of};
use crate::resolve::{
    calico::{self, IfKey},
    model::{Name, Peer, PeerKind},
    objects::{OwnerRef, SlimPod},
};

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
    pub(super) fn peer(&self) -> Peer {
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
pub(super) fn looks_like_template_hash(s: &str) -> bool {
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
    pub(super) by_key: Map<Key, Arc<PodEntry>>,
    pub(super) by_ip: Map<IpAddr, Arc<PodEntry>>,
    pub(super) by_if: Map<IfKey, Arc<PodEntry>>,
    pub(super) names: Interner,
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

    pub(super) fn unlink(&mut self, old: &Arc<PodEntry>) {
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

    pub(super) fn link(&mut self, e: &Arc<PodEntry>) {
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

    pub(super) fn get(&self, ns: &str, name: &str) -> Option<&Arc<PodEntry>> {
        self.by_key.get(&(Name::new(ns), Name::new(name)))
    }
}
