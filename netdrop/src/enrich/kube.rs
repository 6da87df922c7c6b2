//! Kubernetes names for a drop's ends, from the resolver's index.

use crate::{
    enrich::record::DropRecord,
    resolve::{Proto, Resolver},
};

/// Names both ends (and the pre-NAT ends) of a drop.
pub fn resolve_record(r: &Resolver, d: &mut DropRecord) {
    let proto = d.protocol.ip().and_then(Proto::from_ip);
    for e in [&mut d.src, &mut d.dst, &mut d.orig_src, &mut d.orig_dst]
        .into_iter()
        .flatten()
    {
        let port = e.port.zip(proto);
        e.k8s = Some(r.lookup_endpoint(e.ip, port));
    }
}
