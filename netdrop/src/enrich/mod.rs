//! Enrichment.

pub mod classify;
pub mod decode;
pub mod record;
