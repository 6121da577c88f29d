//! The waPC guest side of the ABI, written by hand (kubewarden-compat.md §1).
//!
//! * imports: the nine host functions of module `"wapc"`;
//! * export: `__guest_call(op_len, msg_len) -> i32`, which fetches the
//!   operation name and payload with `__guest_request`, runs the handler
//!   registered for that operation and hands the result back with
//!   `__guest_response` (return 1) or `__guest_error` (return 0).
//!
//! The registry is filled from the policy's `wapc_init` export (see
//! [`register_function`]). Outside wasm32 (i.e. `cargo test` on the build
//! machine) the imports do not exist; host calls then fail with an error, so
//! that pure helpers stay testable.

use std::cell::RefCell;

/// What a handler returns: the response payload, or an error message that is
/// handed to the host through `__guest_error` (a waPC *call failure*).
pub type CallResult = Result<Vec<u8>, String>;

/// An operation handler: receives the raw payload of the call.
pub type Handler = fn(&[u8]) -> CallResult;

thread_local! {
    // wasm32 guests are single-threaded; a thread-local avoids `static mut`
    // and works on rustc 1.63 (no `OnceLock` yet). Linear search is fine for
    // the three operations a policy registers.
    static HANDLERS: RefCell<Vec<(String, Handler)>> = RefCell::new(Vec::new());
}

/// Registers (or replaces) the handler for operation `name`.
///
/// Replacing rather than appending keeps a second `wapc_init` call on the
/// same instance harmless.
pub fn register_function(name: &str, handler: Handler) {
    HANDLERS.with(|handlers| {
        let mut handlers = handlers.borrow_mut();
        match handlers.iter_mut().find(|(n, _)| n == name) {
            Some(entry) => entry.1 = handler,
            None => handlers.push((name.to_string(), handler)),
        }
    });
}

/// Runs the handler registered for `op`. Unknown operations fail with the
/// same text as the upstream Rust waPC guest.
pub fn dispatch(op: &str, payload: &[u8]) -> CallResult {
    // Copy the fn pointer out first: the registry must not stay borrowed
    // while the handler runs.
    let handler = HANDLERS.with(|handlers| {
        handlers
            .borrow()
            .iter()
            .find(|(n, _)| n == op)
            .map(|(_, h)| *h)
    });
    match handler {
        Some(handler) => handler(payload),
        None => Err(format!("No handler registered for function {}", op)),
    }
}

/// Severity of a [`log`] message, serialized as the lowercase names the
/// Kubewarden host maps onto its tracing levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Trace => "trace",
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

/// Sends a log line to the host through the Kubewarden logging callback
/// (binding `kubewarden`, namespace `tracing`, operation `log`).
///
/// Logging is best effort: a host that does not implement the callback must
/// not make the policy fail, so the outcome is ignored.
pub fn log(level: Level, message: &str) {
    let payload = serde_json::json!({ "level": level.as_str(), "message": message });
    if let Ok(bytes) = serde_json::to_vec(&payload) {
        let _ = host_call("kubewarden", "tracing", "log", &bytes);
    }
}

#[cfg(target_arch = "wasm32")]
mod imp {
    use super::CallResult;

    // Pointers and lengths are wasm i32s; on wasm32 `usize` and pointers are
    // 32 bits wide, so these Rust types lower to exactly the ABI signatures.
    #[link(wasm_import_module = "wapc")]
    extern "C" {
        fn __guest_request(op_ptr: *mut u8, ptr: *mut u8);
        fn __guest_response(ptr: *const u8, len: usize);
        fn __guest_error(ptr: *const u8, len: usize);
        #[allow(clippy::too_many_arguments)]
        fn __host_call(
            bd_ptr: *const u8,
            bd_len: usize,
            ns_ptr: *const u8,
            ns_len: usize,
            op_ptr: *const u8,
            op_len: usize,
            ptr: *const u8,
            len: usize,
        ) -> usize;
        fn __host_response_len() -> usize;
        fn __host_response(ptr: *mut u8);
        fn __host_error_len() -> usize;
        fn __host_error(ptr: *mut u8);
        fn __console_log(ptr: *const u8, len: usize);
    }

    /// Entry point of every waPC invocation. The host has stored the
    /// operation name and payload; their lengths arrive as arguments so that
    /// the guest can allocate the buffers `__guest_request` fills.
    #[no_mangle]
    pub extern "C" fn __guest_call(op_len: i32, msg_len: i32) -> i32 {
        let mut op = vec![0u8; usize::try_from(op_len).unwrap_or(0)];
        let mut msg = vec![0u8; usize::try_from(msg_len).unwrap_or(0)];
        unsafe { __guest_request(op.as_mut_ptr(), msg.as_mut_ptr()) };

        let op = String::from_utf8_lossy(&op);
        match super::dispatch(&op, &msg) {
            Ok(response) => {
                unsafe { __guest_response(response.as_ptr(), response.len()) };
                1
            }
            Err(message) => {
                // Rust strings are UTF-8, which the host requires here.
                unsafe { __guest_error(message.as_ptr(), message.len()) };
                0
            }
        }
    }

    pub fn host_call(binding: &str, namespace: &str, operation: &str, payload: &[u8]) -> CallResult {
        let status = unsafe {
            __host_call(
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
        // 1 = success (response stored), anything else = failure (error stored).
        if status == 1 {
            let mut response = vec![0u8; unsafe { __host_response_len() }];
            unsafe { __host_response(response.as_mut_ptr()) };
            Ok(response)
        } else {
            let mut error = vec![0u8; unsafe { __host_error_len() }];
            unsafe { __host_error(error.as_mut_ptr()) };
            Err(String::from_utf8_lossy(&error).into_owned())
        }
    }

    pub fn console_log(message: &str) {
        unsafe { __console_log(message.as_ptr(), message.len()) }
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    use super::CallResult;

    pub fn host_call(_: &str, _: &str, _: &str, _: &[u8]) -> CallResult {
        Err("host calls are only available inside a waPC host".to_string())
    }

    pub fn console_log(message: &str) {
        eprintln!("{}", message);
    }
}

/// Calls the host (`__host_call`) and returns its response payload, or the
/// host's error string when it reports a failure.
pub fn host_call(binding: &str, namespace: &str, operation: &str, payload: &[u8]) -> CallResult {
    imp::host_call(binding, namespace, operation, payload)
}

/// Writes a raw line through waPC's `__console_log` (logged by the host at
/// INFO level). Prefer [`log`] for Kubewarden hosts.
pub fn console_log(message: &str) {
    imp::console_log(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo(payload: &[u8]) -> CallResult {
        Ok(payload.to_vec())
    }

    fn fail(_: &[u8]) -> CallResult {
        Err("boom".to_string())
    }

    #[test]
    fn dispatches_registered_operations() {
        register_function("echo", echo);
        assert_eq!(dispatch("echo", b"hi"), Ok(b"hi".to_vec()));
        register_function("echo", fail); // replaces
        assert_eq!(dispatch("echo", b"hi"), Err("boom".to_string()));
    }

    #[test]
    fn unknown_operation() {
        assert_eq!(
            dispatch("nope", b""),
            Err("No handler registered for function nope".to_string())
        );
    }
}
