//! RBAC for the stand-in: a ClusterRole's rules, enforced on every request the way the real API
//! server authorizes it, with every decision recorded so a test can fail on any denial.
//!
//! Request attributes follow kube-apiserver's `RequestInfoFactory`
//! (staging/src/k8s.io/apiserver/pkg/endpoints/request/requestinfo.go): `/api/v1/...` is the core
//! group "", `/apis/GROUP/VERSION/...` a named group; `namespaces/NS/` scopes a request; the verb
//! comes from the HTTP method — GET/HEAD on a collection is `list`, `watch` with `watch=true`
//! (also on a name, or a `metadata.name` field selector), `get` on a name; POST `create`, PUT
//! `update`, PATCH `patch`, DELETE `delete` on a name and `deletecollection` on a collection.
//! Discovery and health paths (`/api`, `/apis`, `/version`, `/healthz`, ...) are non-resource URLs
//! that the default `system:discovery` and `system:public-info-viewer` bindings grant every
//! authenticated user, so they are allowed here too. Rules match as in
//! `rbac/v1` `PolicyRule`: `apiGroups`, `resources` (or `resource/subresource`), `verbs`
//! (`*` matches all) and `resourceNames` (only for requests that name an object).

use std::sync::Mutex;

use serde::Deserialize;

/// One `rules:` entry of a ClusterRole.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRule {
    #[serde(default)]
    pub api_groups: Vec<String>,
    #[serde(default)]
    pub resources: Vec<String>,
    pub verbs: Vec<String>,
    #[serde(default)]
    pub resource_names: Vec<String>,
}

#[derive(Deserialize)]
struct RoleDoc {
    #[serde(default)]
    rules: Vec<PolicyRule>,
}

/// What a request asks for, in RBAC's terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attributes {
    pub verb: String,
    pub group: String,
    /// `pods`, or `pods/log` for a subresource.
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

impl std::fmt::Display for Attributes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = if self.group.is_empty() { "core" } else { &self.group };
        write!(f, "{} {}/{}", self.verb, group, self.resource)?;
        if let Some(ns) = &self.namespace {
            write!(f, " in {ns}")?;
        }
        if let Some(n) = &self.name {
            write!(f, " named {n}")?;
        }
        Ok(())
    }
}

/// Errors reading a role.
#[derive(Debug, thiserror::Error)]
pub enum RbacError {
    #[error("{0}")]
    Yaml(String),
    #[error("no ClusterRole in the document")]
    NoClusterRole,
}

/// A ClusterRole bound to the stand-in's token, and the decisions it made.
#[derive(Debug, Default)]
pub struct Rbac {
    rules: Vec<PolicyRule>,
    allowed: Mutex<Vec<Attributes>>,
    denied: Mutex<Vec<Attributes>>,
}

impl Rbac {
    /// A role with these rules.
    pub fn new(rules: Vec<PolicyRule>) -> Self {
        Self {
            rules,
            ..Self::default()
        }
    }

    /// The first ClusterRole of a YAML stream (one or more documents, as `kubectl kustomize`
    /// prints them or as a single manifest file holds one).
    pub fn from_yaml(yaml: &str) -> Result<Self, RbacError> {
        let docs: Vec<serde_json::Value> =
            serde_saphyr::from_multiple(yaml).map_err(|e| RbacError::Yaml(e.to_string()))?;
        let role = docs
            .into_iter()
            .filter(|d| d.get("kind").and_then(|k| k.as_str()) == Some("ClusterRole"))
            .map(serde_json::from_value::<RoleDoc>)
            .next()
            .ok_or(RbacError::NoClusterRole)?
            .map_err(|e| RbacError::Yaml(e.to_string()))?;
        Ok(Self::new(role.rules))
    }

    pub fn rules(&self) -> &[PolicyRule] {
        &self.rules
    }

    /// Whether the role allows `a`.
    pub fn allows(&self, a: &Attributes) -> bool {
        self.rules.iter().any(|r| rule_allows(r, a))
    }

    /// The real API server's refusal text for `a`, as the agent's identity.
    pub fn forbidden_message(a: &Attributes) -> String {
        let main = a.resource.split('/').next().unwrap_or_default();
        let qualified = if a.group.is_empty() {
            main.to_owned()
        } else {
            format!("{main}.{}", a.group)
        };
        let scope = match &a.namespace {
            Some(ns) => format!("in the namespace \"{ns}\""),
            None => "at the cluster scope".to_owned(),
        };
        format!(
            "{qualified}{} is forbidden: User \"system:serviceaccount:netdrop:netdrop\" cannot {} resource \"{}\" in API group \"{}\" {scope}",
            a.name.as_deref().map(|n| format!(" \"{n}\"")).unwrap_or_default(),
            a.verb,
            a.resource,
            a.group,
        )
    }

    /// Decides and records.
    pub(crate) fn authorize(&self, a: Attributes) -> Result<(), Attributes> {
        if self.allows(&a) {
            self.allowed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(a);
            Ok(())
        } else {
            self.denied
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(a.clone());
            Err(a)
        }
    }

    /// Every request the role refused so far.
    pub fn denied(&self) -> Vec<Attributes> {
        self.denied
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Every resource request the role allowed so far.
    pub fn allowed(&self) -> Vec<Attributes> {
        self.allowed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

fn matches(list: &[String], value: &str) -> bool {
    list.iter().any(|v| v == "*" || v == value)
}

fn rule_allows(r: &PolicyRule, a: &Attributes) -> bool {
    if !matches(&r.verbs, &a.verb) || !matches(&r.api_groups, &a.group) {
        return false;
    }
    let resource_ok = r.resources.iter().any(|res| {
        res == "*"
            || *res == a.resource
            // `*/scale`-style and `pods/*`-style subresource wildcards.
            || a.resource.split_once('/').is_some_and(|(main, sub)| {
                *res == format!("{main}/*") || *res == format!("*/{sub}")
            })
    });
    if !resource_ok {
        return false;
    }
    if r.resource_names.is_empty() {
        return true;
    }
    a.name
        .as_deref()
        .is_some_and(|n| r.resource_names.iter().any(|x| x == n))
}

/// The RBAC attributes of a request, or `None` for a non-resource URL.
pub fn attributes<S: std::hash::BuildHasher>(
    method: &str,
    path: &str,
    query: &std::collections::HashMap<String, String, S>,
) -> Option<Attributes> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    let (group, rest): (&str, &[&str]) = match segs.as_slice() {
        ["api", _version, rest @ ..] if !rest.is_empty() => ("", rest),
        ["apis", group, _version, rest @ ..] if !rest.is_empty() => (group, rest),
        _ => return None,
    };
    // `namespaces/NS/RESOURCE...` is namespaced; `namespaces` and `namespaces/NS` alone are the
    // namespaces resource itself (`namespaces/NS/status` its subresource is not used here).
    let (namespace, rest) = match rest {
        ["namespaces", ns, more @ ..] if !more.is_empty() => (Some((*ns).to_owned()), more),
        _ => (None, rest),
    };
    let (resource, name, sub) = match rest {
        [res] => (*res, None, None),
        [res, name] => (*res, Some((*name).to_owned()), None),
        [res, name, sub, ..] => (*res, Some((*name).to_owned()), Some(*sub)),
        [] => return None,
    };
    let watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    let field_name = query
        .get("fieldSelector")
        .and_then(|f| f.split(',').find_map(|t| t.strip_prefix("metadata.name=")))
        .map(|n| n.trim_start_matches('=').to_owned());
    let verb = match (method, name.is_some()) {
        ("GET" | "HEAD", _) if watch => "watch",
        ("GET" | "HEAD", true) => "get",
        ("GET" | "HEAD", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        (other, _) => return Some(unknown(other, group, resource, namespace, name)),
    };
    // A list or watch limited to one name by field selector is authorized for that name
    // (requestinfo.go: "if there's no name on the request and we thought it was a list before,
    // then the fieldSelector name wins").
    let name = name.or(if matches!(verb, "list" | "watch") {
        field_name
    } else {
        None
    });
    Some(Attributes {
        verb: verb.to_owned(),
        group: group.to_owned(),
        resource: sub.map_or_else(|| resource.to_owned(), |s| format!("{resource}/{s}")),
        namespace,
        name,
    })
}

fn unknown(method: &str, group: &str, resource: &str, namespace: Option<String>, name: Option<String>) -> Attributes {
    Attributes {
        verb: method.to_ascii_lowercase(),
        group: group.to_owned(),
        resource: resource.to_owned(),
        namespace,
        name,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn verbs_as_the_api_server_maps_them() {
        let a = |m: &str, p: &str, query: &[(&str, &str)]| attributes(m, p, &q(query)).expect("resource request");
        assert_eq!(a("GET", "/api/v1/pods", &[]).verb, "list");
        assert_eq!(a("GET", "/api/v1/pods", &[("watch", "true")]).verb, "watch");
        let g = a("GET", "/api/v1/namespaces/default/pods/web-0", &[]);
        assert_eq!(
            (g.verb.as_str(), g.namespace.as_deref(), g.name.as_deref()),
            ("get", Some("default"), Some("web-0"))
        );
        let e = a("GET", "/apis/discovery.k8s.io/v1/endpointslices", &[("watch", "1")]);
        assert_eq!((e.verb.as_str(), e.group.as_str()), ("watch", "discovery.k8s.io"));
        assert_eq!(a("DELETE", "/api/v1/namespaces/x/pods", &[]).verb, "deletecollection");
        assert_eq!(a("GET", "/api/v1/namespaces/x/pods/p/log", &[]).resource, "pods/log");
        assert_eq!(a("GET", "/api/v1/namespaces/x", &[]).resource, "namespaces");
        let f = a("GET", "/api/v1/nodes", &[("fieldSelector", "metadata.name=node-a")]);
        assert_eq!((f.verb.as_str(), f.name.as_deref()), ("list", Some("node-a")));
        assert!(attributes("GET", "/api", &q(&[])).is_none());
        assert!(attributes("GET", "/apis/discovery.k8s.io/v1", &q(&[])).is_none());
        assert!(attributes("GET", "/version", &q(&[])).is_none());
    }

    #[test]
    fn rules_match_like_rbac() {
        let rbac = Rbac::from_yaml(
            "kind: ClusterRole\napiVersion: rbac.authorization.k8s.io/v1\nmetadata: {name: r}\nrules:\n- apiGroups: ['']\n  resources: [pods]\n  verbs: [list, watch]\n- apiGroups: [apps]\n  resources: ['*']\n  verbs: [get]\n  resourceNames: [x]\n",
        )
        .expect("role");
        let at = |verb: &str, group: &str, resource: &str, name: Option<&str>| Attributes {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            namespace: None,
            name: name.map(Into::into),
        };
        assert!(rbac.allows(&at("list", "", "pods", None)));
        assert!(rbac.allows(&at("watch", "", "pods", None)));
        assert!(!rbac.allows(&at("get", "", "pods", Some("p"))));
        assert!(!rbac.allows(&at("list", "", "services", None)));
        assert!(!rbac.allows(&at("list", "apps", "pods", None)));
        assert!(!rbac.allows(&at("list", "", "pods/log", None)));
        assert!(rbac.allows(&at("get", "apps", "deployments", Some("x"))));
        assert!(!rbac.allows(&at("get", "apps", "deployments", Some("y"))));
        assert!(!rbac.allows(&at("get", "apps", "deployments", None)));
    }
}
