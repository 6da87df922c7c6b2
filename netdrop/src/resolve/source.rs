//! Where cluster state comes from: command-line flags and the API client configuration.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use kube::config::{KubeConfigOptions, Kubeconfig};

use super::ResolveError;

/// Default service-account directory mounted into every pod.
pub const SERVICEACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Where cluster state comes from (`netdrop trace` and `netdrop resolve` fill it from their
/// Kubernetes flags, `cli::KubeOptions`).
#[derive(Debug, Clone, Default)]
pub struct KubeOptions {
    /// Kubeconfig file [default: $KUBECONFIG, else ~/.kube/config, else the in-cluster service
    /// account].
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context [default: the current context].
    pub context: Option<String>,
    /// A saved cluster state (`kubectl get pods,services,endpointslices,nodes -A -o json`)
    /// instead of the API.
    pub kube_snapshot: Option<PathBuf>,
    /// Do not talk to Kubernetes: addresses stay unresolved.
    pub no_kube: bool,
    /// The node this runs on [default: `$NODE_NAME`, else the hostname].
    pub node_name: Option<String>,
    /// Service-account directory for the in-cluster configuration (token, ca.crt).
    pub serviceaccount_dir: PathBuf,
}

/// The node where drops happen: `--node-name`, else `NODE_NAME` (clap reads it into the options), else the hostname.
pub fn node_name(args: &KubeOptions) -> String {
    if let Some(n) = args.node_name.as_deref().filter(|n| !n.is_empty()) {
        return n.to_owned();
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// This node's name: `flag` (`--node-name`/`$NODE_NAME`), else the hostname.
pub fn node_name_or_host(flag: Option<&str>) -> String {
    node_name(&KubeOptions {
        node_name: flag.map(String::from),
        ..Default::default()
    })
}

/// What the flags and the environment select.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    Off,
    Snapshot(PathBuf),
    Kubeconfig(Option<PathBuf>),
    InCluster(PathBuf),
    /// Nothing configured: no kubeconfig and not in a pod.
    Nothing,
}

/// The order users expect: explicit flags, `KUBECONFIG`, `~/.kube/config`, then in-cluster.
pub(crate) fn choose(args: &KubeOptions) -> Source {
    if args.no_kube {
        return Source::Off;
    }
    if let Some(p) = &args.kube_snapshot {
        return Source::Snapshot(p.clone());
    }
    if let Some(p) = &args.kubeconfig {
        return Source::Kubeconfig(Some(p.clone()));
    }
    if std::env::var_os("KUBECONFIG").is_some_and(|v| !v.is_empty()) {
        return Source::Kubeconfig(None);
    }
    if let Some(home) = std::env::var_os("HOME") {
        let p = Path::new(&home).join(".kube/config");
        if p.is_file() {
            return Source::Kubeconfig(Some(p));
        }
    }
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() && args.serviceaccount_dir.join("token").is_file() {
        return Source::InCluster(args.serviceaccount_dir.clone());
    }
    Source::Nothing
}

/// How long to wait for a TCP connection to the API before counting it as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Builds the client configuration; returns it with a description of where it came from.
pub(crate) async fn client_config(src: &Source, context: Option<&str>) -> Result<(kube::Config, String), ResolveError> {
    let options = KubeConfigOptions {
        context: context.map(str::to_owned),
        ..KubeConfigOptions::default()
    };
    let (kc, what) = match src {
        Source::Kubeconfig(Some(path)) => (
            Kubeconfig::read_from(path).map_err(|source| ResolveError::Kubeconfig {
                what: path.display().to_string(),
                source,
            })?,
            format!("kubeconfig {}", path.display()),
        ),
        Source::Kubeconfig(None) => match Kubeconfig::from_env() {
            Ok(Some(kc)) => (kc, "kubeconfig $KUBECONFIG".to_owned()),
            Ok(None) => return Err(ResolveError::NoConfig),
            Err(source) => {
                return Err(ResolveError::Kubeconfig {
                    what: "$KUBECONFIG".to_owned(),
                    source,
                });
            }
        },
        Source::InCluster(dir) => (
            incluster_kubeconfig(dir)?,
            format!("in-cluster service account {}", dir.display()),
        ),
        Source::Off | Source::Snapshot(_) | Source::Nothing => return Err(ResolveError::NoConfig),
    };
    let mut config = kube::Config::from_custom_kubeconfig(kc, &options)
        .await
        .map_err(|source| ResolveError::Kubeconfig {
            what: what.clone(),
            source,
        })?;
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    let what = format!("{what} ({})", config.cluster_url);
    Ok((config, what))
}

/// The in-cluster configuration, expressed as a kubeconfig so kube-rs reads the CA bundle and
/// re-reads the (rotating, projected) token file exactly as it does for `Config::incluster`.
/// Unlike `Config::incluster`, the service-account directory can be moved (tests, sidecars).
fn incluster_kubeconfig(dir: &Path) -> Result<Kubeconfig, ResolveError> {
    let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| ResolveError::NoConfig)?;
    let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".to_owned());
    let host = if host.contains(':') { format!("[{host}]") } else { host };
    let ca = dir.join("ca.crt");
    let token = dir.join("token");
    for f in [&ca, &token] {
        if !f.is_file() {
            return Err(ResolveError::InCluster {
                path: f.display().to_string(),
            });
        }
    }
    let doc = serde_json::json!({
        "apiVersion": "v1", "kind": "Config", "current-context": "in-cluster",
        "clusters": [{"name": "in-cluster", "cluster": {
            "server": format!("https://{host}:{port}"),
            "certificate-authority": ca.display().to_string()}}],
        "users": [{"name": "service-account", "user": {"tokenFile": token.display().to_string()}}],
        "contexts": [{"name": "in-cluster", "context": {"cluster": "in-cluster", "user": "service-account"}}],
    });
    Kubeconfig::from_yaml(&doc.to_string()).map_err(|source| ResolveError::Kubeconfig {
        what: format!("in-cluster service account {}", dir.display()),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_environment() {
        let args = KubeOptions {
            no_kube: true,
            ..KubeOptions::default()
        };
        assert_eq!(choose(&args), Source::Off);
        let args = KubeOptions {
            kube_snapshot: Some("s.json".into()),
            ..KubeOptions::default()
        };
        assert_eq!(choose(&args), Source::Snapshot("s.json".into()));
        let args = KubeOptions {
            kubeconfig: Some("k".into()),
            ..KubeOptions::default()
        };
        assert_eq!(choose(&args), Source::Kubeconfig(Some("k".into())));
    }

    #[test]
    fn node_name_flag_then_hostname() {
        let args = KubeOptions {
            node_name: Some("worker-2".into()),
            ..KubeOptions::default()
        };
        assert_eq!(node_name(&args), "worker-2");
        assert!(!node_name(&KubeOptions::default()).is_empty());
    }
}
