//! SIGTERM and SIGKILL: afterwards no netdrop program is attached to any interface. TCX links
//! die with a killed process; clsact filters outlive it and the next run removes them, without
//! touching another dataplane's filter.

use netdrop_tests::{
    TcNode, TcWatch, Tracer, add_foreign_clsact_dropper, links_of, prog_exists, require_root, require_tcx,
    sched_cls_prog_ids,
};
use nix::sys::signal::Signal;

/// A node with three pods (the pods must live as long as the test: deleting a pod namespace
/// deletes its veth pair).
fn setup() -> (TcNode, Vec<String>, Vec<netdrop_tests::TcPod>) {
    let node = TcNode::new("tcsig");
    let pods: Vec<_> = (1..=3).map(|n| node.add_pod(93, n)).collect();
    let names = pods.iter().map(|p| p.host_if.clone()).collect();
    (node, names, pods)
}

fn nothing_attached(node: &TcNode, names: &[String], progs: &[u64]) {
    let tcx = node.tcx_programs(names);
    assert!(
        tcx.values().all(|(i, e)| i.is_empty() && e.is_empty()),
        "TCX programs left: {tcx:?}"
    );
    let ours: Vec<_> = node
        .bpftool_tc()
        .into_iter()
        .filter(|(_, _, n)| n.starts_with("netdrop_"))
        .collect();
    assert!(ours.is_empty(), "netdrop filters left: {ours:?}");
    assert_eq!(links_of(progs), 0, "links left");
    assert!(progs.iter().all(|p| !prog_exists(*p)), "programs left loaded");
}

fn sigterm(mode: &str, test: &str) {
    require_root!(test);
    if mode == "tcx" {
        require_tcx!(test);
    }
    let (node, names, _pods) = setup();
    let mut w = TcWatch::start(&["--node-netns", &node.arg("n1"), "--tc-mode", mode]);
    let progs = sched_cls_prog_ids(w.pid());
    w.wait_until("3 interfaces attached", std::time::Duration::from_secs(10), |w| {
        w.attached().len() == 3
    });
    assert!(w.signal(Signal::SIGTERM), "exit status after SIGTERM");
    assert!(
        w.stderr
            .lock()
            .expect("lock")
            .iter()
            .any(|l| l.contains("detached from 3 interfaces"))
    );
    nothing_attached(&node, &names, &progs);
}

#[test]
fn tc_sigterm_detaches_tcx() {
    sigterm("tcx", "tc_sigterm_detaches_tcx");
}

#[test]
fn tc_sigterm_detaches_clsact() {
    sigterm("clsact", "tc_sigterm_detaches_clsact");
}

#[test]
fn tc_sigkill_tcx_leaves_nothing() {
    require_root!("tc_sigkill_tcx_leaves_nothing");
    require_tcx!("tc_sigkill_tcx_leaves_nothing");
    let (node, names, _pods) = setup();
    let mut w = TcWatch::start(&["--node-netns", &node.arg("n1"), "--tc-mode", "tcx"]);
    let progs = sched_cls_prog_ids(w.pid());
    w.signal(Signal::SIGKILL);
    // The kernel releases a dead process's links from a workqueue: give it a moment.
    let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while links_of(&progs) > 0 && std::time::Instant::now() < end {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    nothing_attached(&node, &names, &progs);
}

#[test]
fn tc_sigkill_clsact_then_restart_removes_leftovers_only() {
    require_root!("tc_sigkill_clsact_then_restart_removes_leftovers_only");
    let (node, names, _pods) = setup();
    add_foreign_clsact_dropper(&node.ns, &names[0], 7, 1);
    let mut w = TcWatch::start(&["--node-netns", &node.arg("n1"), "--tc-mode", "clsact"]);
    w.signal(Signal::SIGKILL);
    let left: Vec<_> = node
        .bpftool_tc()
        .into_iter()
        .filter(|(_, _, n)| n.starts_with("netdrop_"))
        .collect();
    assert_eq!(
        left.len(),
        6,
        "a killed clsact run leaves its 6 filters (that is why restarts clean up): {left:?}"
    );

    // The restart (auto mode: TCX here) removes them and says so.
    let mut w = TcWatch::start(&["--node-netns", &node.arg("n1")]);
    assert!(
        w.stderr
            .lock()
            .expect("lock")
            .iter()
            .any(|l| l.contains("removed 6 filters left by killed earlier runs")),
        "restart reports the clean-up: {:?}",
        w.stderr.lock().expect("lock")
    );
    let progs = sched_cls_prog_ids(w.pid());
    assert!(w.signal(Signal::SIGINT));
    nothing_attached(&node, &names, &progs);
    // The other dataplane's filter is untouched.
    let filters = node.ns.exec("tc", &["filter", "show", "dev", &names[0], "ingress"]);
    assert!(
        filters.contains("pref 7") && filters.contains("handle 0x7"),
        "foreign filter kept: {filters}"
    );
}

/// The agent killed (clsact mode): its filters stay; a restarted agent removes them as it
/// starts; killed again, `netdrop cleanup` removes them (an agent uninstalled). Another
/// dataplane's filter stays throughout.
#[test]
fn agent_sigkill_then_restart_and_cleanup_remove_leftovers_only() {
    require_root!("agent_sigkill_then_restart_and_cleanup_remove_leftovers_only");
    let (node, names, _pods) = setup();
    add_foreign_clsact_dropper(&node.ns, &names[0], 7, 1);
    let netns = node.arg("n1");
    let args = [
        "--no-kube",
        "--node-name",
        "n1",
        "--node-netns",
        &netns,
        "--tc-mode",
        "clsact",
        "--listen",
        "127.0.0.1:0",
    ];
    let ours = |node: &TcNode| -> Vec<String> {
        node.bpftool_tc()
            .into_iter()
            .filter(|(_, _, n)| n.starts_with("netdrop_"))
            .map(|(d, k, n)| format!("{d} {k} {n}"))
            .collect()
    };
    let kill9 = |a: Tracer| {
        let pid = nix::unistd::Pid::from_raw(a.pid() as i32);
        nix::sys::signal::kill(pid, Signal::SIGKILL).expect("SIGKILL");
        drop(a); // reaps it
    };
    let a = Tracer::start_agent(&args);
    kill9(a);
    assert_eq!(
        ours(&node).len(),
        6,
        "a killed clsact agent leaves its 6 filters: {:?}",
        ours(&node)
    );

    let a = Tracer::start_agent(&args);
    let pid = a.pid();
    let now = ours(&node);
    assert_eq!(now.len(), 6, "{now:?}");
    assert!(
        now.iter().all(|f| f.contains(&format!("pid={pid}"))),
        "only the new agent's filters: {now:?}"
    );
    kill9(a);
    let (ok, out, err) = netdrop_tests::netdrop(&["cleanup", "--node-netns", &netns]);
    println!("netdrop cleanup: {out}{err}");
    assert!(ok, "cleanup failed: {err}");
    assert!(out.contains("n1: removed 6 tc filter(s)"), "{out}");
    assert!(ours(&node).is_empty(), "left after cleanup: {:?}", ours(&node));
    let filters = node.ns.exec("tc", &["filter", "show", "dev", &names[0], "ingress"]);
    assert!(
        filters.contains("pref 7") && filters.contains("handle 0x7"),
        "foreign filter kept: {filters}"
    );
}
