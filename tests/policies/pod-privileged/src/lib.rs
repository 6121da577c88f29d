//! pod-privileged: rejects Pods (and workloads embedding a Pod template)
//! that run a privileged container, like Kubewarden's pod-privileged policy.

use kwguest::{podspec, CallResult, ValidationRequest};
use serde::Deserialize;
use serde_json::Value;

/// Any object is accepted (`{}` included); both switches default to false,
/// as in the newer upstream releases.
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
    // Non-pod kinds and DELETE requests (no object) carry no pod spec.
    let spec = match req.request.pod_spec() {
        Some(spec) => spec,
        None => return kwguest::accept(),
    };
    let settings = &req.settings;
    let privileged = podspec::containers(
        spec,
        !settings.skip_init_containers,
        !settings.skip_ephemeral_containers,
    )
    .any(is_privileged);
    if privileged {
        // One message for every container type, as pod-privileged v0.2.1
        // (the version the reference integration tests use).
        kwguest::reject("Privileged container is not allowed", None)
    } else {
        kwguest::accept()
    }
}

fn is_privileged(container: &Value) -> bool {
    container
        .pointer("/securityContext/privileged")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}
