//! The stand-in's cluster state: objects per kind, a global resourceVersion, a bounded event
//! history for watch resumption (older resourceVersions get `410 Gone`, as after etcd compaction),
//! and a broadcast of live events.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use serde_json::Value;
use tokio::sync::broadcast;

/// The kinds the stand-in serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResKind {
    Pods,
    Services,
    EndpointSlices,
    Nodes,
}

impl ResKind {
    pub const ALL: [ResKind; 4] = [Self::Pods, Self::Services, Self::EndpointSlices, Self::Nodes];

    pub fn plural(self) -> &'static str {
        match self {
            Self::Pods => "pods",
            Self::Services => "services",
            Self::EndpointSlices => "endpointslices",
            Self::Nodes => "nodes",
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            Self::Pods => "Pod",
            Self::Services => "Service",
            Self::EndpointSlices => "EndpointSlice",
            Self::Nodes => "Node",
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Self::EndpointSlices => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }

    /// "" for the core group.
    pub fn group(self) -> &'static str {
        match self {
            Self::EndpointSlices => "discovery.k8s.io",
            _ => "",
        }
    }

    pub fn namespaced(self) -> bool {
        !matches!(self, Self::Nodes)
    }

    pub fn short_names(self) -> &'static [&'static str] {
        match self {
            Self::Pods => &["po"],
            Self::Services => &["svc"],
            Self::EndpointSlices => &[],
            Self::Nodes => &["no"],
        }
    }

    pub fn from_plural(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.plural() == s)
    }

    pub fn from_kind(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.kind() == s)
    }

    fn idx(self) -> usize {
        self as usize
    }
}

/// Watch event types, as the API spells them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One change, with the object serialized as the API would send it.
#[derive(Clone, Debug)]
pub struct Change {
    pub rv: u64,
    pub kind: ResKind,
    pub typ: EventType,
    pub namespace: String,
    pub name: String,
    pub json: Arc<str>,
}

#[derive(Clone)]
pub(crate) struct Stored {
    pub json: Arc<str>,
}

#[derive(Default)]
pub(crate) struct KindState {
    /// (namespace, name) → object; cluster-scoped kinds use "" as namespace.
    pub objects: BTreeMap<(String, String), Stored>,
    pub history: VecDeque<Change>,
    /// Watches from a resourceVersion below this get 410 Gone.
    pub floor: u64,
}

/// Switches that make the stand-in misbehave like a broken or restricted API server.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// 403 Forbidden on list/watch/get of these kinds (RBAC missing).
    pub forbidden: Vec<ResKind>,
    /// 500 on every resource request.
    pub error_500: bool,
    /// Accept connections and requests, never answer.
    pub hang: bool,
}

pub(crate) struct State {
    pub rv: u64,
    pub kinds: [KindState; 4],
    pub faults: Faults,
    pub history_cap: usize,
}

impl State {
    pub fn kind(&self, k: ResKind) -> &KindState {
        &self.kinds[k.idx()]
    }
}

/// Errors mutating the state.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object has no kind the stand-in serves (Pod, Service, EndpointSlice, Node): {0}")]
    Kind(String),
    #[error("object has no metadata.name")]
    Name,
    #[error("{kind} {namespace}/{name} does not exist")]
    NotFound {
        kind: &'static str,
        namespace: String,
        name: String,
    },
    #[error("cannot read fixture {path}: {source}")]
    Fixture {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("fixture {path} is not JSON: {source}")]
    FixtureJson {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

/// The cluster the stand-in serves. Shared by the server and the test that mutates it; survives a
/// server restart, as etcd would.
pub struct Cluster {
    state: Mutex<State>,
    tx: broadcast::Sender<Arc<Change>>,
}

impl Default for Cluster {
    fn default() -> Self {
        Self::new()
    }
}

impl Cluster {
    /// An empty cluster; history keeps the last 10,000 changes.
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(65_536);
        Self {
            state: Mutex::new(State {
                rv: 1000,
                kinds: Default::default(),
                faults: Faults::default(),
                history_cap: 10_000,
            }),
            tx,
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Subscribes to live changes; call with the state lock held to line up with a snapshot.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.tx.subscribe()
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// Number of objects of a kind.
    pub fn count(&self, kind: ResKind) -> usize {
        self.lock().kind(kind).objects.len()
    }

    /// Sets the fault switches.
    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    pub fn faults(&self) -> Faults {
        self.lock().faults.clone()
    }

    /// Creates or replaces an object (ADDED or MODIFIED); returns its new resourceVersion.
    pub fn apply(&self, mut obj: Value) -> Result<u64, StoreError> {
        let kind = obj
            .get("kind")
            .and_then(Value::as_str)
            .and_then(ResKind::from_kind)
            .ok_or_else(|| StoreError::Kind(obj.get("kind").map(ToString::to_string).unwrap_or_default()))?;
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .ok_or(StoreError::Name)?
            .to_owned();
        let namespace = if kind.namespaced() {
            obj.pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("default")
                .to_owned()
        } else {
            String::new()
        };
        obj["apiVersion"] = Value::from(kind.api_version());
        let mut st = self.lock();
        st.rv += 1;
        let rv = st.rv;
        let meta = &mut obj["metadata"];
        meta["resourceVersion"] = Value::from(rv.to_string());
        if kind.namespaced() {
            meta["namespace"] = Value::from(namespace.as_str());
        }
        if meta.get("uid").is_none() {
            meta["uid"] = Value::from(format!("00000000-0000-4000-8000-{rv:012}"));
        }
        if meta.get("creationTimestamp").is_none() {
            meta["creationTimestamp"] = Value::from("2026-11-26T00:00:00Z");
        }
        let json: Arc<str> = Arc::from(obj.to_string());
        let key = (namespace.clone(), name.clone());
        let existed = st.kinds[kind.idx()]
            .objects
            .insert(key, Stored { json: json.clone() })
            .is_some();
        let typ = if existed { EventType::Modified } else { EventType::Added };
        self.record(
            &mut st,
            Change {
                rv,
                kind,
                typ,
                namespace,
                name,
                json,
            },
        );
        Ok(rv)
    }

    /// Deletes an object (DELETED, carrying the deletion's resourceVersion like the real API).
    pub fn delete(&self, kind: ResKind, namespace: &str, name: &str) -> Result<u64, StoreError> {
        let ns = if kind.namespaced() { namespace } else { "" };
        let mut st = self.lock();
        let Some(old) = st.kinds[kind.idx()].objects.remove(&(ns.to_owned(), name.to_owned())) else {
            return Err(StoreError::NotFound {
                kind: kind.kind(),
                namespace: ns.to_owned(),
                name: name.to_owned(),
            });
        };
        st.rv += 1;
        let rv = st.rv;
        let mut v: Value = serde_json::from_str(&old.json).expect("stored objects are JSON");
        v["metadata"]["resourceVersion"] = Value::from(rv.to_string());
        self.record(
            &mut st,
            Change {
                rv,
                kind,
                typ: EventType::Deleted,
                namespace: ns.to_owned(),
                name: name.to_owned(),
                json: Arc::from(v.to_string()),
            },
        );
        Ok(rv)
    }

    /// Forgets the watch history, as etcd compaction does: watches resuming from any earlier
    /// resourceVersion now get `410 Gone` and must relist.
    pub fn compact(&self) {
        let mut st = self.lock();
        let rv = st.rv;
        for k in &mut st.kinds {
            k.history.clear();
            k.floor = rv;
        }
    }

    /// Sets how many changes per kind stay watchable.
    pub fn set_history(&self, cap: usize) {
        self.lock().history_cap = cap.max(1);
    }

    fn record(&self, st: &mut State, change: Change) {
        let cap = st.history_cap;
        let k = &mut st.kinds[change.kind.idx()];
        k.history.push_back(change.clone());
        while k.history.len() > cap {
            let dropped = k.history.pop_front().expect("non-empty");
            k.floor = dropped.rv;
        }
        // Sent under the lock so a watcher that drains its receiver under the lock has seen every
        // change up to `st.rv` (bookmarks rely on it).
        let _ = self.tx.send(Arc::new(change));
    }

    /// Loads `kubectl get ... -o json` output (a List, or a single object) or a directory of them.
    pub fn load_fixture(&self, path: &std::path::Path) -> Result<usize, StoreError> {
        if path.is_dir() {
            let mut entries: Vec<_> = std::fs::read_dir(path)
                .map_err(|source| StoreError::Fixture {
                    path: path.display().to_string(),
                    source,
                })?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "json"))
                .collect();
            entries.sort();
            let mut n = 0;
            for p in entries {
                n += self.load_fixture(&p)?;
            }
            return Ok(n);
        }
        let text = std::fs::read_to_string(path).map_err(|source| StoreError::Fixture {
            path: path.display().to_string(),
            source,
        })?;
        let v: Value = serde_json::from_str(&text).map_err(|source| StoreError::FixtureJson {
            path: path.display().to_string(),
            source,
        })?;
        self.load_value(v)
    }

    /// Loads a List or a single object; items of other kinds are skipped.
    pub fn load_value(&self, v: Value) -> Result<usize, StoreError> {
        let items = match v.get("items") {
            Some(Value::Array(items)) => items.clone(),
            _ => vec![v],
        };
        let mut n = 0;
        for item in items {
            if item
                .get("kind")
                .and_then(Value::as_str)
                .and_then(ResKind::from_kind)
                .is_some()
            {
                self.apply(item)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Reads one object.
    pub fn get(&self, kind: ResKind, namespace: &str, name: &str) -> Option<Value> {
        let ns = if kind.namespaced() { namespace } else { "" };
        let st = self.lock();
        let o = st.kind(kind).objects.get(&(ns.to_owned(), name.to_owned()))?;
        serde_json::from_str(&o.json).ok()
    }
}
