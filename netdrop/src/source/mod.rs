//! Sources.

pub mod conntrack;
pub mod interfaces;
