//! `kube-standin`: the Kubernetes API stand-in as a process, for the lab and benchmarks.
//!
//! Prints one JSON line `{"type":"ready","url":...}` when serving, then takes commands on stdin,
//! one per line, answering each with a JSON line:
//! `churn RATE SECONDS` (pod IP updates at RATE/s), `apply JSON`, `delete KIND NS NAME`, `compact`,
//! `fault none|500|hang|forbidden KIND`, `stop`, `start`, `rv`, `quit`.

use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Parser;
use netdrop_tests::apiserver::{
    Cluster, Faults, ResKind, ServeOptions, StandIn, TlsMaterial,
    synth::{self, SynthSpec},
};
use tokio::io::{AsyncBufReadExt, BufReader};

#[derive(Parser)]
#[command(about = "Kubernetes API stand-in (list/watch of pods, services, endpointslices, nodes)")]
struct Args {
    /// Listen address (loopback only), e.g. `--listen 127.0.0.1:6443`
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Fixture files or directories (kubectl `-o json` output), e.g. `--fixtures tests/fixtures/kube`
    #[arg(long)]
    fixtures: Vec<PathBuf>,
    /// Synthetic cluster sizes PODS,SERVICES,SLICES,NODES, e.g. `--synthetic 100000,10000,10000,1000`
    #[arg(long)]
    synthetic: Option<String>,
    /// Serve HTTPS with a generated CA
    #[arg(long)]
    tls: bool,
    /// Require this bearer token
    #[arg(long)]
    token: Option<String>,
    /// Write a kubeconfig for this server here
    #[arg(long)]
    kubeconfig_out: Option<PathBuf>,
    /// Write a service-account directory (token, ca.crt) here
    #[arg(long)]
    serviceaccount_out: Option<PathBuf>,
    /// Bookmark interval, e.g. `--bookmark-interval 5s`
    #[arg(long, default_value = "5s", value_parser = humantime_secs)]
    bookmark_interval: Duration,
}

fn humantime_secs(s: &str) -> Result<Duration, String> {
    let n = s.trim_end_matches('s').parse::<u64>().map_err(|e| e.to_string())?;
    Ok(Duration::from_secs(n))
}

fn say(v: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn parse_kind(s: &str) -> anyhow::Result<ResKind> {
    ResKind::ALL
        .into_iter()
        .find(|k| k.plural() == s || k.kind().eq_ignore_ascii_case(s))
        .with_context(|| format!("unknown kind {s:?}"))
}

async fn churn(cluster: &Cluster, spec: &SynthSpec, rate: u64, secs: u64, generation: &mut usize) -> serde_json::Value {
    let total = (rate * secs) as usize;
    let start = Instant::now();
    let mut last = None;
    let per_tick = (rate / 100).max(1) as usize;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut sent = 0;
    while sent < total {
        tick.tick().await;
        for _ in 0..per_tick.min(total - sent) {
            let i = *generation % spec.pods.max(1);
            let ip = synth::churn_ip(*generation);
            *generation += 1;
            if cluster.apply(synth::pod(i, spec, IpAddr::V4(ip))).is_ok() {
                last = Some((synth::pod_name(i), ip));
            }
            sent += 1;
        }
    }
    let (pod, ip) = last.map_or((String::new(), String::new()), |((ns, n), ip)| {
        (format!("{ns}/{n}"), ip.to_string())
    });
    serde_json::json!({"type":"churned","updates":sent,"elapsed_ms":start.elapsed().as_millis(),"last_pod":pod,"last_ip":ip})
}

#[expect(clippy::too_many_lines, reason = "argument handling and the command loop")]
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cluster = Arc::new(Cluster::new());
    let mut spec = SynthSpec::default();
    if let Some(s) = &args.synthetic {
        let n: Vec<usize> = s
            .split(',')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .context("--synthetic PODS,SERVICES,SLICES,NODES")?;
        anyhow::ensure!(n.len() == 4, "--synthetic takes 4 numbers: PODS,SERVICES,SLICES,NODES");
        spec = SynthSpec {
            pods: n[0],
            services: n[1],
            endpointslices: n[2],
            nodes: n[3],
        };
        synth::populate(&cluster, &spec)?;
    }
    for f in &args.fixtures {
        cluster.load_fixture(f)?;
    }
    let tls = if args.tls { Some(TlsMaterial::generate()?) } else { None };
    let mut options = ServeOptions {
        addr: args.listen,
        tls,
        token: args.token.clone(),
        bookmark_interval: args.bookmark_interval,
        rbac: None,
    };
    let mut server = Some(StandIn::start(cluster.clone(), options.clone()).await?);
    let s = server.as_ref().expect("started");
    options.addr = s.addr();
    if let Some(p) = &args.kubeconfig_out {
        s.write_kubeconfig(p)?;
    }
    if let Some(d) = &args.serviceaccount_out {
        s.write_serviceaccount(d)?;
    }
    say(
        &serde_json::json!({"type":"ready","url":s.url(),"addr":s.addr().to_string(),
        "objects":{"pods":cluster.count(ResKind::Pods),"services":cluster.count(ResKind::Services),
        "endpointslices":cluster.count(ResKind::EndpointSlices),"nodes":cluster.count(ResKind::Nodes)}}),
    );

    let mut generation = 0usize;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let words: Vec<&str> = line.split_whitespace().collect();
        let reply = match words.as_slice() {
            [] => continue,
            ["quit"] => break,
            ["rv"] => Ok(serde_json::json!({"type":"rv","rv":cluster.resource_version()})),
            ["churn", rate, secs] => match (rate.parse(), secs.parse()) {
                (Ok(r), Ok(s)) => Ok(churn(&cluster, &spec, r, s, &mut generation).await),
                _ => Err(anyhow::anyhow!("churn RATE SECONDS")),
            },
            ["compact"] => {
                cluster.compact();
                Ok(serde_json::json!({"type":"ok"}))
            }
            ["fault", "none"] => {
                cluster.set_faults(Faults::default());
                Ok(serde_json::json!({"type":"ok"}))
            }
            ["fault", "500"] => {
                cluster.set_faults(Faults {
                    error_500: true,
                    ..Faults::default()
                });
                Ok(serde_json::json!({"type":"ok"}))
            }
            ["fault", "hang"] => {
                cluster.set_faults(Faults {
                    hang: true,
                    ..Faults::default()
                });
                Ok(serde_json::json!({"type":"ok"}))
            }
            ["fault", "forbidden", kind] => parse_kind(kind).map(|k| {
                let mut f = cluster.faults();
                f.forbidden.push(k);
                cluster.set_faults(f);
                serde_json::json!({"type":"ok"})
            }),
            ["delete", kind, ns, name] => parse_kind(kind)
                .and_then(|k| Ok(cluster.delete(k, ns, name)?))
                .map(|rv| serde_json::json!({"type":"ok","rv":rv})),
            ["apply", ..] => serde_json::from_str(line.trim_start().trim_start_matches("apply"))
                .map_err(anyhow::Error::from)
                .and_then(|v| Ok(cluster.apply(v)?))
                .map(|rv| serde_json::json!({"type":"ok","rv":rv})),
            ["stop"] => {
                if let Some(s) = server.take() {
                    options = s.stop().await;
                }
                Ok(serde_json::json!({"type":"ok"}))
            }
            ["start"] => {
                if server.is_none() {
                    server = Some(StandIn::start(cluster.clone(), options.clone()).await?);
                }
                Ok(serde_json::json!({"type":"ok"}))
            }
            _ => Err(anyhow::anyhow!("unknown command {line:?}")),
        };
        match reply {
            Ok(v) => say(&v),
            Err(e) => say(&serde_json::json!({"type":"error","error":e.to_string()})),
        }
    }
    Ok(())
}
