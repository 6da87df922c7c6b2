//! The lab as Kubernetes objects (kubectl `-o json` shape) for the API stand-in: Nodes with
//! their `InternalIP` and `podCIDR`, Pods with IP, node and readiness, `ClusterIP` Services and one
//! `EndpointSlice` per Service, all matching what [`super::net`] built.

use serde_json::{Value, json};

use super::topology::{DNS_PORT, PodSpec, Role, ServiceSpec, Topology};

fn node(n: &super::topology::NodeSpec, created: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": n.name, "creationTimestamp": created,
            "labels": {"kubernetes.io/hostname": n.name, "kubernetes.io/os": "linux"}},
        "spec": {"podCIDR": format!("{}/{}", n.pod_cidr.0, n.pod_cidr.1),
                 "podCIDRs": [format!("{}/{}", n.pod_cidr.0, n.pod_cidr.1)]},
        "status": {
            "addresses": [{"type": "InternalIP", "address": n.underlay_ip.to_string()},
                          {"type": "Hostname", "address": n.name}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
            "nodeInfo": {"kubeletVersion": "v1.33.1", "kubeProxyVersion": "v1.33.1",
                         "containerRuntimeVersion": "netdrop-lab", "operatingSystem": "linux", "architecture": "amd64"}
        }
    })
}

pub(super) fn pod(topo: &Topology, p: &PodSpec, created: &str) -> Value {
    let host_ip = topo
        .node(&p.node)
        .map(|n| n.underlay_ip.to_string())
        .unwrap_or_default();
    let ports = if p.role == Role::Backend {
        let (tcp, udp) = if p.port == DNS_PORT {
            ("dns-tcp", "dns")
        } else {
            ("http", "udp")
        };
        json!([{"name": tcp, "containerPort": p.port, "protocol": "TCP"},
               {"name": udp, "containerPort": p.port, "protocol": "UDP"}])
    } else {
        json!([])
    };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": p.name, "namespace": p.namespace, "creationTimestamp": created,
            "labels": {"app": p.app},
            "annotations": {"cni.projectcalico.org/podIP": format!("{}/32", p.ip),
                            "cni.projectcalico.org/podIPs": format!("{}/32", p.ip)}},
        "spec": {"nodeName": p.node,
                 "containers": [{"name": "main", "image": "netdrop-lab/echo:1", "ports": ports}]},
        "status": {
            "phase": "Running", "hostIP": host_ip, "hostIPs": [{"ip": host_ip}],
            "podIP": p.ip.to_string(), "podIPs": [{"ip": p.ip.to_string()}],
            "conditions": [{"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}],
            "startTime": created
        }
    })
}

fn service(s: &ServiceSpec, created: &str) -> Value {
    let ports: Vec<Value> = s
        .ports
        .iter()
        .map(|p| json!({"name": p.name, "port": p.port, "protocol": p.protocol.upper(), "targetPort": p.target_port}))
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": s.name, "namespace": s.namespace, "creationTimestamp": created,
                     "labels": {"app": s.selector}},
        "spec": {"type": "ClusterIP", "clusterIP": s.cluster_ip.to_string(), "clusterIPs": [s.cluster_ip.to_string()],
                 "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack", "sessionAffinity": "None",
                 "internalTrafficPolicy": "Cluster", "ports": ports, "selector": {"app": s.selector}},
        "status": {"loadBalancer": {}}
    })
}

fn endpoint_slice(topo: &Topology, s: &ServiceSpec, created: &str) -> Value {
    let endpoints: Vec<Value> = topo
        .backends(s)
        .iter()
        .map(|p| {
            json!({
                "addresses": [p.ip.to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": p.node,
                "targetRef": {"kind": "Pod", "namespace": p.namespace, "name": p.name}
            })
        })
        .collect();
    let ports: Vec<Value> = s
        .ports
        .iter()
        .map(|p| json!({"name": p.name, "port": p.target_port, "protocol": p.protocol.upper()}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{}-lab01", s.name), "namespace": s.namespace, "creationTimestamp": created,
            "generateName": format!("{}-", s.name),
            "labels": {"kubernetes.io/service-name": s.name,
                       "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": s.name, "controller": true,
                                 "blockOwnerDeletion": true, "uid": "00000000-0000-4000-8000-00000000abcd"}]},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports
    })
}

/// Every object the stand-in serves for the lab, created now.
pub fn objects(topo: &Topology) -> Vec<Value> {
    let created = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let c = created.as_str();
    let mut out: Vec<Value> = topo.nodes.iter().map(|n| node(n, c)).collect();
    out.extend(topo.pods.iter().map(|p| pod(topo, p, c)));
    out.extend(topo.services.iter().map(|s| service(s, c)));
    out.extend(topo.services.iter().map(|s| endpoint_slice(topo, s, c)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::topology::Sizes;

    #[test]
    fn slices_match_backends() {
        let t = Topology::default_lab(Sizes::default());
        let objs = objects(&t);
        let web = objs
            .iter()
            .find(|o| o["kind"] == "EndpointSlice" && o["metadata"]["labels"]["kubernetes.io/service-name"] == "web")
            .expect("web slice");
        assert_eq!(web["endpoints"].as_array().map(Vec::len), Some(3));
        assert_eq!(web["ports"][0]["port"], 8080);
        let empty = objs
            .iter()
            .find(|o| o["kind"] == "EndpointSlice" && o["metadata"]["labels"]["kubernetes.io/service-name"] == "empty")
            .expect("empty slice");
        assert_eq!(empty["endpoints"].as_array().map(Vec::len), Some(0));
        assert_eq!(objs.iter().filter(|o| o["kind"] == "Pod").count(), t.pods.len());
    }
}
