//! Builds and removes the lab's network: node and pod namespaces, the underlay, Calico-style
//! workload veths and routes, and kube-proxy-style iptables rules. Everything lives inside
//! namespaces the lab creates; nothing is added to the namespace the lab runs in.

use std::{
    fmt::Write as _,
    fs,
    io::Write as _,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    process::Stdio,
    thread,
};

use super::{
    LabError,
    topology::{
        CALI_MAC, CLUSTER_CIDR, EXTERNAL_IP, Names, NodeSpec, POD_GATEWAY, PodSpec, Topology, UNDERLAY_PREFIX,
        sep_chain, svc_chain,
    },
};

/// Where `ip netns` keeps named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Runs `f` on a thread that has entered the network namespace at `path`: sockets it opens and
/// processes it starts live there (a child process inherits the calling thread's namespaces).
pub fn in_netns<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> Result<T, LabError> + Send + 'static,
) -> Result<T, LabError> {
    let file = fs::File::open(path).map_err(|source| LabError::Io {
        path: path.to_owned(),
        source,
    })?;
    let p = path.to_owned();
    thread::spawn(move || {
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|source| LabError::Setns { path: p, source })?;
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Runs a command (in the caller's namespace), feeding `stdin`; fails with its stderr.
pub fn cmd(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, LabError> {
    let line = format!("{program} {}", args.join(" "));
    let mut child = netdrop_tools::tool(program)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| LabError::Spawn {
            cmd: line.clone(),
            source,
        })?;
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("piped stdin");
        pipe.write_all(input.as_bytes()).map_err(|source| LabError::Spawn {
            cmd: line.clone(),
            source,
        })?;
    }
    let out = child.wait_with_output().map_err(|source| LabError::Spawn {
        cmd: line.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(LabError::Command {
            cmd: line,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command inside a named namespace.
pub fn ns_cmd(netns: &str, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, LabError> {
    let (program, args, stdin) = (
        program.to_string(),
        args.iter().map(|s| (*s).to_string()).collect::<Vec<_>>(),
        stdin.map(str::to_string),
    );
    in_netns(&netns_path(netns), move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        cmd(&program, &a, stdin.as_deref())
    })
}

/// `ip -n <netns> -batch -` with these lines.
pub(crate) fn ip_batch(netns: Option<&str>, lines: &str) -> Result<(), LabError> {
    let mut args = Vec::new();
    if let Some(ns) = netns {
        args.extend(["-n", ns]);
    }
    args.extend(["-batch", "-"]);
    cmd("ip", &args, Some(lines)).map(drop)
}

/// Writes sysctls (`net.ipv4.ip_forward` style keys) inside a namespace.
pub fn ns_sysctls(netns: &str, kv: &[(&str, &str)]) -> Result<(), LabError> {
    let kv: Vec<(String, String)> = kv.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect();
    in_netns(&netns_path(netns), move || {
        for (k, v) in kv {
            let path = PathBuf::from("/proc/sys").join(k.replace('.', "/"));
            fs::write(&path, &v).map_err(|source| LabError::Io { path, source })?;
        }
        Ok(())
    })
}

/// Names in `/run/netns`.
pub fn list_netns() -> Vec<String> {
    fs::read_dir(NETNS_DIR)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Deletes named namespaces (their veths go with them); returns those deleted.
pub fn delete_netns(names: &[String]) -> Vec<String> {
    let mut deleted = Vec::new();
    // Pods first: their veths' node ends then disappear before the nodes go.
    let (pods, nodes): (Vec<&String>, Vec<&String>) = names.iter().partition(|n| n.contains("pod-"));
    for chunk in [pods, nodes] {
        let batch = chunk.iter().fold(String::new(), |mut s, n| {
            let _ = writeln!(s, "netns del {n}");
            s
        });
        if batch.is_empty() {
            continue;
        }
        if ip_batch(None, &batch).is_err() {
            // One failed line stops a batch; fall back to one by one.
            for n in &chunk {
                let _ = cmd("ip", &["netns", "del", n], None);
            }
        }
        deleted.extend(chunk.iter().filter(|n| !netns_path(n).exists()).map(|n| (*n).clone()));
    }
    deleted
}

/// Sysctls of every lab namespace, before any link is created: no IPv6 (no ND/MLD/RS packets
/// disturbing exact counts), and new links inherit it from `default`.
pub(super) const QUIET: [(&str, &str); 2] = [
    ("net.ipv6.conf.all.disable_ipv6", "1"),
    ("net.ipv6.conf.default.disable_ipv6", "1"),
];

/// Creates every namespace, link, address, route and rule of the topology.
pub fn build(topo: &Topology, names: &Names) -> Result<(), LabError> {
    let all: Vec<String> = topo
        .nodes
        .iter()
        .map(|n| names.node_ns(&n.name))
        .chain(topo.pods.iter().map(|p| names.pod_ns(p)))
        .chain(std::iter::once(names.router_ns()))
        .collect();
    let add = all.iter().fold(String::new(), |mut s, n| {
        let _ = writeln!(s, "netns add {n}");
        s
    });
    ip_batch(None, &add)?;
    for ns in &all {
        ns_sysctls(ns, &QUIET)?;
    }
    for node in &topo.nodes {
        let ns = names.node_ns(&node.name);
        ns_sysctls(
            &ns,
            &[
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
            ],
        )?;
    }
    ns_sysctls(
        &names.router_ns(),
        &[
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ],
    )?;
    underlay(topo, names)?;
    uplinks(topo, names)?;
    for node in &topo.nodes {
        workloads(topo, names, node)?;
        let ns = names.node_ns(&node.name);
        iptables_restore(&ns, &kube_proxy_rules(topo))?;
        ns_cmd(&ns, "iptables-restore", &["--noflush"], Some(NAT_OUTGOING)).map(drop)?;
    }
    for pod in &topo.pods {
        pod_side(names, pod)?;
    }
    Ok(())
}

/// `eth0` in each node on one veth (two nodes) or a bridge-less chain would be needed for more;
/// the lab has exactly two nodes, joined by one veth, like two machines on one switch port pair.
fn underlay(topo: &Topology, names: &Names) -> Result<(), LabError> {
    let [a, b] = topo.nodes.as_slice() else {
        unreachable!("the lab has two nodes")
    };
    let (na, nb) = (names.node_ns(&a.name), names.node_ns(&b.name));
    ip_batch(
        Some(&na),
        &format!(
            "link add eth0 address 02:42:c0:a8:32:0a type veth peer name eth0 address 02:42:c0:a8:32:0b netns {nb}\n"
        ),
    )?;
    for (me, other) in [(a, b), (b, a)] {
        let ns = names.node_ns(&me.name);
        let mut s = String::new();
        let _ = writeln!(s, "link set lo up");
        let _ = writeln!(s, "addr add {}/{UNDERLAY_PREFIX} dev eth0", me.underlay_ip);
        let _ = writeln!(s, "link set eth0 up");
        let _ = writeln!(
            s,
            "route add {}/{} via {} dev eth0 proto bird",
            other.pod_cidr.0, other.pod_cidr.1, other.underlay_ip
        );
        // Calico blackholes the node's own IPAM block: a pod IP without its /32 route goes nowhere.
        let _ = writeln!(s, "route add blackhole {}/{} proto bird", me.pod_cidr.0, me.pod_cidr.1);
        // Static neighbours: no ARP on the underlay either.
        let other_mac = if std::ptr::eq(other, a) {
            "02:42:c0:a8:32:0a"
        } else {
            "02:42:c0:a8:32:0b"
        };
        let _ = writeln!(
            s,
            "neigh replace {} lladdr {other_mac} dev eth0 nud permanent",
            other.underlay_ip
        );
        ip_batch(Some(&ns), &s)?;
    }
    Ok(())
}

/// Calico's `natOutgoing`: pods' traffic to outside the cluster CIDR leaves with the node's
/// address (Felix's `cali-nat-outgoing` chain, simplified to the CIDR instead of its ipset).
const NAT_OUTGOING: &str = "*nat\n:cali-nat-outgoing - [0:0]\n\
     -A POSTROUTING -m comment --comment \"cali:nat-outgoing\" -j cali-nat-outgoing\n\
     -A cali-nat-outgoing -s 10.244.0.0/16 ! -d 10.244.0.0/16 -m comment --comment \"cali:natOutgoing\" -j MASQUERADE --random-fully\n\
     COMMIT\n";

/// The upstream router: a veth `uplink0` from each node (the node's default route: a real node
/// has one, and packets to a Service without endpoints must be routed to reach FORWARD, where
/// kube-proxy's REJECT answers them), the "external" host's address on its loopback, no route
/// to any pod block (an upstream router does not know them), static neighbours (no ARP).
fn uplinks(topo: &Topology, names: &Names) -> Result<(), LabError> {
    let router = names.router_ns();
    let mut r = format!("link set lo up\naddr add {EXTERNAL_IP}/32 dev lo\n");
    for (i, node) in topo.nodes.iter().enumerate() {
        let (node_mac, router_mac) = (
            format!("02:42:c6:33:64:{:02x}", 4 * i + 2),
            format!("02:42:c6:33:64:{:02x}", 4 * i + 1),
        );
        let _ = writeln!(
            r,
            "link add {name} address {router_mac} type veth peer name uplink0 address {node_mac} netns {ns}",
            name = node.name,
            ns = names.node_ns(&node.name)
        );
        let _ = writeln!(r, "addr add {}/30 dev {}", node.gateway_ip(), node.name);
        let _ = writeln!(r, "link set {} up", node.name);
        let _ = writeln!(
            r,
            "neigh replace {} lladdr {node_mac} dev {} nud permanent",
            node.uplink_ip(),
            node.name
        );
        ip_batch(Some(&router), &r)?;
        r.clear();
        let n = format!(
            "addr add {}/30 dev uplink0\nlink set uplink0 up\nneigh replace {gw} lladdr {router_mac} dev uplink0 nud permanent\nroute add default via {gw} dev uplink0\n",
            node.uplink_ip(),
            gw = node.gateway_ip()
        );
        ip_batch(Some(&names.node_ns(&node.name)), &n)?;
    }
    Ok(())
}

/// The node side of each of its pods: `cali…` veth (peer `eth0` in the pod), the /32 route and a
/// static neighbour entry, proxy-ARP, as Calico's CNI plugin and Felix set them up.
fn workloads(topo: &Topology, names: &Names, node: &NodeSpec) -> Result<(), LabError> {
    let pods: Vec<_> = topo.pods.iter().filter(|p| p.node == node.name).collect();
    node_side(names, &names.node_ns(&node.name), &pods)
}

/// [`workloads`] for these pods of the node whose namespace is `ns` (their namespaces exist).
pub(super) fn node_side(names: &Names, ns: &str, pods: &[&PodSpec]) -> Result<(), LabError> {
    let mut s = String::new();
    for p in pods {
        let cali = p.cali();
        let _ = writeln!(
            s,
            "link add {cali} address {CALI_MAC} type veth peer name eth0 address {} netns {}",
            p.mac(),
            names.pod_ns(p)
        );
        let _ = writeln!(s, "link set {cali} up");
        let _ = writeln!(s, "route add {}/32 dev {cali} scope link", p.ip);
        let _ = writeln!(s, "neigh replace {} lladdr {} dev {cali} nud permanent", p.ip, p.mac());
    }
    ip_batch(Some(ns), &s)?;
    let keys: Vec<(String, &str)> = pods
        .iter()
        .flat_map(|p| {
            let c = p.cali();
            [
                (format!("net.ipv4.conf.{c}.proxy_arp"), "1"),
                (format!("net.ipv4.neigh.{c}.proxy_delay"), "0"),
            ]
        })
        .collect();
    let kv: Vec<(&str, &str)> = keys.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    ns_sysctls(ns, &kv)
}

/// The pod side: the pod IP as /32, a default route via 169.254.1.1 (Calico's), and a static
/// neighbour for the gateway so that no ARP crosses (proxy-ARP on the node would answer too).
pub(super) fn pod_side(names: &Names, pod: &PodSpec) -> Result<(), LabError> {
    let s = format!(
        "link set lo up\naddr add {ip}/32 dev eth0\nlink set eth0 up\nroute add {POD_GATEWAY} dev eth0 scope link\n\
         route add default via {POD_GATEWAY} dev eth0\nneigh replace {POD_GATEWAY} lladdr {CALI_MAC} dev eth0 nud permanent\n",
        ip = pod.ip
    );
    ip_batch(Some(&names.pod_ns(pod)), &s)
}

/// Loads an `iptables-save` style text into a namespace (the machine's iptables: nft backend by
/// default on Debian 12).
pub fn iptables_restore(netns: &str, rules: &str) -> Result<(), LabError> {
    ns_cmd(netns, "iptables-restore", &[], Some(rules)).map(drop)
}

/// kube-proxy's iptables-mode rules for every `ClusterIP` Service of the topology (the same on every
/// node, as kube-proxy writes them): `KUBE-SERVICES` from PREROUTING and OUTPUT, `KUBE-SVC-…` picking
/// an endpoint with `-m statistic --mode random --probability 1/(n-i)`, `KUBE-SEP-…` DNAT,
/// `KUBE-MARK-MASQ`/`KUBE-POSTROUTING` masquerading traffic from outside the cluster CIDR and
/// hairpin traffic, `KUBE-FORWARD` dropping conntrack-INVALID packets, and REJECT for Services
/// without endpoints (filter table, NEW connections). Source: kubernetes/kubernetes
/// `pkg/proxy/iptables/proxier.go` (`syncProxyRules`), read for the rule shapes.
#[expect(clippy::cast_precision_loss, reason = "n ≤ a few hundred backends")]
pub fn kube_proxy_rules(topo: &Topology) -> String {
    let mut nat_chains = vec![
        "KUBE-SERVICES".to_string(),
        "KUBE-POSTROUTING".into(),
        "KUBE-MARK-MASQ".into(),
        "KUBE-NODEPORTS".into(),
    ];
    let mut nat = String::new();
    let mut filter = String::new();
    for svc in &topo.services {
        let backends = topo.backends(svc);
        for port in &svc.ports {
            let sp = format!("{}:{}", svc.key(), port.name);
            let (proto, cip, p) = (port.protocol.lower(), svc.cluster_ip, port.port);
            if backends.is_empty() {
                let _ = writeln!(
                    filter,
                    "-A KUBE-SERVICES -d {cip}/32 -p {proto} -m comment --comment \"{sp} has no endpoints\" -m {proto} --dport {p} -j REJECT --reject-with icmp-port-unreachable"
                );
                continue;
            }
            let svc_chain = svc_chain(svc, port);
            nat_chains.push(svc_chain.clone());
            let _ = writeln!(
                nat,
                "-A KUBE-SERVICES -d {cip}/32 -p {proto} -m comment --comment \"{sp} cluster IP\" -m {proto} --dport {p} -j {svc_chain}"
            );
            let _ = writeln!(
                nat,
                "-A {svc_chain} ! -s {CLUSTER_CIDR} -d {cip}/32 -p {proto} -m comment --comment \"{sp} cluster IP\" -m {proto} --dport {p} -j KUBE-MARK-MASQ"
            );
            let n = backends.len();
            for (i, b) in backends.iter().enumerate() {
                let ep = format!("{}:{}", b.ip, port.target_port);
                let sep = sep_chain(svc, port, &ep);
                nat_chains.push(sep.clone());
                let stat = if i + 1 < n {
                    format!(" -m statistic --mode random --probability {:.10}", 1.0 / (n - i) as f64)
                } else {
                    String::new()
                };
                let _ = writeln!(
                    nat,
                    "-A {svc_chain} -m comment --comment \"{sp} -> {ep}\"{stat} -j {sep}"
                );
                let _ = writeln!(
                    nat,
                    "-A {sep} -s {}/32 -m comment --comment \"{sp}\" -j KUBE-MARK-MASQ",
                    b.ip
                );
                let _ = writeln!(
                    nat,
                    "-A {sep} -p {proto} -m comment --comment \"{sp}\" -m {proto} -j DNAT --to-destination {ep}"
                );
            }
        }
    }
    let mut out = String::from("*nat\n");
    for c in &nat_chains {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    out.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
    );
    out.push_str(&nat);
    out.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\nCOMMIT\n",
    );
    out.push_str(
        "*filter\n:KUBE-SERVICES - [0:0]\n:KUBE-FORWARD - [0:0]\n\
         -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n",
    );
    out.push_str(&filter);
    out.push_str("COMMIT\n");
    out
}

/// Packet count of the rule carrying `comment` in `table`/`chain` of a namespace (summed when
/// several rules carry it), from `iptables -L -v -x`.
pub fn rule_packets(netns: &str, table: &str, chain: &str, comment: &str) -> Result<u64, LabError> {
    let text = ns_cmd(netns, "iptables", &["-t", table, "-L", chain, "-v", "-x", "-n"], None)?;
    let needle = format!("/* {comment} */");
    Ok(text
        .lines()
        .filter(|l| l.contains(&needle))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum())
}
