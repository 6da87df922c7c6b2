//! Commands.

pub mod interfaces;
pub mod reasons;
pub mod resolve;
pub mod trace;
