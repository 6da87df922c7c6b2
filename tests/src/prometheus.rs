//! A real Prometheus server (the Debian package) for the tests: scrapes the given targets every
//! second, answers PromQL over its HTTP API. Blocking (plain `std::net`), killed on drop with its
//! data directory removed.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

/// A running `prometheus`.
pub struct Prometheus {
    child: Child,
    pub addr: SocketAddr,
    dir: PathBuf,
}

/// `GET path` on `addr` (HTTP/1.0, the whole answer read): (status, body). `None` when nothing
/// listens.
pub fn http_get(addr: SocketAddr, path: &str, accept: Option<&str>) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let accept = accept.map_or_else(String::new, |a| format!("Accept: {a}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// Percent-encodes a query parameter.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"_-.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` every second (job `netdrop`); waits until it is ready.
    pub fn start(targets: &[SocketAddr]) -> Self {
        let dir = std::env::temp_dir().join(format!("netdrop-prometheus-{}-{}", std::process::id(), targets.len()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("prometheus dir");
        let config = dir.join("prometheus.yml");
        let list = targets.iter().map(|t| format!("'{t}'")).collect::<Vec<_>>().join(", ");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\nscrape_configs:\n  - job_name: netdrop\n    static_configs:\n      - targets: [{list}]\n"
            ),
        )
        .expect("prometheus config");
        // A free port: Prometheus cannot say which port 0 gave it.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
        let child = netdrop_tools::tool("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let p = Self { child, addr, dir };
        let start = Instant::now();
        while http_get(addr, "/-/ready", None).is_none_or(|(s, _)| s != 200) {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "prometheus not ready: {}",
                p.log()
            );
            thread::sleep(Duration::from_millis(200));
        }
        p
    }

    /// Its log (stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// `/api/v1/query`: the result vector.
    pub fn query(&self, promql: &str) -> Vec<Value> {
        let (status, body) = http_get(self.addr, &format!("/api/v1/query?query={}", encode(promql)), None)
            .unwrap_or_else(|| panic!("prometheus gone: {}", self.log()));
        assert_eq!(status, 200, "{promql}: {body}");
        let v: Value = serde_json::from_str(&body).expect("json");
        v["data"]["result"].as_array().expect("result").clone()
    }

    /// The query's samples as (labels, value as Prometheus writes it: `"183"`, `"0.366"`, `"NaN"`).
    pub fn values(&self, promql: &str) -> Vec<(serde_json::Map<String, Value>, String)> {
        self.query(promql)
            .into_iter()
            .map(|s| {
                let labels = s["metric"].as_object().cloned().unwrap_or_default();
                let v = s["value"][1].as_str().unwrap_or_default().to_string();
                (labels, v)
            })
            .collect()
    }

    /// `up` of every target is 1 (each scraped at least once).
    pub fn wait_up(&self, targets: usize) {
        let start = Instant::now();
        loop {
            let up = self.values("up");
            if up.len() == targets && up.iter().all(|(_, v)| v == "1") {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "targets not up: {up:?}\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(300));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
