//! netdrop: an eBPF packet-drop tracer for Kubernetes.

pub mod aggregate;
pub mod cli;
pub mod cmd;
pub mod enrich;
pub mod kernel;
pub mod probe;
pub mod resolve;
pub mod sink;
pub mod source;

#[cfg(test)]
mod golden;
