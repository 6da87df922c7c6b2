//! The diagnosis of a target summary in plain words: which backends and nodes carry the drops,
//! the share of the attempts they explain, why, and what to check next.

use super::target_summary::{BackendRow, NodeCount, TargetSummary, TopReason, sum_nodes};
use crate::enrich::classify::{self, Certainty, Effect};

/// `12.3%`, or `-` without attempts.
pub(crate) fn pct(r: Option<f64>) -> String {
    r.map_or_else(|| "-".into(), |r| format!("{:.1}%", r * 100.0))
}

/// A drop ratio in the diagnosis, `of` naming the attempts ("attempts", "its own attempts").
fn ratio_words(r: Option<f64>, of: &str) -> String {
    match r {
        Some(r) if r > 1.0 => format!(
            "more drops than {of}: each lost {r:.1} packets on average, the same data retransmitted and dropped again"
        ),
        _ => format!("{} of {of}", pct(r)),
    }
}

/// The share of a Service's backend drops that "carries" it: 90%.
const MOST_DROPS: f64 = 0.9;

/// How many of `bad` (sorted by drops, most first) it takes to account for [`MOST_DROPS`] of
/// their drops.
fn carriers_of_most(bad: &[&BackendRow]) -> usize {
    let total: u64 = bad.iter().map(|b| b.drops).sum();
    let mut sum = 0;
    for (i, b) in bad.iter().enumerate() {
        sum += b.drops;
        if sum as f64 >= MOST_DROPS * total as f64 {
            return i + 1;
        }
    }
    bad.len()
}

fn at(b: &BackendRow) -> String {
    match &b.node {
        Some(n) => format!("{} on {n}", b.pod),
        None => b.pod.clone(),
    }
}

/// `netfilter_rule (NETFILTER_DROP at nft_do_chain+0x3e8 on node-b)`.
pub(crate) fn why(r: &TopReason) -> String {
    let inferred = if r.certainty == Certainty::Inferred {
        ", inferred"
    } else {
        ""
    };
    let place = r.node.as_ref().map(|n| format!(" on {n}")).unwrap_or_default();
    format!("{} ({} at {}{place}{inferred})", r.classification, r.reason, r.location)
}

/// `node-a`, or `node-a (300), node-b (26)` when several; namespaces on no watched node are
/// "an unwatched namespace".
fn nodes_text(nodes: &[NodeCount]) -> String {
    let name = |n: &NodeCount| n.node.clone().unwrap_or_else(|| "an unwatched namespace".into());
    match nodes {
        [one] => name(one),
        _ => nodes
            .iter()
            .map(|n| format!("{} ({})", name(n), n.count))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// Sums node counts of several rows.
fn merge_nodes<'a>(parts: impl Iterator<Item = &'a [NodeCount]>) -> Vec<NodeCount> {
    sum_nodes(parts.flatten().cloned())
}

/// " Not counted as drops: ..." for the discards counted apart, or nothing.
fn discarded_text(s: &TargetSummary) -> String {
    let mut discarded = Vec::new();
    if s.lossless > 0 {
        discarded.push(format!(
            "{} discards that lost nothing (stale bare ACKs, data already received)",
            s.lossless
        ));
    }
    if s.resets > 0 {
        discarded.push(format!("{} segments answered with a reset", s.resets));
    }
    if discarded.is_empty() {
        String::new()
    } else {
        format!(" Not counted as drops: {}.", discarded.join("; "))
    }
}

/// A hint per classification of the drops, in order of appearance.
fn next_steps(s: &TargetSummary, bad: &[&BackendRow], out: &mut Vec<String>) {
    let mut classes: Vec<&str> = bad
        .iter()
        .flat_map(|b| b.top_reasons.iter())
        .chain(&s.unmatched.top_reasons)
        .map(|r| r.classification.as_str())
        .collect();
    classes.dedup();
    let mut seen = Vec::new();
    for c in classes {
        if seen.contains(&c) {
            continue;
        }
        seen.push(c);
        if let Some(h) = classify::hint(c) {
            out.push(format!("Next ({c}): {h}."));
        }
    }
}

/// "The drops are on node-a: look there first.", with counts when on several nodes.
fn where_to_look(nodes: &[NodeCount]) -> String {
    let known: Vec<&NodeCount> = nodes.iter().filter(|n| n.node.is_some()).collect();
    match known.as_slice() {
        [] => {
            "The drops happened in namespaces on no watched node: pass --node-netns for every node to see where.".into()
        }
        [one] if nodes.len() == 1 => format!(
            "The drops are on {}: look there first.",
            one.node.as_deref().unwrap_or_default()
        ),
        [first, ..] => {
            format!(
                "The drops are on {}: look at {} first.",
                nodes_text(nodes),
                first.node.as_deref().unwrap_or_default()
            )
        }
    }
}

/// Resets matter when there are more than one and they reach this share of a backend's
/// attempts (or attempts are not known): a stray one after a server's early close (the field
/// notes' healthy lab: 1 in 150 connections, no request failed) is not worth a line.
const RESETS_MATTER: f64 = 0.01;

/// Which backends and nodes carry the drops, the share of the Service's attempts they explain,
/// why, and what to check next. "Where to look" is where the drops happened (the node whose
/// kernel dropped them, e.g. the client's for a conntrack insert failure), never where the
/// backend runs.
#[expect(
    clippy::too_many_lines,
    reason = "the findings in the order an engineer checks them; each is a few lines"
)]
pub fn diagnose(s: &TargetSummary) -> Vec<String> {
    let mut out = Vec::new();
    if s.backends.is_empty() {
        out.push(format!(
            "{} has no endpoints: kube-proxy rejects its packets (ICMP/RST); check the selector and the pods' readiness (`kubectl get endpointslices -l kubernetes.io/service-name=...`)",
            s.service
        ));
    }
    let discarded = discarded_text(s);
    if s.drops == 0 {
        let tried = s.attempts.map_or_else(String::new, |a| format!(" of {a} attempts"));
        out.push(format!("{}: no drops{tried}.{discarded}", s.service));
        resets_lines(s, &mut out);
        clash_lines(s, &mut out);
        return out;
    }
    out.push(format!(
        "{}: {} drops{} ({}).{discarded}",
        s.service,
        s.drops,
        s.attempts.map_or_else(String::new, |a| format!(" for {a} attempts")),
        ratio_words(s.drop_ratio, "attempts")
    ));
    let mut bad: Vec<&BackendRow> = s.backends.iter().filter(|b| b.drops > 0).collect();
    bad.sort_by_key(|b| std::cmp::Reverse(b.drops));
    let share_of_drops = |n: u64| n as f64 / s.drops as f64;
    // Drops concentrated on a few backends: name them; spread over all: say so. Judged by the
    // drops, not by how many backends have any: one bad backend with a stray drop or two on the
    // others (a late retransmission meeting a TIME_WAIT socket) is still one bad backend.
    // Pods, namespaces and nodes are not replicas of one another: their drops are theirs, never
    // "spread over most backends" (one pod is all of its rows).
    let carriers = carriers_of_most(&bad);
    let concentrated = carriers > 0 && (s.basis.pods || carriers * 2 <= s.backends.len().max(1));
    let of_attempts = if s.basis.pods { "all" } else { "the Service's" };
    for b in bad.iter().take(5) {
        let explains = s.attempts.filter(|a| *a > 0).map(|a| b.drops as f64 / a as f64);
        let reason = b.top_reasons.first().map(why).unwrap_or_default();
        let several = if b.drops_by_node.len() > 1 {
            format!(" Dropped on {}.", nodes_text(&b.drops_by_node))
        } else {
            String::new()
        };
        out.push(format!(
            "{}: {} drops ({:.0}% of the drops{}; {}): {reason}.{several}",
            at(b),
            b.drops,
            share_of_drops(b.drops) * 100.0,
            explains.map_or_else(String::new, |e| if e > 1.0 {
                format!(", {e:.1} per attempt ({of_attempts} attempts)")
            } else {
                format!(", {:.1}% of {of_attempts} attempts", e * 100.0)
            }),
            ratio_words(b.drop_ratio, "its own attempts"),
        ));
    }
    if bad.len() > 5 {
        out.push(format!("... and {} more backends with drops.", bad.len() - 5));
    }
    let on_backends: u64 = bad.iter().map(|b| b.drops).sum();
    // Out-of-order data the client's socket still held when the connection was aborted: it
    // carries the Service's address (the reply, un-NATed) but is a consequence of a loss
    // elsewhere, not a drop before any backend was chosen.
    let ofo: u64 = s
        .unmatched
        .top_reasons
        .iter()
        .filter(|r| r.classification == classify::OFO_PURGED)
        .map(|r| r.count)
        .sum();
    let before_backend = s.unmatched.drops.saturating_sub(ofo);
    // Where to look: the nodes of the drops that carry most of them — those before any backend
    // was chosen when they are the majority, else the few bad backends'.
    let carried_by: Option<Vec<NodeCount>> = if before_backend > 0 && before_backend >= on_backends {
        Some(s.unmatched.drops_by_node.clone())
    } else if concentrated {
        Some(merge_nodes(
            bad.iter().take(carriers).map(|b| b.drops_by_node.as_slice()),
        ))
    } else {
        None
    };
    if concentrated {
        let healthy: Vec<String> = s.backends.iter().filter(|b| b.drops == 0).map(at).collect();
        if !healthy.is_empty() {
            out.push(format!("Healthy: {}.", healthy.join(", ")));
        }
    } else if !bad.is_empty() && before_backend < on_backends {
        out.push("The drops are spread over most backends: suspect something they share (the client's node, conntrack, DNS, a policy on every backend).".into());
    }
    if before_backend > 0 {
        let reason = s
            .unmatched
            .top_reasons
            .iter()
            .find(|r| r.classification != classify::OFO_PURGED)
            .map(why)
            .unwrap_or_default();
        out.push(format!(
            "{before_backend} drops matched the Service's address but no backend (before DNAT, or rejected for lack of endpoints): {reason}.",
        ));
    }
    if let Some(r) = s
        .unmatched
        .top_reasons
        .iter()
        .find(|r| r.classification == classify::OFO_PURGED)
    {
        out.push(format!(
            "{ofo} drops on the client's side: {}: out-of-order data of the Service's replies the client's socket held when the connection was aborted; a consequence of the loss above, not a cause of its own.",
            why(r)
        ));
    }
    if let Some(nodes) = carried_by {
        out.push(where_to_look(&nodes));
    }
    resets_lines(s, &mut out);
    if s.other_namespaces > 0 {
        out.push(format!(
            "{} more matched the {} addresses in network namespaces of none of the given nodes (another cluster on this host?): left out, and not shown as drop lines.",
            s.other_namespaces,
            if s.basis.pods { "traced" } else { "Service's" }
        ));
    }
    next_steps(s, &bad, &mut out);
    clash_lines(s, &mut out);
    out
}

/// Conntrack clashes the kernel resolved: nothing dropped, which is the answer to "is it the
/// DNS insert race?".
fn clash_lines(s: &TargetSummary, out: &mut Vec<String>) {
    for c in &s.basis.clashes {
        out.push(format!(
            "{}: {} conntrack clashes resolved: {}.",
            c.place,
            c.count,
            classify::CLASH_RESOLVED
        ));
    }
}

/// Backends whose resets matter ([`RESETS_MATTER`]): their clients see "connection reset".
#[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
fn resets_lines(s: &TargetSummary, out: &mut Vec<String>) {
    for b in s.backends.iter().filter(|b| b.resets > 0) {
        let matters = b.resets > 1
            && b.attempts
                .is_none_or(|a| b.resets as f64 >= RESETS_MATTER * a.max(1) as f64);
        if !matters {
            continue;
        }
        let place = b
            .discard_reasons
            .iter()
            .find(|r| r.effect == Effect::Reset)
            .map(why)
            .unwrap_or_default();
        out.push(format!(
            "{}: {} segments met no connection and were answered with a reset: {place}; its clients see \"connection reset\" (expected once after a restart; if it keeps happening, connections outlive the server's sockets).",
            at(b),
            b.resets
        ));
    }
}
