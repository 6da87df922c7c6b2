//! A synthetic cluster for benchmarks: N nodes, P pods in Deployments of 10, one Service and one
//! `EndpointSlice` per Deployment. Objects carry what real ones carry (labels, `managedFields`,
//! container specs, conditions) so that parsing and stripping cost what it costs in a cluster.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde_json::{Value, json};

use super::store::{Cluster, StoreError};

/// Sizes of the synthetic cluster.
#[derive(Clone, Copy, Debug)]
pub struct SynthSpec {
    pub pods: usize,
    pub services: usize,
    pub endpointslices: usize,
    pub nodes: usize,
}

impl Default for SynthSpec {
    /// The resolver benchmark's cluster (100,000 pods on 1,000 nodes).
    fn default() -> Self {
        Self {
            pods: 100_000,
            services: 10_000,
            endpointslices: 10_000,
            nodes: 1_000,
        }
    }
}

const PODS_PER_APP: usize = 10;
const NAMESPACES: usize = 100;

fn namespace(app: usize) -> String {
    format!("ns-{:02}", app % NAMESPACES)
}

/// Pod `i`'s address: 10.64.0.0/10 laid out linearly.
pub fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0a40_0000 + i as u32)
}

/// Pod `i`'s IPv6 address.
pub fn pod_ip6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, (i >> 16) as u16, i as u16)
}

/// An address for churn generation `g`: 10.128.0.0/10, never a pod's initial address.
pub fn churn_ip(g: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0a80_0000 + (g as u32 & 0x003f_ffff))
}

pub fn node_ip(n: usize) -> Ipv4Addr {
    Ipv4Addr::from(0xac10_0000 + n as u32)
}

pub fn service_ip(s: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0a60_0000 + s as u32)
}

/// Name and namespace of pod `i`.
pub fn pod_name(i: usize) -> (String, String) {
    let app = i / PODS_PER_APP;
    (namespace(app), format!("app-{app}-6d4cf56db6-{:05}", i % 100_000))
}

fn managed_fields(manager: &str) -> Value {
    json!([{"manager": manager, "operation": "Update", "apiVersion": "v1", "time": "2026-11-20T10:00:00Z",
        "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:app": {}, "f:pod-template-hash": {}}},
        "f:spec": {"f:containers": {"k:{\"name\":\"main\"}": {".": {}, "f:image": {}, "f:name": {}, "f:ports": {}}}},
        "f:status": {"f:conditions": {}, "f:podIP": {}, "f:podIPs": {}}}}])
}

/// Pod `i` on node `i % nodes`, with `ip` (its own address unless churning).
pub fn pod(i: usize, spec: &SynthSpec, ip: IpAddr) -> Value {
    let app = i / PODS_PER_APP;
    let (ns, name) = pod_name(i);
    let node = format!("node-{:04}", i % spec.nodes.max(1));
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "generateName": format!("app-{app}-6d4cf56db6-"),
            "labels": {"app": format!("app-{app}"), "pod-template-hash": "6d4cf56db6", "tier": "backend"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-11-20T10:00:00Z"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("app-{app}-6d4cf56db6"),
                "uid": "7a0c6b8e-0000-4000-8000-000000000000", "controller": true, "blockOwnerDeletion": true}],
            "managedFields": managed_fields("kubelet")},
        "spec": {"nodeName": node, "serviceAccountName": "default", "restartPolicy": "Always",
            "containers": [{"name": "main", "image": "registry.example/app:1.2.3", "imagePullPolicy": "IfNotPresent",
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                "env": [{"name": "MODE", "value": "production"}, {"name": "LOG_LEVEL", "value": "info"}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                "volumeMounts": [{"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}]}],
            "volumes": [{"name": "kube-api-access", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}}],
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}]},
        "status": {"phase": "Running", "hostIP": node_ip(i % spec.nodes.max(1)).to_string(),
            "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}, {"ip": pod_ip6(i).to_string()}],
            "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2026-11-20T10:00:05Z"},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": "2026-11-20T10:00:05Z"}],
            "containerStatuses": [{"name": "main", "ready": true, "restartCount": 0, "image": "registry.example/app:1.2.3",
                "imageID": "registry.example/app@sha256:0000000000000000000000000000000000000000000000000000000000000000",
                "containerID": "containerd://0000000000000000000000000000000000000000000000000000000000000000",
                "started": true, "state": {"running": {"startedAt": "2026-11-20T10:00:04Z"}}}],
            "qosClass": "Burstable", "startTime": "2026-11-20T10:00:00Z"}
    })
}

fn node(n: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": format!("node-{n:04}"), "labels": {"kubernetes.io/hostname": format!("node-{n:04}"),
            "kubernetes.io/os": "linux", "node.kubernetes.io/instance-type": "m6i.large"}, "managedFields": managed_fields("kubelet")},
        "spec": {"podCIDR": format!("10.244.{}.0/24", n % 256)},
        "status": {"addresses": [{"type": "InternalIP", "address": node_ip(n).to_string()},
            {"type": "Hostname", "address": format!("node-{n:04}")}],
            "conditions": [{"type": "Ready", "status": "True"}],
            "nodeInfo": {"kubeletVersion": "v1.33.1", "containerRuntimeVersion": "containerd://2.0.0"}}})
}

fn service(s: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("app-{s}"), "namespace": namespace(s), "labels": {"app": format!("app-{s}")},
            "managedFields": managed_fields("kubectl")},
        "spec": {"type": "ClusterIP", "clusterIP": service_ip(s).to_string(), "clusterIPs": [service_ip(s).to_string()],
            "selector": {"app": format!("app-{s}")}, "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]},
        "status": {"loadBalancer": {}}})
}

fn slice(s: usize, spec: &SynthSpec) -> Value {
    let endpoints: Vec<Value> = (s * PODS_PER_APP..((s + 1) * PODS_PER_APP).min(spec.pods))
        .map(|i| {
            let (ns, name) = pod_name(i);
            json!({"addresses": [pod_ip(i).to_string()], "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": format!("node-{:04}", i % spec.nodes.max(1)),
                "targetRef": {"kind": "Pod", "namespace": ns, "name": name, "uid": "7a0c6b8e-0000-4000-8000-000000000001"}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("app-{s}-x7k2p"), "namespace": namespace(s),
            "labels": {"kubernetes.io/service-name": format!("app-{s}"),
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
            "managedFields": managed_fields("kube-controller-manager")},
        "addressType": "IPv4", "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]})
}

/// Fills `cluster` with the synthetic objects.
pub fn populate(cluster: &Cluster, spec: &SynthSpec) -> Result<(), StoreError> {
    cluster.set_history(100_000);
    for n in 0..spec.nodes {
        cluster.apply(node(n))?;
    }
    for s in 0..spec.services {
        cluster.apply(service(s))?;
    }
    for s in 0..spec.endpointslices {
        cluster.apply(slice(s, spec))?;
    }
    for i in 0..spec.pods {
        cluster.apply(pod(i, spec, IpAddr::V4(pod_ip(i))))?;
    }
    Ok(())
}
