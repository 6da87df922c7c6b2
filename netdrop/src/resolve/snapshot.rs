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
