//! Sources: what the kernel and the host produce over time besides drop events — the tc
//! counters and link events of workload interfaces ([`interfaces`]), and each namespace's
//! conntrack statistics ([`conntrack`]).

pub mod conntrack;
pub mod interfaces;
