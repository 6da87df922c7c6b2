//! The faults the lab injects, each aimed at one backend and node so that a test can assert
//! netdrop names them: what each does, how it is undone, and what the client should see.

use std::{fmt, fs, path::PathBuf, str::FromStr};

use serde::{Deserialize, Serialize};

use super::{BackendStatus, Lab, LabError, net, topology::PodSpec};

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
}

impl FaultKind {
    pub const ALL: [Self; 6] = [
        Self::PolicyDrop,
        Self::NotListening,
        Self::ConntrackInsert,
        Self::ConntrackFull,
        Self::RouteMissing,
        Self::BigOneBad,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::PolicyDrop => "policy-drop",
            Self::NotListening => "not-listening",
            Self::ConntrackInsert => "conntrack-insert",
            Self::ConntrackFull => "conntrack-full",
            Self::RouteMissing => "route-missing",
            Self::BigOneBad => "big-one-bad",
        }
    }

    /// The backend aimed at when none is given.
    fn default_pod(self) -> Option<&'static str> {
        match self {
            Self::PolicyDrop | Self::ConntrackInsert | Self::RouteMissing => Some("default/web-2"),
            Self::NotListening => Some("default/web-0"),
            Self::BigOneBad => Some("default/big-17"),
            Self::ConntrackFull => None,
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
            _ => None,
        };
        if self.topology.services_of(&pod).is_empty() || must_serve.is_some_and(|s| pod.app != s) {
            return Err(LabError::BadTarget {
                fault: req.kind.to_string(),
                why: format!(
                    "{key} is not a backend of {}",
                    must_serve.unwrap_or("any Service")
                ),
            });
        }
        if req.kind == FaultKind::RouteMissing && pod.node == self.topology.client().node {
            return Err(LabError::BadTarget {
                fault: req.kind.to_string(),
                why: format!(
                    "{key} is on the client's node {}; route-missing needs a backend on another node",
                    pod.node
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
        let pod = self.target(req)?;
        let client = self.topology.client().clone();
        let service = pod
            .as_ref()
            .and_then(|p| self.topology.services_of(p).first().map(|s| s.key()));
        let backend = pod.as_ref().map(Self::backend_status);
        let node_name = match req.kind {
            FaultKind::ConntrackInsert | FaultKind::ConntrackFull => client.node.clone(),
            _ => pod.as_ref().map(|p| p.node.clone()).unwrap_or_default(),
        };
        let node_ns = self.names.node_ns(&node_name);
        let tag = |what: &str| format!("ndlab-fault:{} {what}", req.kind);
        let mut rules = Vec::new();
        let mut did = Vec::new();
        let mut sysctl = None;
        let (undo, expect) = match req.kind {
            FaultKind::PolicyDrop | FaultKind::BigOneBad => {
                let p = pod.as_ref().expect("target");
                let comment = tag(&p.key());
                let spec: Vec<String> = [
                    "-o",
                    &p.cali(),
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
                let holders = match self.hold_ports(&client, p, 4) {
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
            FaultKind::ConntrackFull => {
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
                did.push(format!("sysctl -w {CT_MAX_KEY}={max} (was {old}; global: every namespace on this kernel)"));
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
        did.push(format!(
            "ip netns exec {netns} iptables {}",
            shell_words(&args)
        ));
        Ok(())
    }

    /// Undoes one fault kind, or all of them; returns the records of those cleared.
    pub fn clear(&self, kind: Option<FaultKind>) -> Result<Vec<FaultRecord>, LabError> {
        let mut faults = self.faults.lock().expect("faults lock");
        let (clear, keep): (Vec<_>, Vec<_>) = faults
            .drain(..)
            .partition(|(r, _)| kind.is_none_or(|k| r.fault == k));
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
            Undo::Rules {
                netns,
                rules,
                holders,
            } => {
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
        }
    }

    /// Opens `n` idle TCP connections from the client pod straight to the backend's target port
    /// and keeps them open on the lab's runtime until aborted.
    fn hold_ports(
        &self,
        client: &PodSpec,
        backend: &PodSpec,
        n: usize,
    ) -> Result<Vec<tokio::task::AbortHandle>, LabError> {
        let to = std::net::SocketAddr::from((backend.ip, super::topology::TARGET_PORT));
        let streams = net::in_netns(&net::netns_path(&self.names.pod_ns(client)), move || {
            let mut v = Vec::new();
            for _ in 0..n {
                let io = |source| LabError::Io {
                    path: format!("connection to {to}").into(),
                    source,
                };
                let mut s =
                    std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_secs(2))
                        .map_err(io)?;
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
        let text = net::ns_cmd(
            &self.names.node_ns(node),
            "cat",
            &["/proc/net/stat/nf_conntrack"],
            None,
        )?;
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
