//! sleeping: a test policy that burns CPU for the number of milliseconds
//! given by the object's `kubewarden.sleep_duration_milliseconds`
//! annotation, then accepts. Used to test evaluation timeouts.
//!
//! It busy-waits on the WASI monotonic clock instead of calling
//! `thread::sleep`: a single blocking `poll_oneoff` cannot be cut short by
//! wasmtime's epoch interruption, whereas every iteration of this loop passes
//! an epoch check, so a host deadline stops it promptly.

use std::time::{Duration, Instant};

use kwguest::{CallResult, Level, ValidationRequest};
use serde::Deserialize;
use serde_json::Value;

const ANNOTATION: &str = "kubewarden.sleep_duration_milliseconds";

/// `sleepMilliseconds` is mandatory and must be an unsigned integer: e.g.
/// `"abc"` fails decoding (a waPC call failure).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)] // required for compatibility; the annotation drives the sleep
struct Settings {
    sleep_milliseconds: u64,
}

impl kwguest::Validatable for Settings {}

#[no_mangle]
pub extern "C" fn wapc_init() {
    kwguest::register_policy::<Settings>(validate);
}

fn validate(payload: &[u8]) -> CallResult {
    let req = ValidationRequest::<Settings>::decode(payload)?;
    let millis = match sleep_duration(&req.request.object)? {
        Some(millis) => millis,
        None => return kwguest::accept(),
    };
    kwguest::log(Level::Info, &format!("sleeping for {} milliseconds", millis));
    busy_wait(Duration::from_millis(millis));
    kwguest::accept()
}

/// Reads the annotation, which may be a JSON number (as in the reference
/// fixtures) or a numeric string (the only form Kubernetes itself allows).
fn sleep_duration(object: &Value) -> Result<Option<u64>, String> {
    let value = match object.pointer("/metadata/annotations").and_then(|a| a.get(ANNOTATION)) {
        Some(value) => value,
        None => return Ok(None),
    };
    let parsed = match value {
        Value::Number(n) => n.as_u64().or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    parsed
        .map(Some)
        .ok_or_else(|| format!("invalid value of annotation {}: {}", ANNOTATION, value))
}

fn busy_wait(duration: Duration) {
    let start = Instant::now();
    while start.elapsed() < duration {
        std::hint::spin_loop();
    }
}
