//! The faults the lab injects, each aimed at one backend and node so that a test can assert
//! netdrop names them: what each does, how it is undone, and what the client should see.

use std::{fmt, fs, path::PathBuf, str::FromStr};

use serde::{Deserialize, Serialize};

use super::{
    BackendStatus, Lab, LabError, net,
    topology::{EXTERNAL_IP, EXTERNAL_PORT, PodSpec, VXLAN_DEV, VXLAN_MTU},
};

/// `conntrack-insert` squeezes MASQUERADE into 4 ports from here on, a fresh 4 each time it is
/// applied: entries of the previous application (`TIME_WAIT`, UDP) must not decide the next one.
const SQUEEZE_BASE: u32 = 40000;
static SQUEEZE_SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn squeezed_ports() -> String {
    let n = SQUEEZE_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 5000;
    let lo = SQUEEZE_BASE + 4 * n;
    format!("{lo}-{}", lo + 3)
}
/// `nf_conntrack_max` set by `conntrack-full` unless told otherwise.
pub const DEFAULT_CT_MAX: u64 = 256;
const CT_MAX_KEY: &str = "net.netfilter.nf_conntrack_max";

/// The faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// One backend unreachable by an iptables DROP in FORWARD on its node (a policy drop).
    PolicyDrop,
    /// One backend's server stops listening on the target port.
    NotListening,
    /// Conntrack insert failures on the client's node: MASQUERADE of the client's flows to one
    /// backend squeezed into 4 ports, so NAT runs out of unique tuples (the SNAT race).
    ConntrackInsert,
    /// `nf_conntrack_max` lowered (a global sysctl; saved and restored).
    ConntrackFull,
    /// A backend on the other node loses its /32 route there.
    RouteMissing,
    /// One of `default/big`'s backends dropped on its node, like `policy-drop`.
    BigOneBad,
    /// The nodes talk over a VXLAN overlay (Calico's `vxlan.calico`, MTU 1450) while pods keep
    /// MTU 1500, ICMP "fragmentation needed" is filtered on the backend's node and GSO is off in
    /// the backend's pod: its responses larger than 1450 bytes are dropped on its node
    /// (`PKT_TOO_BIG`, `Ip FragFails`), small ones pass. Cross-node only.
    MtuBlackhole,
    /// The client's node lost its route to the other node's pod block (BGP withdrew it): packets
    /// to every pod there follow the default route to the upstream router, which knows no pod
    /// block and drops them (`IP_INNOROUTES`, its `IpExt InNoRoutes`).
    NodeRouteMissing,
    /// An egress policy on the client's node drops the client's packets to the "external" host.
    EgressDeny,
    /// SNAT port exhaustion on the client's node: the client's flows to the "external" host get
    /// 4 source ports, all held by idle connections; conntrack's insert fails.
    SnatExhaustion,
    /// The node of one DNS replica (`kube-system/coredns-1`) drops UDP/53 it forwards.
    DnsUdpDrop,
    /// `conntrack-full` for DNS: `nf_conntrack_max` lowered (global; saved and restored).
    DnsConntrackFull,
    /// Nothing broken: parallel A/AAAA queries from one socket race to create one conntrack
    /// entry; Linux 5.6+ resolves the clash and keeps both (`clash_resolve`), nothing drops.
    DnsRace,
}

impl FaultKind {
    pub const ALL: [Self; 13] = [
        Self::PolicyDrop,
        Self::NotListening,
        Self::ConntrackInsert,
        Self::ConntrackFull,
        Self::RouteMissing,
        Self::BigOneBad,
        Self::MtuBlackhole,
        Self::NodeRouteMissing,
        Self::EgressDeny,
        Self::SnatExhaustion,
        Self::DnsUdpDrop,
        Self::DnsConntrackFull,
        Self::DnsRace,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::PolicyDrop => "policy-drop",
            Self::NotListening => "not-listening",
            Self::ConntrackInsert => "conntrack-insert",
            Self::ConntrackFull => "conntrack-full",
            Self::RouteMissing => "route-missing",
            Self::BigOneBad => "big-one-bad",
            Self::MtuBlackhole => "mtu-blackhole",
            Self::NodeRouteMissing => "node-route-missing",
            Self::EgressDeny => "egress-deny",
            Self::SnatExhaustion => "snat-exhaustion",
            Self::DnsUdpDrop => "dns-udp-drop",
            Self::DnsConntrackFull => "dns-conntrack-full",
            Self::DnsRace => "dns-race",
        }
    }

    /// The Service the fault is shown with (`cargo xtask demo` traces it), or `None` for the
    /// egress faults (traced by the external address).
    pub fn service(self) -> Option<&'static str> {
        match self {
            Self::BigOneBad => Some("default/big"),
            Self::DnsUdpDrop | Self::DnsConntrackFull | Self::DnsRace => Some("kube-system/kube-dns"),
            Self::EgressDeny | Self::SnatExhaustion => None,
            _ => Some("default/web"),
        }
    }

    /// Faults that change the same thing, one at a time: the route to the other node's pod
    /// block, or the global `nf_conntrack_max` (saved once, restored once).
    fn conflicts_with(self, other: Self) -> bool {
        let group = |k: Self| match k {
            Self::MtuBlackhole | Self::NodeRouteMissing => 1,
            Self::ConntrackFull | Self::DnsConntrackFull => 2,
            _ => 0,
        };
        group(self) != 0 && group(self) == group(other)
    }

    /// The backend aimed at when none is given.
    fn default_pod(self) -> Option<&'static str> {
        match self {
            Self::PolicyDrop
            | Self::ConntrackInsert
            | Self::RouteMissing
            | Self::MtuBlackhole
            | Self::NodeRouteMissing => Some("default/web-2"),
            Self::NotListening => Some("default/web-0"),
            Self::BigOneBad => Some("default/big-17"),
            Self::DnsUdpDrop => Some("kube-system/coredns-1"),
            Self::ConntrackFull | Self::DnsConntrackFull | Self::DnsRace | Self::EgressDeny | Self::SnatExhaustion => {
                None
            }
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FaultKind {
    type Err = LabError;
    fn from_str(s: &str) -> Result<Self, LabError> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| LabError::UnknownFault(s.to_string()))
    }
}

/// A fault to inject.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FaultRequest {
    pub kind: FaultKind,
    /// The backend (`ns/name`); each fault has a default.
    pub pod: Option<String>,
    /// `conntrack-full`: the `nf_conntrack_max` to set.
    pub max: Option<u64>,
}

impl FaultRequest {
    pub fn new(kind: FaultKind) -> Self {
        Self {
            kind,
            pod: None,
            max: None,
        }
    }
}

/// An iptables rule a fault added, for reading its packet counter.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RuleRef {
    /// Namespace the rule is in.
    pub netns: String,
    pub table: String,
    pub chain: String,
    /// The rule's `-m comment`.
    pub comment: String,
}

/// A global sysctl a fault changed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SysctlChange {
    pub key: String,
    pub old: String,
    pub new: String,
}

/// What a fault did and whom it targets (printed by `lab fault`, kept in the lab's status).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FaultRecord {
    #[serde(rename = "type")]
    pub kind_tag: String,
    pub fault: FaultKind,
    /// `applied` or `cleared`.
    pub action: String,
    /// The Service whose traffic it breaks (the targeted backend's), if any.
    pub service: Option<String>,
    /// The targeted backend, if any.
    pub backend: Option<BackendStatus>,
    /// The node where the packets are dropped.
    pub node: String,
    pub node_netns: String,
    pub node_netns_path: PathBuf,
    /// What was changed, as commands.
    pub did: Vec<String>,
    /// What clients should see.
    pub expect: String,
    /// The iptables rules the fault added (their counters count the dropped packets).
    pub rules: Vec<RuleRef>,
    pub sysctl: Option<SysctlChange>,
    /// The egress faults: the "external" `IP:PORT` the client's traffic is aimed at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<String>,
}

/// How to undo a fault.
pub(super) enum Undo {
    /// `iptables -t <table> -D <chain> <spec…>` in a namespace.
    /// Also closes held connections first.
    Rules {
        netns: String,
        rules: Vec<(String, String, Vec<String>)>,
        holders: Vec<tokio::task::AbortHandle>,
    },
    /// Start the pod's servers again.
    Listen { pod: String },
    /// `ip route add <args>` in a namespace.
    Route { netns: String, args: Vec<String> },
    /// Restore the saved sysctls.
    Sysctl,
    /// Several steps: close held connections, delete iptables rules (netns, table, chain,
    /// spec), then run `ip -n <netns> -batch` lines, in this order.
    Many {
        holders: Vec<tokio::task::AbortHandle>,
        rules: Vec<(String, String, String, Vec<String>)>,
        ip: Vec<(String, String)>,
    },
}

/// The saved global sysctls (written before any change, removed after the restore), so that a
/// crashed lab's next `up` or `down` restores them.
#[derive(Serialize, Deserialize, Default)]
pub(super) struct SavedSysctls {
    pub owner_pid: u32,
    pub sysctls: Vec<(String, String)>,
}

pub(super) fn sysctl_path(key: &str) -> PathBuf {
    PathBuf::from("/proc/sys").join(key.replace('.', "/"))
}

/// Restores what `<state_dir>/sysctl-restore.json` saved; returns the keys restored.
pub(super) fn restore_sysctls(file: &std::path::Path) -> Vec<String> {
    let Ok(text) = fs::read_to_string(file) else {
        return Vec::new();
    };
    let Ok(saved) = serde_json::from_str::<SavedSysctls>(&text) else {
        return Vec::new();
    };
    let mut done = Vec::new();
    for (k, v) in &saved.sysctls {
        match fs::write(sysctl_path(k), v) {
            Ok(()) => done.push(format!("{k}={v}")),
            Err(e) => eprintln!("netdrop-lab: could not restore {k}={v}: {e}"),
        }
    }
    if done.len() == saved.sysctls.len() {
        let _ = fs::remove_file(file);
    }
    done
}

impl Lab {
    fn target(&self, req: &FaultRequest) -> Result<Option<PodSpec>, LabError> {
        let Some(key) = req.pod.as_deref().or(req.kind.default_pod()) else {
            return Ok(None);
        };
        let pod = self
            .topology
            .pod(key)
            .ok_or_else(|| LabError::NoPod(key.to_string()))?
            .clone();
        let must_serve = match req.kind {
            FaultKind::BigOneBad => Some("big"),
            FaultKind::DnsUdpDrop => Some("kube-dns"),
            _ => None,
        };
        if self.topology.services_of(&pod).is_empty() || must_serve.is_some_and(|s| pod.app != s) {
            return Err(LabError::BadTarget {
                fault: req.kind.to_string(),
                why: format!("{key} is not a backend of {}", must_serve.unwrap_or("any Service")),
            });
        }
        let cross_node = matches!(
            req.kind,
            FaultKind::RouteMissing | FaultKind::MtuBlackhole | FaultKind::NodeRouteMissing | FaultKind::DnsUdpDrop
        );
        if cross_node && pod.node == self.topology.client().node {
            return Err(LabError::BadTarget {
                fault: req.kind.to_string(),
                why: format!(
                    "{key} is on the client's node {}; {} needs a backend on another node",
                    pod.node, req.kind
                ),
            });
        }
        Ok(Some(pod))
    }

    /// Injects a fault. One fault of each kind at a time.
    #[expect(clippy::too_many_lines, reason = "one short arm per fault")]
    pub fn fault(&self, req: &FaultRequest) -> Result<FaultRecord, LabError> {
        let mut faults = self.faults.lock().expect("faults lock");
        if faults.iter().any(|(r, _)| r.fault == req.kind) {
            return Err(LabError::FaultActive(req.kind.to_string()));
        }
        if let Some((other, _)) = faults.iter().find(|(r, _)| req.kind.conflicts_with(r.fault)) {
            return Err(LabError::BadTarget {
                fault: req.kind.to_string(),
                why: format!(
                    "{} changes the same route or sysctl; `lab fault clear {}` first",
                    other.fault, other.fault
                ),
            });
        }
        let pod = self.target(req)?;
        let client = self.topology.client().clone();
        let service = match req.kind {
            FaultKind::DnsConntrackFull | FaultKind::DnsRace => req.kind.service().map(String::from),
            _ => pod
                .as_ref()
                .and_then(|p| self.topology.services_of(p).first().map(|s| s.key())),
        };
        let backend = pod.as_ref().map(Self::backend_status);
        let node_name = match req.kind {
            FaultKind::ConntrackInsert
            | FaultKind::ConntrackFull
            | FaultKind::DnsConntrackFull
            | FaultKind::DnsRace
            | FaultKind::NodeRouteMissing
            | FaultKind::EgressDeny
            | FaultKind::SnatExhaustion => client.node.clone(),
            _ => pod.as_ref().map(|p| p.node.clone()).unwrap_or_default(),
        };
        let mut external = None;
        let node_ns = self.names.node_ns(&node_name);
        let tag = |what: &str| format!("ndlab-fault:{} {what}", req.kind);
        let mut rules = Vec::new();
        let mut did = Vec::new();
        let mut sysctl = None;
        let (undo, expect) = match req.kind {
            FaultKind::PolicyDrop | FaultKind::BigOneBad => {
                let p = pod.as_ref().expect("target");
                let comment = tag(&p.key());
                let spec: Vec<String> = ["-o", &p.cali(), "-m", "comment", "--comment", &comment, "-j", "DROP"]
                    .iter()
                    .map(|s| (*s).to_string())
                    .collect();
                Self::iptables_insert(&node_ns, "filter", "FORWARD", &spec, &mut did)?;
                rules.push(RuleRef {
                    netns: node_ns.clone(),
                    table: "filter".into(),
                    chain: "FORWARD".into(),
                    comment,
                });
                let svc = service.clone().unwrap_or_default();
                let n = self
                    .topology
                    .service(&svc)
                    .map_or(1, |s| self.topology.backends(s).len());
                (
                    Undo::Rules {
                        netns: node_ns.clone(),
                        rules: vec![("filter".into(), "FORWARD".into(), spec)],
                        holders: Vec::new(),
                    },
                    format!(
                        "about 1/{n} of new connections to {svc} (those kube-proxy sends to {}) time out: the packets to {} are dropped by a DROP rule in FORWARD on {node_name}",
                        p.key(),
                        p.cali()
                    ),
                )
            }
            FaultKind::NotListening => {
                let p = pod.as_ref().expect("target");
                self.servers.lock().expect("servers lock").remove(&p.key());
                did.push(format!(
                    "closed the TCP and UDP sockets of {} on port {}",
                    p.key(),
                    super::topology::TARGET_PORT
                ));
                (
                    Undo::Listen { pod: p.key() },
                    format!(
                        "connections sent to {} are refused (RST from its namespace: no socket on {}); UDP gets ICMP port unreachable (rate-limited by the kernel's icmp_ratelimit, so most UDP clients see a timeout)",
                        p.key(),
                        super::topology::TARGET_PORT
                    ),
                )
            }
            FaultKind::ConntrackInsert => {
                let p = pod.as_ref().expect("target");
                let comment = tag(&format!("{} -> {}", client.key(), p.key()));
                let ports = squeezed_ports();
                let mut specs = Vec::new();
                for proto in ["tcp", "udp"] {
                    let spec: Vec<String> = [
                        "-s",
                        &format!("{}/32", client.ip),
                        "-d",
                        &format!("{}/32", p.ip),
                        "-p",
                        proto,
                        "-m",
                        "comment",
                        "--comment",
                        &comment,
                        "-j",
                        "MASQUERADE",
                        "--to-ports",
                        &ports,
                    ]
                    .iter()
                    .map(|s| (*s).to_string())
                    .collect();
                    Self::iptables_insert(&node_ns, "nat", "POSTROUTING", &spec, &mut did)?;
                    specs.push(("nat".to_string(), "POSTROUTING".to_string(), spec));
                }
                rules.push(RuleRef {
                    netns: node_ns.clone(),
                    table: "nat".into(),
                    chain: "POSTROUTING".into(),
                    comment,
                });
                // Linux 6.x lets NAT evict a TIME_WAIT entry to reuse its tuple for a new SYN
                // (nf_nat_used_tuple_harder, net/netfilter/nf_nat_core.c), so closed TCP flows
                // free their port at once; idle connections hold the squeezed ports, as
                // long-lived connections do on a real node. UDP entries hold theirs for 30 s.
                let to = std::net::SocketAddr::from((p.ip, p.port));
                let holders = match self.hold_ports(&client, to, 4) {
                    Ok(h) => h,
                    Err(e) => {
                        let _ = self.undo(Undo::Rules {
                            netns: node_ns.clone(),
                            rules: specs,
                            holders: Vec::new(),
                        });
                        return Err(e);
                    }
                };
                did.push(format!(
                    "opened {} idle TCP connections {} -> {}:{} holding the squeezed ports",
                    holders.len(),
                    client.key(),
                    p.ip,
                    super::topology::TARGET_PORT
                ));
                (
                    Undo::Rules {
                        netns: node_ns.clone(),
                        rules: specs,
                        holders,
                    },
                    format!(
                        "new flows from {} to {} fail: the 4 source ports MASQUERADE may use ({ports}) are taken (TCP: by idle connections; UDP: by the first 4 flows for 30 s), NAT finds no unique tuple and conntrack's insert fails on {node_name} (insert_failed in {node_ns}'s /proc/net/stat/nf_conntrack); about 1/{} of {}'s flows",
                        client.key(),
                        p.key(),
                        service
                            .as_deref()
                            .and_then(|s| self.topology.service(s))
                            .map_or(1, |s| self.topology.backends(s).len()),
                        service.as_deref().unwrap_or("?"),
                    ),
                )
            }
            FaultKind::ConntrackFull | FaultKind::DnsConntrackFull => {
                let max = req.max.unwrap_or(DEFAULT_CT_MAX);
                let path = sysctl_path(CT_MAX_KEY);
                let old = fs::read_to_string(&path)
                    .map_err(|source| LabError::Io {
                        path: path.clone(),
                        source,
                    })?
                    .trim()
                    .to_string();
                // Saved before the change: a crash from here on is repaired by the next up/down.
                let saved = SavedSysctls {
                    owner_pid: std::process::id(),
                    sysctls: vec![(CT_MAX_KEY.into(), old.clone())],
                };
                let file = self.state_dir.join(super::SYSCTL_FILE);
                fs::write(&file, serde_json::to_vec(&saved).expect("json"))
                    .map_err(|source| LabError::Io { path: file, source })?;
                fs::write(&path, max.to_string()).map_err(|source| LabError::Io {
                    path: path.clone(),
                    source,
                })?;
                did.push(format!(
                    "sysctl -w {CT_MAX_KEY}={max} (was {old}; global: every namespace on this kernel)"
                ));
                sysctl = Some(SysctlChange {
                    key: CT_MAX_KEY.into(),
                    old,
                    new: max.to_string(),
                });
                (
                    Undo::Sysctl,
                    format!(
                        "new flows fail in every lab node holding {max} or more conntrack entries, first {node_name} where the client's flows are tracked; early_drop evicts unreplied entries first, so some flows still pass. Client failures = the sum of 'drop' over the nodes' /proc/net/stat/nf_conntrack (Lab::conntrack_stat); dmesg says 'nf_conntrack: table full'"
                    ),
                )
            }
            FaultKind::RouteMissing => {
                let p = pod.as_ref().expect("target");
                let route = vec![
                    format!("{}/32", p.ip),
                    "dev".into(),
                    p.cali(),
                    "scope".into(),
                    "link".into(),
                ];
                let mut args: Vec<&str> = vec!["route", "del"];
                args.extend(route.iter().map(String::as_str));
                net::ns_cmd(&node_ns, "ip", &args, None)?;
                did.push(format!("ip -n {node_ns} {}", args.join(" ")));
                let cidr = self
                    .topology
                    .node(&node_name)
                    .map(|n| format!("{}/{}", n.pod_cidr.0, n.pod_cidr.1))
                    .unwrap_or_default();
                (
                    Undo::Route {
                        netns: node_ns.clone(),
                        args: route,
                    },
                    format!(
                        "flows sent to {} time out: {node_name} has no /32 route to {} any more and its blackhole route for {cidr} (Calico's block route) discards them",
                        p.key(),
                        p.ip
                    ),
                )
            }
            FaultKind::MtuBlackhole => {
                let p = pod.as_ref().expect("target");
                let (near, far) = (
                    self.topology.node(&client.node).expect("client node").clone(),
                    self.topology.node(&p.node).expect("pod node").clone(),
                );
                let mut ip_undo = Vec::new();
                for (me, other) in [(&near, &far), (&far, &near)] {
                    let ns = self.names.node_ns(&me.name);
                    let cidr = format!("{}/{}", other.pod_cidr.0, other.pod_cidr.1);
                    let lines = format!(
                        "link add {VXLAN_DEV} address {mac} mtu {VXLAN_MTU} type vxlan id 4096 local {local} remote {remote} dstport 4789 dev eth0\n\
                         link set {VXLAN_DEV} up\n\
                         addr add {vtep}/32 dev {VXLAN_DEV}\n\
                         neigh replace {peer} lladdr {peer_mac} dev {VXLAN_DEV} nud permanent\n\
                         route replace {cidr} via {peer} dev {VXLAN_DEV} onlink proto bird\n",
                        mac = me.vtep_mac(),
                        local = me.underlay_ip,
                        remote = other.underlay_ip,
                        vtep = me.vtep_ip(),
                        peer = other.vtep_ip(),
                        peer_mac = other.vtep_mac(),
                    );
                    // Undone in reverse: the BGP route back first, then the device.
                    ip_undo.push((
                        ns.clone(),
                        format!(
                            "route replace {cidr} via {} dev eth0 proto bird\nlink del {VXLAN_DEV}\n",
                            other.underlay_ip
                        ),
                    ));
                    let r = net::ip_batch(Some(&ns), &lines);
                    if let Err(e) = r {
                        let _ = self.undo(Undo::Many {
                            holders: Vec::new(),
                            rules: Vec::new(),
                            ip: ip_undo,
                        });
                        return Err(e);
                    }
                    did.extend(lines.lines().map(|l| format!("ip -n {ns} {l}")));
                }
                // One segment per packet from the backend (no GSO/TSO): each too-big segment is
                // one drop and one FragFails.
                let pod_ns = self.names.pod_ns(p);
                let gso = "link set eth0 gso_max_segs 1\n";
                let r = net::ip_batch(Some(&pod_ns), gso);
                ip_undo.push((pod_ns.clone(), "link set eth0 gso_max_segs 65535\n".into()));
                if let Err(e) = r {
                    let _ = self.undo(Undo::Many {
                        holders: Vec::new(),
                        rules: Vec::new(),
                        ip: ip_undo,
                    });
                    return Err(e);
                }
                did.push(format!("ip -n {pod_ns} {}", gso.trim_end()));
                let comment = tag(&format!("icmp frag-needed on {}", p.node));
                let spec: Vec<String> = [
                    "-p",
                    "icmp",
                    "--icmp-type",
                    "fragmentation-needed",
                    "-m",
                    "comment",
                    "--comment",
                    &comment,
                    "-j",
                    "DROP",
                ]
                .iter()
                .map(|s| (*s).to_string())
                .collect();
                if let Err(e) = Self::iptables_insert(&node_ns, "filter", "OUTPUT", &spec, &mut did) {
                    let _ = self.undo(Undo::Many {
                        holders: Vec::new(),
                        rules: Vec::new(),
                        ip: ip_undo,
                    });
                    return Err(e);
                }
                rules.push(RuleRef {
                    netns: node_ns.clone(),
                    table: "filter".into(),
                    chain: "OUTPUT".into(),
                    comment,
                });
                (
                    Undo::Many {
                        holders: Vec::new(),
                        rules: vec![(node_ns.clone(), "filter".into(), "OUTPUT".into(), spec)],
                        ip: ip_undo,
                    },
                    format!(
                        "the nodes talk over {VXLAN_DEV} (MTU {VXLAN_MTU}) while pods keep MTU 1500: responses of {} larger than {VXLAN_MTU} bytes (`lab traffic --reply-bytes 4000`) are dropped on {node_name} (PKT_TOO_BIG in ip_forward, Ip FragFails in {node_ns}); the ICMP 'fragmentation needed' that would lower the path MTU is dropped by a rule in its OUTPUT, so the sender never learns: large responses time out, small ones pass, pods on {} are not affected",
                        p.key(),
                        client.node
                    ),
                )
            }
            FaultKind::NodeRouteMissing => {
                let p = pod.as_ref().expect("target");
                let far = self.topology.node(&p.node).expect("pod node").clone();
                let cidr = format!("{}/{}", far.pod_cidr.0, far.pod_cidr.1);
                let del = format!("route del {cidr}\n");
                net::ip_batch(Some(&node_ns), &del)?;
                did.push(format!("ip -n {node_ns} {}", del.trim_end()));
                (
                    Undo::Many {
                        holders: Vec::new(),
                        rules: Vec::new(),
                        ip: vec![(
                            node_ns.clone(),
                            format!("route add {cidr} via {} dev eth0 proto bird\n", far.underlay_ip),
                        )],
                    },
                    format!(
                        "{node_name} has no route to {}'s pod block {cidr} any more: packets from {node_name}'s pods to every pod on {} ({} among them) follow the default route to the upstream router ({}), which has no route to pod blocks and drops them (IP_INNOROUTES, Ip InNoRoutes in its namespace); same-node traffic is fine",
                        far.name,
                        far.name,
                        p.key(),
                        self.names.router_ns()
                    ),
                )
            }
            FaultKind::EgressDeny => {
                let to = format!("{EXTERNAL_IP}:{EXTERNAL_PORT}");
                let comment = tag(&format!("{} -> {to}", client.key()));
                let spec: Vec<String> = [
                    "-i",
                    &client.cali(),
                    "-d",
                    &format!("{EXTERNAL_IP}/32"),
                    "-p",
                    "tcp",
                    "--dport",
                    &EXTERNAL_PORT.to_string(),
                    "-m",
                    "comment",
                    "--comment",
                    &comment,
                    "-j",
                    "DROP",
                ]
                .iter()
                .map(|s| (*s).to_string())
                .collect();
                Self::iptables_insert(&node_ns, "filter", "FORWARD", &spec, &mut did)?;
                rules.push(RuleRef {
                    netns: node_ns.clone(),
                    table: "filter".into(),
                    chain: "FORWARD".into(),
                    comment,
                });
                external = Some(to.clone());
                (
                    Undo::Rules {
                        netns: node_ns.clone(),
                        rules: vec![("filter".into(), "FORWARD".into(), spec)],
                        holders: Vec::new(),
                    },
                    format!(
                        "connections from {} to the external {to} (`lab traffic --to {to}`) time out: an egress policy rule in FORWARD on {node_name} drops them before SNAT",
                        client.key()
                    ),
                )
            }
            FaultKind::SnatExhaustion => {
                let to = std::net::SocketAddr::from((EXTERNAL_IP, EXTERNAL_PORT));
                let comment = tag(&format!("{} -> {to}", client.key()));
                let ports = squeezed_ports();
                let spec: Vec<String> = [
                    "-s",
                    &format!("{}/32", client.ip),
                    "-d",
                    &format!("{EXTERNAL_IP}/32"),
                    "-p",
                    "tcp",
                    "-m",
                    "comment",
                    "--comment",
                    &comment,
                    "-j",
                    "MASQUERADE",
                    "--to-ports",
                    &ports,
                ]
                .iter()
                .map(|s| (*s).to_string())
                .collect();
                Self::iptables_insert(&node_ns, "nat", "POSTROUTING", &spec, &mut did)?;
                let rule = (node_ns.clone(), "nat".to_string(), "POSTROUTING".to_string(), spec);
                let holders = match self.hold_ports(&client, to, 4) {
                    Ok(h) => h,
                    Err(e) => {
                        let _ = self.undo(Undo::Many {
                            holders: Vec::new(),
                            rules: vec![rule],
                            ip: Vec::new(),
                        });
                        return Err(e);
                    }
                };
                did.push(format!(
                    "opened {} idle TCP connections {} -> {to} holding the squeezed ports",
                    holders.len(),
                    client.key()
                ));
                rules.push(RuleRef {
                    netns: node_ns.clone(),
                    table: "nat".into(),
                    chain: "POSTROUTING".into(),
                    comment,
                });
                external = Some(to.to_string());
                (
                    Undo::Many {
                        holders,
                        rules: vec![rule],
                        ip: Vec::new(),
                    },
                    format!(
                        "new connections from {} to the external {to} fail: the node's SNAT for them has 4 source ports ({ports}), all held by idle connections, so NAT finds no free tuple and conntrack's insert fails on {node_name} (insert_failed in {node_ns}'s /proc/net/stat/nf_conntrack), as a node does when too many connections go to one destination",
                        client.key()
                    ),
                )
            }
            FaultKind::DnsUdpDrop => {
                let p = pod.as_ref().expect("target");
                let comment = tag(&format!("udp/53 on {}", p.node));
                let spec: Vec<String> = [
                    "-p",
                    "udp",
                    "--dport",
                    "53",
                    "-m",
                    "comment",
                    "--comment",
                    &comment,
                    "-j",
                    "DROP",
                ]
                .iter()
                .map(|s| (*s).to_string())
                .collect();
                Self::iptables_insert(&node_ns, "filter", "FORWARD", &spec, &mut did)?;
                rules.push(RuleRef {
                    netns: node_ns.clone(),
                    table: "filter".into(),
                    chain: "FORWARD".into(),
                    comment,
                });
                (
                    Undo::Rules {
                        netns: node_ns.clone(),
                        rules: vec![("filter".into(), "FORWARD".into(), spec)],
                        holders: Vec::new(),
                    },
                    format!(
                        "DNS queries over UDP that kube-proxy sends to {} (about half) time out: {node_name} drops the UDP/53 it forwards; queries to the other replica are answered",
                        p.key()
                    ),
                )
            }
            FaultKind::DnsRace => (
                Undo::Many {
                    holders: Vec::new(),
                    rules: Vec::new(),
                    ip: Vec::new(),
                },
                format!(
                    "nothing is changed: send A/AAAA-style pairs at once from one socket (`lab traffic --svc kube-system/kube-dns --proto udp --pairs`); when both packets of a pair are new at the same time on {node_name}, they race to create one conntrack entry (possibly DNATed to different replicas): Linux 5.6+ keeps both and counts clash_resolve in {node_ns}'s /proc/net/stat/nf_conntrack instead of dropping one (insert_failed)"
                ),
            ),
        };
        let record = FaultRecord {
            kind_tag: "fault".into(),
            fault: req.kind,
            action: "applied".into(),
            service,
            backend,
            node: node_name,
            node_netns_path: net::netns_path(&node_ns),
            node_netns: node_ns,
            did,
            expect,
            rules,
            sysctl,
            external,
        };
        faults.push((record.clone(), undo));
        drop(faults);
        self.write_state()?;
        Ok(record)
    }

    fn iptables_insert(
        netns: &str,
        table: &str,
        chain: &str,
        spec: &[String],
        did: &mut Vec<String>,
    ) -> Result<(), LabError> {
        let mut args: Vec<&str> = vec!["-w", "-t", table, "-I", chain, "1"];
        args.extend(spec.iter().map(String::as_str));
        net::ns_cmd(netns, "iptables", &args, None)?;
        did.push(format!("ip netns exec {netns} iptables {}", shell_words(&args)));
        Ok(())
    }

    /// Undoes one fault kind, or all of them; returns the records of those cleared.
    pub fn clear(&self, kind: Option<FaultKind>) -> Result<Vec<FaultRecord>, LabError> {
        let mut faults = self.faults.lock().expect("faults lock");
        let (clear, keep): (Vec<_>, Vec<_>) = faults.drain(..).partition(|(r, _)| kind.is_none_or(|k| r.fault == k));
        *faults = keep;
        drop(faults);
        let mut out = Vec::new();
        let mut first_err = None;
        for (mut rec, undo) in clear {
            if let Err(e) = self.undo(undo) {
                first_err.get_or_insert(e);
            }
            rec.action = "cleared".into();
            out.push(rec);
        }
        self.write_state()?;
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    fn undo(&self, undo: Undo) -> Result<(), LabError> {
        match undo {
            Undo::Rules { netns, rules, holders } => {
                for h in holders {
                    h.abort();
                }
                for (table, chain, spec) in rules {
                    let mut args: Vec<&str> = vec!["-w", "-t", &table, "-D", &chain];
                    args.extend(spec.iter().map(String::as_str));
                    net::ns_cmd(&netns, "iptables", &args, None)?;
                }
                Ok(())
            }
            Undo::Listen { pod } => {
                let p = self
                    .topology
                    .pod(&pod)
                    .ok_or_else(|| LabError::NoPod(pod.clone()))?
                    .clone();
                self.start_server(&p)
            }
            Undo::Route { netns, args } => {
                let mut a: Vec<&str> = vec!["route", "add"];
                a.extend(args.iter().map(String::as_str));
                net::ns_cmd(&netns, "ip", &a, None).map(drop)
            }
            Undo::Sysctl => {
                restore_sysctls(&self.state_dir.join(super::SYSCTL_FILE));
                Ok(())
            }
            Undo::Many { holders, rules, ip } => {
                for h in holders {
                    h.abort();
                }
                let mut first_err = None;
                for (netns, table, chain, spec) in rules {
                    let mut args: Vec<&str> = vec!["-w", "-t", &table, "-D", &chain];
                    args.extend(spec.iter().map(String::as_str));
                    if let Err(e) = net::ns_cmd(&netns, "iptables", &args, None) {
                        first_err.get_or_insert(e);
                    }
                }
                for (netns, lines) in ip {
                    if let Err(e) = net::ip_batch(Some(&netns), &lines) {
                        first_err.get_or_insert(e);
                    }
                }
                first_err.map_or(Ok(()), Err)
            }
        }
    }

    /// Opens `n` idle TCP connections from the client pod straight to `to` (a backend's target
    /// port, the "external" host) and keeps them open on the lab's runtime until aborted.
    fn hold_ports(
        &self,
        client: &PodSpec,
        to: std::net::SocketAddr,
        n: usize,
    ) -> Result<Vec<tokio::task::AbortHandle>, LabError> {
        let streams = net::in_netns(&net::netns_path(&self.names.pod_ns(client)), move || {
            let mut v = Vec::new();
            for _ in 0..n {
                let io = |source| LabError::Io {
                    path: format!("connection to {to}").into(),
                    source,
                };
                let mut s = std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_secs(2)).map_err(io)?;
                std::io::Write::write_all(&mut s, super::servers::HOLD).map_err(io)?;
                s.set_nonblocking(true).map_err(io)?;
                v.push(s);
            }
            Ok(v)
        })?;
        let rt = self.handle();
        let _guard = rt.enter();
        let mut out = Vec::new();
        for s in streams {
            let s = tokio::net::TcpStream::from_std(s).map_err(|source| LabError::Io {
                path: "held connection".into(),
                source,
            })?;
            out.push(
                rt.spawn(async move {
                    let mut s = s;
                    let mut buf = [0u8; 64];
                    while matches!(tokio::io::AsyncReadExt::read(&mut s, &mut buf).await, Ok(k) if k > 0) {}
                })
                .abort_handle(),
            );
        }
        Ok(out)
    }

    /// A column of a node's `/proc/net/stat/nf_conntrack` (e.g. `drop`, `insert_failed`,
    /// `early_drop`), summed over CPUs: the kernel's own count for the conntrack faults.
    pub fn conntrack_stat(&self, node: &str, column: &str) -> Result<u64, LabError> {
        let text = net::ns_cmd(&self.names.node_ns(node), "cat", &["/proc/net/stat/nf_conntrack"], None)?;
        crate::ct_stat_column(&text, column).ok_or_else(|| LabError::NoColumn(column.to_string()))
    }

    /// Packets counted by the rules a fault added (all its rules summed).
    pub fn fault_packets(&self, record: &FaultRecord) -> Result<u64, LabError> {
        let mut sum = 0;
        for r in &record.rules {
            sum += net::rule_packets(&r.netns, &r.table, &r.chain, &r.comment)?;
        }
        Ok(sum)
    }
}

fn shell_words(args: &[&str]) -> String {
    args.iter()
        .map(|a| {
            if a.contains(' ') {
                format!("\"{a}\"")
            } else {
                (*a).to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
