//! wasi-testbed: kwserver's plain-WASI test policy (`executionMode: wasi`).
//!
//! A command-line program, run once per evaluation: `policy.wasm validate` reads a
//! ValidationRequest `{"request": ..., "settings": ...}` from stdin and prints one
//! ValidationResponse; `policy.wasm validate-settings` reads the settings and prints
//! `{"valid": ..., "message": ...}`.
//!
//! Settings (all optional): `validUsers`, `validActions`, `validResources` (non-empty
//! lists of strings, for raw requests), `deniedNames` (list of Pod names), and
//! `settingsBehaviour` to make settings validation fail (see `misbehave`).
//!
//! Requests:
//! - raw `{"user", "action", "resource"}`: accepted iff each value is listed in the
//!   matching settings list (a missing list accepts anything), else rejected with
//!   `this request is not accepted`;
//! - an AdmissionRequest: rejected with `The '<name>' name is on the deny list` when
//!   the object's name is in `deniedNames`, else accepted.
//! - a `behaviour` (raw request key, or the object's `kwserver.test/behaviour`
//!   annotation) exercises everything else; see `misbehave` and `validate`.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[link(wasm_import_module = "host")]
extern "C" {
    /// Kubewarden's WASI host call: 0 = success, 1 = failure; the answer is appended
    /// to stdin.
    #[link_name = "call"]
    fn host_call(
        bd_ptr: *const u8,
        bd_len: usize,
        ns_ptr: *const u8,
        ns_len: usize,
        op_ptr: *const u8,
        op_len: usize,
        ptr: *const u8,
        len: usize,
    ) -> u32;
}

fn read_stdin() -> Vec<u8> {
    let mut data = Vec::new();
    std::io::stdin().read_to_end(&mut data).expect("cannot read stdin");
    data
}

fn print_json(value: &Value) {
    let mut out = std::io::stdout();
    out.write_all(value.to_string().as_bytes()).unwrap();
    out.flush().unwrap();
}

/// Calls the host; returns (status, answer read back from stdin).
fn call_host(binding: &str, namespace: &str, operation: &str, payload: &[u8]) -> (u32, String) {
    let status = unsafe {
        host_call(
            binding.as_ptr(),
            binding.len(),
            namespace.as_ptr(),
            namespace.len(),
            operation.as_ptr(),
            operation.len(),
            payload.as_ptr(),
            payload.len(),
        )
    };
    (status, String::from_utf8_lossy(&read_stdin()).into_owned())
}

fn busy_loop() -> ! {
    let start = Instant::now();
    loop {
        if start.elapsed() > Duration::from_secs(3600) {
            std::process::exit(0);
        }
        std::hint::spin_loop();
    }
}

/// Failure behaviours shared by both operations.
fn misbehave(behaviour: &str) {
    match behaviour {
        "panic" => panic!("boom: the policy panicked on purpose"),
        "silent-trap" => std::process::abort(),
        "exit" => {
            eprintln!("exiting with code 3 on purpose");
            std::process::exit(3);
        }
        "silent-exit" => std::process::exit(4),
        "garbage" => {
            print!("this is not JSON");
            std::process::exit(0);
        }
        "invalid-utf8" => {
            std::io::stdout().write_all(&[0xff, 0xfe, 0x00]).unwrap();
            std::process::exit(0);
        }
        "busy-loop" => {
            eprintln!("looping forever");
            busy_loop();
        }
        "sleep" => {
            eprintln!("sleeping for an hour");
            std::thread::sleep(Duration::from_secs(3600));
        }
        _ => {}
    }
}

fn string_list<'a>(settings: &'a Value, key: &str) -> Option<Vec<&'a str>> {
    settings
        .get(key)
        .and_then(Value::as_array)
        .map(|items| items.iter().filter_map(Value::as_str).collect())
}

fn validate_settings(settings: &Value) -> Value {
    if let Some(behaviour) = settings.get("settingsBehaviour").and_then(Value::as_str) {
        misbehave(behaviour);
    }
    if !settings.is_object() {
        return json!({"valid": false, "message": "settings must be an object"});
    }
    for key in ["validUsers", "validActions", "validResources"] {
        if let Some(value) = settings.get(key) {
            match value.as_array() {
                Some(items) if !items.is_empty() && items.iter().all(Value::is_string) => {}
                _ => {
                    return json!({"valid": false, "message": format!("{} must be a non-empty list of strings", key)})
                }
            }
        }
    }
    json!({"valid": true})
}

fn reject(message: String) -> Value {
    json!({"accepted": false, "message": message})
}

fn validate(payload: &Value) -> Value {
    let request = &payload["request"];
    let settings = &payload["settings"];
    let behaviour = request
        .get("behaviour")
        .or_else(|| request.pointer("/object/metadata/annotations/kwserver.test~1behaviour"))
        .and_then(Value::as_str)
        .unwrap_or("");
    misbehave(behaviour);
    match behaviour {
        "exit-zero-early" => {
            print_json(&json!({"accepted": true, "warnings": ["answered, then proc_exit(0)"]}));
            std::process::exit(0);
        }
        "no-accepted" => return json!({"message": "an answer without `accepted`"}),
        "stderr-then-reject" => {
            eprintln!("this goes to stderr");
            return json!({"accepted": false, "message": "rejected after writing to stderr", "code": 418});
        }
        "host-call" => {
            let log = json!({"level": "info", "message": "hello from a WASI policy"}).to_string();
            let (log_status, log_answer) = call_host("kubewarden", "tracing", "log", log.as_bytes());
            let list = json!({"api_version": "v1", "kind": "Namespace"}).to_string();
            let (status, answer) = call_host("kubewarden", "kubernetes", "list_resources_all", list.as_bytes());
            return reject(format!(
                "log: {} {:?}; list_resources_all: {} {}",
                log_status, log_answer, status, answer
            ));
        }
        "mutate" => {
            let mut mutated = request.clone();
            mutated["resource"] = json!("mutated");
            return json!({"accepted": true, "mutated_object": mutated});
        }
        _ => {}
    }
    if let Some(user) = request.get("user").and_then(Value::as_str) {
        let action = request.get("action").and_then(Value::as_str).unwrap_or("");
        let resource = request.get("resource").and_then(Value::as_str).unwrap_or("");
        let allowed = |key: &str, value: &str| string_list(settings, key).map_or(true, |l| l.contains(&value));
        if allowed("validUsers", user) && allowed("validActions", action) && allowed("validResources", resource) {
            return json!({"accepted": true});
        }
        return reject("this request is not accepted".to_string());
    }
    let name = request.pointer("/object/metadata/name").and_then(Value::as_str).unwrap_or("");
    if string_list(settings, "deniedNames").map_or(false, |names| names.contains(&name)) {
        return reject(format!("The '{}' name is on the deny list", name));
    }
    json!({"accepted": true})
}

fn main() {
    let operation = std::env::args().nth(1).unwrap_or_default();
    let input: Value = match serde_json::from_slice(&read_stdin()) {
        Ok(value) => value,
        Err(err) => {
            eprintln!("cannot decode stdin: {}", err);
            std::process::exit(1);
        }
    };
    let answer = match operation.as_str() {
        "validate" => validate(&input),
        "validate-settings" => validate_settings(&input),
        other => {
            eprintln!("unknown operation {:?}", other);
            std::process::exit(2);
        }
    };
    print_json(&answer);
}
