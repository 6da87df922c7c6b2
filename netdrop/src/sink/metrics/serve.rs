//! The agent's HTTP endpoints (hyper 1, HTTP/1.1): `/metrics` (a fresh snapshot from the agent
//! per scrape, OpenMetrics or the classic format by the `Accept` header), `/healthz` (the event
//! reader is alive) and `/readyz` (programs attached, caches synced). The probes answer from
//! [`Health`] alone and never ask the agent for a snapshot.

use std::{
    convert::Infallible,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
    task::JoinSet,
};

use super::{Exposition, MetricsOptions, MetricsState};
use crate::aggregate::node_metrics::NodeMetrics;

/// How the agent is asked for a snapshot: it answers on the sender it receives.
pub type SnapshotRequest = oneshot::Sender<NodeMetrics>;

/// `/healthz` fails when the event reader has not beaten for this long.
pub const BEAT_TIMEOUT: Duration = Duration::from_secs(10);
/// A scrape waits this long for a fresh snapshot before serving the last one.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a client may take to send its request header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the probes answer, shared between the agent (which updates it) and the server.
#[derive(Debug)]
pub struct Health {
    inner: Mutex<HealthState>,
}

#[derive(Debug)]
struct HealthState {
    /// The last beat (the exporter's creation counts as one: a start-up grace period).
    beat: Instant,
    beat_wall: SystemTime,
    ready: bool,
    why: String,
}

impl Health {
    fn new() -> Self {
        Self {
            inner: Mutex::new(HealthState {
                beat: Instant::now(),
                beat_wall: SystemTime::now(),
                ready: false,
                why: "starting".into(),
            }),
        }
    }

    /// The event reader is alive.
    pub fn beat(&self) {
        let mut h = self.lock();
        h.beat = Instant::now();
        h.beat_wall = SystemTime::now();
    }

    /// Ready (programs attached, caches synced) or not, and why not.
    pub fn set_ready(&self, ready: bool, why: &str) {
        let mut h = self.lock();
        h.ready = ready;
        why.clone_into(&mut h.why);
    }

    /// A panicking holder cannot leave the state half-written (plain fields): keep serving.
    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn healthz(&self) -> (StatusCode, String) {
        let h = self.lock();
        let silent = h.beat.elapsed();
        if silent <= BEAT_TIMEOUT {
            (StatusCode::OK, "ok\n".into())
        } else {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "event reader silent since {} ({} s)\n",
                    humantime::format_rfc3339_seconds(h.beat_wall),
                    silent.as_secs()
                ),
            )
        }
    }

    fn readyz(&self) -> (StatusCode, String) {
        let h = self.lock();
        if h.ready {
            (StatusCode::OK, "ready\n".into())
        } else {
            (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", h.why))
        }
    }
}

/// The metrics and health server.
#[derive(Debug)]
pub struct Exporter {
    state: MetricsState,
    health: Arc<Health>,
}

/// What every connection shares.
#[derive(Debug)]
struct Shared {
    /// One scrape at a time: each asks for its own snapshot and applies it.
    state: tokio::sync::Mutex<MetricsState>,
    health: Arc<Health>,
    snapshots: mpsc::Sender<SnapshotRequest>,
}

impl Exporter {
    pub fn new(opts: MetricsOptions, version: &str) -> Self {
        Self {
            state: MetricsState::new(opts, version),
            health: Arc::new(Health::new()),
        }
    }

    /// What the agent beats and sets ready on.
    pub fn health(&self) -> Arc<Health> {
        Arc::clone(&self.health)
    }

    /// Serves every listener until the returned future is dropped (which also ends the
    /// connections it accepted). Errors only when there is nothing to listen on.
    pub async fn serve(
        self,
        listeners: Vec<TcpListener>,
        snapshots: mpsc::Sender<SnapshotRequest>,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(!listeners.is_empty(), "metrics: no address to listen on");
        let shared = Arc::new(Shared {
            state: tokio::sync::Mutex::new(self.state),
            health: self.health,
            snapshots,
        });
        let mut accepting = JoinSet::new();
        for l in listeners {
            accepting.spawn(accept(l, Arc::clone(&shared)));
        }
        while accepting.join_next().await.is_some() {}
        Ok(())
    }
}

/// Accepts connections for ever; an accept error (out of file descriptors) is logged and
/// retried rather than ending the server.
async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        match listener.accept().await {
            Ok((stream, _)) => {
                let shared = Arc::clone(&shared);
                connections.spawn(async move {
                    let service = service_fn(move |req| {
                        let shared = Arc::clone(&shared);
                        async move { Ok::<_, Infallible>(handle(&shared, &req).await) }
                    });
                    // A client that never finishes its request header does not hold a
                    // connection for ever.
                    if let Err(e) = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), service)
                        .await
                    {
                        tracing::debug!("metrics: connection: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("metrics: accept failed: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into(), false);
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/healthz" => {
            let (status, body) = shared.health.healthz();
            text(status, body, head)
        }
        "/readyz" => {
            let (status, body) = shared.health.readyz();
            text(status, body, head)
        }
        "/metrics" => {
            let accept = req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok());
            let format = Exposition::from_accept(accept);
            // HEAD says what a GET would return without taking a snapshot for nothing.
            let body = if head {
                String::new()
            } else {
                scrape(shared, format).await
            };
            response(StatusCode::OK, format.content_type(), body)
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: /metrics, /healthz, /readyz\n".into(),
            head,
        ),
    }
}

/// Asks the agent for a snapshot, applies it and encodes; without an answer in
/// [`SNAPSHOT_TIMEOUT`] (the agent busy or gone) serves the last one and counts it.
async fn scrape(shared: &Shared, format: Exposition) -> String {
    let mut state = shared.state.lock().await;
    let fresh = tokio::time::timeout(SNAPSHOT_TIMEOUT, async {
        let (tx, rx) = oneshot::channel();
        shared.snapshots.send(tx).await.ok()?;
        rx.await.ok()
    })
    .await;
    match fresh {
        Ok(Some(m)) => state.update(&m, Instant::now()),
        Ok(None) => {
            tracing::warn!("metrics: the agent did not answer the scrape; serving the last snapshot");
            state.stale_scrape();
        }
        Err(_) => {
            tracing::warn!(
                "metrics: no snapshot within {} s; serving the last one",
                SNAPSHOT_TIMEOUT.as_secs()
            );
            state.stale_scrape();
        }
    }
    state.encode(format)
}

fn text(status: StatusCode, body: String, head: bool) -> Response<Full<Bytes>> {
    response(
        status,
        "text/plain; charset=utf-8",
        if head { String::new() } else { body },
    )
}

fn response(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    r
}
