//! Sources: what the kernel and the host produce over time besides drop events — the drop
//! counters, harvested into totals and deltas with the keys of network namespaces that are gone
//! evicted ([`counters`]), the tc counters and link events of workload interfaces
//! ([`interfaces`]), each namespace's conntrack statistics ([`conntrack`]), and the node's state
//! for a postmortem bundle ([`node_state`]).

pub mod conntrack;
pub mod counters;
pub mod interfaces;
pub mod node_state;
