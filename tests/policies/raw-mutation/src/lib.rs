//! raw-mutation: a raw policy (the request is arbitrary JSON such as
//! `{"user":"tonio","action":"eats","resource":"banana"}`) that replaces a
//! forbidden `resource` with a default one, like Kubewarden's
//! raw-mutation-policy.

use kwguest::{CallResult, ValidationRequest};
use serde::Deserialize;
use serde_json::Value;

/// Both keys are required: missing ones make `validate_settings` fail with a
/// decoding error.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Settings {
    forbidden_resources: Vec<String>,
    default_resource: String,
}

impl kwguest::Validatable for Settings {
    // Same texts as the upstream policy.
    fn validate(&self) -> Result<(), String> {
        if self.default_resource.is_empty() {
            return Err("Provided settings are not valid: defaultResource cannot be empty".into());
        }
        if self.forbidden_resources.contains(&self.default_resource) {
            return Err("Provided settings are not valid: defaultResource cannot be forbidden".into());
        }
        Ok(())
    }
}

#[no_mangle]
pub extern "C" fn wapc_init() {
    kwguest::register_policy::<Settings>(validate);
}

fn validate(payload: &[u8]) -> CallResult {
    let req = ValidationRequest::<Settings, Value>::decode(payload)?;
    let settings = &req.settings;
    let forbidden = req
        .request
        .get("resource")
        .and_then(Value::as_str)
        .map_or(false, |resource| settings.forbidden_resources.iter().any(|f| f == resource));
    if !forbidden {
        return kwguest::accept();
    }
    // Keep every other member of the request untouched: the host diffs the
    // whole raw request against this object to build the JSON patch.
    let mut mutated = req.request;
    mutated["resource"] = Value::String(settings.default_resource.clone());
    kwguest::mutate(mutated)
}
