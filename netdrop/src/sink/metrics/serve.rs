//! The agent's HTTP endpoints (hyper 1, HTTP/1.1): `/metrics` (a fresh snapshot from the agent
//! per scrape, OpenMetrics or the classic format by the `Accept` header), `/healthz` (the event
//! reader is alive) and `/readyz` (programs attached, caches synced). The probes answer from
//! [`Health`] alone and never ask the agent for a snapshot. With the flight recorder on,
//! `/debug/recorder.pcapng`: its dump ([`crate::sink::recorder`]), streamed as it is written.

use std::{
    convert::Infallible,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{Either, Full, StreamBody};
use hyper::body::Frame;
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
    task::JoinSet,
};

use super::{Exposition, MetricsOptions, MetricsState};
use crate::{aggregate::node_metrics::NodeMetrics, sink::recorder::Dump};

/// How the agent is asked for a snapshot: it answers on the sender it receives.
pub type SnapshotRequest = oneshot::Sender<NodeMetrics>;
/// How the agent is asked for the flight recorder's dump.
pub type DumpRequest = oneshot::Sender<Dump>;
/// The flight recorder's path.
pub const RECORDER_PATH: &str = "/debug/recorder.pcapng";

/// A response: whole, or a dump streamed in chunks as it is written.
type Body = Either<Full<Bytes>, StreamBody<futures::stream::BoxStream<'static, Result<Frame<Bytes>, std::io::Error>>>>;

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
    recorder: Option<mpsc::Sender<DumpRequest>>,
}

/// What every connection shares.
#[derive(Debug)]
struct Shared {
    /// One scrape at a time: each asks for its own snapshot and applies it.
    state: tokio::sync::Mutex<MetricsState>,
    health: Arc<Health>,
    snapshots: mpsc::Sender<SnapshotRequest>,
    recorder: Option<mpsc::Sender<DumpRequest>>,
}

impl Exporter {
    pub fn new(opts: MetricsOptions, version: &str) -> Self {
        Self {
            state: MetricsState::new(opts, version),
            health: Arc::new(Health::new()),
            recorder: None,
        }
    }

    /// Serves the flight recorder's dump at [`RECORDER_PATH`], asking the agent on `dumps`.
    #[must_use]
    pub fn with_recorder(mut self, dumps: mpsc::Sender<DumpRequest>) -> Self {
        self.recorder = Some(dumps);
        self
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
            recorder: self.recorder,
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

async fn handle(shared: &Shared, req: &Request<Incoming>) -> Response<Body> {
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
        RECORDER_PATH => recorder(shared, head).await,
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: /metrics, /healthz, /readyz, /debug/recorder.pcapng\n".into(),
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

/// The flight recorder's dump, streamed: the agent hands over the records (within
/// [`SNAPSHOT_TIMEOUT`]) and a blocking thread writes the pcapng into the response in chunks, so
/// the dump is never whole in memory twice.
async fn recorder(shared: &Shared, head: bool) -> Response<Body> {
    let Some(dumps) = &shared.recorder else {
        return text(
            StatusCode::NOT_FOUND,
            "the flight recorder is off (--recorder-events 0 or --recorder-bytes 0)\n".into(),
            head,
        );
    };
    let dump = tokio::time::timeout(SNAPSHOT_TIMEOUT, async {
        let (tx, rx) = oneshot::channel();
        dumps.send(tx).await.ok()?;
        rx.await.ok()
    })
    .await;
    let Ok(Some(dump)) = dump else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the agent did not hand over the recorder within {} s\n",
                SNAPSHOT_TIMEOUT.as_secs()
            ),
            head,
        );
    };
    let mut r = if head {
        Response::new(Either::Left(Full::new(Bytes::new())))
    } else {
        let (tx, rx) = mpsc::channel::<Bytes>(4);
        tokio::task::spawn_blocking(move || {
            // A client that goes away ends the write (the channel is closed): nothing to report.
            if let Err(e) = dump.write(ChunkWriter {
                tx,
                buf: Vec::with_capacity(CHUNK),
            }) {
                tracing::debug!("flight recorder: dump over HTTP: {e}");
            }
        });
        let chunks = futures::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|b| (Ok(Frame::data(b)), rx)) },
        );
        Response::new(Either::Right(StreamBody::new(Box::pin(chunks) as _)))
    };
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/x-pcapng"),
    );
    r.headers_mut().insert(
        header::CONTENT_DISPOSITION,
        header::HeaderValue::from_static("attachment; filename=\"netdrop-recorder.pcapng\""),
    );
    r
}

/// The size of the chunks a dump is sent in.
const CHUNK: usize = 64 * 1024;

/// Sends what is written to it in chunks of [`CHUNK`] bytes, on a blocking thread.
struct ChunkWriter {
    tx: mpsc::Sender<Bytes>,
    buf: Vec<u8>,
}

impl ChunkWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let b = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(b)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away"))
    }
}

impl std::io::Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

fn text(status: StatusCode, body: String, head: bool) -> Response<Body> {
    response(
        status,
        "text/plain; charset=utf-8",
        if head { String::new() } else { body },
    )
}

fn response(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut r = Response::new(Either::Left(Full::new(Bytes::from(body))));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    r
}
