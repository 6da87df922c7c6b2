//! Coexistence: another dataplane's tc program on the same interface (a TCX program or a clsact
//! filter that drops "marked" packets) keeps running and keeps its verdicts while netdrop is
//! attached and after it leaves; netdrop still counts every packet, as it runs first.

use std::net::SocketAddr;

use netdrop_tests::{
    TcNode, TcWatch, UdpCounter, add_foreign_clsact_dropper, load_len_dropper, require_root, require_tcx,
    tcx_attach_last, udp_burst,
};

/// Marked datagrams: payload 333 → skb->len 14 + 20 + 8 + 333 at tc ingress.
const MARKED_PAYLOAD: usize = 333;
const MARKED_LEN: u32 = 14 + 20 + 8 + 333;

fn coexist(netdrop_mode: &str, foreign_tcx: bool, test: &str, subnet: u8) {
    require_root!(test);
    if netdrop_mode == "tcx" || foreign_tcx {
        require_tcx!(test);
    }
    let node = TcNode::new("tcco");
    let pod = node.add_pod(subnet, 1);
    let prog = load_len_dropper(MARKED_LEN);
    let _link = if foreign_tcx {
        Some(tcx_attach_last(&node.ns, &prog, &pod.host_if))
    } else {
        add_foreign_clsact_dropper(&node.ns, &pod.host_if, 7, MARKED_LEN);
        None
    };
    let to = SocketAddr::from((pod.node_ip, 9500));
    let foreign_drops = |count_plain: usize, count_marked: usize| -> usize {
        let rx = UdpCounter::start(&node.ns, to);
        udp_burst(&pod.ns, pod.pod_ip, to, 10, count_plain);
        udp_burst(&pod.ns, pod.pod_ip, to, MARKED_PAYLOAD, count_marked);
        rx.stop()
    };
    assert_eq!(
        foreign_drops(5, 5),
        5,
        "the foreign program drops marked packets before netdrop starts"
    );

    let mut w = TcWatch::start(&["--node-netns", &node.arg("n1"), "--tc-mode", netdrop_mode]);
    if foreign_tcx {
        let order = node.tcx_programs(std::slice::from_ref(&pod.host_if));
        assert_eq!(
            order[&pod.host_if].0,
            ["netdrop_ingress", "test_len_drop"],
            "netdrop first, the other kept"
        );
    }
    assert_eq!(
        foreign_drops(50, 20),
        50,
        "marked packets still dropped, others delivered, while netdrop runs"
    );
    assert!(w.signal(nix::sys::signal::Signal::SIGTERM));
    let s = w.summary();
    let i = s["interfaces"]
        .as_array()
        .and_then(|a| a.first())
        .cloned()
        .expect("interface in summary");
    assert_eq!(
        i["from_pod"]["packets"], 70,
        "netdrop saw every packet, dropped ones included: {i}"
    );
    assert_eq!(i["from_pod"]["udp_new"], 2, "two flows (one socket per burst)");

    assert_eq!(
        foreign_drops(5, 5),
        5,
        "the foreign program still works after netdrop left"
    );
    if foreign_tcx {
        let order = node.tcx_programs(std::slice::from_ref(&pod.host_if));
        assert_eq!(order[&pod.host_if].0, ["test_len_drop"]);
    } else {
        let f = node.ns.exec("tc", &["filter", "show", "dev", &pod.host_if, "ingress"]);
        assert!(f.contains("pref 7") && !f.contains("netdrop"), "{f}");
    }
}

#[test]
fn tc_coexist_tcx_with_tcx_program() {
    coexist("tcx", true, "tc_coexist_tcx_with_tcx_program", 94);
}

#[test]
fn tc_coexist_clsact_with_clsact_filter() {
    coexist("clsact", false, "tc_coexist_clsact_with_clsact_filter", 95);
}

#[test]
fn tc_coexist_tcx_with_clsact_filter() {
    coexist("tcx", false, "tc_coexist_tcx_with_clsact_filter", 96);
}
