//! Kubernetes flags shared by `netdrop trace` and `netdrop resolve`.

use std::path::PathBuf;

use crate::resolve::{KubeOptions, SERVICEACCOUNT_DIR};

/// Kubernetes flags shared by `netdrop trace` and `netdrop resolve`.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = "Kubernetes")]
pub struct KubeArgs {
    /// Kubeconfig to use, e.g. `--kubeconfig ~/.kube/config` [default: $KUBECONFIG, else
    /// ~/.kube/config, else the in-cluster service account]
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,

    /// Kubeconfig context to use, e.g. `--context kind-lab` [default: the current context]
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,

    /// Resolve from a saved cluster state instead of the API, for offline and postmortem use, e.g.
    /// `--kube-snapshot state.json` made with
    /// `kubectl get pods,services,endpointslices,nodes -A -o json > state.json`
    #[arg(long, value_name = "FILE", conflicts_with_all = ["kubeconfig", "context", "no_kube"])]
    pub kube_snapshot: Option<PathBuf>,

    /// Do not talk to Kubernetes: addresses stay unresolved
    #[arg(long, conflicts_with_all = ["kubeconfig", "context"])]
    pub no_kube: bool,

    /// The node this runs on, named as the drop's location, e.g. `--node-name worker-2`
    /// [default: `$NODE_NAME`, else the hostname]
    #[arg(long, value_name = "NAME", env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// Service-account directory for the in-cluster configuration (token, ca.crt).
    #[arg(long, value_name = "DIR", hide = true, env = "NETDROP_SERVICEACCOUNT_DIR", default_value = SERVICEACCOUNT_DIR)]
    pub serviceaccount_dir: PathBuf,
}

impl From<&KubeArgs> for KubeOptions {
    fn from(a: &KubeArgs) -> Self {
        Self {
            kubeconfig: a.kubeconfig.clone(),
            context: a.context.clone(),
            kube_snapshot: a.kube_snapshot.clone(),
            no_kube: a.no_kube,
            node_name: a.node_name.clone(),
            serviceaccount_dir: a.serviceaccount_dir.clone(),
        }
    }
}
