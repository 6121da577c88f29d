//! hostpaths-psp: replacement for the PodSecurityPolicy `allowedHostPaths`
//! control, with the settings, defaults and messages of the Kubewarden
//! policy of the same name (a Go policy upstream).
//!
//! Every `hostPath` volume mounted by a container or init container must lie
//! under one of `allowedHostPaths[].pathPrefix` (path-segment-wise: `/foo`
//! allows `/foo` and `/foo/bar`, not `/fool`), mounted with the `readOnly`
//! value of the most specific matching prefix. Every violation is reported,
//! one per line. With no `allowedHostPaths` every request is accepted.

use kwguest::json::{opt_array, opt_bool, opt_object, opt_object_list, opt_str};
use kwguest::{CallResult, ValidationRequest};
use serde::Deserialize;
use serde_json::Value;

/// Settings as the `validate` operation reads them; `validate_settings`
/// checks the raw JSON more strictly (see [`validate_settings`]).
#[derive(Debug, Default, Deserialize)]
struct Settings {
    #[serde(default, rename = "allowedHostPaths")]
    allowed_host_paths: Option<Vec<HostPath>>,
}

#[derive(Debug, Default, Deserialize)]
struct HostPath {
    #[serde(default, rename = "pathPrefix")]
    path_prefix: String,
    #[serde(default, rename = "readOnly")]
    read_only: bool,
}

#[no_mangle]
pub extern "C" fn wapc_init() {
    kwguest::register_policy_with(validate, validate_settings);
}

/// Every entry needs both `pathPrefix` and `readOnly`; all the problems are
/// reported, separated by `; `. Settings that are not JSON are invalid too.
fn validate_settings(payload: &[u8]) -> CallResult {
    let settings: Value = match serde_json::from_slice(payload) {
        Ok(settings) => settings,
        Err(err) => return kwguest::settings_response(Err(err.to_string())),
    };
    let entries: Vec<&Value> = match settings.get("allowedHostPaths") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) if s.is_empty() => Vec::new(),
        Some(Value::Array(items)) => items.iter().collect(),
        Some(Value::Object(map)) => map.values().collect(),
        Some(other) => vec![other],
    };
    let mut errors = Vec::new();
    for entry in entries {
        let prefix = match entry.get("pathPrefix") {
            Some(prefix) => prefix,
            None => {
                errors.push("pathPrefix key is missing".to_string());
                continue;
            }
        };
        if entry.get("readOnly").is_none() {
            let prefix = match prefix {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            errors.push(format!("readOnly key for pathPrefix '{}' is missing", prefix));
        }
    }
    if errors.is_empty() {
        // Entries of the wrong type would make every request fail.
        if let Err(err) = serde_json::from_value::<Settings>(settings) {
            return kwguest::settings_response(Err(err.to_string()));
        }
        kwguest::settings_response(Ok(()))
    } else {
        kwguest::settings_response(Err(errors.join("; ")))
    }
}

const KINDS: &str = "Deployment, ReplicaSet, StatefulSet, DaemonSet, ReplicationController, Job, CronJob, Pod";

fn validate(payload: &[u8]) -> CallResult {
    let req = match ValidationRequest::<Settings>::decode(payload) {
        Ok(req) => req,
        Err(err) => return kwguest::reject(&err, Some(400)),
    };
    let allowed = req.settings.allowed_host_paths.unwrap_or_default();
    if allowed.is_empty() {
        return kwguest::accept();
    }
    let kind = req.request.object_kind();
    if kwguest::podspec::pod_spec_path(kind).is_none() {
        return kwguest::reject(&format!("object should be one of these kinds: {}", KINDS), Some(400));
    }
    // A missing Pod spec (or a DELETE, with no object) has no volumes.
    let spec = match req.request.pod_spec() {
        Some(spec) => spec,
        None => return kwguest::accept(),
    };
    match violations(spec, &allowed) {
        Ok(errors) if errors.is_empty() => kwguest::accept(),
        Ok(errors) => kwguest::reject(&errors.join("\n"), None),
        Err(err) => kwguest::reject(&err, Some(400)),
    }
}

struct Mount<'a> {
    name: &'a str,
    read_only: bool,
}

fn violations(spec: &Value, allowed: &[HostPath]) -> Result<Vec<String>, String> {
    let e = |err: kwguest::json::TypeMismatch| err.to_string();
    let mut host_volumes = Vec::new();
    for volume in opt_object_list(spec, "volumes").map_err(e)?.into_iter().flatten() {
        if opt_object(volume, "hostPath").map_err(e)?.is_none() {
            continue;
        }
        let name = opt_str(volume, "name").map_err(e)?.unwrap_or("");
        let path = opt_str(&volume["hostPath"], "path").map_err(e)?.unwrap_or("");
        host_volumes.push((name, path));
    }
    let mut mounts = Vec::new();
    for key in ["initContainers", "containers"] {
        for container in opt_object_list(spec, key).map_err(e)?.into_iter().flatten() {
            let list = opt_array(container, "volumeMounts").map_err(e)?;
            for mount in list.into_iter().flatten() {
                mounts.push(Mount {
                    name: opt_str(mount, "name").map_err(e)?.unwrap_or(""),
                    read_only: opt_bool(mount, "readOnly").map_err(e)?.unwrap_or(false),
                });
            }
        }
    }

    let mut errors = Vec::new();
    for (volume, path) in &host_volumes {
        for mount in mounts.iter().filter(|m| m.name == *volume) {
            errors.extend(check_mount(path, mount, allowed));
        }
    }
    Ok(errors)
}

/// The errors of one volume/mount pair. Prefixes are walked in settings
/// order; a prefix counts only if it is at least as specific as the last one
/// that counted, and a matching one that validates clears the errors found
/// so far (the most specific prefix wins).
fn check_mount(path: &str, mount: &Mount, allowed: &[HostPath]) -> Vec<String> {
    let mut matched = false;
    let mut errors = Vec::new();
    let mut previous = "";
    for host_path in allowed {
        if !has_path_prefix(path, &host_path.path_prefix) || !has_path_prefix(&host_path.path_prefix, previous) {
            continue;
        }
        matched = true;
        if mount.read_only == host_path.read_only {
            errors.clear();
        } else {
            errors.push(format!(
                "hostPath '{}' mounted as '{}' should be readOnly '{}'",
                path, mount.name, host_path.read_only
            ));
        }
        previous = &host_path.path_prefix;
    }
    if !matched {
        errors.push(format!(
            "hostPath '{}' mounted as '{}' is not in the AllowedHostPaths list",
            path, mount.name
        ));
    }
    errors
}

/// `/foo` is a prefix of `/foo`, `/foo/` and `/foo/bar`, not of `/fool`.
fn has_path_prefix(path: &str, prefix: &str) -> bool {
    let terminated = |s: &str| if s.ends_with('/') { s.to_string() } else { format!("{}/", s) };
    terminated(path).starts_with(&terminated(prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert!(has_path_prefix("/foo", "/foo"));
        assert!(has_path_prefix("/foo/bar", "/foo/"));
        assert!(!has_path_prefix("/fool", "/foo"));
        assert!(has_path_prefix("/anything", ""));
    }
}
