//! raw-validation: a raw policy accepting `{"user","action","resource"}`
//! requests only when all three values are in the allowed lists, like
//! Kubewarden's raw-validation-policy.

use kwguest::CallResult;
use serde::Deserialize;

/// Missing lists default to empty, which `validate_settings` then refuses
/// (upstream behaviour and texts).
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct Settings {
    valid_users: Vec<String>,
    valid_actions: Vec<String>,
    valid_resources: Vec<String>,
}

impl kwguest::Validatable for Settings {
    fn validate(&self) -> Result<(), String> {
        if self.valid_users.is_empty() {
            return Err("valid_users cannot be empty".into());
        }
        if self.valid_actions.is_empty() {
            return Err("valid_actions cannot be empty".into());
        }
        if self.valid_resources.is_empty() {
            return Err("valid_resources cannot be empty".into());
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
struct Request {
    user: String,
    action: String,
    resource: String,
}

#[derive(Debug, Deserialize)]
struct Payload {
    request: Request,
    settings: Settings,
}

#[no_mangle]
pub extern "C" fn wapc_init() {
    kwguest::register_policy::<Settings>(validate);
}

fn validate(payload: &[u8]) -> CallResult {
    // Upstream answers a request it cannot decode (e.g. no `user`) with a
    // rejection, not a call failure; do the same.
    let Payload { request, settings } = match serde_json::from_slice(payload) {
        Ok(decoded) => decoded,
        Err(_) => return kwguest::reject("cannot unmarshal request", None),
    };
    if settings.valid_users.contains(&request.user)
        && settings.valid_actions.contains(&request.action)
        && settings.valid_resources.contains(&request.resource)
    {
        kwguest::accept()
    } else {
        kwguest::reject("this request is not accepted", None)
    }
}
