//! netdrop: an eBPF packet-drop tracer for Kubernetes.
pub mod resolve;
