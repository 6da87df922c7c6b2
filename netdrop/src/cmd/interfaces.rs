//! `netdrop interfaces`: attach to workload interfaces, follow them, and show their counters.

use std::{io, sync::Arc, time::Instant};

use crate::{
    cli::{Format, InterfacesArgs},
    probe::tc::{LoadOptions, TcMode},
    source::interfaces::{Counters, IfacePattern, TcAccounting, TcSnapshot, WatchEvent, WatchOptions, unix_ms},
};

/// `netdrop interfaces`.
pub async fn run(args: InterfacesArgs) -> anyhow::Result<()> {
    use std::io::Write as _;

    use tokio::signal::unix::{SignalKind, signal};

    crate::probe::check_permission()?;
    let nodes = args.tc.node_netns.clone();
    let default_node = crate::resolve::node_name_or_host(args.node_name.as_deref());
    let opts = WatchOptions {
        load: LoadOptions {
            max_interfaces: args.max_interfaces,
            // The `udp_new` column is this command's.
            udp_flows: !args.no_udp_flows,
            ..LoadOptions::default()
        },
        ..args.tc.watch_options()
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let started = Instant::now();
    let acct =
        tokio::task::spawn_blocking(move || TcAccounting::start(&nodes, &default_node, &opts, Some(&tx))).await??;
    acct.set_destinations(&args.dests)?;
    let total: usize = acct.reports().iter().map(|r| r.interfaces).sum();
    let leftovers: usize = acct.reports().iter().map(|r| r.leftovers_removed).sum();
    let per_node: Vec<String> = acct
        .reports()
        .iter()
        .map(|r| format!("{} {} in {:.0} ms", r.node, r.interfaces, r.attach_ms))
        .collect();
    eprintln!("netdrop: tc programs: {}", acct.mode_note());
    eprintln!(
        "netdrop: attached to {total} interfaces matching {} ({}; {:.0} ms since start){}",
        IfacePattern::new(&args.tc.iface_patterns),
        per_node.join(", "),
        started.elapsed().as_secs_f64() * 1e3,
        if leftovers > 0 {
            format!("; removed {leftovers} filters left by killed earlier runs")
        } else {
            String::new()
        }
    );

    let mut out = io::BufWriter::new(io::stdout());
    let deadline = async {
        match args.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(args.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let acct = Arc::new(acct);
    loop {
        tokio::select! {
            Some(ev) = rx.recv() => {
                print_event(&mut out, args.output, &ev)?;
                // Drain what else is waiting before flushing: churn comes in bursts.
                while let Ok(ev) = rx.try_recv() {
                    print_event(&mut out, args.output, &ev)?;
                }
                out.flush()?;
            }
            _ = tick.tick() => {
                let a = acct.clone();
                let snap = tokio::task::spawn_blocking(move || a.snapshot()).await?;
                print_snapshot(&mut out, args.output, &snap, acct.mode(), false)?;
                out.flush()?;
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            () = &mut deadline => break,
        }
    }
    let a = acct.clone();
    let snap = tokio::task::spawn_blocking(move || a.snapshot()).await?;
    print_snapshot(&mut out, args.output, &snap, acct.mode(), true)?;
    out.flush()?;
    let acct = Arc::try_unwrap(acct).map_err(|_| anyhow::anyhow!("accounting still in use"))?;
    let detached = tokio::task::spawn_blocking(move || acct.shutdown()).await?;
    eprintln!("netdrop: detached from {detached} interfaces");
    Ok(())
}

fn print_event(out: &mut impl io::Write, format: Format, ev: &WatchEvent) -> io::Result<()> {
    match format {
        Format::Json => {
            let mut v = serde_json::to_value(ev).map_err(io::Error::other)?;
            v["type"] = "interface".into();
            writeln!(out, "{v}")
        }
        Format::Text => match ev {
            WatchEvent::Attached {
                node, ifindex, name, ..
            } => writeln!(out, "+ {node}/{name} (ifindex {ifindex}) attached"),
            WatchEvent::Forgotten {
                node, ifindex, name, ..
            } => writeln!(out, "- {node}/{name} (ifindex {ifindex}) gone"),
            WatchEvent::Error {
                node, name, message, ..
            } => writeln!(out, "! {node}/{name}: {message}"),
        },
    }
}

fn print_snapshot(
    out: &mut impl io::Write,
    format: Format,
    snap: &TcSnapshot,
    mode: TcMode,
    last: bool,
) -> io::Result<()> {
    if format == Format::Json {
        let v = serde_json::json!({
            "type": if last { "summary" } else { "interfaces" },
            "unix_ms": unix_ms(),
            "mode": mode,
            "interfaces": snap.interfaces,
            "destinations": snap.destinations,
            "stats": snap.stats,
        });
        return writeln!(out, "{v}");
    }
    let mut total_from = Counters::default();
    let mut total_to = Counters::default();
    writeln!(
        out,
        "{:<12} {:<16} {:>7} {:>11}  {:>10} {:>12} {:>7} {:>7}  {:>10} {:>12} {:>7} {:>7}",
        "NODE",
        "INTERFACE",
        "IFINDEX",
        "POD-NETNS",
        "OUT-PKTS",
        "OUT-BYTES",
        "OUT-SYN",
        "OUT-UDP",
        "IN-PKTS",
        "IN-BYTES",
        "IN-SYN",
        "IN-UDP"
    )?;
    for i in &snap.interfaces {
        let peer = i.peer_netns.map_or_else(|| "-".to_string(), |n| n.to_string());
        writeln!(
            out,
            "{:<12} {:<16} {:>7} {:>11}  {:>10} {:>12} {:>7} {:>7}  {:>10} {:>12} {:>7} {:>7}",
            i.node,
            i.name,
            i.ifindex,
            peer,
            i.from_pod.packets,
            i.from_pod.bytes,
            i.from_pod.tcp_syn,
            i.from_pod.udp_new,
            i.to_pod.packets,
            i.to_pod.bytes,
            i.to_pod.tcp_syn,
            i.to_pod.udp_new
        )?;
        total_from.add(&i.from_pod);
        total_to.add(&i.to_pod);
    }
    writeln!(
        out,
        "{:<12} {:<16} {:>7} {:>11}  {:>10} {:>12} {:>7} {:>7}  {:>10} {:>12} {:>7} {:>7}",
        "total",
        format!("{} interfaces", snap.interfaces.len()),
        "",
        "",
        total_from.packets,
        total_from.bytes,
        total_from.tcp_syn,
        total_from.udp_new,
        total_to.packets,
        total_to.bytes,
        total_to.tcp_syn,
        total_to.udp_new
    )?;
    writeln!(
        out,
        "OUT = sent by the pod (tc ingress of the host-side veth), IN = delivered to the pod (tc egress); SYN = TCP SYN without ACK, UDP = new UDP flows"
    )?;
    for d in &snap.destinations {
        let proto = if d.dest.proto == 17 { "udp" } else { "tcp" };
        let addr = std::net::SocketAddr::new(d.dest.ip, d.dest.port);
        writeln!(
            out,
            "attempts (TCP SYNs, UDP datagrams) to {addr}/{proto} on {}: {} sent by pods, {} delivered to pods",
            d.node, d.from_pod, d.to_pod
        )?;
    }
    let s = &snap.stats;
    writeln!(
        out,
        "{} mode; link events {}, attached {}, gone {}, attach errors {}, resyncs {}{}",
        mode.name(),
        s.link_events,
        s.attached,
        s.forgotten,
        s.attach_errors,
        s.resyncs,
        if s.unregistered_packets > 0 {
            format!(", unregistered packets {}", s.unregistered_packets)
        } else {
            String::new()
        }
    )?;
    writeln!(out)
}
