//! netdrop: an eBPF packet-drop tracer for Kubernetes.
//!
//! Stages, one module each: [`probe`] (load, attach, feature detection and fallbacks),
//! [`decode`] (kernel events → [`event::DropRecord`]), [`classify`] (benign frees, drop
//! classes), [`resolve`] (Kubernetes names), [`filter`], [`aggregate`] (summaries from exact
//! kernel counters), [`output`] (sinks). Only `probe` needs privileges.

pub mod aggregate;
pub mod classify;
pub mod cli;
pub mod conntrack;
pub mod decode;
pub mod event;
pub mod filter;
pub mod interfaces;
pub mod output;
pub mod probe;
pub mod reasons;
pub mod resolve;
pub mod svc;
pub mod symbols;
pub mod targets;
pub mod trace;

#[cfg(test)]
mod golden;
