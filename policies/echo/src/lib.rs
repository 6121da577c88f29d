//! echo: accepts everything, except requests whose object carries the
//! annotation `io.kubewarden.policy.echo.<operation>` (`create`, `update`,
//! `delete`, `connect`; any value): those are rejected with code 418 and the
//! AdmissionRequest itself, as compact JSON with sorted keys, as the message.
//! Same behaviour as the Kubewarden `echo` policy; it takes no settings.
//!
//! CREATE and CONNECT look at `object`, UPDATE and DELETE at `oldObject`.
//! Raw requests (no `operation` string, as sent to `/validate_raw`) are
//! accepted, which makes the module usable as a no-op raw policy in load
//! tests; the upstream fails such calls.

use kwguest::CallResult;
use serde::Deserialize;
use serde_json::Value;

/// No settings; any object is accepted (unknown keys are ignored).
#[derive(Debug, Default, Deserialize)]
struct Settings {}

impl kwguest::Validatable for Settings {}

#[no_mangle]
pub extern "C" fn wapc_init() {
    kwguest::register_policy::<Settings>(validate);
}

#[derive(Deserialize)]
struct Payload {
    #[serde(default)]
    request: Value,
}

fn validate(payload: &[u8]) -> CallResult {
    let Payload { request } = kwguest::decode_payload(payload)?;
    let operation = match request.get("operation").and_then(Value::as_str) {
        Some(operation) => operation,
        None => return kwguest::accept(),
    };
    let (object, key) = match operation {
        "CREATE" => ("object", "io.kubewarden.policy.echo.create"),
        "UPDATE" => ("oldObject", "io.kubewarden.policy.echo.update"),
        "DELETE" => ("oldObject", "io.kubewarden.policy.echo.delete"),
        "CONNECT" => ("object", "io.kubewarden.policy.echo.connect"),
        other => return Err(format!("unknown type of operation: {}", other)),
    };
    let annotated = request
        .get(object)
        .and_then(|o| o.pointer("/metadata/annotations"))
        .and_then(Value::as_object)
        .map_or(false, |annotations| annotations.contains_key(key));
    if annotated {
        // serde_json's Value keeps object keys sorted: the same text as the
        // upstream (jmespath over BTreeMaps).
        kwguest::reject(&request.to_string(), Some(418))
    } else {
        kwguest::accept()
    }
}
