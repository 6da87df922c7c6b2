//! Commands.

pub mod resolve;
pub mod trace;
