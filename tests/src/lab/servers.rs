//! The backends: a TCP and a UDP echo server on the target port inside each backend pod's
//! namespace, served by the lab's tokio runtime. The reply names the pod and node that answered,
//! so the traffic generator can count successes per backend.
//!
//! Protocol: the client sends one line (at most 512 bytes); the server answers
//! `<namespace>/<pod> <node> <line>` (followed, over TCP, by N filler bytes when the line holds
//! `pad=N`; to [`HOLD`], nothing) and, for TCP, closes first, so `TIME_WAIT` stays on the
//! backend's side and a long traffic run does not exhaust the client's ephemeral ports.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, UdpSocket},
    runtime::Handle,
    task::AbortHandle,
};

use super::{LabError, net::in_netns};

/// A request line asking the server to keep the connection open, without a reply, until the
/// client closes it.
pub const HOLD: &[u8] = b"ndlab-hold\n";

/// The most filler a TCP request may ask for with `pad=N`.
pub const MAX_PAD: usize = 64 * 1024;

/// `pad=N` in a request line (TCP only), capped at [`MAX_PAD`].
fn padding(line: &str) -> Option<usize> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("pad=")?.parse::<usize>().ok())
        .map(|n| n.min(MAX_PAD))
}

/// How long a server waits for a client's request line.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// One pod's running servers; dropping it stops them (the sockets close).
pub struct EchoServer {
    tasks: Vec<AbortHandle>,
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts TCP and UDP echo on `port` inside the namespace at `netns_path`.
pub fn start(rt: &Handle, netns_path: &std::path::Path, port: u16, who: String) -> Result<EchoServer, LabError> {
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let (tcp, udp) = in_netns(netns_path, move || {
        let io = |source| LabError::Bind { addr, source };
        let tcp = std::net::TcpListener::bind(addr).map_err(io)?;
        tcp.set_nonblocking(true).map_err(io)?;
        let udp = std::net::UdpSocket::bind(addr).map_err(io)?;
        udp.set_nonblocking(true).map_err(io)?;
        Ok((tcp, udp))
    })?;
    let _guard = rt.enter();
    let tcp = TcpListener::from_std(tcp).map_err(|source| LabError::Bind { addr, source })?;
    let udp = UdpSocket::from_std(udp).map_err(|source| LabError::Bind { addr, source })?;
    let who_tcp = who.clone();
    let t = rt.spawn(async move {
        loop {
            let Ok((mut sock, _)) = tcp.accept().await else {
                continue;
            };
            let who = who_tcp.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 512];
                let mut n = 0;
                let read = tokio::time::timeout(READ_TIMEOUT, async {
                    while n < buf.len() {
                        match sock.read(&mut buf[n..]).await {
                            Ok(0) | Err(_) => break,
                            Ok(k) => {
                                n += k;
                                if buf[..n].contains(&b'\n') {
                                    break;
                                }
                            }
                        }
                    }
                })
                .await;
                if read.is_ok() && buf[..n].starts_with(HOLD) {
                    // A connection held open on purpose (the conntrack-insert fault): wait for
                    // the client to close it.
                    while matches!(sock.read(&mut buf).await, Ok(k) if k > 0) {}
                } else if read.is_ok() && n > 0 {
                    let line = String::from_utf8_lossy(&buf[..n]);
                    let mut reply = format!("{who} {}\n", line.trim_end());
                    // `pad=N`: a large response (the path-MTU fault), N filler bytes after the
                    // reply line.
                    if let Some(pad) = padding(&line) {
                        reply.push_str(&".".repeat(pad));
                    }
                    let _ = sock.write_all(reply.as_bytes()).await;
                }
                let _ = sock.shutdown().await;
            });
        }
    });
    let u = rt.spawn(async move {
        let mut buf = [0u8; 512];
        loop {
            let Ok((n, from)) = udp.recv_from(&mut buf).await else {
                continue;
            };
            let line = String::from_utf8_lossy(&buf[..n]);
            let reply = format!("{who} {}\n", line.trim_end());
            let _ = udp.send_to(reply.as_bytes(), from).await;
        }
    });
    Ok(EchoServer {
        tasks: vec![t.abort_handle(), u.abort_handle()],
    })
}
