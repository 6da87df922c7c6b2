//! `--kube-snapshot FILE`: the JSON that `kubectl get pods,services,endpointslices,nodes -A -o json`
//! prints (a `v1` `List`), or a single kind's `PodList`/... , loaded into the same index.

use std::path::Path;

use serde::Deserialize;

use super::{
    ResolveError,
    index::Index,
    objects::{SlimEndpointSlice, SlimNode, SlimPod, SlimService},
};

/// One `items[]` entry; kubectl sets `kind` on every item of its output.
#[derive(Deserialize)]
#[serde(tag = "kind")]
enum Item {
    Pod(SlimPod),
    Service(SlimService),
    EndpointSlice(SlimEndpointSlice),
    Node(SlimNode),
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
struct List {
    #[serde(default)]
    items: Vec<Item>,
}

pub(crate) fn parse(bytes: &[u8]) -> Result<Index, serde_json::Error> {
    let list: List = serde_json::from_slice(bytes)?;
    let mut ix = Index::default();
    for item in list.items {
        match item {
            Item::Pod(p) => ix.pods.apply(p),
            Item::Service(s) => ix.services.apply(s),
            Item::EndpointSlice(s) => ix.slices.apply(s),
            Item::Node(n) => ix.nodes.apply(n),
            Item::Other => {}
        }
    }
    // A snapshot is all there is: what it does not name is external.
    ix.synced = [true; 4];
    Ok(ix)
}

pub(crate) fn load(path: &Path) -> Result<Index, ResolveError> {
    let bytes = std::fs::read(path).map_err(|source| ResolveError::SnapshotRead {
        path: path.to_owned(),
        source,
    })?;
    parse(&bytes).map_err(|source| ResolveError::SnapshotParse {
        path: path.to_owned(),
        source,
    })
}

/// Pod fields kept in a bundle's snapshot: what the resolver reads, nothing else (a pod's spec
/// holds environment values and commands, which are not the bundle's business).
const POD_KEEP: &[(&str, &[&str])] = &[
    ("spec", &["nodeName", "hostNetwork"]),
    ("status", &["phase", "podIP", "podIPs", "hostIP", "conditions"]),
];
/// Metadata kept of every object.
const META_KEEP: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "labels",
    "ownerReferences",
    "deletionTimestamp",
    "resourceVersion",
];

/// The objects the resolver watches (pods, services, endpointslices, nodes; all namespaces), as
/// the JSON `--kube-snapshot` reads — `kubectl get pods,services,endpointslices,nodes -A -o json`
/// — for `capture --bundle`. A snapshot source is copied as it is; `None` without Kubernetes.
/// Pods keep only the fields resolution uses, nodes lose their image lists, and no object keeps
/// its annotations or managed fields.
pub async fn dump(args: &super::KubeOptions) -> Result<Option<Vec<u8>>, ResolveError> {
    use k8s_openapi::api::{
        core::v1::{Node, Pod, Service},
        discovery::v1::EndpointSlice,
    };
    use kube::api::{Api, ListParams};

    use crate::resolve::source::{self, Source};

    let src = source::choose(args);
    let (config, what) = match &src {
        Source::Off | Source::Nothing => return Ok(None),
        Source::Snapshot(path) => {
            return std::fs::read(path)
                .map(Some)
                .map_err(|source| ResolveError::SnapshotRead {
                    path: path.clone(),
                    source,
                });
        }
        _ => source::client_config(&src, args.context.as_deref()).await?,
    };
    let client = kube::Client::try_from(config).map_err(|source| ResolveError::Client {
        what: what.clone(),
        source,
    })?;
    let list_err = |kind| {
        let what = what.clone();
        move |source| ResolveError::List { what, kind, source }
    };
    let lp = ListParams::default();
    let mut items: Vec<serde_json::Value> = Vec::new();
    let mut add = |v: serde_json::Value| items.push(slim(v));
    for o in Api::<Pod>::all(client.clone())
        .list(&lp)
        .await
        .map_err(list_err("pods"))?
    {
        add(serde_json::to_value(o).unwrap_or_default());
    }
    for o in Api::<Service>::all(client.clone())
        .list(&lp)
        .await
        .map_err(list_err("services"))?
    {
        add(serde_json::to_value(o).unwrap_or_default());
    }
    for o in Api::<EndpointSlice>::all(client.clone())
        .list(&lp)
        .await
        .map_err(list_err("endpointslices"))?
    {
        add(serde_json::to_value(o).unwrap_or_default());
    }
    for o in Api::<Node>::all(client).list(&lp).await.map_err(list_err("nodes"))? {
        add(serde_json::to_value(o).unwrap_or_default());
    }
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
    Ok(Some(serde_json::to_vec_pretty(&list).unwrap_or_default()))
}

/// One object as a bundle keeps it (see [`dump`]).
fn slim(mut v: serde_json::Value) -> serde_json::Value {
    let Some(obj) = v.as_object_mut() else { return v };
    if let Some(meta) = obj.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.retain(|k, _| META_KEEP.contains(&k.as_str()));
    }
    match obj.get("kind").and_then(|k| k.as_str()) {
        Some("Pod") => {
            for (section, keep) in POD_KEEP {
                if let Some(s) = obj.get_mut(*section).and_then(|s| s.as_object_mut()) {
                    s.retain(|k, _| keep.contains(&k.as_str()));
                }
            }
        }
        Some("Node") => {
            if let Some(status) = obj.get_mut("status").and_then(|s| s.as_object_mut()) {
                status.remove("images");
            }
        }
        _ => {}
    }
    v
}

#[cfg(test)]
mod dump_tests {
    use super::{parse, slim};

    #[test]
    fn a_slimmed_pod_keeps_what_resolution_reads_and_nothing_secret() {
        let pod = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-0", "namespace": "default", "uid": "u1",
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}"},
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"nodeName": "node-a", "hostNetwork": false,
                     "containers": [{"name": "c", "env": [{"name": "DB_PASSWORD", "value": "hunter2"}]}]},
            "status": {"phase": "Running", "podIP": "10.244.1.10", "podIPs": [{"ip": "10.244.1.10"}]}
        });
        let s = slim(pod);
        let text = s.to_string();
        assert!(
            !text.contains("hunter2") && !text.contains("managedFields") && !text.contains("annotations"),
            "{text}"
        );
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [s]});
        let ix = parse(list.to_string().as_bytes()).expect("the snapshot format");
        assert_eq!(ix.stats().pods, 1);
    }
}
