//! The lab daemon's control socket (`<state dir>/control.sock`): one JSON request line per
//! connection, one JSON reply line. `lab fault` goes through it because only the daemon holds
//! the servers (`not-listening`) and the fault bookkeeping.
//!
//! Requests: `{"op":"fault","kind":"policy-drop","pod":null,"max":null}`, `{"op":"clear","kind":null}`,
//! `{"op":"status"}`, `{"op":"down"}`. Replies: the result, or `{"type":"error","error":"..."}`.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    sync::Arc,
    thread,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{
    Lab, LabError,
    faults::{FaultKind, FaultRequest},
};

pub const SOCKET_FILE: &str = "control.sock";

/// A request to the daemon.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    Fault(FaultRequest),
    Clear { kind: Option<FaultKind> },
    Status,
    Down,
}

/// Serves the control socket on a thread. `on_down` is called after answering a `down` request.
pub fn serve(lab: Arc<Lab>, on_down: impl Fn() + Send + 'static) -> Result<PathBuf, LabError> {
    let path = lab.state_dir().join(SOCKET_FILE);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|source| LabError::Io {
        path: path.clone(),
        source,
    })?;
    thread::Builder::new()
        .name("netdrop-lab-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut line = String::new();
                if BufReader::new(&conn).read_line(&mut line).is_err() {
                    continue;
                }
                let (reply, down) = match serde_json::from_str::<Request>(&line) {
                    Err(e) => (error(&format!("bad request: {e}")), false),
                    Ok(Request::Fault(req)) => (result(lab.fault(&req).map(|r| json!(r))), false),
                    Ok(Request::Clear { kind }) => (
                        result(lab.clear(kind).map(|r| json!({"type":"cleared","faults":r}))),
                        false,
                    ),
                    Ok(Request::Status) => (json!(lab.status()), false),
                    Ok(Request::Down) => (json!({"type":"ok"}), true),
                };
                let _ = writeln!(conn, "{reply}");
                drop(conn);
                if down {
                    on_down();
                    return;
                }
            }
        })
        .map_err(|source| LabError::Io {
            path: path.clone(),
            source,
        })?;
    Ok(path)
}

fn error(msg: &str) -> Value {
    json!({"type":"error","error":msg})
}

fn result(r: Result<Value, LabError>) -> Value {
    r.unwrap_or_else(|e| error(&e.to_string()))
}

/// Sends one request to the daemon of the instance whose state directory is `dir`.
pub fn request(dir: &Path, req: &Request, timeout: Duration) -> Result<Value, LabError> {
    let path = dir.join(SOCKET_FILE);
    let io = |source| LabError::Io {
        path: path.clone(),
        source,
    };
    let mut s = UnixStream::connect(&path).map_err(io)?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    writeln!(s, "{}", serde_json::to_string(req).expect("request is JSON")).map_err(io)?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).map_err(io)?;
    let v: Value = serde_json::from_str(&line).map_err(|e| io(std::io::Error::other(e)))?;
    if v["type"] == "error" {
        return Err(LabError::Daemon {
            message: v["error"].as_str().unwrap_or("?").to_string(),
        });
    }
    Ok(v)
}
