//! unique-ingress: rejects an Ingress when one of its rule hosts is already a
//! rule host of another Ingress of the cluster. Behaviour and message follow
//! the Kubewarden `unique-ingress-policy` (a Gatekeeper policy there); this is
//! a waPC policy that lists the cluster's Ingresses through the host's
//! `kubernetes/list_resources_all` callback, so it needs
//! `contextAwareResources: [{apiVersion: networking.k8s.io/v1, kind: Ingress}]`.
//! It takes no settings.

use std::collections::BTreeSet;

use kwguest::{AdmissionRequest, CallResult, ValidationRequest};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// No settings; any object is accepted (unknown keys are ignored).
#[derive(Debug, Default, Deserialize)]
struct Settings {}

impl kwguest::Validatable for Settings {}

#[no_mangle]
pub extern "C" fn wapc_init() {
    kwguest::register_policy::<Settings>(validate);
}

/// The payload of `list_resources_all`: every Ingress, no selectors.
#[derive(Serialize)]
struct ListAll<'a> {
    api_version: &'a str,
    kind: &'a str,
    label_selector: Option<&'a str>,
    field_selector: Option<&'a str>,
}

const INGRESS_API_VERSION: &str = "networking.k8s.io/v1";

fn validate(payload: &[u8]) -> CallResult {
    let req = ValidationRequest::<Settings>::decode(payload)?;
    let request = &req.request;
    if !is_ingress(request) {
        return kwguest::accept();
    }
    let hosts = rule_hosts(&request.object);
    if hosts.is_empty() {
        return kwguest::accept();
    }
    let others = list_ingresses()?;
    let (namespace, name) = identity(request);
    let mut conflicts = BTreeSet::new();
    for other in others.iter().filter(|other| !same_object(other, namespace, name)) {
        conflicts.extend(rule_hosts(other).intersection(&hosts).cloned());
    }
    if conflicts.is_empty() {
        return kwguest::accept();
    }
    let messages: Vec<String> = conflicts
        .iter()
        .map(|host| format!("ingress host conflicts with an existing ingress <{}>", host))
        .collect();
    kwguest::reject(&messages.join(", "), None)
}

/// An Ingress of either API group that ever served Ingresses.
fn is_ingress(request: &AdmissionRequest) -> bool {
    request.kind.kind == "Ingress"
        && (request.kind.group == "networking.k8s.io" || request.kind.group == "extensions")
}

/// The `host` of every rule of an Ingress (rules without one are skipped).
fn rule_hosts(ingress: &Value) -> BTreeSet<String> {
    ingress
        .pointer("/spec/rules")
        .and_then(Value::as_array)
        .map(|rules| {
            rules
                .iter()
                .filter_map(|rule| rule.get("host").and_then(Value::as_str))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Namespace and name of the object under review: its own metadata, else the
/// request's (an object without a namespace must not conflict with itself).
fn identity(request: &AdmissionRequest) -> (&str, &str) {
    let metadata = |key: &str| request.object.pointer(&format!("/metadata/{}", key)).and_then(Value::as_str);
    let namespace = metadata("namespace").unwrap_or(&request.namespace);
    let name = metadata("name").unwrap_or(&request.name);
    (namespace, name)
}

fn same_object(other: &Value, namespace: &str, name: &str) -> bool {
    let metadata = |key: &str| other.pointer(&format!("/metadata/{}", key)).and_then(Value::as_str);
    !name.is_empty() && metadata("name") == Some(name) && metadata("namespace").unwrap_or("") == namespace
}

fn list_ingresses() -> Result<Vec<Value>, String> {
    let payload = serde_json::to_vec(&ListAll {
        api_version: INGRESS_API_VERSION,
        kind: "Ingress",
        label_selector: None,
        field_selector: None,
    })
    .map_err(|err| err.to_string())?;
    let answer = kwguest::host_call("kubewarden", "kubernetes", "list_resources_all", &payload)
        .map_err(|err| format!("cannot list the Ingresses of the cluster: {}", err))?;
    let list: Value = serde_json::from_slice(&answer)
        .map_err(|err| format!("cannot list the Ingresses of the cluster: {}", err))?;
    Ok(match list.get("items") {
        Some(Value::Array(items)) => items.clone(),
        _ => Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ingress(namespace: Option<&str>, name: &str, hosts: &[&str]) -> Value {
        let rules: Vec<Value> = hosts.iter().map(|host| json!({"host": host})).collect();
        let mut metadata = json!({"name": name});
        if let Some(namespace) = namespace {
            metadata["namespace"] = json!(namespace);
        }
        json!({"metadata": metadata, "spec": {"rules": rules}})
    }

    #[test]
    fn rule_hosts_skip_rules_without_a_host() {
        let mut object = ingress(None, "a", &["b.example", "a.example"]);
        object["spec"]["rules"].as_array_mut().unwrap().push(json!({"http": {}}));
        let hosts: Vec<String> = rule_hosts(&object).into_iter().collect();
        assert_eq!(hosts, vec!["a.example", "b.example"]);
    }

    #[test]
    fn an_object_is_the_same_only_with_its_name_and_namespace() {
        let other = ingress(Some("team-a"), "web", &[]);
        assert!(same_object(&other, "team-a", "web"));
        assert!(!same_object(&other, "team-b", "web"));
        assert!(!same_object(&other, "team-a", "api"));
        assert!(!same_object(&other, "team-a", ""));
    }
}
