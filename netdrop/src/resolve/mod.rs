//! Kubernetes resolution: IP/port → pod, Service, backend, node.
//!
//! This module owns everything netdrop knows about the cluster: the reflectors that watch Pods,
//! Services, `EndpointSlices` and Nodes through the API (or a `--kube-snapshot` file), the compact
//! indexes they maintain, and the lookups the tracer calls for every drop event.
//!
//! Lookups take a read lock on one index and clone interned names: no allocation, well under a
//! microsecond (`cargo xtask bench kube` measures it). Watch events patch the index in place under
//! a short write lock; a (re)list is built aside and swapped in.
//!
//! Failure behaviour: an unreachable API leaves addresses `unresolved` while the reflectors retry
//! with backoff; a lost API keeps the last known state and reports it stale; a 403 on one kind is
//! named once and the other kinds keep resolving. [`Resolver::status`] says which.

pub mod calico;
mod index;
mod model;
pub mod objects;
mod snapshot;
mod source;
mod status;
mod watch;

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use index::Index;
pub use index::{IndexStats, Kind};
pub use model::{
    Backend, Name, Peer, PeerKind, Proto, ServiceInfo, ServicePort, ns_name_arg, parse_addr_port_proto, parse_ns_name,
};
pub use snapshot::dump as snapshot_dump;
use source::Source;
pub use source::{KubeOptions, SERVICEACCOUNT_DIR, node_name, node_name_or_host};
pub use status::{Health, KindStatus, Status};
use status::{KindState, Slot};

/// Errors a user can hit while setting resolution up. Each displays as one line that says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The kubeconfig could not be read or used.
    #[error("cannot use {what}: {}; fix it, or pass --kubeconfig FILE, --kube-snapshot FILE or --no-kube", one_line(.source))]
    Kubeconfig {
        what: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// No configuration was found where one was required.
    #[error("no Kubernetes configuration found; pass --kubeconfig FILE, --kube-snapshot FILE or --no-kube")]
    NoConfig,
    /// In-cluster configuration is incomplete.
    #[error("in-cluster configuration: {path} is missing; mount the service account token or pass --kubeconfig")]
    InCluster { path: String },
    /// The API client could not be built (TLS material, proxy settings).
    #[error("cannot create the Kubernetes client for {what}: {source}")]
    Client {
        what: String,
        #[source]
        source: kube::Error,
    },
    /// The snapshot file could not be read.
    #[error("cannot read snapshot {path}: {source}")]
    SnapshotRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The snapshot file is not the JSON of `kubectl get ... -o json`.
    #[error(
        "snapshot {path} is not kubectl JSON ({source}); make it with `kubectl get pods,services,endpointslices,nodes -A -o json`"
    )]
    SnapshotParse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// Listing objects for a bundle's snapshot failed.
    #[error("listing {kind} from {what} for the bundle's snapshot: {}", one_line(.source))]
    List {
        what: String,
        kind: &'static str,
        #[source]
        source: kube::Error,
    },
}

/// Errors from YAML parsers span several lines; a user-facing error is one.
fn one_line(e: &dyn std::error::Error) -> String {
    let s = e.to_string();
    let mut parts = s
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("-->") && !l.starts_with('|'));
    parts.next().unwrap_or_default().to_owned()
}

/// State shared between the reflector tasks and the lookups.
pub(crate) struct Shared {
    index: RwLock<Index>,
    slots: Mutex<[Slot; 4]>,
    /// Watch events applied per kind (lists count as one).
    events: [AtomicU64; 4],
    source: String,
    base: Health,
    changed: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    fn new(source: String, base: Health) -> Self {
        Self {
            index: RwLock::new(Index::default()),
            slots: Mutex::new(Default::default()),
            events: Default::default(),
            source,
            base,
            changed: tokio::sync::watch::Sender::new(0),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, [Slot; 4]> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn state(&self, kind: Kind) -> KindState {
        self.slots()[kind.idx()].state.clone()
    }

    fn index_synced(&self, kind: Kind) -> bool {
        self.read().synced[kind.idx()]
    }

    fn set_state(&self, kind: Kind, state: KindState, objects: Option<usize>) {
        {
            let mut slots = self.slots();
            let slot = &mut slots[kind.idx()];
            if let Some(n) = objects {
                slot.objects = n;
            }
            if slot.state == state {
                return;
            }
            watch::log_transition(kind, &slot.state, &state);
            slot.state = state;
            slot.since = Instant::now();
        }
        self.changed.send_modify(|g| *g += 1);
    }

    /// A watch event arrived: the kind is live again if it was stale.
    fn touch(&self, kind: Kind, objects: usize) {
        let state = {
            let mut slots = self.slots();
            slots[kind.idx()].objects = objects;
            slots[kind.idx()].state.clone()
        };
        if matches!(state, KindState::Stale { .. }) {
            self.set_state(kind, KindState::Synced, None);
        }
    }

    /// The API answered a request for this kind with 2xx.
    fn reachable(&self, kind: Kind) {
        let state = self.state(kind);
        if matches!(state, KindState::Stale { .. }) && self.index_synced(kind) {
            self.set_state(kind, KindState::Synced, None);
        } else if let KindState::Waiting { error: Some(_) } = state {
            self.set_state(kind, KindState::Waiting { error: None }, None);
        } else if matches!(state, KindState::Forbidden { .. }) {
            let synced = self.index_synced(kind);
            self.set_state(
                kind,
                if synced {
                    KindState::Synced
                } else {
                    KindState::Waiting { error: None }
                },
                None,
            );
        }
    }
}

/// Aborts the reflector tasks when the last [`Resolver`] clone goes away.
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// The handle the tracer keeps: cheap to clone, lookups are `&self` and thread-safe.
#[derive(Clone)]
pub struct Resolver {
    shared: Arc<Shared>,
    _tasks: Arc<Tasks>,
}

impl Resolver {
    /// Starts resolution as the flags say. Only configuration mistakes fail (one-line errors);
    /// an unreachable API does not: the resolver starts unresolved and keeps retrying.
    pub async fn start(args: &KubeOptions) -> Result<Self, ResolveError> {
        match source::choose(args) {
            Source::Off => Ok(Self::disabled("--no-kube")),
            Source::Nothing => {
                tracing::warn!(
                    "kube: no kubeconfig ($KUBECONFIG, ~/.kube/config) and not running in a pod; addresses stay unresolved (pass --kubeconfig FILE, --kube-snapshot FILE, or --no-kube to silence this)"
                );
                Ok(Self::disabled("no configuration found"))
            }
            Source::Snapshot(path) => Self::from_snapshot(&path),
            src => {
                let (config, what) = source::client_config(&src, args.context.as_deref()).await?;
                Self::connect(config, what)
            }
        }
    }

    /// Resolution turned off: every lookup is `unresolved`.
    pub fn disabled(why: &str) -> Self {
        Self {
            shared: Arc::new(Shared::new(why.to_owned(), Health::Off)),
            _tasks: Arc::new(Tasks(Vec::new())),
        }
    }

    /// Watches the API described by `config` (must be called inside a tokio runtime).
    pub fn connect(config: kube::Config, what: String) -> Result<Self, ResolveError> {
        let shared = Arc::new(Shared::new(what.clone(), Health::Syncing));
        for k in Kind::ALL {
            shared.set_state(k, KindState::Waiting { error: None }, None);
        }
        let client = watch::client(config, &shared).map_err(|source| ResolveError::Client { what, source })?;
        let tasks = watch::spawn_all(&client, &shared);
        Ok(Self {
            shared,
            _tasks: Arc::new(Tasks(tasks)),
        })
    }

    /// Loads `kubectl get pods,services,endpointslices,nodes -A -o json` output.
    pub fn from_snapshot(path: &std::path::Path) -> Result<Self, ResolveError> {
        let ix = snapshot::load(path)?;
        let shared = Arc::new(Shared::new(path.display().to_string(), Health::Snapshot));
        {
            let mut slots = shared.slots();
            let st = ix.stats();
            for (k, n) in [
                (Kind::Pods, st.pods),
                (Kind::Services, st.services),
                (Kind::EndpointSlices, st.endpointslices),
                (Kind::Nodes, st.nodes),
            ] {
                slots[k.idx()] = Slot {
                    state: KindState::Synced,
                    since: Instant::now(),
                    objects: n,
                };
            }
        }
        *shared.write() = ix;
        Ok(Self {
            shared,
            _tasks: Arc::new(Tasks(Vec::new())),
        })
    }

    /// Waits until every kind has listed once (or is forbidden), at most `timeout`.
    /// Returns whether that happened; lookups work either way.
    pub async fn wait_synced(&self, timeout: Duration) -> bool {
        let mut rx = self.shared.changed.subscribe();
        let done = |r: &Self| {
            let s = r.status();
            matches!(s.health, Health::Off | Health::Snapshot) || s.settled()
        };
        let wait = async {
            while !done(self) {
                if rx.changed().await.is_err() {
                    break;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok() && done(self)
    }

    /// Resolves an address with its port and protocol (what a drop event has).
    pub fn lookup(&self, ip: IpAddr, port: u16, proto: Proto) -> Peer {
        self.shared.read().lookup(ip, Some((port, proto)))
    }

    /// Resolves a socket address.
    pub fn lookup_socket(&self, addr: SocketAddr, proto: Proto) -> Peer {
        self.lookup(addr.ip(), addr.port(), proto)
    }

    /// Resolves an address without a port (ICMP, or when the port is unknown).
    pub fn lookup_ip(&self, ip: IpAddr) -> Peer {
        self.shared.read().lookup(ip, None)
    }

    /// The pod behind a Calico-named host interface (`cali` + 11 hex), if known.
    pub fn lookup_ifname(&self, ifname: &str) -> Option<Peer> {
        self.shared.read().lookup_ifname(ifname)
    }

    /// The pod registered for a network namespace inode with [`Resolver::register_netns`].
    pub fn lookup_netns(&self, netns_inode: u64) -> Option<Peer> {
        self.shared.read().lookup_netns(netns_inode)
    }

    /// Records that a network namespace (by inode) belongs to a pod, e.g. learned from the peer of
    /// its Calico interface. The API does not publish this.
    pub fn register_netns(&self, netns_inode: u64, namespace: &str, pod: &str) {
        self.shared
            .write()
            .netns
            .insert(netns_inode, (Name::new(namespace), Name::new(pod)));
    }

    /// A Service with its ports and backends (`trace --svc`), if it exists.
    pub fn service(&self, namespace: &str, name: &str) -> Option<ServiceInfo> {
        self.shared.read().service_info(namespace, name)
    }

    /// `(namespace, name)` of the Services annotated `netdrop.io/observe: "true"` (every
    /// Service with `all`), sorted.
    pub fn observed_services(&self, all: bool) -> Vec<(String, String)> {
        self.shared.read().observed_services(all)
    }

    /// Pods filtered by namespace, node and name, with their IPs (`--pod`, `-n`, `--node`).
    pub fn pods(&self, namespace: Option<&str>, node: Option<&str>, name: Option<&str>) -> Vec<(Peer, Vec<IpAddr>)> {
        self.shared.read().pods(namespace, node, name)
    }

    /// A node's InternalIP/ExternalIP addresses.
    pub fn node_ips(&self, node: &str) -> Option<Vec<IpAddr>> {
        self.shared.read().node_ips(node)
    }

    /// Synced / stale / degraded, with reasons: print it with `{}`.
    pub fn status(&self) -> Status {
        Status::build(&self.shared.source, self.shared.base, &self.shared.slots())
    }

    /// Counts of indexed objects.
    pub fn stats(&self) -> IndexStats {
        self.shared.read().stats()
    }

    /// Watch events applied so far, all kinds (a completed list counts as one).
    pub fn events_applied(&self) -> u64 {
        self.shared.events.iter().map(|e| e.load(Ordering::Relaxed)).sum()
    }

    /// A sample of known addresses, for benchmarks.
    pub fn sample_addresses(&self, n: usize) -> Vec<(IpAddr, Option<(u16, Proto)>)> {
        self.shared.read().sample_addresses(n)
    }

    /// Resolves an address, with its port and protocol when it has them: the lookup each drop
    /// event makes for each of its ends (the hot path; `netdrop resolve --serve-stats` measures it).
    pub fn lookup_endpoint(&self, ip: IpAddr, port: Option<(u16, Proto)>) -> Peer {
        self.shared.read().lookup(ip, port)
    }
}

#[cfg(test)]
mod tests;
