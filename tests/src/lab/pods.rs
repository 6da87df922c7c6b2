//! Pods that come and go on a running lab (the agent's pod-churn test): each is what a CNI ADD
//! makes — a network namespace, a `cali…` veth into its node with the /32 route, proxy-ARP and
//! the pod side's addresses — plus its Pod object in the API stand-in; removing one deletes the
//! object and the namespace (the veth goes with it), as kubelet and the CNI DEL do.

use std::net::Ipv4Addr;

use super::{
    Lab, LabError, kube,
    net::{self, QUIET},
    topology::{PodSpec, Role, TARGET_PORT},
};
use crate::apiserver::ResKind;

impl Lab {
    /// A pod spec for [`Lab::add_pods`]: `namespace/name` on `node`, address `host` in the
    /// node's pod block (the lab's own pods use hosts below 100).
    pub fn churn_pod(&self, namespace: &str, name: &str, node: &str, host: u8) -> Result<PodSpec, LabError> {
        let n = self
            .topology
            .node(node)
            .ok_or_else(|| LabError::NoNode(node.to_string()))?;
        let o = n.pod_cidr.0.octets();
        Ok(PodSpec {
            namespace: namespace.into(),
            name: name.into(),
            node: node.into(),
            ip: Ipv4Addr::new(o[0], o[1], o[2], host),
            app: "churn".into(),
            role: Role::Client,
            port: TARGET_PORT,
        })
    }

    /// Creates these pods (all on one node): namespaces, veths, routes, then the Pod objects.
    pub fn add_pods(&self, pods: &[PodSpec]) -> Result<(), LabError> {
        let Some(first) = pods.first() else { return Ok(()) };
        let add = pods.iter().fold(String::new(), |mut s, p| {
            s.push_str("netns add ");
            s.push_str(&self.names.pod_ns(p));
            s.push('\n');
            s
        });
        net::ip_batch(None, &add)?;
        for p in pods {
            net::ns_sysctls(&self.names.pod_ns(p), &QUIET)?;
        }
        let refs: Vec<&PodSpec> = pods.iter().collect();
        net::node_side(&self.names, &self.names.node_ns(&first.node), &refs)?;
        for p in pods {
            net::pod_side(&self.names, p)?;
        }
        let created = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        let standin = self.standin.lock().expect("lock");
        let standin = standin.as_ref().ok_or(LabError::NoStandIn)?;
        for p in pods {
            standin.cluster().apply(kube::pod(&self.topology, p, &created))?;
        }
        Ok(())
    }

    /// Removes pods made by [`Lab::add_pods`]: their namespaces (and veths), then their objects.
    pub fn remove_pods(&self, pods: &[PodSpec]) -> Result<(), LabError> {
        let doomed: Vec<String> = pods.iter().map(|p| self.names.pod_ns(p)).collect();
        let deleted = net::delete_netns(&doomed);
        if let Some(left) = doomed.iter().find(|n| !deleted.contains(n)) {
            return Err(LabError::PodNotDeleted(left.clone()));
        }
        let standin = self.standin.lock().expect("lock");
        let standin = standin.as_ref().ok_or(LabError::NoStandIn)?;
        for p in pods {
            standin.cluster().delete(ResKind::Pods, &p.namespace, &p.name)?;
        }
        Ok(())
    }
}
