//! netdrop: an eBPF packet-drop tracer for Kubernetes.
//!
//! Data flows one way, and a module imports only the modules before it in this list:
//! - [`kernel`]: read-only facts about the running kernel (BTF offsets, drop reasons, symbols,
//!   tracefs, namespaces, capabilities, benign frees) → [`kernel::KernelInfo`].
//! - [`resolve`]: Kubernetes names for addresses (watchers, slim objects, per-kind indexes).
//! - [`probe`]: privileged load and attach: the drop hook with its fallbacks, the precise
//!   hooks, the kernel filter, tc programs ([`probe::tc`]: TCX, clsact), netlink.
//! - [`source`]: what the kernel produces over time: the drop counters, with the keys of
//!   namespaces that are gone evicted ([`source::counters`]), tc counters of workload interfaces
//!   and their link events ([`source::interfaces`]), conntrack statistics (sampled on a thread of
//!   their own, [`source::conntrack::CtSampler`]).
//! - [`enrich`]: an event becomes a typed [`enrich::record::DropRecord`] (decode, visibility,
//!   one [`enrich::classify::Classifier`] for events and counter rows, Kubernetes names);
//!   values become text only in a sink.
//! - [`aggregate`]: summaries from the kernel's exact counters, what was attached
//!   ([`aggregate::attach::AttachReport`]), target sets and per-backend target summaries
//!   (mergeable across nodes), the diagnosis.
//! - [`sink`]: where records and summaries are written: text lines, JSON lines, the live table,
//!   pcapng capture files.
//! - [`cli`]: clap types only. [`cmd`]: the commands (`trace`, `capture`, `report`, `reasons`,
//!   `resolve`, `interfaces`), the only place with a `select!` loop.
//!
//! Only `probe` (and the tc watchers it drives in `source`) needs privileges; the stages after
//! it make no syscalls and are unit-tested without root.

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
