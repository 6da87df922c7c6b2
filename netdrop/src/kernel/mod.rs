//! Read-only facts about the running kernel.

pub mod offsets;
pub mod reasons;
pub mod symbols;
pub mod tracefs;
