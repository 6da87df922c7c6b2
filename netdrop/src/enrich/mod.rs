//! Enrichment: a kernel event becomes a [`record::DropRecord`] — decoded headers, whether it is
//! shown ([`visibility`]), what it is ([`classify`]), the node it happened on, and the
//! Kubernetes names of its ends ([`kube`]). No syscalls; unit-tested without root.

pub mod classify;
pub mod decode;
pub mod kube;
pub mod record;
pub mod visibility;
