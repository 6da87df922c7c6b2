//! Resolver health: per kind synced / waiting / stale / forbidden, and the one-line summary the
//! tracer prints. Transitions are logged once; retries are not.

use std::{
    fmt,
    time::{Duration, Instant},
};

use serde::Serialize;

use super::index::Kind;

/// Where one kind stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum KindState {
    /// Not watched (resolution off, or not in the snapshot).
    Off,
    /// First list not finished; `error` says why if a try failed.
    Waiting {
        error: Option<String>,
    },
    Synced,
    /// The connection was lost after a sync: the last known state is served.
    Stale {
        reason: String,
    },
    /// RBAC refused list/watch on this kind (or a 401).
    Forbidden {
        reason: String,
    },
}

#[derive(Clone, Debug)]
pub(crate) struct Slot {
    pub state: KindState,
    pub since: Instant,
    pub objects: usize,
}

impl Default for Slot {
    fn default() -> Self {
        Self {
            state: KindState::Off,
            since: Instant::now(),
            objects: 0,
        }
    }
}

/// The resolver's overall condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// `--no-kube`, or nothing configured.
    Off,
    /// Loaded from `--kube-snapshot`.
    Snapshot,
    /// Waiting for the first complete list of some kind.
    Syncing,
    Synced,
    /// The API is unreachable; names come from the last known state.
    Stale,
    /// Some kinds cannot be read (RBAC); the others resolve.
    Degraded,
}

/// One kind's status, as printed and serialized.
#[derive(Clone, Debug, Serialize)]
pub struct KindStatus {
    pub kind: Kind,
    /// `off`, `waiting`, `synced`, `stale`, `forbidden`.
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Seconds in this state.
    pub for_secs: u64,
    pub objects: usize,
}

/// What the tracer prints about resolution.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub health: Health,
    /// Where state comes from (kubeconfig and server, service account, snapshot file).
    pub source: String,
    pub kinds: Vec<KindStatus>,
}

impl Status {
    pub(crate) fn build(source: &str, base: Health, slots: &[Slot; 4]) -> Self {
        let kinds: Vec<KindStatus> = Kind::ALL
            .iter()
            .map(|&k| {
                let s = &slots[k.idx()];
                let (state, reason) = match &s.state {
                    KindState::Off => ("off", None),
                    KindState::Waiting { error } => ("waiting", error.clone()),
                    KindState::Synced => ("synced", None),
                    KindState::Stale { reason } => ("stale", Some(reason.clone())),
                    KindState::Forbidden { reason } => ("forbidden", Some(reason.clone())),
                };
                KindStatus {
                    kind: k,
                    state,
                    reason,
                    for_secs: s.since.elapsed().as_secs(),
                    objects: s.objects,
                }
            })
            .collect();
        let any = |st: &str| kinds.iter().any(|k| k.state == st);
        let health = match base {
            Health::Off | Health::Snapshot => base,
            _ if any("forbidden") => Health::Degraded,
            _ if any("stale") => Health::Stale,
            _ if any("waiting") => Health::Syncing,
            _ => Health::Synced,
        };
        Self {
            health,
            source: source.to_owned(),
            kinds,
        }
    }

    /// True when every watched kind finished a list (it may be stale now) or is forbidden.
    pub fn settled(&self) -> bool {
        self.kinds.iter().all(|k| k.state != "waiting")
    }
}

fn secs(d: u64) -> String {
    humantime::format_duration(Duration::from_secs(d)).to_string()
}

impl fmt::Display for Status {
    /// One line, e.g. `kube: synced from kubeconfig ~/.kube/config (https://...) — 120 pods, ...`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let counts = self
            .kinds
            .iter()
            .filter(|k| k.state != "off")
            .map(|k| format!("{} {}", k.objects, k.kind.resource().split('.').next().unwrap_or("")))
            .collect::<Vec<_>>()
            .join(", ");
        match self.health {
            Health::Off => write!(f, "kube: off ({}); addresses are not resolved", self.source),
            Health::Snapshot => write!(f, "kube: snapshot {}: {counts}", self.source),
            Health::Synced => write!(f, "kube: synced from {}: {counts}", self.source),
            Health::Syncing => {
                write!(f, "kube: syncing from {}", self.source)?;
                for k in self.kinds.iter().filter(|k| k.state == "waiting") {
                    write!(f, "; {} waiting {}", k.kind.resource(), secs(k.for_secs))?;
                    if let Some(r) = &k.reason {
                        write!(f, " ({r})")?;
                    }
                }
                Ok(())
            }
            Health::Stale => {
                let k = self.kinds.iter().find(|k| k.state == "stale").expect("stale kind");
                write!(
                    f,
                    "kube: stale for {} ({}); using the last known state ({counts}), resyncing when the API is back",
                    secs(k.for_secs),
                    k.reason.as_deref().unwrap_or("API unreachable")
                )
            }
            Health::Degraded => {
                write!(f, "kube: degraded")?;
                for k in self.kinds.iter().filter(|k| k.state == "forbidden") {
                    write!(f, "; {}", k.reason.as_deref().unwrap_or("forbidden"))?;
                }
                write!(f, "; other kinds resolve ({counts})")
            }
        }
    }
}
