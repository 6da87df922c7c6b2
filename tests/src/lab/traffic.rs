//! The traffic generator: from inside the client pod, `rate` new requests per second to a
//! Service's ClusterIP:port for `duration`, each a new flow (TCP: connect, one request line, one
//! reply, server closes; UDP: a new socket, one datagram, one reply) with a short timeout. Its
//! counts are the ground truth the end-to-end tests compare netdrop with.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpSocket, UdpSocket},
};

use super::{LabError, net::in_netns, topology::Proto};

/// Below TCP's 1 s initial SYN retransmission timeout (RFC 6298 §2.1): a connection whose SYN is
/// dropped fails after exactly one SYN, so failures and a DROP rule's packet counter agree.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(800);

/// What to send.
#[derive(Clone, Debug)]
pub struct TrafficOptions {
    /// Requests per second (new flows).
    pub rate: u32,
    pub duration: Duration,
    pub proto: Proto,
    /// Per request (connect + request + reply).
    pub timeout: Duration,
    /// UDP: datagrams per query, all from one socket, each after `timeout / udp_tries` without
    /// a reply (a resolver's retries). 1 (the default): no retry.
    pub udp_tries: u32,
    /// UDP: bind the queries' sockets to the ports of this range in turn (inclusive), so that
    /// ports repeat within seconds at a high query rate, as a busy resolver's do; `None`: the
    /// kernel picks (rarely repeats).
    pub udp_ports: Option<(u16, u16)>,
}

impl Default for TrafficOptions {
    fn default() -> Self {
        Self {
            rate: 200,
            duration: Duration::from_secs(10),
            proto: Proto::Tcp,
            timeout: DEFAULT_TIMEOUT,
            udp_tries: 1,
            udp_ports: None,
        }
    }
}

impl TrafficOptions {
    /// 100 TCP requests a second for `duration`, each timing out below the first SYN
    /// retransmission (1 s): one dropped SYN per failed request, so drops equal failures.
    pub fn one_syn_per_request(duration: Duration) -> Self {
        Self {
            rate: 100,
            duration,
            proto: Proto::Tcp,
            timeout: Duration::from_millis(700),
            ..Self::default()
        }
    }
}

/// What each request looks like beyond [`TrafficOptions`] (kept apart so that callers building
/// `TrafficOptions` literally stay as they are).
#[derive(Clone, Copy, Debug, Default)]
pub struct TrafficShape {
    /// TCP: ask each backend for this many filler bytes after the reply line (a response larger
    /// than one segment; the path-MTU fault). 0: the one-line reply. A request that times out
    /// then is reset (zero linger), so that the server stops retransmitting what the path drops.
    pub reply_bytes: usize,
    /// UDP: each attempt is a pair of datagrams sent at the same instant from one socket by two
    /// threads on different CPUs, as a resolver sends its A and AAAA queries in parallel; it
    /// succeeds when both are answered.
    pub pairs: bool,
}

/// Why a request failed, as the client saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// No answer to the connect (TCP SYN) or the datagram within the timeout.
    Timeout,
    /// Connected, but no reply within the timeout.
    ReplyTimeout,
    /// RST to the SYN, or ICMP port unreachable (REJECT, nobody listening).
    Refused,
    /// ICMP host/network unreachable.
    Unreachable,
    /// Reset after connecting.
    Reset,
    /// Anything else (reply garbled, local errors such as no free port).
    Other,
}

/// What the generator measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TrafficReport {
    #[serde(rename = "type")]
    pub kind: String,
    pub service: String,
    pub target: String,
    pub proto: String,
    pub rate: u32,
    pub duration_s: f64,
    pub attempts: u64,
    pub successes: u64,
    pub failures: u64,
    pub failure_ratio: f64,
    pub failures_by_kind: BTreeMap<FailureKind, u64>,
    /// Successful requests per answering backend (`namespace/pod`), from the replies.
    pub successes_by_backend: BTreeMap<String, u64>,
    /// Backend → node, from the replies.
    pub backend_nodes: BTreeMap<String, String>,
    /// Attempts actually started per second (lower than `rate` when the machine cannot keep up).
    pub achieved_rate: f64,
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
    /// TCP connections whose local port an earlier connection of this run had used, failed
    /// ones included: through a ClusterIP the same client-side 4-tuple then names two backend
    /// connections in turn, and a late segment of the first can reach the second (the client
    /// discards it: PAWS, out of window); or, when the first never got an answer, the new SYN
    /// joins its conntrack entry and goes to the same backend without a new DNAT.
    #[serde(default)]
    pub reused_ports: u64,
    /// New flows kube-proxy's rules on the client's node sent to each backend (`namespace/pod`):
    /// the per-endpoint rule's packet counter, the kernel's own record of where each flow went.
    /// For TCP within one run (no reused port) that is one per connection attempt.
    #[serde(default)]
    pub flows_by_backend: BTreeMap<String, u64>,
    /// UDP datagrams sent to the Service (retries included); 0 for TCP.
    #[serde(default)]
    pub datagrams: u64,
    /// UDP datagrams of the queries each backend answered (`namespace/pod`), retries included:
    /// all of a query's datagrams leave one socket, so one conntrack entry sends them to the
    /// same backend. The rest (`datagrams` minus these) belong to unanswered queries.
    #[serde(default)]
    pub datagrams_by_backend: BTreeMap<String, u64>,
}

#[derive(Default)]
struct Tally {
    successes: u64,
    failures: BTreeMap<FailureKind, u64>,
    by_backend: BTreeMap<String, u64>,
    nodes: BTreeMap<String, String>,
    latencies_us: Vec<u64>,
    /// Local ports of the TCP connections made so far, and how many were reused.
    ports: std::collections::HashSet<u16>,
    reused_ports: u64,
    datagrams: u64,
    datagrams_by_backend: BTreeMap<String, u64>,
    /// The next port of `udp_ports` to try.
    next_port: u32,
}

fn kind_of(e: &std::io::Error) -> FailureKind {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused => FailureKind::Refused,
        K::HostUnreachable | K::NetworkUnreachable => FailureKind::Unreachable,
        K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof => FailureKind::Reset,
        K::TimedOut => FailureKind::Timeout,
        _ => FailureKind::Other,
    }
}

async fn tcp_once(
    target: SocketAddr,
    seq: u64,
    timeout: Duration,
    reply_bytes: usize,
    tally: &Mutex<Tally>,
) -> Result<String, FailureKind> {
    let deadline = tokio::time::Instant::now() + timeout;
    // Bound before connecting, so that the port of a connection that fails is known too: a
    // failed flow's conntrack entry outlives the run, and a later SYN from its port joins it.
    let socket = match target {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| kind_of(&e))?;
    let any = match target {
        SocketAddr::V4(_) => SocketAddr::from(([0u8; 4], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    };
    socket.bind(any).map_err(|e| kind_of(&e))?;
    if let Ok(local) = socket.local_addr() {
        let mut t = tally.lock().expect("tally");
        if !t.ports.insert(local.port()) {
            t.reused_ports += 1;
        }
    }
    let mut sock = tokio::time::timeout_at(deadline, socket.connect(target))
        .await
        .map_err(|_| FailureKind::Timeout)?
        .map_err(|e| kind_of(&e))?;
    let request = if reply_bytes > 0 {
        format!("ndlab {seq} pad={reply_bytes}\n")
    } else {
        format!("ndlab {seq}\n")
    };
    let result = {
        let exchange = async {
            sock.write_all(request.as_bytes()).await?;
            let mut reply = Vec::with_capacity(128 + reply_bytes);
            sock.read_to_end(&mut reply).await?;
            Ok::<_, std::io::Error>(reply)
        };
        tokio::time::timeout_at(deadline, exchange).await
    };
    let Ok(reply) = result else {
        if reply_bytes > 0 {
            // An RST instead of a FIN: the server's socket goes at once, so its retransmissions
            // of what the path drops stop with the request.
            let _ = sock.set_zero_linger();
        }
        return Err(FailureKind::ReplyTimeout);
    };
    let reply = reply.map_err(|e| kind_of(&e))?;
    if reply.len() < reply_bytes {
        return Err(FailureKind::Other);
    }
    String::from_utf8(reply).map_err(|_| FailureKind::Other)
}

/// A UDP socket on the next free port of `range` (the ports of queries still waiting are
/// skipped), or on a port the kernel picks.
async fn udp_socket(range: Option<(u16, u16)>, tally: &Mutex<Tally>) -> Result<UdpSocket, FailureKind> {
    let Some((lo, hi)) = range else {
        return UdpSocket::bind(("0.0.0.0", 0)).await.map_err(|e| kind_of(&e));
    };
    let n = u32::from(hi - lo) + 1;
    for _ in 0..n {
        let port = {
            let mut t = tally.lock().expect("tally");
            t.next_port = (t.next_port + 1) % n;
            lo + t.next_port as u16
        };
        if let Ok(s) = UdpSocket::bind(("0.0.0.0", port)).await {
            return Ok(s);
        }
    }
    Err(FailureKind::Other)
}

/// One query: up to `tries` datagrams from one socket, each waiting `timeout / tries` for the
/// reply. Returns the reply and the datagrams sent.
async fn udp_once(
    target: SocketAddr,
    seq: u64,
    timeout: Duration,
    tries: u32,
    ports: Option<(u16, u16)>,
    tally: &Mutex<Tally>,
) -> (Result<String, FailureKind>, u64) {
    let sock = match udp_socket(ports, tally).await {
        Ok(s) => s,
        Err(k) => return (Err(k), 0),
    };
    // Connected: an ICMP error for this flow comes back as an error on recv.
    if let Err(e) = sock.connect(target).await {
        return (Err(kind_of(&e)), 0);
    }
    let tries = tries.max(1);
    let wait = timeout / tries;
    let mut sent = 0;
    let mut last = FailureKind::Timeout;
    for _ in 0..tries {
        if let Err(e) = sock.send(format!("ndlab {seq}\n").as_bytes()).await {
            return (Err(kind_of(&e)), sent);
        }
        sent += 1;
        tally.lock().expect("tally").datagrams += 1;
        let mut buf = [0u8; 600];
        match tokio::time::timeout(wait, sock.recv(&mut buf)).await {
            Ok(Ok(n)) => {
                return (
                    String::from_utf8(buf[..n].to_vec()).map_err(|_| FailureKind::Other),
                    sent,
                );
            }
            Ok(Err(e)) => return (Err(kind_of(&e)), sent),
            Err(_) => last = FailureKind::Timeout,
        }
    }
    (Err(last), sent)
}

/// Parses `<ns>/<pod> <node> ndlab <seq>`; checks the sequence number came back.
fn parse_reply(reply: &str, seq: u64) -> Option<(String, String)> {
    let mut w = reply.split_whitespace();
    let (pod, node, tag, s) = (w.next()?, w.next()?, w.next()?, w.next()?);
    (tag == "ndlab" && s.parse::<u64>().ok()? == seq).then(|| (pod.to_string(), node.to_string()))
}

/// Runs the generator from inside the namespace at `client_netns` (the client pod's).
pub fn run(
    client_netns: &Path,
    service: &str,
    target: SocketAddr,
    opts: &TrafficOptions,
) -> Result<TrafficReport, LabError> {
    run_shaped(client_netns, service, target, opts, TrafficShape::default())
}

/// [`run`] with requests shaped by `shape`.
#[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
pub fn run_shaped(
    client_netns: &Path,
    service: &str,
    target: SocketAddr,
    opts: &TrafficOptions,
    shape: TrafficShape,
) -> Result<TrafficReport, LabError> {
    let o = opts.clone();
    let tally = Arc::new(Mutex::new(Tally::default()));
    let t = tally.clone();
    let (attempts, elapsed) = in_netns(client_netns, move || {
        if shape.pairs && o.proto == Proto::Udp {
            // Threads started here inherit the client's namespace.
            return Ok(pairs::generate(target, &o, &t));
        }
        // A runtime on this thread only: every socket it opens is in the client's namespace.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| LabError::Io {
                path: "tokio runtime".into(),
                source,
            })?;
        Ok(rt.block_on(generate(target, &o, shape, t)))
    })?;
    let t = tally.lock().expect("tally");
    let failures: u64 = t.failures.values().sum();
    let mut lat = t.latencies_us.clone();
    lat.sort_unstable();
    let pct = |q: f64| {
        if lat.is_empty() {
            0.0
        } else {
            lat[((lat.len() - 1) as f64 * q) as usize] as f64 / 1000.0
        }
    };
    Ok(TrafficReport {
        kind: "traffic".into(),
        service: service.into(),
        target: target.to_string(),
        proto: opts.proto.lower().into(),
        rate: opts.rate,
        duration_s: opts.duration.as_secs_f64(),
        attempts,
        successes: t.successes,
        failures,
        failure_ratio: if attempts == 0 {
            0.0
        } else {
            failures as f64 / attempts as f64
        },
        failures_by_kind: t.failures.clone(),
        successes_by_backend: t.by_backend.clone(),
        backend_nodes: t.nodes.clone(),
        flows_by_backend: BTreeMap::new(),
        datagrams: t.datagrams,
        datagrams_by_backend: t.datagrams_by_backend.clone(),
        achieved_rate: attempts as f64 / elapsed.as_secs_f64().max(1e-9),
        latency_ms_p50: pct(0.5),
        latency_ms_p99: pct(0.99),
        reused_ports: t.reused_ports,
    })
}

async fn generate(
    target: SocketAddr,
    o: &TrafficOptions,
    shape: TrafficShape,
    tally: Arc<Mutex<Tally>>,
) -> (u64, Duration) {
    let total = (f64::from(o.rate) * o.duration.as_secs_f64()).round() as u64;
    let period = Duration::from_secs_f64(1.0 / f64::from(o.rate.max(1)));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    let start = Instant::now();
    for seq in 0..total {
        tick.tick().await;
        let (proto, timeout, tally) = (o.proto, o.timeout, tally.clone());
        let (tries, ports) = (o.udp_tries, o.udp_ports);
        tasks.spawn(async move {
            let t0 = Instant::now();
            let (r, datagrams) = match proto {
                Proto::Tcp => (tcp_once(target, seq, timeout, shape.reply_bytes, &tally).await, 0),
                Proto::Udp => udp_once(target, seq, timeout, tries, ports, &tally).await,
            };
            let mut t = tally.lock().expect("tally");
            match r.and_then(|reply| parse_reply(&reply, seq).ok_or(FailureKind::Other)) {
                Ok((pod, node)) => {
                    t.successes += 1;
                    t.latencies_us.push(t0.elapsed().as_micros() as u64);
                    *t.by_backend.entry(pod.clone()).or_default() += 1;
                    if datagrams > 0 {
                        *t.datagrams_by_backend.entry(pod.clone()).or_default() += datagrams;
                    }
                    t.nodes.insert(pod, node);
                }
                Err(k) => *t.failures.entry(k).or_default() += 1,
            }
        });
        // Reap finished requests as we go: the set stays as small as the requests in flight.
        while tasks.try_join_next().is_some() {}
    }
    let sent = start.elapsed();
    while tasks.join_next().await.is_some() {}
    (total, sent)
}

impl Tally {
    fn record(&mut self, r: Result<(String, String), FailureKind>, t0: Instant) {
        match r {
            Ok((pod, node)) => {
                self.successes += 1;
                self.latencies_us.push(t0.elapsed().as_micros() as u64);
                *self.by_backend.entry(pod.clone()).or_default() += 1;
                self.nodes.insert(pod, node);
            }
            Err(k) => *self.failures.entry(k).or_default() += 1,
        }
    }
}

/// Parallel A/AAAA-style pairs (see [`TrafficShape::pairs`]).
mod pairs {
    use std::{
        net::{SocketAddr, UdpSocket},
        sync::{
            Arc, Mutex,
            atomic::{AtomicU32, Ordering},
            mpsc,
        },
        thread,
        time::{Duration, Instant},
    };

    use super::{FailureKind, Tally, TrafficOptions, kind_of, parse_reply};

    /// One pair's socket, handed to both senders, and the line each sends.
    struct Job {
        sock: Arc<UdpSocket>,
        seq: u64,
        /// Both senders count in here and spin until both arrived, then send at once.
        gate: Arc<AtomicU32>,
        done: mpsc::Sender<()>,
    }

    /// A sender pinned to one CPU: sends its half of each pair when its partner is ready too.
    fn sender(cpu: usize, qtype: &'static str, jobs: mpsc::Receiver<Job>) {
        let mut set = nix::sched::CpuSet::new();
        if set.set(cpu).is_ok() {
            // Best effort: on one CPU the pair is still sent, just not in parallel.
            let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
        }
        for job in jobs {
            job.gate.fetch_add(1, Ordering::AcqRel);
            let spin = Instant::now();
            while job.gate.load(Ordering::Acquire) < 2 && spin.elapsed() < Duration::from_millis(50) {
                std::hint::spin_loop();
            }
            let _ = job.sock.send(format!("ndlab {} {qtype}\n", job.seq).as_bytes());
            let _ = job.done.send(());
        }
    }

    /// Waits for both answers of one pair.
    fn answers(sock: &UdpSocket, seq: u64, timeout: Duration) -> Result<(String, String), FailureKind> {
        let deadline = Instant::now() + timeout;
        let mut first = None;
        let mut buf = [0u8; 600];
        for _ in 0..2 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(FailureKind::Timeout);
            }
            sock.set_read_timeout(Some(left)).map_err(|e| kind_of(&e))?;
            let n = sock.recv(&mut buf).map_err(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => FailureKind::Timeout,
                _ => kind_of(&e),
            })?;
            let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
            let who = parse_reply(&reply, seq).ok_or(FailureKind::Other)?;
            first.get_or_insert(who);
        }
        first.ok_or(FailureKind::Other)
    }

    #[expect(clippy::cast_precision_loss, reason = "sequence numbers far below 2^52")]
    pub(super) fn generate(target: SocketAddr, o: &TrafficOptions, tally: &Arc<Mutex<Tally>>) -> (u64, Duration) {
        let total = (f64::from(o.rate) * o.duration.as_secs_f64()).round() as u64;
        let period = Duration::from_secs_f64(1.0 / f64::from(o.rate.max(1)));
        let cpus = thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let (a_tx, a_rx) = mpsc::channel::<Job>();
        let (b_tx, b_rx) = mpsc::channel::<Job>();
        let senders = [
            thread::spawn(move || sender(0, "A", a_rx)),
            thread::spawn(move || sender(1 % cpus, "AAAA", b_rx)),
        ];
        let mut waiters = Vec::new();
        let start = Instant::now();
        for seq in 0..total {
            let due = start + period.mul_f64(seq as f64);
            if let Some(d) = due.checked_duration_since(Instant::now()) {
                thread::sleep(d);
            }
            let t0 = Instant::now();
            let sock = match UdpSocket::bind(("0.0.0.0", 0)).and_then(|s| s.connect(target).map(|()| s)) {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    tally.lock().expect("tally").record(Err(kind_of(&e)), t0);
                    continue;
                }
            };
            let gate = Arc::new(AtomicU32::new(0));
            let (done, sent) = mpsc::channel();
            for tx in [&a_tx, &b_tx] {
                let _ = tx.send(Job {
                    sock: sock.clone(),
                    seq,
                    gate: gate.clone(),
                    done: done.clone(),
                });
            }
            drop(done);
            while sent.recv().is_ok() {}
            let (timeout, tally) = (o.timeout, tally.clone());
            waiters.push(thread::spawn(move || {
                let r = answers(&sock, seq, timeout);
                tally.lock().expect("tally").record(r, t0);
            }));
            waiters.retain(|w| !w.is_finished());
        }
        let sent = start.elapsed();
        drop((a_tx, b_tx));
        for w in waiters.into_iter().chain(senders) {
            let _ = w.join();
        }
        (total, sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies() {
        assert_eq!(
            parse_reply("default/web-0 node-a ndlab 7\n", 7),
            Some(("default/web-0".into(), "node-a".into()))
        );
        assert_eq!(parse_reply("default/web-0 node-a ndlab 8\n", 7), None);
        assert_eq!(parse_reply("garbage", 7), None);
    }
}
