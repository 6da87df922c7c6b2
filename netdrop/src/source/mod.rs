//! Sources: what the kernel and the host produce over time besides drop events — the drop
//! counters, harvested into totals and deltas with the keys of network namespaces that are gone
//! evicted ([`counters`]), the tc counters and link events of workload interfaces
//! ([`interfaces`]), and each namespace's conntrack statistics ([`conntrack`]).

pub mod conntrack;
pub mod counters;
pub mod interfaces;
