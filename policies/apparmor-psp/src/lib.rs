//! apparmor-psp: replacement for the PodSecurityPolicy AppArmor control, with
//! the settings, defaults and messages of the Kubewarden policy of the same
//! name. The profiles a Pod asks for are the values of its
//! `container.apparmor.security.beta.kubernetes.io/<container>` annotations;
//! every one must be listed in `allowed_profiles` (empty by default, so any
//! profile annotation is rejected). Pods without such annotations are
//! accepted.
//!
//! The disallowed profiles are listed in sorted order (upstream: hash order).

use std::collections::BTreeSet;

use kwguest::{CallResult, ValidationRequest};
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Default, Deserialize)]
struct Settings {
    #[serde(default)]
    allowed_profiles: BTreeSet<String>,
}

impl kwguest::Validatable for Settings {}

#[no_mangle]
pub extern "C" fn wapc_init() {
    kwguest::register_policy::<Settings>(validate);
}

const ANNOTATION_PREFIX: &str = "container.apparmor.security.beta.kubernetes.io/";

fn validate(payload: &[u8]) -> CallResult {
    let req = ValidationRequest::<Settings>::decode(payload)?;
    let annotations = match req.request.object.pointer("/metadata/annotations") {
        Some(Value::Object(annotations)) => annotations,
        _ => return kwguest::accept(),
    };
    let profiles: BTreeSet<&str> = annotations
        .iter()
        .filter(|(key, _)| key.starts_with(ANNOTATION_PREFIX))
        .filter_map(|(_, value)| value.as_str())
        .collect();
    let disallowed: Vec<&str> = profiles
        .into_iter()
        .filter(|profile| !req.settings.allowed_profiles.contains(*profile))
        .collect();
    if disallowed.is_empty() {
        kwguest::accept()
    } else {
        kwguest::reject(
            &format!("These AppArmor profiles are not allowed: {:?}", disallowed),
            None,
        )
    }
}
