//! The reflectors: one `watcher().default_backoff()` stream per kind, folded into the index.
//!
//! kube-rs's `reflect()` keeps whole objects in a `Store`; here the index *is* the store (compact
//! entries only), so the stream is applied directly: watch events patch the live table under a
//! short write lock, and a (re)list is collected into a fresh table that replaces the old one at
//! `InitDone`, so objects deleted while we were away disappear and readers never see half a list.

use std::{
    future::Future,
    pin::{Pin, pin},
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll},
};

use futures::StreamExt;
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt, watcher},
};
use serde::de::DeserializeOwned;
use tracing::{debug, info, warn};

use super::{
    Shared,
    index::{Index, Kind, NodeTable, PodTable, SliceTable, SvcTable},
    objects::{SlimEndpointSlice, SlimNode, SlimPod, SlimService},
    status::KindState,
};

/// A per-kind table the watcher feeds.
pub(crate) trait Table: Default + Send + Sync + 'static {
    type Obj: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static;
    const KIND: Kind;
    fn apply(&mut self, o: Self::Obj);
    fn delete(&mut self, o: &Self::Obj);
    fn slot(ix: &mut Index) -> &mut Self;
    fn len(&self) -> usize;
}

macro_rules! table {
    ($t:ty, $obj:ty, $kind:expr, $field:ident) => {
        impl Table for $t {
            type Obj = $obj;
            const KIND: Kind = $kind;
            fn apply(&mut self, o: $obj) {
                <$t>::apply(self, o);
            }
            fn delete(&mut self, o: &$obj) {
                <$t>::delete(self, o);
            }
            fn slot(ix: &mut Index) -> &mut Self {
                &mut ix.$field
            }
            fn len(&self) -> usize {
                <$t>::len(self)
            }
        }
    };
}
table!(PodTable, SlimPod, Kind::Pods, pods);
table!(SvcTable, SlimService, Kind::Services, services);
table!(SliceTable, SlimEndpointSlice, Kind::EndpointSlices, slices);
table!(NodeTable, SlimNode, Kind::Nodes, nodes);

/// Starts the four reflectors; the handles are aborted when the resolver is dropped.
pub(crate) fn spawn_all(client: &Client, shared: &Arc<Shared>) -> Vec<tokio::task::JoinHandle<()>> {
    vec![
        tokio::spawn(run::<PodTable>(Api::all(client.clone()), shared.clone())),
        tokio::spawn(run::<SvcTable>(Api::all(client.clone()), shared.clone())),
        tokio::spawn(run::<SliceTable>(Api::all(client.clone()), shared.clone())),
        tokio::spawn(run::<NodeTable>(Api::all(client.clone()), shared.clone())),
    ]
}

async fn run<T: Table>(api: Api<T::Obj>, shared: Arc<Shared>) {
    let kind = T::KIND;
    // Bookmarks keep resumes cheap; the default (non-streaming) list works against every API
    // server version; pages of 500 bound the memory a list needs.
    let cfg = watcher::Config::default();
    let mut stream = pin!(watcher(api, cfg).default_backoff());
    let mut staging: Option<T> = None;
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(watcher::Event::Init) => staging = Some(T::default()),
            Ok(watcher::Event::InitApply(o)) => staging.get_or_insert_with(T::default).apply(o),
            Ok(watcher::Event::InitDone) => {
                let fresh = staging.take().unwrap_or_default();
                let n = fresh.len();
                let old = {
                    let mut ix = shared.write();
                    ix.synced[kind.idx()] = true;
                    std::mem::replace(T::slot(&mut ix), fresh)
                };
                drop(old); // outside the lock: freeing 100k entries takes a while
                shared.events[kind.idx()].fetch_add(1, Ordering::Relaxed);
                shared.set_state(kind, KindState::Synced, Some(n));
            }
            Ok(watcher::Event::Apply(o)) => {
                let n = {
                    let mut ix = shared.write();
                    let t = T::slot(&mut ix);
                    t.apply(o);
                    t.len()
                };
                shared.events[kind.idx()].fetch_add(1, Ordering::Relaxed);
                shared.touch(kind, n);
            }
            Ok(watcher::Event::Delete(o)) => {
                let n = {
                    let mut ix = shared.write();
                    let t = T::slot(&mut ix);
                    t.delete(&o);
                    t.len()
                };
                shared.events[kind.idx()].fetch_add(1, Ordering::Relaxed);
                shared.touch(kind, n);
            }
            Err(e) => on_error(&shared, kind, &e),
        }
    }
}

/// The innermost cause, which is where "Connection refused" lives.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

fn forbidden_reason(kind: Kind, message: &str) -> String {
    format!(
        "cannot list/watch {res} cluster-wide ({message}); grant list,watch on {res} in a ClusterRole bound to netdrop's identity (deploy/base/clusterrole.yaml)",
        res = kind.resource()
    )
}

fn on_error(shared: &Shared, kind: Kind, e: &watcher::Error) {
    use watcher::Error as E;
    let client_err = match e {
        E::InitialListFailed(c) | E::WatchStartFailed(c) | E::WatchFailed(c) => Some(c),
        E::WatchError(_) | E::NoResourceVersion => None,
    };
    let status = match e {
        E::WatchError(s) => Some(s.as_ref()),
        _ => match client_err {
            Some(kube::Error::Api(s)) => Some(s.as_ref()),
            _ => None,
        },
    };
    let new = match (status, client_err) {
        (Some(s), _) if s.code == 410 => {
            debug!(kind = kind.resource(), "resourceVersion expired (410 Gone): relisting");
            return;
        }
        (Some(s), _) if s.code == 403 || s.code == 401 => forbidden_reason(kind, &s.message),
        (Some(s), _) => format!("API error {} on {}: {}", s.code, kind.resource(), s.message),
        (None, Some(c)) => format!("API unreachable: {}", root_cause(c)),
        (None, None) => format!("API sent {} without a resourceVersion", kind.resource()),
    };
    let forbidden = new.starts_with("cannot list/watch");
    let cur = shared.state(kind);
    let next = if forbidden {
        KindState::Forbidden { reason: new }
    } else {
        match cur {
            KindState::Synced | KindState::Stale { .. } => KindState::Stale { reason: new },
            _ if shared.index_synced(kind) => KindState::Stale { reason: new },
            _ => KindState::Waiting { error: Some(new) },
        }
    };
    shared.set_state(kind, next, None);
}

/// Logs a state change once (not every retry).
pub(crate) fn log_transition(kind: Kind, from: &KindState, to: &KindState) {
    let same_class = std::mem::discriminant(from) == std::mem::discriminant(to);
    match to {
        KindState::Forbidden { reason } if !same_class => warn!("kube: {reason}; continuing with the other kinds"),
        KindState::Stale { reason } if !same_class => {
            warn!(
                "kube: {reason}; keeping the last known {} and retrying with backoff",
                kind.resource()
            );
        }
        KindState::Waiting { error: Some(reason) } if !matches!(from, KindState::Waiting { error: Some(_) }) => {
            warn!("kube: {reason}; tracing continues unresolved, retrying with backoff");
        }
        KindState::Synced if matches!(from, KindState::Stale { .. } | KindState::Forbidden { .. }) => {
            info!("kube: {} back in sync", kind.resource());
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Reachability: the watcher only yields an item when an object changes, so a watch that resumes
// after an outage is invisible to it. A layer on the HTTP client sees the 2xx and clears "stale".

#[derive(Clone)]
pub(crate) struct ObserveLayer(pub Arc<Shared>);

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            shared: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Observe<S> {
    inner: S,
    shared: Arc<Shared>,
}

fn kind_of_path(path: &str) -> Option<Kind> {
    match path.rsplit('/').next()? {
        "pods" => Some(Kind::Pods),
        "services" => Some(Kind::Services),
        "endpointslices" => Some(Kind::EndpointSlices),
        "nodes" => Some(Kind::Nodes),
        _ => None,
    }
}

impl<S, B, R> tower::Service<http::Request<B>> for Observe<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let kind = kind_of_path(req.uri().path());
        let shared = self.shared.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await;
            if let (Some(kind), Ok(resp)) = (kind, &res)
                && resp.status().is_success()
            {
                shared.reachable(kind);
            }
            res
        })
    }
}

/// Builds the client with the reachability layer.
pub(crate) fn client(config: kube::Config, shared: &Arc<Shared>) -> Result<Client, kube::Error> {
    let builder = kube::client::ClientBuilder::try_from(config)?;
    Ok(builder.with_layer(&ObserveLayer(shared.clone())).build())
}
