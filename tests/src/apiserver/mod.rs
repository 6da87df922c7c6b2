//! A Kubernetes API stand-in for tests: serves list + watch (and get) of Pods, Services,
//! `EndpointSlices` (`discovery.k8s.io/v1`) and Nodes, cluster-wide and per namespace, from fixture
//! files and state the test mutates, over plain HTTP or TLS with a bearer token, with switches for
//! 403 on one kind, 500, or hanging. No kube-apiserver can be installed on these machines; this
//! answers the requests kube-rs and kubectl make the way the real one does (see `http.rs`).
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! use netdrop_tests::apiserver::{Cluster, ServeOptions, StandIn};
//! let cluster = std::sync::Arc::new(Cluster::new());
//! cluster.load_fixture("tests/fixtures/kube/cluster.json".as_ref())?;
//! let server = StandIn::start(cluster.clone(), ServeOptions::default()).await?;
//! server.write_kubeconfig("/tmp/kubeconfig".as_ref())?;
//! # Ok(()) }
//! ```

mod http;
pub mod rbac;
mod store;
pub mod synth;
mod tls;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
pub use rbac::Rbac;
pub use store::{Change, Cluster, EventType, Faults, ResKind, StoreError};
pub use tls::TlsMaterial;
use tokio::{net::TcpListener, task::JoinSet};

/// How to serve.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Listen address; port 0 picks one. Always loopback.
    pub addr: SocketAddr,
    /// Serve HTTPS with this material (see [`TlsMaterial::generate`]).
    pub tls: Option<Arc<TlsMaterial>>,
    /// Require `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// How often watches with `allowWatchBookmarks=true` get a bookmark (the real API: about a minute).
    pub bookmark_interval: Duration,
    /// Authorize every resource request against this ClusterRole (the token's identity is bound
    /// to it); decisions are recorded in it.
    pub rbac: Option<Arc<Rbac>>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: None,
            token: None,
            bookmark_interval: Duration::from_secs(5),
            rbac: None,
        }
    }
}

/// Errors starting the stand-in.
#[derive(Debug, thiserror::Error)]
pub enum StandInError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the stand-in listens on loopback only, not {0}")]
    NotLoopback(SocketAddr),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS set-up failed: {0}")]
    Tls(String),
}

/// A running stand-in. Dropping it (or [`StandIn::stop`]) closes the listener and every open
/// connection, like a killed API server; the [`Cluster`] lives on for a restart.
pub struct StandIn {
    addr: SocketAddr,
    options: ServeOptions,
    cluster: Arc<Cluster>,
    task: tokio::task::JoinHandle<()>,
}

impl StandIn {
    /// Starts serving `cluster`.
    pub async fn start(cluster: Arc<Cluster>, options: ServeOptions) -> Result<Self, StandInError> {
        if !options.addr.ip().is_loopback() {
            return Err(StandInError::NotLoopback(options.addr));
        }
        let listener = TcpListener::bind(options.addr)
            .await
            .map_err(|source| StandInError::Listen {
                addr: options.addr,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StandInError::Listen {
            addr: options.addr,
            source,
        })?;
        let ctx = Arc::new(http::Ctx {
            cluster: cluster.clone(),
            token: options.token.clone(),
            bookmark_interval: options.bookmark_interval,
            server_address: addr.to_string(),
            rbac: options.rbac.clone(),
        });
        let acceptor = options.tls.as_ref().map(|t| t.acceptor()).transpose()?;
        let task = tokio::spawn(async move {
            // Connection tasks live in this set: aborting the server task drops it, which aborts
            // them and closes every socket, open watches included.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((sock, _)) = accepted else { continue };
                        let ctx = ctx.clone();
                        let acceptor = acceptor.clone();
                        conns.spawn(async move {
                            let svc = service_fn(move |req| http::handle(ctx.clone(), req));
                            let builder = hyper::server::conn::http1::Builder::new();
                            match acceptor {
                                Some(a) => {
                                    if let Ok(tls) = a.accept(sock).await {
                                        let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
                                    }
                                }
                                None => {
                                    let _ = builder.serve_connection(TokioIo::new(sock), svc).await;
                                }
                            }
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(Self {
            addr,
            options,
            cluster,
            task,
        })
    }

    /// Stops serving (listener and connections closed); returns the options to restart on the
    /// same address with [`StandIn::start`].
    pub async fn stop(mut self) -> ServeOptions {
        self.task.abort();
        let _ = (&mut self.task).await;
        let mut o = self.options.clone();
        o.addr = self.addr;
        o
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// `http://127.0.0.1:PORT` or `https://...`.
    pub fn url(&self) -> String {
        let scheme = if self.options.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// A kubeconfig for this server (CA data and token included when configured).
    pub fn kubeconfig(&self) -> serde_json::Value {
        let mut cluster = serde_json::json!({"server": self.url()});
        if let Some(t) = &self.options.tls {
            cluster["certificate-authority-data"] = serde_json::Value::from(t.ca_pem_base64());
        }
        let mut user = serde_json::json!({});
        if let Some(tok) = &self.options.token {
            user["token"] = serde_json::Value::from(tok.as_str());
        }
        serde_json::json!({
            "apiVersion": "v1", "kind": "Config", "current-context": "standin",
            "clusters": [{"name": "standin", "cluster": cluster}],
            "users": [{"name": "standin", "user": user}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "standin", "namespace": "default"}}],
            "preferences": {},
        })
    }

    /// Writes [`StandIn::kubeconfig`] (JSON is valid YAML for kubectl and kube-rs).
    pub fn write_kubeconfig(&self, path: &Path) -> Result<(), StandInError> {
        write(path, self.kubeconfig().to_string().as_bytes())
    }

    /// Writes a service-account directory (`token`, `ca.crt`, `namespace`) for the in-cluster path.
    pub fn write_serviceaccount(&self, dir: &Path) -> Result<(), StandInError> {
        std::fs::create_dir_all(dir).map_err(|source| StandInError::Write {
            path: dir.to_owned(),
            source,
        })?;
        write(
            &dir.join("token"),
            self.options.token.as_deref().unwrap_or("").as_bytes(),
        )?;
        write(&dir.join("namespace"), b"netdrop")?;
        if let Some(t) = &self.options.tls {
            write(&dir.join("ca.crt"), t.ca_pem.as_bytes())?;
        }
        Ok(())
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn write(path: &Path, data: &[u8]) -> Result<(), StandInError> {
    std::fs::write(path, data).map_err(|source| StandInError::Write {
        path: path.to_owned(),
        source,
    })
}
