//! HTTP side of the stand-in: discovery, list (paged), get, and watch (resume, bookmarks,
//! `sendInitialEvents`, 410 Gone), with the behaviour kube-rs and client-go rely on.
//!
//! Facts followed (kubernetes.io/docs/reference/using-api/api-concepts/): a watch from a
//! resourceVersion older than the server keeps answers `200` with an `ERROR` event carrying a
//! `Status` with code 410; bookmarks are `{"type":"BOOKMARK","object":{kind, apiVersion,
//! metadata:{resourceVersion}}}`; a streaming list (`sendInitialEvents=true`) ends its initial
//! events with a bookmark annotated `k8s.io/initial-events-end: "true"`; a watch without a
//! resourceVersion (or "0") starts with synthetic ADDED events for every object; lists are paged
//! with `limit` and an opaque `continue` token; errors are `Status` objects.

use std::{collections::HashMap, convert::Infallible, fmt::Write as _, sync::Arc, time::Duration};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::{Method, Request, Response, StatusCode, body::Frame, header};
use serde_json::{Value, json};
use tokio::sync::{broadcast::error::TryRecvError, mpsc};

use super::{
    rbac::{self, Rbac},
    store::{Change, Cluster, ResKind},
};

pub(crate) type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Per-server settings the handler needs.
pub(crate) struct Ctx {
    pub cluster: Arc<Cluster>,
    pub token: Option<String>,
    pub bookmark_interval: Duration,
    pub server_address: String,
    /// Enforced for every resource request when set.
    pub rbac: Option<Arc<Rbac>>,
}

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()).boxed_unsync())
        .expect("valid response")
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    full(status, "application/json", v.to_string())
}

fn status_object(code: u16, reason: &str, message: &str, details: Option<Value>) -> Value {
    let mut v = json!({"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",
        "message":message,"reason":reason,"code":code});
    if let Some(d) = details {
        v["details"] = d;
    }
    v
}

fn error(code: StatusCode, reason: &str, message: &str, details: Option<Value>) -> Response<Body> {
    json_response(code, &status_object(code.as_u16(), reason, message, details))
}

/// What a resource path names.
struct Target {
    kind: ResKind,
    namespace: Option<String>,
    name: Option<String>,
}

fn parse_resource_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    // /api/v1/... or /apis/discovery.k8s.io/v1/...
    let rest = match segs.as_slice() {
        ["api", "v1", rest @ ..] => (rest, ""),
        ["apis", "discovery.k8s.io", "v1", rest @ ..] => (rest, "discovery.k8s.io"),
        _ => return None,
    };
    let (rest, group) = rest;
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
        _ => (None, rest),
    };
    let (plural, name) = match rest {
        [plural] => (*plural, None),
        [plural, name] => (*plural, Some((*name).to_owned())),
        _ => return None,
    };
    let kind = ResKind::from_plural(plural)?;
    if kind.group() != group || (namespace.is_some() && !kind.namespaced()) {
        return None;
    }
    Some(Target { kind, namespace, name })
}

fn query(req: &Request<hyper::body::Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .map(|q| {
            q.split('&')
                .filter_map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    Some((decode(k)?, decode(v)?))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let h = std::str::from_utf8(&b[i + 1..i + 3]).ok()?;
                out.push(u8::from_str_radix(h, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// `metadata.name=x,metadata.namespace=y` (the field selectors kubectl uses for `get NAME -w`).
fn field_filter(q: &HashMap<String, String>) -> Result<(Option<String>, Option<String>), String> {
    let (mut name, mut ns) = (None, None);
    if let Some(sel) = q.get("fieldSelector").filter(|s| !s.is_empty()) {
        for term in sel.split(',') {
            match term.split_once('=') {
                Some(("metadata.name", v)) => name = Some(v.trim_start_matches('=').to_owned()),
                Some(("metadata.namespace", v)) => ns = Some(v.trim_start_matches('=').to_owned()),
                _ => return Err(format!("field selector {term:?} is not supported by the stand-in")),
            }
        }
    }
    if q.get("labelSelector").is_some_and(|s| !s.is_empty()) {
        return Err("labelSelector is not supported by the stand-in".to_owned());
    }
    Ok((name, ns))
}

struct Filter {
    namespace: Option<String>,
    name: Option<String>,
}

impl Filter {
    fn matches(&self, ns: &str, name: &str) -> bool {
        self.namespace.as_deref().is_none_or(|n| n == ns) && self.name.as_deref().is_none_or(|n| n == name)
    }
}

pub(crate) async fn handle(ctx: Arc<Ctx>, req: Request<hyper::body::Incoming>) -> Result<Response<Body>, Infallible> {
    let faults = ctx.cluster.faults();
    if faults.hang {
        futures::future::pending::<()>().await;
    }
    if let Some(tok) = &ctx.token {
        let ok = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .is_some_and(|h| h.strip_prefix("Bearer ").is_some_and(|t| t.trim() == tok));
        if !ok {
            return Ok(error(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized", None));
        }
    }
    let path = req.uri().path().to_owned();
    // Authorization comes before the handler, as in the real API server: a request the role
    // does not allow is refused whether or not the stand-in could serve it.
    if let Some(rbac) = &ctx.rbac
        && let Some(attrs) = rbac::attributes(req.method().as_str(), &path, &query(&req))
        && let Err(attrs) = rbac.authorize(attrs)
    {
        let main = attrs.resource.split('/').next().unwrap_or_default();
        return Ok(error(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &Rbac::forbidden_message(&attrs),
            Some(json!({"name": attrs.name, "kind": main, "group": attrs.group})),
        ));
    }
    if req.method() != Method::GET {
        return Ok(error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "the stand-in serves GET (list, get, watch) only",
            None,
        ));
    }
    if let Some(r) = discovery(&ctx, &path) {
        return Ok(r);
    }
    let Some(target) = parse_resource_path(&path) else {
        return Ok(error(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
            Some(json!({})),
        ));
    };
    if faults.forbidden.contains(&target.kind) {
        let scope = match &target.namespace {
            Some(ns) => format!("in the namespace \"{ns}\""),
            None => "at the cluster scope".to_owned(),
        };
        let verb = if target.name.is_some() { "get" } else { "list" };
        let msg = format!(
            "{plural} is forbidden: User \"system:serviceaccount:netdrop:netdrop\" cannot {verb} resource \"{plural}\" in API group \"{group}\" {scope}",
            plural = target.kind.plural(),
            group = target.kind.group()
        );
        return Ok(error(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &msg,
            Some(json!({"kind": target.kind.plural(), "group": target.kind.group()})),
        ));
    }
    if faults.error_500 {
        return Ok(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "Internal error occurred: stand-in fault injection",
            None,
        ));
    }
    let q = query(&req);
    let (field_name, field_ns) = match field_filter(&q) {
        Ok(f) => f,
        Err(e) => return Ok(error(StatusCode::BAD_REQUEST, "BadRequest", &e, None)),
    };
    if let Some(name) = &target.name {
        let ns = target.namespace.as_deref().unwrap_or("");
        return Ok(match ctx.cluster.get(target.kind, ns, name) {
            Some(v) => json_response(StatusCode::OK, &v),
            None => error(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("{} \"{name}\" not found", target.kind.plural()),
                Some(json!({"name": name, "kind": target.kind.plural(), "group": target.kind.group()})),
            ),
        });
    }
    let filter = Filter {
        namespace: target.namespace.clone().or(field_ns),
        name: field_name,
    };
    if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
        return Ok(watch(&ctx, target.kind, filter, &q));
    }
    Ok(list(&ctx, target.kind, &filter, &q))
}

fn list(ctx: &Ctx, kind: ResKind, filter: &Filter, q: &HashMap<String, String>) -> Response<Body> {
    let limit = q.get("limit").and_then(|l| l.parse::<usize>().ok()).filter(|&l| l > 0);
    // Continue token: "<rv>/<namespace>/<name>" of the last item sent (opaque to clients).
    let (list_rv, after) = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(c) => {
            let mut parts = c.splitn(3, '/');
            match (
                parts.next().and_then(|r| r.parse::<u64>().ok()),
                parts.next(),
                parts.next(),
            ) {
                (Some(rv), Some(ns), Some(name)) => (Some(rv), Some((ns.to_owned(), name.to_owned()))),
                _ => {
                    return error(StatusCode::BAD_REQUEST, "BadRequest", "invalid continue token", None);
                }
            }
        }
        None => (None, None),
    };
    let st = ctx.cluster.lock();
    // Pages after the first are served from the current state with the first page's
    // resourceVersion: changes in between are replayed by the watch that follows, which is what
    // informers need (the real API serves a consistent snapshot instead).
    let rv = list_rv.unwrap_or(st.rv);
    let range = match &after {
        Some(k) => st
            .kind(kind)
            .objects
            .range::<(String, String), _>((std::ops::Bound::Excluded(k.clone()), std::ops::Bound::Unbounded)),
        None => st.kind(kind).objects.range::<(String, String), _>(..),
    };
    let mut body = String::with_capacity(1024);
    let _ = write!(
        body,
        "{{\"kind\":\"{}List\",\"apiVersion\":\"{}\",\"items\":[",
        kind.kind(),
        kind.api_version()
    );
    let mut n = 0;
    let mut last = None;
    let mut more = false;
    for ((ns, name), obj) in range {
        if !filter.matches(ns, name) {
            continue;
        }
        if limit.is_some_and(|l| n >= l) {
            more = true;
            break;
        }
        if n > 0 {
            body.push(',');
        }
        body.push_str(&obj.json);
        n += 1;
        last = Some((ns.clone(), name.clone()));
    }
    drop(st);
    body.push_str("],\"metadata\":{");
    let _ = write!(body, "\"resourceVersion\":\"{rv}\"");
    if more && let Some((ns, name)) = last {
        let token = format!("{rv}/{ns}/{name}");
        let _ = write!(body, ",\"continue\":{}", Value::from(token));
    }
    body.push_str("}}");
    full(StatusCode::OK, "application/json", body)
}

fn event_line(typ: &str, obj: &str) -> Bytes {
    Bytes::from(format!("{{\"type\":\"{typ}\",\"object\":{obj}}}\n"))
}

fn bookmark(kind: ResKind, rv: u64, initial_end: bool) -> Bytes {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    let obj = json!({"kind": kind.kind(), "apiVersion": kind.api_version(), "metadata": meta});
    event_line("BOOKMARK", &obj.to_string())
}

fn gone(rv: u64, floor: u64) -> Bytes {
    let status = status_object(
        410,
        "Expired",
        &format!("too old resource version: {rv} ({floor})"),
        None,
    );
    event_line("ERROR", &status.to_string())
}

#[expect(clippy::too_many_lines, reason = "one watch protocol, easier to check in one place")]
fn watch(ctx: &Arc<Ctx>, kind: ResKind, filter: Filter, q: &HashMap<String, String>) -> Response<Body> {
    let rv_param = q.get("resourceVersion").cloned().unwrap_or_default();
    let send_initial = q.get("sendInitialEvents").is_some_and(|v| v == "true");
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_mins(30), Duration::from_secs);
    if send_initial && !bookmarks {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "sendInitialEvents requires allowWatchBookmarks=true",
            None,
        );
    }
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    // Snapshot what this watch must replay, and subscribe, under one lock.
    let (initial, start_rv, mut live) = {
        let st = ctx.cluster.lock();
        let live = ctx.cluster.subscribe();
        let ks = st.kind(kind);
        let mut initial: Vec<Bytes> = Vec::new();
        let start_rv = st.rv;
        if send_initial || rv_param.is_empty() || rv_param == "0" {
            for ((ns, name), obj) in &ks.objects {
                if filter.matches(ns, name) {
                    initial.push(event_line("ADDED", &obj.json));
                }
            }
            if send_initial {
                initial.push(bookmark(kind, start_rv, true));
            }
        } else {
            match rv_param.parse::<u64>() {
                Ok(from) if from < ks.floor => initial.push(gone(from, ks.floor)),
                Ok(from) => {
                    for c in ks.history.iter().filter(|c| c.rv > from) {
                        if filter.matches(&c.namespace, &c.name) {
                            initial.push(event_line(c.typ.as_str(), &c.json));
                        }
                    }
                }
                Err(_) => {
                    drop(st);
                    return error(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        &format!("invalid resourceVersion {rv_param:?}"),
                        None,
                    );
                }
            }
        }
        (initial, start_rv, live)
    };
    let expired = initial.last().is_some_and(|b| b.starts_with(b"{\"type\":\"ERROR\""));
    let ctx2 = ctx.clone();
    tokio::spawn(async move {
        for b in initial {
            if tx.send(b).await.is_err() {
                return;
            }
        }
        if expired {
            return;
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(ctx2.bookmark_interval);
        tick.tick().await;
        let send_change = |c: &Change| -> Option<Bytes> {
            (c.kind == kind && c.rv > start_rv && filter.matches(&c.namespace, &c.name))
                .then(|| event_line(c.typ.as_str(), &c.json))
        };
        loop {
            tokio::select! {
                () = &mut deadline => return,
                _ = tick.tick(), if bookmarks => {
                    // Drain under the lock: every change up to `rv` is then sent before the bookmark.
                    let mut out = Vec::new();
                    let rv = {
                        let st = ctx2.cluster.lock();
                        loop {
                            match live.try_recv() {
                                Ok(c) => out.extend(send_change(&c)),
                                Err(TryRecvError::Empty) => break,
                                Err(TryRecvError::Lagged(_)) => { out.push(gone(start_rv, st.rv)); break }
                                Err(TryRecvError::Closed) => return,
                            }
                        }
                        st.rv
                    };
                    let lagged = out.last().is_some_and(|b| b.starts_with(b"{\"type\":\"ERROR\""));
                    for b in out {
                        if tx.send(b).await.is_err() { return; }
                    }
                    if lagged { return; }
                    if tx.send(bookmark(kind, rv, false)).await.is_err() { return; }
                }
                c = live.recv() => match c {
                    Ok(c) => if let Some(b) = send_change(&c) && tx.send(b).await.is_err() { return },
                    // A watcher too slow for the event rate is cut off like the real API does; it relists.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        let _ = tx.send(gone(start_rv, start_rv + 1)).await;
                        return;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::TRANSFER_ENCODING, "chunked")
        .body(BodyExt::boxed_unsync(StreamBody::new(stream.boxed())))
        .expect("valid response")
}

fn resource_list(group_version: &str, kinds: &[ResKind]) -> Value {
    let resources: Vec<Value> = kinds
        .iter()
        .map(|k| {
            json!({"name": k.plural(), "singularName": k.kind().to_lowercase(), "namespaced": k.namespaced(),
                "kind": k.kind(), "verbs": ["get", "list", "watch"], "shortNames": k.short_names()})
        })
        .collect();
    json!({"kind":"APIResourceList","apiVersion":"v1","groupVersion":group_version,"resources":resources})
}

/// Discovery documents kubectl reads before a `get`. Aggregated discovery (`as=APIGroupDiscoveryList`)
/// is not offered: answering plain `application/json` makes client-go fall back to per-group
/// discovery, which is what a pre-1.26 server does.
fn discovery(ctx: &Ctx, path: &str) -> Option<Response<Body>> {
    let v = match path.trim_end_matches('/') {
        "/version" => json!({"major":"1","minor":"33","gitVersion":"v1.33.0-netdrop-standin",
            "gitCommit":"0000000000000000000000000000000000000000","gitTreeState":"clean",
            "buildDate":"2026-11-26T00:00:00Z","goVersion":"go1.24","compiler":"gc","platform":"linux/amd64"}),
        "/api" => json!({"kind":"APIVersions","versions":["v1"],
            "serverAddressByClientCIDRs":[{"clientCIDR":"0.0.0.0/0","serverAddress":ctx.server_address}]}),
        "/apis" => json!({"kind":"APIGroupList","apiVersion":"v1","groups":[{"name":"discovery.k8s.io",
            "versions":[{"groupVersion":"discovery.k8s.io/v1","version":"v1"}],
            "preferredVersion":{"groupVersion":"discovery.k8s.io/v1","version":"v1"}}]}),
        "/apis/discovery.k8s.io" => json!({"kind":"APIGroup","apiVersion":"v1","name":"discovery.k8s.io",
            "versions":[{"groupVersion":"discovery.k8s.io/v1","version":"v1"}],
            "preferredVersion":{"groupVersion":"discovery.k8s.io/v1","version":"v1"}}),
        "/api/v1" => resource_list("v1", &[ResKind::Pods, ResKind::Services, ResKind::Nodes]),
        "/apis/discovery.k8s.io/v1" => resource_list("discovery.k8s.io/v1", &[ResKind::EndpointSlices]),
        "/healthz" | "/readyz" | "/livez" => return Some(full(StatusCode::OK, "text/plain", "ok")),
        _ => return None,
    };
    Some(json_response(StatusCode::OK, &v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let t = parse_resource_path("/api/v1/namespaces/default/pods/web").expect("pod path");
        assert_eq!(
            (t.kind, t.namespace.as_deref(), t.name.as_deref()),
            (ResKind::Pods, Some("default"), Some("web"))
        );
        let t = parse_resource_path("/apis/discovery.k8s.io/v1/endpointslices").expect("slices");
        assert_eq!((t.kind, t.namespace, t.name), (ResKind::EndpointSlices, None, None));
        assert!(parse_resource_path("/api/v1/endpointslices").is_none());
        assert!(parse_resource_path("/api/v1/namespaces/x/nodes").is_none());
        assert_eq!(decode("a%2Fb+c").as_deref(), Some("a/b c"));
    }
}
