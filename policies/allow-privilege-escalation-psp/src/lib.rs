//! allow-privilege-escalation-psp: replacement for the PodSecurityPolicy
//! `allowPrivilegeEscalation` / `defaultAllowPrivilegeEscalation` controls,
//! with the settings, defaults, messages and mutation of the Kubewarden policy
//! of the same name.
//!
//! * any container or init container with
//!   `securityContext.allowPrivilegeEscalation: true` is rejected;
//! * with `default_allow_privilege_escalation: false`, containers and init
//!   containers that do not set `allowPrivilegeEscalation: false` are mutated
//!   to set it.

use kwguest::json::{opt_bool, opt_object_list};
use kwguest::podspec::{pod_spec_mut, security_context, security_context_mut};
use kwguest::{CallResult, ValidationRequest};
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Deserialize)]
#[serde(default)]
struct Settings {
    /// Kubernetes' own default is to allow escalation, hence `true`.
    default_allow_privilege_escalation: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            default_allow_privilege_escalation: true,
        }
    }
}

impl kwguest::Validatable for Settings {}

#[no_mangle]
pub extern "C" fn wapc_init() {
    kwguest::register_policy::<Settings>(validate);
}

const CANNOT_PARSE: &str = "Cannot parse validation request";

fn validate(payload: &[u8]) -> CallResult {
    let req = ValidationRequest::<Settings>::decode(payload)?;
    let spec = match req.request.pod_spec() {
        Some(spec) => spec,
        None => return kwguest::accept(),
    };

    // Which lists escalate, and which containers need the default, checked
    // up front on the read-only spec.
    let mut errors = Vec::new();
    let mut to_patch: Vec<(&str, Vec<usize>)> = Vec::new();
    for (key, error) in [
        (
            "initContainers",
            "one of the init containers has privilege escalation enabled",
        ),
        (
            "containers",
            "one of the containers has privilege escalation enabled",
        ),
    ] {
        let containers = match opt_object_list(spec, key) {
            Ok(list) => list.map(Vec::as_slice).unwrap_or(&[]),
            Err(_) => return kwguest::reject(CANNOT_PARSE, None),
        };
        let mut escalating = false;
        let mut missing_default = Vec::new();
        for (index, container) in containers.iter().enumerate() {
            let setting = match security_context(container) {
                Ok(Some(sc)) => match opt_bool(sc, "allowPrivilegeEscalation") {
                    Ok(setting) => setting,
                    Err(_) => return kwguest::reject(CANNOT_PARSE, None),
                },
                Ok(None) => None,
                Err(_) => return kwguest::reject(CANNOT_PARSE, None),
            };
            escalating |= setting == Some(true);
            if setting != Some(false) {
                missing_default.push(index);
            }
        }
        if escalating {
            errors.push(error);
        } else if !missing_default.is_empty() {
            to_patch.push((key, missing_default));
        }
    }

    if !errors.is_empty() {
        return kwguest::reject(&errors.join(", "), None);
    }
    if req.settings.default_allow_privilege_escalation || to_patch.is_empty() {
        return kwguest::accept();
    }

    let kind = req.request.object_kind().to_string();
    let mut object = req.request.object;
    let spec = match pod_spec_mut(&kind, &mut object) {
        Some(spec) => spec,
        None => return kwguest::accept(),
    };
    for (key, indexes) in to_patch {
        let containers = match spec.get_mut(key).and_then(Value::as_array_mut) {
            Some(containers) => containers,
            None => continue,
        };
        for index in indexes {
            if let Some(sc) = security_context_mut(&mut containers[index]) {
                sc.insert("allowPrivilegeEscalation".to_string(), Value::Bool(false));
            }
        }
    }
    kwguest::mutate(object)
}
