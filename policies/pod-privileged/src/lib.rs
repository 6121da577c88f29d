//! pod-privileged: rejects Pods, and workloads embedding a Pod template, that
//! run a privileged container. Settings, defaults and messages follow the
//! Kubewarden `pod-privileged` policy.

use kwguest::json::opt_object_list;
use kwguest::{CallResult, ValidationRequest};
use serde::Deserialize;
use serde_json::Value;

/// Both switches default to false; any object (`{}` included) is valid.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Settings {
    skip_init_containers: bool,
    skip_ephemeral_containers: bool,
}

impl kwguest::Validatable for Settings {}

#[no_mangle]
pub extern "C" fn wapc_init() {
    kwguest::register_policy::<Settings>(validate);
}

fn validate(payload: &[u8]) -> CallResult {
    let req = ValidationRequest::<Settings>::decode(payload)?;
    // Kinds without a Pod spec, and DELETE requests (no object), are accepted.
    let spec = match req.request.pod_spec() {
        Some(spec) => spec,
        None => return kwguest::accept(),
    };
    match check(spec, &req.settings) {
        Ok(None) => kwguest::accept(),
        Ok(Some(message)) => kwguest::reject(message, None),
        Err(()) => kwguest::reject("Cannot parse validation request", None),
    }
}

/// The first violation, in the upstream order: containers, init containers,
/// ephemeral containers. `Err` when the spec is not a valid Pod spec.
fn check(spec: &Value, settings: &Settings) -> Result<Option<&'static str>, ()> {
    let lists = [
        ("containers", true, "Privileged container is not allowed"),
        (
            "initContainers",
            !settings.skip_init_containers,
            "Privileged init container is not allowed",
        ),
        (
            "ephemeralContainers",
            !settings.skip_ephemeral_containers,
            "Privileged ephemeral container is not allowed",
        ),
    ];
    for (key, wanted, message) in lists {
        let containers = opt_object_list(spec, key).map_err(|_| ())?;
        if !wanted {
            continue;
        }
        for container in containers.into_iter().flatten() {
            if is_privileged(container)? {
                return Ok(Some(message));
            }
        }
    }
    Ok(None)
}

fn is_privileged(container: &Value) -> Result<bool, ()> {
    let security_context = match container.get("securityContext") {
        None | Some(Value::Null) => return Ok(false),
        Some(sc @ Value::Object(_)) => sc,
        Some(_) => return Err(()),
    };
    kwguest::json::opt_bool(security_context, "privileged")
        .map(|privileged| privileged.unwrap_or(false))
        .map_err(|_| ())
}
