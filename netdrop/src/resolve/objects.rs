//! Slim views of the four Kubernetes kinds the resolver watches.
//!
//! The agent runs on every node of large clusters, so nothing it does not use is ever materialised:
//! these types deserialize only the handful of fields resolution needs and skip the rest of the JSON
//! (managedFields, annotations, container specs, conditions, ...) without allocating it. That is the
//! "strip unneeded fields" step of the kube-rs reflector pattern, done at parse time instead of after
//! a full `k8s_openapi` object has been built, which also keeps sync CPU and peak memory down.
//!
//! Each type implements [`kube::Resource`] so `kube::runtime::watcher` can list and watch it; the
//! [`ObjectMeta`] it exposes carries only name, namespace and resourceVersion (what the watcher needs).

use std::{borrow::Cow, fmt, net::IpAddr};

use k8s_openapi::{ClusterResourceScope, NamespaceResourceScope, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use serde::{
    Deserialize, Deserializer,
    de::{IgnoredAny, MapAccess, Visitor},
};

/// Label that ties an `EndpointSlice` to its Service
/// (<https://kubernetes.io/docs/concepts/services-networking/endpoint-slices/#ownership>).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One owner reference: what the pod's workload heuristics need.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct OwnerRef {
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub controller: Option<bool>,
}

/// The metadata fields resolution uses, parsed without building maps for labels or annotations.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MetaWire {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    resource_version: Option<String>,
    #[serde(default)]
    deletion_timestamp: Option<IgnoredAny>,
    #[serde(default)]
    owner_references: Vec<OwnerRef>,
    #[serde(default)]
    labels: ServiceNameLabel,
    #[serde(default)]
    annotations: ObserveAnnotation,
}

impl MetaWire {
    fn object_meta(&mut self) -> ObjectMeta {
        ObjectMeta {
            name: self.name.take(),
            namespace: self.namespace.take(),
            resource_version: self.resource_version.take(),
            ..ObjectMeta::default()
        }
    }
}

/// Keeps only the `kubernetes.io/service-name` label; every other label is skipped unallocated.
#[derive(Debug, Clone, Default)]
struct ServiceNameLabel(Option<String>);

impl<'de> Deserialize<'de> for ServiceNameLabel {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ServiceNameLabel;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a label map")
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(ServiceNameLabel(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut found = None;
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    if key == SERVICE_NAME_LABEL {
                        found = Some(map.next_value::<String>()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(ServiceNameLabel(found))
            }
        }
        de.deserialize_any(V)
    }
}

/// The annotation that asks `netdrop agent` to observe a Service.
pub const OBSERVE_ANNOTATION: &str = "netdrop.io/observe";

/// Keeps only whether [`OBSERVE_ANNOTATION`] is `"true"`; every other annotation is skipped
/// unallocated.
#[derive(Debug, Clone, Copy, Default)]
struct ObserveAnnotation(bool);

impl<'de> Deserialize<'de> for ObserveAnnotation {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ObserveAnnotation;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an annotation map")
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(ObserveAnnotation(false))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut found = false;
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    if key == OBSERVE_ANNOTATION {
                        found = map.next_value::<Cow<'de, str>>()?.trim().eq_ignore_ascii_case("true");
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(ObserveAnnotation(found))
            }
        }
        de.deserialize_any(V)
    }
}

macro_rules! impl_resource {
    ($ty:ty, $scope:ty, $kind:literal, $group:literal, $version:literal, $plural:literal) => {
        impl kube::Resource for $ty {
            type DynamicType = ();
            type Scope = $scope;

            fn kind((): &()) -> Cow<'_, str> {
                Cow::Borrowed($kind)
            }
            fn group((): &()) -> Cow<'_, str> {
                Cow::Borrowed($group)
            }
            fn version((): &()) -> Cow<'_, str> {
                Cow::Borrowed($version)
            }
            fn plural((): &()) -> Cow<'_, str> {
                Cow::Borrowed($plural)
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

/// A Pod, reduced to identity, placement, addresses and owner.
#[derive(Debug, Clone, Deserialize)]
#[serde(from = "PodWire")]
pub struct SlimPod {
    pub metadata: ObjectMeta,
    pub owners: Vec<OwnerRef>,
    pub terminating: bool,
    pub node_name: Option<String>,
    pub host_network: bool,
    /// `Succeeded`/`Failed`: the pod's IPs have gone back to the pool.
    pub finished: bool,
    pub ips: Vec<IpAddr>,
}
impl_resource!(SlimPod, NamespaceResourceScope, "Pod", "", "v1", "pods");

#[derive(Deserialize)]
struct PodWire {
    #[serde(default)]
    metadata: MetaWire,
    #[serde(default)]
    spec: PodSpecWire,
    #[serde(default)]
    status: PodStatusWire,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PodSpecWire {
    #[serde(default)]
    node_name: Option<String>,
    #[serde(default)]
    host_network: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct PodStatusWire {
    #[serde(default)]
    phase: Option<String>,
    #[serde(default, rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(default, rename = "podIPs")]
    pod_ips: Vec<IpWire>,
}

#[derive(Deserialize)]
struct IpWire {
    ip: String,
}

fn parse_ips<'a>(it: impl IntoIterator<Item = &'a str>) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for s in it {
        if let Ok(ip) = s.parse::<IpAddr>()
            && !out.contains(&ip)
        {
            out.push(ip);
        }
    }
    out
}

impl From<PodWire> for SlimPod {
    fn from(mut w: PodWire) -> Self {
        // podIPs is authoritative and dual-stack; podIP mirrors its first entry (older servers only
        // fill podIP).
        let ips = parse_ips(
            w.status
                .pod_ips
                .iter()
                .map(|i| i.ip.as_str())
                .chain(w.status.pod_ip.as_deref()),
        );
        Self {
            metadata: w.metadata.object_meta(),
            owners: std::mem::take(&mut w.metadata.owner_references),
            terminating: w.metadata.deletion_timestamp.is_some(),
            node_name: w.spec.node_name.filter(|s| !s.is_empty()),
            host_network: w.spec.host_network.unwrap_or(false),
            finished: matches!(w.status.phase.as_deref(), Some("Succeeded" | "Failed")),
            ips,
        }
    }
}

/// A Service port.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ServicePortWire {
    #[serde(default)]
    pub name: Option<String>,
    pub port: u16,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub target_port: Option<TargetPort>,
    #[serde(default)]
    pub node_port: Option<u16>,
}

/// `targetPort` is an int-or-string: a number or a named container port.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

impl fmt::Display for TargetPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Number(n) => write!(f, "{n}"),
            Self::Name(s) => f.write_str(s),
        }
    }
}

/// A Service, reduced to its addresses and ports.
#[derive(Debug, Clone, Deserialize)]
#[serde(from = "ServiceWire")]
pub struct SlimService {
    pub metadata: ObjectMeta,
    pub type_: Option<String>,
    /// `ClusterIPs` (dual-stack); `None`/headless Services have none.
    pub cluster_ips: Vec<IpAddr>,
    /// `spec.externalIPs` and `status.loadBalancer.ingress[].ip`.
    pub external_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePortWire>,
    /// Annotated `netdrop.io/observe: "true"`.
    pub observe: bool,
}
impl_resource!(SlimService, NamespaceResourceScope, "Service", "", "v1", "services");

#[derive(Deserialize)]
struct ServiceWire {
    #[serde(default)]
    metadata: MetaWire,
    #[serde(default)]
    spec: ServiceSpecWire,
    #[serde(default)]
    status: ServiceStatusWire,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ServiceSpecWire {
    #[serde(default, rename = "type")]
    type_: Option<String>,
    #[serde(default, rename = "clusterIP")]
    cluster_ip: Option<String>,
    #[serde(default, rename = "clusterIPs")]
    cluster_ips: Vec<String>,
    #[serde(default, rename = "externalIPs")]
    external_ips: Vec<String>,
    #[serde(default)]
    ports: Vec<ServicePortWire>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ServiceStatusWire {
    #[serde(default)]
    load_balancer: LbWire,
}

#[derive(Deserialize, Default)]
struct LbWire {
    #[serde(default)]
    ingress: Vec<LbIngressWire>,
}

#[derive(Deserialize)]
struct LbIngressWire {
    #[serde(default)]
    ip: Option<String>,
}

impl From<ServiceWire> for SlimService {
    fn from(mut w: ServiceWire) -> Self {
        // "None" marks a headless Service: no virtual IP to resolve.
        let cluster_ips = parse_ips(
            w.spec
                .cluster_ips
                .iter()
                .map(String::as_str)
                .chain(w.spec.cluster_ip.as_deref()),
        );
        let external_ips = parse_ips(
            w.spec
                .external_ips
                .iter()
                .map(String::as_str)
                .chain(w.status.load_balancer.ingress.iter().filter_map(|i| i.ip.as_deref())),
        );
        Self {
            observe: w.metadata.annotations.0,
            metadata: w.metadata.object_meta(),
            type_: w.spec.type_,
            cluster_ips,
            external_ips,
            ports: w.spec.ports,
        }
    }
}

/// One endpoint of an `EndpointSlice`.
#[derive(Debug, Clone)]
pub struct SlimEndpoint {
    pub addresses: Vec<IpAddr>,
    /// `conditions.ready`; absent means ready (per the `EndpointSlice` API).
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
    /// `targetRef` when it names a Pod: (namespace, name).
    pub pod: Option<(Option<String>, String)>,
}

/// An `EndpointSlice` port.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct SlicePortWire {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub protocol: Option<String>,
}

/// A `discovery.k8s.io/v1` `EndpointSlice`.
#[derive(Debug, Clone, Deserialize)]
#[serde(from = "SliceWire")]
pub struct SlimEndpointSlice {
    pub metadata: ObjectMeta,
    pub service: Option<String>,
    pub endpoints: Vec<SlimEndpoint>,
    pub ports: Vec<SlicePortWire>,
}
impl_resource!(
    SlimEndpointSlice,
    NamespaceResourceScope,
    "EndpointSlice",
    "discovery.k8s.io",
    "v1",
    "endpointslices"
);

#[derive(Deserialize)]
struct SliceWire {
    #[serde(default)]
    metadata: MetaWire,
    #[serde(default)]
    endpoints: Vec<EndpointWire>,
    #[serde(default)]
    ports: Vec<SlicePortWire>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EndpointWire {
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    conditions: ConditionsWire,
    #[serde(default)]
    node_name: Option<String>,
    #[serde(default)]
    target_ref: Option<TargetRefWire>,
}

#[derive(Deserialize, Default)]
struct ConditionsWire {
    #[serde(default)]
    ready: Option<bool>,
    #[serde(default)]
    serving: Option<bool>,
    #[serde(default)]
    terminating: Option<bool>,
}

#[derive(Deserialize)]
struct TargetRefWire {
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

impl From<SliceWire> for SlimEndpointSlice {
    fn from(mut w: SliceWire) -> Self {
        let endpoints = w
            .endpoints
            .into_iter()
            .map(|e| {
                let ready = e.conditions.ready.unwrap_or(true);
                SlimEndpoint {
                    addresses: parse_ips(e.addresses.iter().map(String::as_str)),
                    ready,
                    serving: e.conditions.serving.unwrap_or(ready),
                    terminating: e.conditions.terminating.unwrap_or(false),
                    node_name: e.node_name.filter(|s| !s.is_empty()),
                    pod: e.target_ref.and_then(|t| match (t.kind.as_deref(), t.name) {
                        (Some("Pod"), Some(name)) => Some((t.namespace, name)),
                        _ => None,
                    }),
                }
            })
            .collect();
        Self {
            service: w.metadata.labels.0.take(),
            metadata: w.metadata.object_meta(),
            endpoints,
            ports: w.ports,
        }
    }
}

/// Node address types resolution uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeAddrType {
    Internal,
    External,
}

/// A Node, reduced to its name and addresses.
#[derive(Debug, Clone, Deserialize)]
#[serde(from = "NodeWire")]
pub struct SlimNode {
    pub metadata: ObjectMeta,
    pub addresses: Vec<(IpAddr, NodeAddrType)>,
}
impl_resource!(SlimNode, ClusterResourceScope, "Node", "", "v1", "nodes");

#[derive(Deserialize)]
struct NodeWire {
    #[serde(default)]
    metadata: MetaWire,
    #[serde(default)]
    status: NodeStatusWire,
}

#[derive(Deserialize, Default)]
struct NodeStatusWire {
    #[serde(default)]
    addresses: Vec<NodeAddressWire>,
}

#[derive(Deserialize)]
struct NodeAddressWire {
    #[serde(rename = "type")]
    type_: String,
    address: String,
}

impl From<NodeWire> for SlimNode {
    fn from(mut w: NodeWire) -> Self {
        let addresses = w
            .status
            .addresses
            .iter()
            .filter_map(|a| {
                let t = match a.type_.as_str() {
                    "InternalIP" => NodeAddrType::Internal,
                    "ExternalIP" => NodeAddrType::External,
                    _ => return None,
                };
                Some((a.address.parse().ok()?, t))
            })
            .collect();
        Self {
            metadata: w.metadata.object_meta(),
            addresses,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_keeps_only_what_resolution_needs() {
        let pod: SlimPod = serde_json::from_str(
            r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"web-7d4b9c8f6d-x2x9k","namespace":"default",
            "resourceVersion":"42","labels":{"app":"web"},"managedFields":[{"manager":"kubelet"}],
            "ownerReferences":[{"apiVersion":"apps/v1","kind":"ReplicaSet","name":"web-7d4b9c8f6d","uid":"u","controller":true}]},
            "spec":{"nodeName":"node-a","containers":[{"name":"c","image":"nginx"}]},
            "status":{"phase":"Running","podIP":"10.244.1.7","podIPs":[{"ip":"10.244.1.7"},{"ip":"fd00:10:244:1::7"}]}}"#,
        )
        .expect("pod parses");
        assert_eq!(pod.metadata.name.as_deref(), Some("web-7d4b9c8f6d-x2x9k"));
        assert_eq!(pod.metadata.resource_version.as_deref(), Some("42"));
        assert!(pod.metadata.managed_fields.is_none());
        assert_eq!(pod.ips.len(), 2);
        assert_eq!(pod.owners[0].kind, "ReplicaSet");
        assert!(!pod.terminating && !pod.finished && !pod.host_network);
    }

    #[test]
    fn slice_reads_service_label_and_defaults_ready() {
        let s: SlimEndpointSlice = serde_json::from_str(
            r#"{"metadata":{"name":"web-abc","namespace":"default","labels":{"a":"b","kubernetes.io/service-name":"web"}},
            "addressType":"IPv4","endpoints":[{"addresses":["10.244.1.7"],"nodeName":"node-a","targetRef":{"kind":"Pod","name":"web-1","namespace":"default"}},
            {"addresses":["10.244.2.8"],"conditions":{"ready":false,"terminating":true}}],
            "ports":[{"name":"http","port":8080,"protocol":"TCP"}]}"#,
        )
        .expect("slice parses");
        assert_eq!(s.service.as_deref(), Some("web"));
        assert!(s.endpoints[0].ready);
        assert!(!s.endpoints[1].ready && s.endpoints[1].terminating);
        assert_eq!(s.endpoints[0].pod, Some((Some("default".into()), "web-1".into())));
    }

    #[test]
    fn headless_service_has_no_cluster_ip() {
        let s: SlimService = serde_json::from_str(
            r#"{"metadata":{"name":"db","namespace":"x"},"spec":{"clusterIP":"None","clusterIPs":["None"],"ports":[{"port":5432}]}}"#,
        )
        .expect("service parses");
        assert!(s.cluster_ips.is_empty());
        assert_eq!(s.ports[0].port, 5432);
    }

    #[test]
    fn observe_annotation_is_kept_and_others_skipped() {
        let parse = |annotations: &str| {
            let s: SlimService = serde_json::from_str(&format!(
                r#"{{"metadata":{{"name":"web","namespace":"x","annotations":{annotations}}},"spec":{{"ports":[{{"port":80}}]}}}}"#
            ))
            .expect("service parses");
            s.observe
        };
        assert!(parse(r#"{"a":"b","netdrop.io/observe":"true"}"#));
        assert!(parse(r#"{"netdrop.io/observe":"True"}"#));
        assert!(!parse(r#"{"netdrop.io/observe":"false"}"#));
        assert!(!parse(r#"{"other":"true"}"#));
        assert!(!parse("null"));
    }
}
