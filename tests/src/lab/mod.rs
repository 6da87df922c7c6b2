//! The lab: a small Calico-style, kube-proxy-style Kubernetes cluster in network
//! namespaces on this machine, for `netdrop trace --svc` end-to-end tests, the demo and the
//! benchmark. This module owns the lab's lifetime; [`topology`] says what it contains, [`net`]
//! builds it, [`servers`] answers, [`kube`] describes it to the API stand-in, [`faults`] breaks
//! it and [`traffic`] measures it.
//!
//! ```no_run
//! use netdrop_tests::lab::{Lab, LabOptions, faults::{FaultKind, FaultRequest}, traffic::TrafficOptions};
//! let lab = Lab::up(&LabOptions::for_test()).expect("lab up"); // removed again on drop
//! let fault = lab.fault(&FaultRequest::new(FaultKind::PolicyDrop)).expect("fault");
//! let report = lab.traffic("default/web", &TrafficOptions::default()).expect("traffic");
//! println!("{} of {} failed; the rule dropped {}", report.failures, report.attempts, lab.fault_packets(&fault).unwrap());
//! ```
//!
//! Topology (default instance; a test instance `tN` prefixes its namespaces `ndlab-tN-`):
//! - nodes `ndlab-node-a` (192.168.50.10, pods 10.244.1.0/24) and `ndlab-node-b` (192.168.50.11,
//!   10.244.2.0/24), IP forwarding on, one veth `eth0`↔`eth0` between them, a route to the other
//!   node's pod block, a blackhole for their own (as Calico's BGP mode leaves them);
//! - one namespace per pod (`ndlab-pod-default-web-0`), joined to its node by a veth whose node
//!   side is Calico's `cali` + 11 hex of sha1("default.web-0"); the pod has its IP as /32 and a
//!   default route via 169.254.1.1; the node has a /32 route, a static neighbour and proxy-ARP;
//! - kube-proxy's iptables rules in every node for the `ClusterIP` Services (10.96.0.0/16), and
//!   Calico's `natOutgoing` MASQUERADE for pods' traffic leaving the cluster CIDR;
//! - an upstream router `ndlab-ext-router`, each node's default gateway over a veth `uplink0`
//!   (198.51.100.0/24, TEST-NET-2), knowing no pod block, with the "external" host 203.0.113.10
//!   (TEST-NET-3) on its loopback; nothing is routed outside the lab's namespaces;
//! - TCP and UDP echo on 8080 in every backend, on 53 in `kube-system/coredns-0`/`-1` (one per
//!   node, behind `kube-system/kube-dns` 10.96.0.53) and on 5432 on the external host; the API
//!   stand-in on 127.0.0.1 and a kubeconfig.

pub mod control;
pub mod faults;
pub mod kube;
pub mod net;
pub mod pods;
pub mod servers;
pub mod topology;
pub mod traffic;

use std::{
    collections::BTreeMap,
    fs,
    net::{Ipv4Addr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use self::{
    faults::{FaultRecord, Undo},
    servers::EchoServer,
    topology::{Names, PodSpec, PortSpec, Proto, Role, Sizes, Topology},
    traffic::{TrafficOptions, TrafficReport, TrafficShape},
};
use crate::apiserver::{Cluster, ServeOptions, StandIn, StandInError, StoreError};

/// How the "external" host names itself in replies (`<who> <where>`, as pods do).
pub const EXTERNAL_WHO: &str = "external/db ext-router";

/// The default instance's state directory.
pub const STATE_DIR: &str = "/run/netdrop-lab";
pub(crate) const STATE_FILE: &str = "state.json";
pub(crate) const SYSCTL_FILE: &str = "sysctl-restore.json";
pub(crate) const OWNER_FILE: &str = "owner.pid";
pub(crate) const KUBECONFIG_FILE: &str = "kubeconfig";

/// Errors of the lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A command (`ip`, `iptables-restore`, …) exited with an error.
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
    /// A command could not be started.
    #[error("cannot run `{cmd}`: {source} (is iproute2/iptables installed? `cargo xtask setup`)")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot enter network namespace {}: {source} (root needed)", path.display())]
    Setns {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot listen on {addr} in a pod: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the lab {instance} is already up (pid {pid}); run `cargo xtask lab down` first")]
    AlreadyUp { instance: String, pid: u32 },
    #[error("the lab {instance} is not up; run `cargo xtask lab up`")]
    NotUp { instance: String },
    #[error(
        "unknown fault {0:?}: policy-drop, not-listening, conntrack-insert, conntrack-full, route-missing, big-one-bad, mtu-blackhole, node-route-missing, egress-deny, snat-exhaustion, dns-udp-drop, dns-conntrack-full, dns-race"
    )]
    UnknownFault(String),
    #[error("fault {0} is already active; `lab fault clear {0}` first")]
    FaultActive(String),
    #[error("no pod {0} in the lab (`lab status` lists them)")]
    NoPod(String),
    #[error("no Service {0} in the lab (`lab status` lists them)")]
    NoService(String),
    #[error("no node {0} in the lab (`lab status` lists them)")]
    NoNode(String),
    /// A churned pod's namespace is still there after `ip netns del`.
    #[error("pod namespace {0} could not be deleted")]
    PodNotDeleted(String),
    /// The lab's API stand-in runs in another process (`lab up` from the CLI).
    #[error("the lab's API stand-in runs in another process")]
    NoStandIn,
    #[error("Service {service} has no {proto} port")]
    NoPort { service: String, proto: String },
    #[error("no column {0:?} in /proc/net/stat/nf_conntrack")]
    NoColumn(String),
    #[error("fault {fault}: {why}")]
    BadTarget { fault: String, why: String },
    #[error("Kubernetes API stand-in: {0}")]
    StandIn(#[from] StandInError),
    #[error("Kubernetes API stand-in objects: {0}")]
    Store(#[from] StoreError),
    #[error("the lab daemon answered: {message}")]
    Daemon { message: String },
}

/// How to bring a lab up.
#[derive(Clone, Debug, Default)]
pub struct LabOptions {
    /// `None`: the default lab (`ndlab-node-a`, state in /run/netdrop-lab). Tests use their own.
    pub instance: Option<String>,
    pub sizes: Sizes,
}

static INSTANCE_SEQ: AtomicU32 = AtomicU32::new(0);

impl LabOptions {
    /// An instance of its own for a test (`t<pid>x<seq>`): runs next to a default lab and next to
    /// other tests' labs, and is recognised as stale by `lab down` once this process is gone.
    pub fn for_test() -> Self {
        Self {
            instance: Some(format!(
                "t{}x{}",
                std::process::id(),
                INSTANCE_SEQ.fetch_add(1, Ordering::Relaxed)
            )),
            sizes: Sizes::default(),
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        state_dir(self.instance.as_deref())
    }
}

/// State directory of an instance.
pub fn state_dir(instance: Option<&str>) -> PathBuf {
    match instance {
        None => PathBuf::from(STATE_DIR),
        Some(i) => PathBuf::from(format!("{STATE_DIR}-{i}")),
    }
}

/// A node in [`Status`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    /// `ip netns` name.
    pub netns: String,
    pub netns_path: PathBuf,
    /// The namespace's inode, as netdrop reports `netns` in events.
    pub netns_inode: u64,
    pub underlay_if: String,
    pub underlay_ip: Ipv4Addr,
    pub pod_cidr: String,
    /// Host-side `cali…` interfaces of the node's pods.
    pub workload_interfaces: Vec<String>,
}

/// A pod in [`Status`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodStatus {
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
    pub node: String,
    /// Calico's host-side interface (in the node's namespace).
    pub interface: String,
    pub netns: String,
    pub netns_path: PathBuf,
    pub netns_inode: u64,
    pub role: Role,
    /// Whether its servers listen (false under `not-listening`; always false for the client).
    pub listening: bool,
}

/// A backend of a Service.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackendStatus {
    /// `namespace/name`.
    pub pod: String,
    pub ip: Ipv4Addr,
    pub node: String,
    pub interface: String,
}

/// A Service in [`Status`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<PortSpec>,
    pub backends: Vec<BackendStatus>,
}

/// Everything about a running lab (`lab status -o json`; also `<state dir>/state.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    #[serde(rename = "type")]
    pub kind: String,
    /// `default` or the test instance's name.
    pub instance: String,
    /// Namespace-name prefix of this instance.
    pub prefix: String,
    /// Process that holds the lab (the daemon, or a test).
    pub pid: u32,
    pub state_dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub api_server: String,
    /// Seconds `up` took.
    pub up_seconds: f64,
    pub nodes: Vec<NodeStatus>,
    pub pods: Vec<PodStatus>,
    pub services: Vec<ServiceStatus>,
    pub faults: Vec<FaultRecord>,
    /// The upstream router's namespace (the nodes' default gateway, the "external" host's).
    #[serde(default)]
    pub router_netns: String,
    /// The "external" host pods reach through their node's SNAT, `IP:PORT`.
    #[serde(default)]
    pub external: String,
}

impl Status {
    /// Reads an instance's `state.json`.
    pub fn read(instance: Option<&str>) -> Result<Self, LabError> {
        let path = state_dir(instance).join(STATE_FILE);
        let text = fs::read_to_string(&path).map_err(|_| LabError::NotUp {
            instance: instance.unwrap_or("default").to_string(),
        })?;
        serde_json::from_str(&text).map_err(|e| LabError::Io {
            path,
            source: std::io::Error::other(e),
        })
    }

    pub fn service(&self, key: &str) -> Option<&ServiceStatus> {
        let (ns, name) = key.split_once('/').unwrap_or(("default", key));
        self.services.iter().find(|s| s.namespace == ns && s.name == name)
    }

    pub fn client(&self) -> Option<&PodStatus> {
        self.pods.iter().find(|p| p.role == Role::Client)
    }

    /// The Service's `ClusterIP:port` for a protocol.
    pub fn target(&self, service: &str, proto: Proto) -> Result<SocketAddr, LabError> {
        let svc = self
            .service(service)
            .ok_or_else(|| LabError::NoService(service.to_string()))?;
        let port = svc
            .ports
            .iter()
            .find(|p| p.protocol == proto)
            .ok_or_else(|| LabError::NoPort {
                service: service.to_string(),
                proto: proto.lower().to_string(),
            })?;
        Ok(SocketAddr::from((svc.cluster_ip, port.port)))
    }

    /// Runs the traffic generator from the client pod to any address (the "external" host).
    pub fn traffic_to(
        &self,
        target: SocketAddr,
        opts: &TrafficOptions,
        shape: TrafficShape,
    ) -> Result<TrafficReport, LabError> {
        let client = self.client().ok_or_else(|| LabError::NoPod("client".into()))?;
        traffic::run_shaped(&client.netns_path, &target.to_string(), target, opts, shape)
    }

    /// [`Status::traffic`] with requests shaped by `shape` (large replies, parallel pairs).
    pub fn traffic_shaped(
        &self,
        service: &str,
        opts: &TrafficOptions,
        shape: TrafficShape,
    ) -> Result<TrafficReport, LabError> {
        let target = self.target(service, opts.proto)?;
        let client = self.client().ok_or_else(|| LabError::NoPod("client".into()))?;
        let key = self
            .service(service)
            .map(|s| format!("{}/{}", s.namespace, s.name))
            .unwrap_or_default();
        traffic::run_shaped(&client.netns_path, &key, target, opts, shape)
    }

    /// Runs the traffic generator from the client pod (usable without the [`Lab`] object).
    pub fn traffic(&self, service: &str, opts: &TrafficOptions) -> Result<TrafficReport, LabError> {
        let target = self.target(service, opts.proto)?;
        let client = self.client().ok_or_else(|| LabError::NoPod("client".into()))?;
        let key = self
            .service(service)
            .map(|s| format!("{}/{}", s.namespace, s.name))
            .unwrap_or_default();
        let before = self.endpoint_choices(service, opts.proto)?;
        let mut report = traffic::run(&client.netns_path, &key, target, opts)?;
        let after = self.endpoint_choices(service, opts.proto)?;
        report.flows_by_backend = after
            .into_iter()
            .map(|(pod, n)| {
                let was = before.get(&pod).copied().unwrap_or(0);
                (pod, n - was)
            })
            .collect();
        Ok(report)
    }

    /// Per backend (`namespace/pod`), the packet counter of kube-proxy's rule that sends a new
    /// flow to it (`KUBE-SVC-…` → `KUBE-SEP-…`) in the client's node: the kernel's own count of
    /// the flows `DNAT`ed to each backend (the nat table sees a flow's first packet only).
    pub fn endpoint_choices(&self, service: &str, proto: Proto) -> Result<BTreeMap<String, u64>, LabError> {
        let svc = self
            .service(service)
            .ok_or_else(|| LabError::NoService(service.to_string()))?;
        // Without endpoints kube-proxy writes no `KUBE-SVC-…` chain (a REJECT instead).
        let Some(port) = svc.ports.iter().find(|p| p.protocol == proto) else {
            return Ok(BTreeMap::new());
        };
        if svc.backends.is_empty() {
            return Ok(BTreeMap::new());
        }
        let client = self.client().ok_or_else(|| LabError::NoPod("client".into()))?;
        let node_ns = self
            .nodes
            .iter()
            .find(|n| n.name == client.node)
            .map(|n| n.netns.clone())
            .ok_or_else(|| LabError::NoPod(client.node.clone()))?;
        let spec = topology::ServiceSpec {
            namespace: svc.namespace.clone(),
            name: svc.name.clone(),
            cluster_ip: svc.cluster_ip,
            ports: svc.ports.clone(),
            selector: String::new(),
        };
        let chain = topology::svc_chain(&spec, port);
        let text = net::ns_cmd(
            &node_ns,
            "iptables",
            &["-t", "nat", "-L", &chain, "-v", "-x", "-n"],
            None,
        )?;
        let sp = format!("{}:{}", spec.key(), port.name);
        let mut out = BTreeMap::new();
        for b in &svc.backends {
            let needle = format!("/* {sp} -> {}:{} */", b.ip, port.target_port);
            let n: u64 = text
                .lines()
                .filter(|l| l.contains(&needle))
                .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
                .sum();
            out.insert(b.pod.clone(), n);
        }
        Ok(out)
    }
}

/// A tokio runtime on a thread of its own (so the lab works from sync and async callers alike);
/// stopping it closes every socket its tasks hold.
struct RuntimeThread {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl RuntimeThread {
    fn start() -> Result<Self, LabError> {
        let (tx, rx) = mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = thread::Builder::new()
            .name("netdrop-lab-rt".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let _ = tx.send(Ok(rt.handle().clone()));
                rt.block_on(async {
                    let _ = stopped.await;
                });
                rt.shutdown_timeout(Duration::from_secs(2));
            })
            .map_err(|source| LabError::Io {
                path: "runtime thread".into(),
                source,
            })?;
        let handle = rx
            .recv()
            .expect("runtime thread answers")
            .map_err(|source| LabError::Io {
                path: "tokio runtime".into(),
                source,
            })?;
        Ok(Self {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for RuntimeThread {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A running lab. Dropping it (or [`Lab::down`]) removes everything it made.
pub struct Lab {
    pub topology: Topology,
    names: Names,
    instance: Option<String>,
    state_dir: PathBuf,
    kubeconfig: PathBuf,
    api_server: Mutex<String>,
    up_time: Mutex<Duration>,
    rt: Mutex<Option<RuntimeThread>>,
    standin: Mutex<Option<StandIn>>,
    servers: Mutex<BTreeMap<String, EchoServer>>,
    faults: Mutex<Vec<(FaultRecord, Undo)>>,
    down: AtomicBool,
}

/// What [`cleanup`] removed.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Cleanup {
    pub namespaces: Vec<String>,
    pub sysctls_restored: Vec<String>,
    pub dirs: Vec<PathBuf>,
    pub killed: Vec<u32>,
}

/// Whether a process runs (a zombie does not: a killed daemon whose parent is gone may stay one
/// until its reaper gets to it).
pub fn pid_alive(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // `pid (comm) S ...`: the state follows the last ')' (comm may contain anything).
    pid != 0
        && stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|s| s != "Z" && s != "X")
}

fn read_owner(dir: &Path) -> Option<u32> {
    fs::read_to_string(dir.join(OWNER_FILE)).ok()?.trim().parse().ok()
}

/// Removes what an instance left behind: restores saved sysctls, deletes its namespaces and its
/// state directory. With `stale_too`, also every other instance whose owner process is gone (a
/// crashed test). Does not stop a live owner: see the CLI's `down`.
pub fn cleanup(instance: Option<&str>, stale_too: bool) -> Cleanup {
    cleanup_inner(instance, stale_too, false)
}

fn cleanup_inner(instance: Option<&str>, stale_too: bool, keep_own_log: bool) -> Cleanup {
    let mut out = Cleanup::default();
    let mut dirs = vec![(instance.map(str::to_string), state_dir(instance))];
    if stale_too && let Ok(rd) = fs::read_dir("/run") {
        for e in rd.filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(inst) = name.strip_prefix("netdrop-lab-")
                && Some(inst) != instance
                && !read_owner(&e.path()).is_some_and(pid_alive)
            {
                dirs.push((Some(inst.to_string()), e.path()));
            }
        }
    }
    let mut doomed = Vec::new();
    let all_ns = net::list_netns();
    for (inst, dir) in &dirs {
        out.sysctls_restored
            .extend(faults::restore_sysctls(&dir.join(SYSCTL_FILE)));
        let names = Names::new(inst.as_deref());
        doomed.extend(all_ns.iter().filter(|n| names.owns(n)).cloned());
    }
    if stale_too {
        // Namespaces of test instances whose directory is gone too: `ndlab-t<pid>x<seq>-…`.
        for n in &all_ns {
            if let Some(rest) = n.strip_prefix("ndlab-t")
                && let Some(pid) = rest.split('x').next().and_then(|p| p.parse::<u32>().ok())
                && !pid_alive(pid)
                && !doomed.contains(n)
            {
                doomed.push(n.clone());
            }
        }
    }
    out.namespaces = net::delete_netns(&doomed);
    for (i, (_, dir)) in dirs.into_iter().enumerate() {
        if i == 0 && keep_own_log {
            for f in [
                STATE_FILE,
                SYSCTL_FILE,
                OWNER_FILE,
                KUBECONFIG_FILE,
                control::SOCKET_FILE,
            ] {
                let _ = fs::remove_file(dir.join(f));
            }
            continue;
        }
        if dir.exists() && fs::remove_dir_all(&dir).is_ok() {
            out.dirs.push(dir);
        }
    }
    out
}

impl Lab {
    /// Builds the lab: leftovers of a crashed instance of the same name are removed first.
    pub fn up(opts: &LabOptions) -> Result<Self, LabError> {
        let t0 = Instant::now();
        let instance = opts.instance.clone();
        let dir = opts.state_dir();
        if let Some(pid) = read_owner(&dir).filter(|p| pid_alive(*p) && *p != std::process::id()) {
            return Err(LabError::AlreadyUp {
                instance: instance.unwrap_or_else(|| "default".into()),
                pid,
            });
        }
        // The daemon's log (opened by the CLI before starting it) stays; the rest goes.
        cleanup_inner(instance.as_deref(), false, true);
        fs::create_dir_all(&dir).map_err(|source| LabError::Io {
            path: dir.clone(),
            source,
        })?;
        let owner = dir.join(OWNER_FILE);
        fs::write(&owner, std::process::id().to_string()).map_err(|source| LabError::Io { path: owner, source })?;
        let lab = Self {
            topology: Topology::default_lab(opts.sizes),
            names: Names::new(instance.as_deref()),
            kubeconfig: dir.join(KUBECONFIG_FILE),
            state_dir: dir,
            instance,
            api_server: Mutex::new(String::new()),
            up_time: Mutex::new(Duration::ZERO),
            rt: Mutex::new(None),
            standin: Mutex::new(None),
            servers: Mutex::new(BTreeMap::new()),
            faults: Mutex::new(Vec::new()),
            down: AtomicBool::new(false),
        };
        // From here on a failure drops `lab`, which removes what was built so far.
        net::build(&lab.topology, &lab.names)?;
        *lab.rt.lock().expect("rt lock") = Some(RuntimeThread::start()?);
        for p in lab.topology.pods.iter().filter(|p| p.role == Role::Backend) {
            lab.start_server(p)?;
        }
        lab.start_external()?;
        lab.start_standin()?;
        *lab.up_time.lock().expect("lock") = t0.elapsed();
        lab.write_state()?;
        Ok(lab)
    }

    pub(crate) fn handle(&self) -> tokio::runtime::Handle {
        self.rt
            .lock()
            .expect("rt lock")
            .as_ref()
            .expect("lab runtime running")
            .handle
            .clone()
    }

    pub(crate) fn start_server(&self, p: &PodSpec) -> Result<(), LabError> {
        let who = format!("{} {}", p.key(), p.node);
        let s = servers::start(&self.handle(), &net::netns_path(&self.names.pod_ns(p)), p.port, who)?;
        self.servers.lock().expect("servers lock").insert(p.key(), s);
        Ok(())
    }

    /// The "external" host's echo on the router ([`topology::EXTERNAL_IP`]).
    fn start_external(&self) -> Result<(), LabError> {
        let s = servers::start(
            &self.handle(),
            &net::netns_path(&self.names.router_ns()),
            topology::EXTERNAL_PORT,
            EXTERNAL_WHO.into(),
        )?;
        self.servers
            .lock()
            .expect("servers lock")
            .insert(EXTERNAL_WHO.into(), s);
        Ok(())
    }

    fn start_standin(&self) -> Result<(), LabError> {
        let cluster = Arc::new(Cluster::new());
        for obj in kube::objects(&self.topology) {
            cluster.apply(obj)?;
        }
        let (tx, rx) = mpsc::channel();
        // Started on the lab's runtime and waited for over a channel: works from async callers.
        self.handle().spawn(async move {
            let _ = tx.send(StandIn::start(cluster, ServeOptions::default()).await);
        });
        let standin = rx.recv().expect("stand-in start answers")?;
        standin.write_kubeconfig(&self.kubeconfig)?;
        *self.api_server.lock().expect("lock") = standin.url();
        *self.standin.lock().expect("lock") = Some(standin);
        Ok(())
    }

    /// Sets an annotation on one of the lab's Services in the API stand-in (a MODIFIED event for
    /// its watchers), e.g. `netdrop.io/observe: "true"` for the agent.
    pub fn annotate_service(&self, namespace: &str, name: &str, key: &str, value: &str) -> Result<(), LabError> {
        let mut obj = kube::objects(&self.topology)
            .into_iter()
            .find(|o| {
                o["kind"] == "Service" && o["metadata"]["namespace"] == namespace && o["metadata"]["name"] == name
            })
            .ok_or_else(|| LabError::NoPod(format!("Service {namespace}/{name}")))?;
        obj["metadata"]["annotations"][key] = serde_json::Value::from(value);
        let standin = self.standin.lock().expect("lock");
        let standin = standin
            .as_ref()
            .ok_or_else(|| LabError::NoPod("the API stand-in (lab not up in this process)".into()))?;
        standin.cluster().apply(obj)?;
        Ok(())
    }

    /// The instance name (`default` for the default lab).
    pub fn instance(&self) -> &str {
        self.instance.as_deref().unwrap_or("default")
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// `ip netns` name of a node.
    pub fn node_netns(&self, node: &str) -> String {
        self.names.node_ns(node)
    }

    /// `ip netns` name of a pod (`ns/name` or `name`).
    pub fn pod_netns(&self, pod: &str) -> Result<String, LabError> {
        let p = self.topology.pod(pod).ok_or_else(|| LabError::NoPod(pod.to_string()))?;
        Ok(self.names.pod_ns(p))
    }

    pub(crate) fn backend_status(p: &PodSpec) -> BackendStatus {
        BackendStatus {
            pod: p.key(),
            ip: p.ip,
            node: p.node.clone(),
            interface: p.cali(),
        }
    }

    /// Everything about the lab, as `lab status -o json` prints it.
    pub fn status(&self) -> Status {
        let inode = |ns: &str| fs::metadata(net::netns_path(ns)).map_or(0, |m| m.ino());
        let servers = self.servers.lock().expect("servers lock");
        let t = &self.topology;
        Status {
            kind: "lab".into(),
            instance: self.instance().to_string(),
            prefix: self.names.prefix.clone(),
            pid: std::process::id(),
            state_dir: self.state_dir.clone(),
            kubeconfig: self.kubeconfig.clone(),
            api_server: self.api_server.lock().expect("lock").clone(),
            up_seconds: self.up_time.lock().expect("lock").as_secs_f64(),
            nodes: t
                .nodes
                .iter()
                .map(|n| {
                    let ns = self.names.node_ns(&n.name);
                    NodeStatus {
                        name: n.name.clone(),
                        netns_path: net::netns_path(&ns),
                        netns_inode: inode(&ns),
                        netns: ns,
                        underlay_if: "eth0".into(),
                        underlay_ip: n.underlay_ip,
                        pod_cidr: format!("{}/{}", n.pod_cidr.0, n.pod_cidr.1),
                        workload_interfaces: t.pods.iter().filter(|p| p.node == n.name).map(PodSpec::cali).collect(),
                    }
                })
                .collect(),
            pods: t
                .pods
                .iter()
                .map(|p| {
                    let ns = self.names.pod_ns(p);
                    PodStatus {
                        namespace: p.namespace.clone(),
                        name: p.name.clone(),
                        ip: p.ip,
                        node: p.node.clone(),
                        interface: p.cali(),
                        netns_path: net::netns_path(&ns),
                        netns_inode: inode(&ns),
                        netns: ns,
                        role: p.role,
                        listening: servers.contains_key(&p.key()),
                    }
                })
                .collect(),
            services: t
                .services
                .iter()
                .map(|s| ServiceStatus {
                    namespace: s.namespace.clone(),
                    name: s.name.clone(),
                    cluster_ip: s.cluster_ip,
                    ports: s.ports.clone(),
                    backends: t.backends(s).iter().map(|p| Self::backend_status(p)).collect(),
                })
                .collect(),
            faults: self
                .faults
                .lock()
                .expect("faults lock")
                .iter()
                .map(|(r, _)| r.clone())
                .collect(),
            router_netns: self.names.router_ns(),
            external: format!("{}:{}", topology::EXTERNAL_IP, topology::EXTERNAL_PORT),
        }
    }

    pub(crate) fn write_state(&self) -> Result<(), LabError> {
        let path = self.state_dir.join(STATE_FILE);
        let tmp = self.state_dir.join("state.json.tmp");
        let text = serde_json::to_string_pretty(&self.status()).expect("status is JSON");
        fs::write(&tmp, text).map_err(|source| LabError::Io {
            path: tmp.clone(),
            source,
        })?;
        fs::rename(&tmp, &path).map_err(|source| LabError::Io { path, source })
    }

    /// Runs the traffic generator from the client pod against a Service (`ns/name`).
    pub fn traffic(&self, service: &str, opts: &TrafficOptions) -> Result<TrafficReport, LabError> {
        self.status().traffic(service, opts)
    }

    /// Runs the traffic generator from the client pod to an address (the "external" host).
    pub fn traffic_to(
        &self,
        target: SocketAddr,
        opts: &TrafficOptions,
        shape: TrafficShape,
    ) -> Result<TrafficReport, LabError> {
        self.status().traffic_to(target, opts, shape)
    }

    /// [`Lab::traffic`] with requests shaped by `shape`.
    pub fn traffic_shaped(
        &self,
        service: &str,
        opts: &TrafficOptions,
        shape: TrafficShape,
    ) -> Result<TrafficReport, LabError> {
        self.status().traffic_shaped(service, opts, shape)
    }

    /// The "external" host's `IP:PORT`.
    pub fn external(&self) -> SocketAddr {
        SocketAddr::from((topology::EXTERNAL_IP, topology::EXTERNAL_PORT))
    }

    /// Removes everything: restores sysctls, stops servers and the stand-in, deletes the
    /// namespaces and the state directory. Idempotent; also run on drop.
    pub fn down(&self) -> Cleanup {
        if self.down.swap(true, Ordering::SeqCst) {
            return Cleanup::default();
        }
        let restored = faults::restore_sysctls(&self.state_dir.join(SYSCTL_FILE));
        self.servers.lock().expect("servers lock").clear();
        drop(self.standin.lock().expect("lock").take());
        drop(self.rt.lock().expect("rt lock").take());
        let mut c = cleanup(self.instance.as_deref(), false);
        c.sysctls_restored.extend(restored);
        c
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.down();
    }
}
