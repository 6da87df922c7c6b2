//! What the lab is made of, as plain data: nodes, pods, Services and the names derived from
//! them (namespaces, Calico interface names, kube-proxy chain names). No syscalls here; the
//! network side ([`super::net`]) and the API stand-in objects ([`super::kube`]) are built from it.

use std::{fmt, net::Ipv4Addr};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The Service CIDR kube-proxy's `KUBE-MARK-MASQ` rules compare with (kind and kubeadm default).
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The cluster's pod CIDR (`--cluster-cidr`); traffic from outside it to a Service is masqueraded.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The gateway Calico gives every pod: a link-local address nobody owns, answered by proxy-ARP
/// on the host side (Calico docs, "Why does my container have a route to 169.254.1.1?").
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The MAC address Calico puts on every host-side workload veth.
pub const CALI_MAC: &str = "ee:ee:ee:ee:ee:ee";
/// The lab's underlay: one /24 shared by the nodes' `eth0`.
pub const UNDERLAY_PREFIX: u8 = 24;
/// The port every backend listens on (TCP and UDP echo), except the DNS pods.
pub const TARGET_PORT: u16 = 8080;
/// The DNS pods' port (`kube-system/coredns-N`, behind `kube-system/kube-dns`).
pub const DNS_PORT: u16 = 53;
/// The lab's "outside world": the nodes' default route leads to an upstream router namespace
/// (`<prefix>ext-router`), joined to each node by a veth `uplink0`, addressed from TEST-NET-2
/// (RFC 5737, never routed on the Internet) and routed only inside the lab. The router knows no
/// pod block (as a real upstream router does not) and holds the "external" host.
pub const UPLINK_NET: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 0);
/// The "external" host pods reach through their node's SNAT (TEST-NET-3, RFC 5737), on the
/// router's loopback; a TCP/UDP echo listens on [`EXTERNAL_PORT`], like a database outside the
/// cluster.
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const EXTERNAL_PORT: u16 = 5432;
/// The router's namespace, after the instance prefix.
pub const ROUTER_NS: &str = "ext-router";
/// Calico's VXLAN device and its MTU (1500 minus the 50-byte VXLAN/UDP/IP/Ethernet overhead).
pub const VXLAN_DEV: &str = "vxlan.calico";
pub const VXLAN_MTU: u16 = 1450;

/// IP protocol of a Service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// As iptables spells it.
    pub fn lower(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }

    /// As the Kubernetes API spells it.
    pub fn upper(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.lower())
    }
}

/// One "node": a network namespace with forwarding on, its end of the underlay and a pod CIDR.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeSpec {
    pub name: String,
    pub underlay_ip: Ipv4Addr,
    /// The node's pod block, `10.244.N.0/24`.
    pub pod_cidr: (Ipv4Addr, u8),
}

impl NodeSpec {
    /// The node's index in the lab (its pod block's third octet minus 1).
    fn index(&self) -> u8 {
        self.pod_cidr.0.octets()[2].saturating_sub(1)
    }

    /// The node's `uplink0` address (a /30 per node from [`UPLINK_NET`]).
    pub fn uplink_ip(&self) -> Ipv4Addr {
        let o = UPLINK_NET.octets();
        Ipv4Addr::new(o[0], o[1], o[2], 4 * self.index() + 2)
    }

    /// The router's end of the node's uplink (the node's default gateway).
    pub fn gateway_ip(&self) -> Ipv4Addr {
        let o = UPLINK_NET.octets();
        Ipv4Addr::new(o[0], o[1], o[2], 4 * self.index() + 1)
    }

    /// The address of the node's `vxlan.calico` device (the first of its block, as Calico's
    /// VTEP takes one from the node's block).
    pub fn vtep_ip(&self) -> Ipv4Addr {
        let o = self.pod_cidr.0.octets();
        Ipv4Addr::new(o[0], o[1], o[2], 1)
    }

    /// The MAC of the node's `vxlan.calico` device.
    pub fn vtep_mac(&self) -> String {
        format!("66:ca:11:c0:00:{:02x}", self.index() + 10)
    }
}

/// What a pod does in the lab.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Runs the traffic generator.
    Client,
    /// Answers TCP and UDP echo on [`TARGET_PORT`].
    Backend,
}

/// One pod: a network namespace joined to its node by a `cali…` veth.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub ip: Ipv4Addr,
    /// The `app` label Services select on.
    pub app: String,
    pub role: Role,
    /// The port its servers listen on ([`TARGET_PORT`]; [`DNS_PORT`] for the DNS pods).
    #[serde(default = "target_port")]
    pub port: u16,
}

fn target_port() -> u16 {
    TARGET_PORT
}

impl PodSpec {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Calico's host-side interface name, from the one place netdrop's resolver also uses.
    pub fn cali(&self) -> String {
        netdrop::resolve::calico::interface_name(&self.namespace, &self.name)
    }

    /// The pod side's MAC: kubenet style `0a:58` + the IPv4 address, unique in the lab.
    pub fn mac(&self) -> String {
        let o = self.ip.octets();
        format!("0a:58:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
    }
}

/// One port of a Service.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PortSpec {
    pub name: String,
    pub protocol: Proto,
    pub port: u16,
    pub target_port: u16,
}

/// A `ClusterIP` Service selecting pods by their `app` label.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<PortSpec>,
    /// Selects pods with `app=<selector>`; a selector no pod has gives a Service without endpoints.
    pub selector: String,
}

impl ServiceSpec {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The whole lab.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Topology {
    pub nodes: Vec<NodeSpec>,
    pub pods: Vec<PodSpec>,
    pub services: Vec<ServiceSpec>,
}

/// Sizes of the lab, for tests that want it smaller or a benchmark that wants it larger.
#[derive(Clone, Copy, Debug)]
pub struct Sizes {
    /// Backends of `default/big`, split evenly over the two nodes (≤ 200).
    pub big: usize,
}

impl Default for Sizes {
    fn default() -> Self {
        Self { big: 50 }
    }
}

fn echo_ports() -> Vec<PortSpec> {
    vec![
        PortSpec {
            name: "http".into(),
            protocol: Proto::Tcp,
            port: 80,
            target_port: TARGET_PORT,
        },
        PortSpec {
            name: "udp".into(),
            protocol: Proto::Udp,
            port: 80,
            target_port: TARGET_PORT,
        },
    ]
}

impl Topology {
    /// The default lab: `node-a` and `node-b`; a client pod on node-a; `default/web` (web-0 and
    /// web-1 on node-a, web-2 on node-b), `default/healthy` (one backend per node), `default/big`
    /// (`sizes.big` backends over both nodes) and `default/empty` (no endpoints: REJECT).
    pub fn default_lab(sizes: Sizes) -> Self {
        let big = sizes.big.min(200);
        let nodes = vec![
            NodeSpec {
                name: "node-a".into(),
                underlay_ip: Ipv4Addr::new(192, 168, 50, 10),
                pod_cidr: (Ipv4Addr::new(10, 244, 1, 0), 24),
            },
            NodeSpec {
                name: "node-b".into(),
                underlay_ip: Ipv4Addr::new(192, 168, 50, 11),
                pod_cidr: (Ipv4Addr::new(10, 244, 2, 0), 24),
            },
        ];
        let pod = |name: String, node: usize, host: u8, app: &str, role| PodSpec {
            namespace: "default".into(),
            name,
            node: nodes[node].name.clone(),
            ip: Ipv4Addr::new(10, 244, node as u8 + 1, host),
            app: app.into(),
            role,
            port: TARGET_PORT,
        };
        // CoreDNS-like replicas, one per node, behind kube-dns (UDP and TCP echo on 53).
        let dns = |node: usize| PodSpec {
            namespace: "kube-system".into(),
            port: DNS_PORT,
            ..pod(format!("coredns-{node}"), node, 30, "kube-dns", Role::Backend)
        };
        let mut pods = vec![
            pod("client".into(), 0, 2, "client", Role::Client),
            pod("web-0".into(), 0, 10, "web", Role::Backend),
            pod("web-1".into(), 0, 11, "web", Role::Backend),
            pod("web-2".into(), 1, 10, "web", Role::Backend),
            pod("healthy-0".into(), 0, 20, "healthy", Role::Backend),
            pod("healthy-1".into(), 1, 20, "healthy", Role::Backend),
            dns(0),
            dns(1),
        ];
        let half = big.div_ceil(2);
        for i in 0..big {
            let (node, host) = if i < half { (0, 50 + i) } else { (1, 50 + i - half) };
            pods.push(pod(format!("big-{i:02}"), node, host as u8, "big", Role::Backend));
        }
        let svc = |name: &str, last: u8| ServiceSpec {
            namespace: "default".into(),
            name: name.into(),
            cluster_ip: Ipv4Addr::new(10, 96, 0, last),
            ports: echo_ports(),
            selector: name.into(),
        };
        let dns_port = |name: &str, protocol| PortSpec {
            name: name.into(),
            protocol,
            port: DNS_PORT,
            target_port: DNS_PORT,
        };
        let services = vec![
            svc("web", 10),
            svc("healthy", 20),
            svc("big", 30),
            svc("empty", 40),
            // kube-dns's address in kubeadm clusters is the Service CIDR's tenth; `web` has it
            // here, so the lab's DNS Service takes .53.
            ServiceSpec {
                namespace: "kube-system".into(),
                name: "kube-dns".into(),
                cluster_ip: Ipv4Addr::new(10, 96, 0, 53),
                ports: vec![dns_port("dns", Proto::Udp), dns_port("dns-tcp", Proto::Tcp)],
                selector: "kube-dns".into(),
            },
        ];
        Self { nodes, pods, services }
    }

    pub fn node(&self, name: &str) -> Option<&NodeSpec> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// A pod by `ns/name` or bare name (namespace `default`).
    pub fn pod(&self, key: &str) -> Option<&PodSpec> {
        let (ns, name) = key.split_once('/').unwrap_or(("default", key));
        self.pods.iter().find(|p| p.namespace == ns && p.name == name)
    }

    /// A Service by `ns/name` or bare name (namespace `default`).
    pub fn service(&self, key: &str) -> Option<&ServiceSpec> {
        let (ns, name) = key.split_once('/').unwrap_or(("default", key));
        self.services.iter().find(|s| s.namespace == ns && s.name == name)
    }

    /// The client pod (the first pod with [`Role::Client`]).
    pub fn client(&self) -> &PodSpec {
        self.pods
            .iter()
            .find(|p| p.role == Role::Client)
            .expect("the lab has a client pod")
    }

    /// The Service's backends, in kube-proxy's order (sorted by `ip:port`, as strings).
    pub fn backends(&self, svc: &ServiceSpec) -> Vec<&PodSpec> {
        let mut b: Vec<&PodSpec> = self
            .pods
            .iter()
            .filter(|p| p.role == Role::Backend && p.namespace == svc.namespace && p.app == svc.selector)
            .collect();
        b.sort_by_key(|p| format!("{}:{}", p.ip, p.port));
        b
    }

    /// The Services that select this pod.
    pub fn services_of(&self, pod: &PodSpec) -> Vec<&ServiceSpec> {
        self.services
            .iter()
            .filter(|s| pod.role == Role::Backend && s.namespace == pod.namespace && s.selector == pod.app)
            .collect()
    }
}

/// Network-namespace names of one lab instance: `<prefix>node-a`, `<prefix>pod-<ns>-<name>`.
#[derive(Clone, Debug)]
pub struct Names {
    /// `ndlab-` for the default instance, `ndlab-<instance>-` otherwise.
    pub prefix: String,
}

impl Names {
    pub fn new(instance: Option<&str>) -> Self {
        let prefix = match instance {
            None => "ndlab-".to_string(),
            Some(i) => format!("ndlab-{i}-"),
        };
        Self { prefix }
    }

    pub fn node_ns(&self, node: &str) -> String {
        format!("{}{node}", self.prefix)
    }

    pub fn pod_ns(&self, pod: &PodSpec) -> String {
        format!("{}pod-{}-{}", self.prefix, pod.namespace, pod.name)
    }

    /// The upstream router's namespace (also the "external" host's).
    pub fn router_ns(&self) -> String {
        format!("{}{ROUTER_NS}", self.prefix)
    }

    /// Whether a namespace name belongs to this instance (`<prefix>node-…`, `<prefix>pod-…` or
    /// `<prefix>ext-…`).
    pub fn owns(&self, netns: &str) -> bool {
        // The router by its whole name: an instance called `ext` has the prefix `ndlab-ext-`.
        netns
            .strip_prefix(&self.prefix)
            .is_some_and(|rest| rest.starts_with("node-") || rest.starts_with("pod-") || rest == ROUTER_NS)
    }
}

/// kube-proxy's chain-name hash: the first 16 characters of base32(sha256(s)). Source:
/// kubernetes/kubernetes `pkg/proxy/iptables/proxier.go`, `portProtoHash` (`sha256.Sum256([]byte(
/// servicePortName + protocol))`, `base32.StdEncoding.EncodeToString(hash[:])`, `[:16]`).
fn chain_hash(s: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let digest = Sha256::digest(s.as_bytes());
    // 16 base32 characters are 80 bits: the first 10 bytes.
    let mut bits: u128 = 0;
    for b in &digest[..10] {
        bits = bits << 8 | u128::from(*b);
    }
    (0..16)
        .map(|i| char::from(ALPHABET[(bits >> (75 - 5 * i) & 31) as usize]))
        .collect()
}

/// `KUBE-SVC-…` of a Service port (`servicePortChainName`).
pub fn svc_chain(svc: &ServiceSpec, port: &PortSpec) -> String {
    format!(
        "KUBE-SVC-{}",
        chain_hash(&format!("{}:{}{}", svc.key(), port.name, port.protocol.lower()))
    )
}

/// `KUBE-SEP-…` of one endpoint of a Service port (`servicePortEndpointChainName`).
pub fn sep_chain(svc: &ServiceSpec, port: &PortSpec, endpoint: &str) -> String {
    format!(
        "KUBE-SEP-{}",
        chain_hash(&format!(
            "{}:{}{}{endpoint}",
            svc.key(),
            port.name,
            port.protocol.lower()
        ))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_lab_shape() {
        let t = Topology::default_lab(Sizes::default());
        let web = t.service("default/web").expect("web");
        let b = t.backends(web);
        assert_eq!(b.len(), 3);
        assert_eq!(b.iter().filter(|p| p.node == "node-a").count(), 2);
        assert_eq!(t.backends(t.service("big").expect("big")).len(), 50);
        assert!(t.backends(t.service("empty").expect("empty")).is_empty());
        let mut ips: Vec<_> = t.pods.iter().map(|p| p.ip).collect();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), t.pods.len(), "pod IPs are unique");
        let mut ifs: Vec<_> = t.pods.iter().map(PodSpec::cali).collect();
        ifs.sort();
        ifs.dedup();
        assert_eq!(ifs.len(), t.pods.len(), "cali names are unique");
        assert!(ifs.iter().all(|n| n.len() == 15 && n.starts_with("cali")));
    }

    #[test]
    fn chain_hash_is_base32_of_sha256() {
        // Independently: printf 'default/web:httptcp' | sha256sum | xxd -r -p | base32 | cut -c1-16
        use netdrop_tools::filter;
        let hex = filter("sha256sum", &[], b"default/web:httptcp");
        let digest = filter("xxd", &["-r", "-p"], &hex[..64]);
        let b32 = filter("base32", &[], &digest);
        let want = String::from_utf8_lossy(&b32[..16]).into_owned();
        assert_eq!(chain_hash("default/web:httptcp"), want);
        assert_eq!(chain_hash("x").len(), 16);
    }

    #[test]
    fn names() {
        let n = Names::new(None);
        assert!(n.owns("ndlab-node-a"));
        assert!(n.owns("ndlab-pod-default-web-0"));
        assert!(!n.owns("ndlab-t12-node-a"));
        assert!(n.owns("ndlab-ext-router"));
        assert!(
            !n.owns("ndlab-ext-node-a"),
            "an instance named ext is not the default's"
        );
        let t = Names::new(Some("t12"));
        assert!(t.owns("ndlab-t12-node-a"));
        assert!(!t.owns("ndlab-node-a"));
    }
}
