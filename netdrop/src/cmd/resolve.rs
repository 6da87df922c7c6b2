//! `netdrop resolve`: name addresses and Services the way `netdrop trace` will, from the command line.

use std::{
    io::{BufRead, Write},
    net::{IpAddr, SocketAddr},
    str::FromStr,
    time::Instant,
};

use anyhow::Context as _;
use serde::Serialize;

use crate::{
    cli::{Format, ResolveArgs},
    resolve::{KubeOptions, Peer, Proto, Resolver, ServiceInfo},
};

/// An address or interface to name (`netdrop resolve ARG...`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Query {
    Addr(IpAddr, Option<(u16, Proto)>),
    Interface(String),
}

impl FromStr for Query {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok((ip, port)) = crate::resolve::parse_addr_port_proto(s) {
            return Ok(Self::Addr(ip, port));
        }
        if crate::resolve::calico::parse_ifname(s).is_some() {
            return Ok(Self::Interface(s.to_owned()));
        }
        Err(format!(
            "{s:?} is not an address: use IP, IP:PORT, [IPv6]:PORT, IP:PORT/udp, or a cali… interface name"
        ))
    }
}

#[derive(Serialize)]
struct Line<'a> {
    target: &'a str,
    #[serde(flatten)]
    peer: Peer,
}

fn resolve_query(r: &Resolver, t: &Query) -> Peer {
    match t {
        Query::Addr(ip, port) => r.lookup_endpoint(*ip, *port),
        Query::Interface(name) => r.lookup_ifname(name).unwrap_or_else(|| {
            if r.status().settled() {
                Peer::external()
            } else {
                Peer::unresolved()
            }
        }),
    }
}

fn print_service(out: &mut impl Write, s: &ServiceInfo) -> std::io::Result<()> {
    let ips = s
        .cluster_ips
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    writeln!(
        out,
        "Service {}/{} ({}) {}",
        s.namespace,
        s.name,
        s.type_.as_deref().unwrap_or("ClusterIP"),
        if ips.is_empty() { "headless".to_owned() } else { ips }
    )?;
    if !s.external_ips.is_empty() {
        let e = s
            .external_ips
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        writeln!(out, "  external: {e}")?;
    }
    for p in &s.ports {
        write!(
            out,
            "  port {}{}/{} -> {}",
            p.name.as_ref().map(|n| format!("{n} ")).unwrap_or_default(),
            p.port,
            p.protocol,
            p.target_port
        )?;
        if let Some(np) = p.node_port {
            write!(out, ", nodePort {np}")?;
        }
        writeln!(out)?;
    }
    let ready = s.backends.iter().filter(|b| b.ready).count();
    writeln!(out, "  backends: {} ({ready} ready)", s.backends.len())?;
    for b in &s.backends {
        let pod = match (&b.namespace, &b.pod) {
            (Some(ns), Some(p)) => format!("{ns}/{p}"),
            _ => "-".to_owned(),
        };
        let addr = SocketAddr::new(b.ip, b.port);
        let state = match (b.ready, b.terminating) {
            (true, _) => "ready",
            (false, true) => "terminating",
            (false, false) => "not ready",
        };
        writeln!(
            out,
            "    {pod:<40} {addr:<28} {:<5} {:<20} {state}",
            b.protocol,
            b.node.as_deref().unwrap_or("-")
        )?;
    }
    Ok(())
}

fn proc_status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn rss_kib() -> u64 {
    proc_status_kib("VmRSS:")
}

fn peak_rss_kib() -> u64 {
    proc_status_kib("VmHWM:")
}

#[derive(Serialize)]
struct Latency {
    samples: usize,
    mean_ns: f64,
    p50_ns: u64,
    p99_ns: u64,
    max_ns: u64,
}

#[expect(clippy::cast_precision_loss, reason = "nanosecond statistics, far below 2^52")]
fn measure_lookups(r: &Resolver) -> Latency {
    let sample = r.sample_addresses(20_000);
    if sample.is_empty() {
        return Latency {
            samples: 0,
            mean_ns: 0.0,
            p50_ns: 0,
            p99_ns: 0,
            max_ns: 0,
        };
    }
    // Bulk mean over many lookups (the clock is read once), then individually timed lookups for
    // the distribution (each includes ~20-30 ns of clock reads).
    let rounds = 50;
    let t0 = Instant::now();
    for _ in 0..rounds {
        for (ip, port) in &sample {
            std::hint::black_box(r.lookup_endpoint(*ip, *port));
        }
    }
    let mean_ns = t0.elapsed().as_nanos() as f64 / (rounds * sample.len()) as f64;
    let mut each: Vec<u64> = sample
        .iter()
        .map(|(ip, port)| {
            let t = Instant::now();
            std::hint::black_box(r.lookup_endpoint(*ip, *port));
            t.elapsed().as_nanos() as u64
        })
        .collect();
    each.sort_unstable();
    let pct = |p: f64| each[((each.len() - 1) as f64 * p) as usize];
    Latency {
        samples: each.len(),
        mean_ns,
        p50_ns: pct(0.5),
        p99_ns: pct(0.99),
        max_ns: *each.last().expect("non-empty"),
    }
}

async fn serve_stats(r: Resolver, started: Instant, synced: bool) -> anyhow::Result<()> {
    let sync_ms = started.elapsed().as_millis();
    let latency = measure_lookups(&r);
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(
        &mut out,
        &serde_json::json!({"type":"synced","synced":synced,"sync_ms":sync_ms,"rss_kib":rss_kib(),"peak_rss_kib":peak_rss_kib(),
            "stats":r.stats(),"events":r.events_applied(),"lookup":latency,"status":r.status().to_string()}),
    )?;
    writeln!(out)?;
    out.flush()?;
    drop(out);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(16);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    while let Some(line) = rx.recv().await {
        let line = line.trim();
        let v = if line == "quit" {
            break;
        } else if line == "stats" {
            serde_json::json!({"type":"stats","rss_kib":rss_kib(),"peak_rss_kib":peak_rss_kib(),"stats":r.stats(),"events":r.events_applied(),
                "status":r.status().to_string()})
        } else if let Some(t) = line.strip_prefix("lookup ") {
            match t.trim().parse::<Query>() {
                Ok(target) => serde_json::json!({"type":"lookup","target":t,"peer":resolve_query(&r, &target)}),
                Err(e) => serde_json::json!({"type":"error","error":e}),
            }
        } else if line == "latency" {
            serde_json::json!({"type":"latency","lookup":measure_lookups(&r)})
        } else {
            serde_json::json!({"type":"error","error":format!("unknown command {line:?}")})
        };
        let mut out = std::io::stdout().lock();
        serde_json::to_writer(&mut out, &v)?;
        writeln!(out)?;
        out.flush()?;
    }
    Ok(())
}

fn service_name(args: &ResolveArgs, svc: &str) -> anyhow::Result<(String, String)> {
    crate::resolve::parse_ns_name(svc, args.namespace.as_deref()).map_err(|e| anyhow::anyhow!("--svc {e}"))
}

/// Runs `netdrop resolve`.
pub async fn run(args: ResolveArgs) -> anyhow::Result<()> {
    let targets: Vec<(String, Query)> = args
        .targets
        .iter()
        .map(|t| t.parse::<Query>().map(|p| (t.clone(), p)))
        .collect::<Result<_, _>>()
        .map_err(anyhow::Error::msg)?;
    if targets.is_empty() && args.svc.is_none() && !args.serve_stats {
        anyhow::bail!("nothing to resolve: give addresses (e.g. `netdrop resolve 10.244.1.7:8080`) or --svc NS/NAME");
    }
    let svc = args.svc.as_deref().map(|s| service_name(&args, s)).transpose()?;
    let started = Instant::now();
    let r = Resolver::start(&KubeOptions::from(&args.kube)).await?;
    let synced = r.wait_synced(args.sync_timeout).await;
    if args.serve_stats {
        return serve_stats(r, started, synced).await;
    }
    let status = r.status();
    if !synced || status.health != crate::resolve::Health::Synced {
        eprintln!("{status}");
    }
    let mut out = std::io::stdout().lock();
    for (text, t) in &targets {
        let peer = resolve_query(&r, t);
        match args.output {
            Format::Text => writeln!(out, "{text:<24} {peer}")?,
            Format::Json => {
                serde_json::to_writer(&mut out, &Line { target: text, peer })?;
                writeln!(out)?;
            }
        }
    }
    if let Some((ns, name)) = svc {
        let info = r.service(&ns, &name).with_context(|| {
            if status
                .kinds
                .iter()
                .any(|k| k.kind == crate::resolve::Kind::Services && k.state == "synced")
            {
                format!("Service {ns}/{name} not found (check the namespace: `-n NS` or --svc NS/NAME)")
            } else {
                format!("Service {ns}/{name} unknown: Services are not synced ({status})")
            }
        })?;
        match args.output {
            Format::Text => print_service(&mut out, &info)?,
            Format::Json => {
                serde_json::to_writer(&mut out, &info)?;
                writeln!(out)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(
            "10.0.0.1".parse::<Query>(),
            Ok(Query::Addr("10.0.0.1".parse().expect("ip"), None))
        );
        assert_eq!(
            "10.0.0.1:53/udp".parse::<Query>(),
            Ok(Query::Addr("10.0.0.1".parse().expect("ip"), Some((53, Proto::Udp))))
        );
        assert_eq!(
            "[fd00::7]:8080".parse::<Query>(),
            Ok(Query::Addr("fd00::7".parse().expect("ip"), Some((8080, Proto::Tcp))))
        );
        assert_eq!(
            "fd00::7".parse::<Query>(),
            Ok(Query::Addr("fd00::7".parse().expect("ip"), None))
        );
        assert_eq!(
            "cali0d7763386da".parse::<Query>(),
            Ok(Query::Interface("cali0d7763386da".into()))
        );
        assert!("web".parse::<Query>().is_err());
    }
}
