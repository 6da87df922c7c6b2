//! The commands: each wires the stages together, runs its event loop (the only `select!`s in
//! the crate) and maps errors to one line at the edge (`anyhow`).

pub mod agent;
pub mod capture;
pub mod cleanup;
pub mod interfaces;
pub mod reasons;
pub mod recorder;
pub mod report;
pub mod resolve;
pub(crate) mod session;
pub mod targets;
pub mod trace;
