//! What the resolver hands out: cheap-to-clone names, protocols, the per-endpoint result that drop
//! events carry as `src`/`dst`, and Service descriptions for `trace --svc`.

use std::{borrow::Borrow, fmt, net::IpAddr, ops::Deref, str::FromStr, sync::Arc};

use serde::{Serialize, Serializer};

use crate::kernel::proto::IpProto;

/// An interned Kubernetes name: cloning is one atomic increment, so results need no allocation.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(Arc<str>);

impl Name {
    pub fn new(s: &str) -> Self {
        Self(Arc::from(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl Serialize for Name {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl From<&str> for Name {
    fn from(s: &str) -> Self {
        Self::new(s)
    }
}

/// Transport protocol of a Service or endpoint port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    /// From an IP protocol number (6, 17, 132).
    pub fn from_ip_proto(n: u8) -> Option<Self> {
        Self::from_ip(IpProto(n))
    }

    /// The Kubernetes port protocol of an IP protocol, for the three Kubernetes knows.
    pub fn from_ip(p: IpProto) -> Option<Self> {
        match p {
            IpProto::TCP => Some(Self::Tcp),
            IpProto::UDP => Some(Self::Udp),
            IpProto::SCTP => Some(Self::Sctp),
            _ => None,
        }
    }

    /// Its IP protocol number.
    pub fn ip(self) -> IpProto {
        match self {
            Self::Tcp => IpProto::TCP,
            Self::Udp => IpProto::UDP,
            Self::Sctp => IpProto::SCTP,
        }
    }

    /// From the Kubernetes `protocol` field; absent means TCP.
    pub fn from_k8s(s: Option<&str>) -> Option<Self> {
        match s {
            None | Some("TCP") => Some(Self::Tcp),
            Some("UDP") => Some(Self::Udp),
            Some("SCTP") => Some(Self::Sctp),
            Some(_) => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Proto {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            "sctp" => Ok(Self::Sctp),
            other => Err(format!("unknown protocol {other:?} (tcp, udp or sctp)")),
        }
    }
}

/// `NAMESPACE/NAME`, or `NAME` in `namespace` (`-n`), else in `default` — kubectl's rule. The
/// one parser of that syntax (`--svc`, `--pod`, `netdrop resolve --svc`).
pub fn parse_ns_name(value: &str, namespace: Option<&str>) -> Result<(String, String), String> {
    match value.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_owned(), name.to_owned()))
        }
        Some(_) => Err(format!("{value:?}: expected NAMESPACE/NAME or NAME, e.g. default/web")),
        None if value.is_empty() => Err("an empty name: expected NAMESPACE/NAME or NAME, e.g. default/web".to_owned()),
        None => Ok((namespace.unwrap_or("default").to_owned(), value.to_owned())),
    }
}

/// clap's check of a `[NS/]NAME` value, so a malformed one is refused with the other flag errors.
pub fn ns_name_arg(value: &str) -> Result<String, String> {
    parse_ns_name(value, None).map(|_| value.to_owned())
}

/// `IP`, `IP:PORT`, `[IPv6]:PORT`, each optionally `/PROTO` (`10.96.0.10:53/udp`): the address
/// and, with a port, the port and protocol (TCP unless given). The one parser of that syntax
/// (`netdrop resolve`, `netdrop interfaces --dest`).
pub fn parse_addr_port_proto(s: &str) -> Result<(IpAddr, Option<(u16, Proto)>), String> {
    let (addr, proto) = match s.rsplit_once('/') {
        Some((a, p)) => (a, Some(p.parse::<Proto>()?)),
        None => (s, None),
    };
    if let Ok(ip) = addr.parse::<IpAddr>() {
        return Ok((ip, None));
    }
    match addr.parse::<std::net::SocketAddr>() {
        Ok(sa) => Ok((sa.ip(), Some((sa.port(), proto.unwrap_or(Proto::Tcp))))),
        Err(_) => Err(format!(
            "{s:?} is not an address: use IP, IP:PORT, [IPv6]:PORT, optionally /tcp, /udp or /sctp"
        )),
    }
}

/// What an address turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerKind {
    /// A pod's own IP (not hostNetwork).
    Pod,
    /// A node address, including `hostNetwork` pods and `NodePorts`.
    Node,
    /// A Service virtual IP: `ClusterIP`, `externalIP` or load-balancer ingress IP.
    Service,
    /// Known to the cluster state and not part of it (the resolver is synced for the kinds asked).
    External,
    /// Resolution is off, or the kinds needed have not synced yet: nothing can be said.
    #[default]
    Unresolved,
}

impl PeerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pod => "pod",
            Self::Node => "node",
            Self::Service => "service",
            Self::External => "external",
            Self::Unresolved => "unresolved",
        }
    }
}

/// The `src`/`dst` object of a drop event. Field names are part of the JSON schema: keep them.
///
/// `service` is `namespace/name`; `service_port` is the port's name, or its number when unnamed;
/// `workload` is `Kind/name` of the owning controller (e.g. `Deployment/web`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Peer {
    pub kind: PeerKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<Name>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<Name>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<Name>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<Name>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_port: Option<Name>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<Name>,
    /// Set when the address:port is a Service backend: whether that endpoint is ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
}

impl Peer {
    pub fn unresolved() -> Self {
        Self::default()
    }

    pub fn external() -> Self {
        Self {
            kind: PeerKind::External,
            ..Self::default()
        }
    }
}

impl fmt::Display for Peer {
    /// `default/web-3 (Deployment/web) on node-b, backend of default/web:http (not ready)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            PeerKind::Pod => {
                write!(f, "pod ")?;
                if let Some(ns) = &self.namespace {
                    write!(f, "{ns}/")?;
                }
                if let Some(p) = &self.pod {
                    write!(f, "{p}")?;
                }
                if let Some(w) = &self.workload {
                    write!(f, " ({w})")?;
                }
                if let Some(n) = &self.node {
                    write!(f, " on {n}")?;
                }
            }
            PeerKind::Node => {
                write!(f, "node {}", self.node.as_deref().unwrap_or("?"))?;
                if let (Some(ns), Some(p)) = (&self.namespace, &self.pod) {
                    write!(f, " (hostNetwork pod {ns}/{p})")?;
                }
            }
            PeerKind::Service => write!(f, "service")?,
            PeerKind::External => write!(f, "external")?,
            PeerKind::Unresolved => write!(f, "unresolved")?,
        }
        if let Some(s) = &self.service {
            let sep = if self.kind == PeerKind::Service {
                " "
            } else {
                ", backend of "
            };
            write!(f, "{sep}{s}")?;
            if let Some(p) = &self.service_port {
                write!(f, ":{p}")?;
            }
            if self.ready == Some(false) {
                write!(f, " (not ready)")?;
            }
        }
        Ok(())
    }
}

/// One Service port, as `trace --svc` needs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<Name>,
    pub port: u16,
    pub protocol: Proto,
    /// A number or a named container port.
    pub target_port: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_port: Option<u16>,
}

/// One backend endpoint of a Service (from its `EndpointSlices`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Backend {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<Name>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<Name>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<Name>,
    pub ip: IpAddr,
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port_name: Option<Name>,
    pub protocol: Proto,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// A Service and its backends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceInfo {
    pub namespace: Name,
    pub name: Name,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<Name>,
    pub cluster_ips: Vec<IpAddr>,
    pub external_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub backends: Vec<Backend>,
}

#[cfg(test)]
mod parse_tests {
    use super::*;

    #[test]
    fn ns_name_follows_kubectl() {
        assert_eq!(parse_ns_name("default/web", None), Ok(("default".into(), "web".into())));
        assert_eq!(parse_ns_name("web", Some("shop")), Ok(("shop".into(), "web".into())));
        assert_eq!(parse_ns_name("web", None), Ok(("default".into(), "web".into())));
        for bad in ["/web", "default/", "a/b/c", "", "/"] {
            assert!(parse_ns_name(bad, None).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn addr_port_proto() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(parse_addr_port_proto("10.0.0.1"), Ok((ip("10.0.0.1"), None)));
        assert_eq!(
            parse_addr_port_proto("10.96.0.10:53/udp"),
            Ok((ip("10.96.0.10"), Some((53, Proto::Udp))))
        );
        assert_eq!(
            parse_addr_port_proto("[fd00::1]:443"),
            Ok((ip("fd00::1"), Some((443, Proto::Tcp))))
        );
        assert!(parse_addr_port_proto("10.0.0.1:80/icmp").is_err());
        assert!(parse_addr_port_proto("cali123").is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_json_field_names_are_stable() {
        let p = Peer {
            kind: PeerKind::Pod,
            pod: Some("web-3".into()),
            namespace: Some("default".into()),
            node: Some("node-b".into()),
            service: Some("default/web".into()),
            service_port: Some("http".into()),
            workload: Some("Deployment/web".into()),
            ready: Some(true),
        };
        let v = serde_json::to_value(&p).expect("serializes");
        assert_eq!(
            v,
            serde_json::json!({"kind":"pod","pod":"web-3","namespace":"default","node":"node-b",
                "service":"default/web","service_port":"http","workload":"Deployment/web","ready":true})
        );
        assert_eq!(
            p.to_string(),
            "pod default/web-3 (Deployment/web) on node-b, backend of default/web:http"
        );
        assert_eq!(
            serde_json::to_value(Peer::external()).expect("serializes"),
            serde_json::json!({"kind":"external"})
        );
    }
}
