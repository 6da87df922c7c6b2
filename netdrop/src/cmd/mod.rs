//! The commands: each wires the stages together, runs its event loop (the only `select!`s in
//! the crate) and maps errors to one line at the edge (`anyhow`).

pub mod interfaces;
pub mod reasons;
pub mod resolve;
pub mod trace;
