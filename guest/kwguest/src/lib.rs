//! kwguest: a deliberately small toolkit for writing Kubewarden waPC policies
//! in Rust with nothing but serde/serde_json (the crates Debian vendors), so
//! that the test policies of kwserver build offline with Debian's rustc 1.63.
//!
//! It is *not* the upstream `kubewarden-policy-sdk`: it only implements what
//! kwserver's own test policies need, following the behaviour described in
//! `kubewarden-compat.md` §1 (waPC ABI) and §2 (guest protocol).
//!
//! # Writing a policy
//!
//! ```ignore
//! #[no_mangle]
//! pub extern "C" fn wapc_init() {
//!     // registers "validate", "validate_settings" and "protocol_version"
//!     kwguest::register_policy::<Settings>(validate);
//! }
//!
//! fn validate(payload: &[u8]) -> kwguest::CallResult {
//!     let req = kwguest::ValidationRequest::<Settings>::decode(payload)?;
//!     // ... inspect req.request / req.settings ...
//!     kwguest::accept()
//! }
//! ```
//!
//! Handlers are registered at run time from the module's `wapc_init` export,
//! exactly like waPC guests written with the upstream SDKs: every waPC host
//! calls `wapc_init` once per instance before the first `__guest_call`.
//! `__guest_call` itself is exported by this crate (see [`wapc`]).

pub mod decode;
pub mod json;
pub mod podspec;
pub mod protocol;
pub mod wapc;

pub use protocol::{
    accept, decode_payload, mutate, protocol_version, reject, validate_settings,
    AdmissionRequest, GroupVersionKind, GroupVersionResource, SettingsValidationResponse,
    Validatable, ValidationRequest, ValidationResponse,
};
pub use wapc::{console_log, host_call, log, register_function, CallResult, Handler, Level};

/// Registers the three operations every Kubewarden policy answers:
/// `validate` (the given handler), `validate_settings` (decodes settings of
/// type `S` and runs [`Validatable::validate`]) and `protocol_version`.
///
/// Call it from the policy's `wapc_init` export.
pub fn register_policy<S>(validate: Handler)
where
    S: serde::de::DeserializeOwned + Validatable,
{
    register_function("validate", validate);
    register_function("validate_settings", validate_settings::<S>);
    register_function("protocol_version", protocol_version);
}

/// Like [`register_policy`], with a hand-written `validate_settings` handler:
/// for policies whose upstream reports undecodable settings as invalid
/// settings (`{"valid":false,...}`, e.g. the Go SDK ones) rather than as a
/// call failure.
pub fn register_policy_with(validate: Handler, validate_settings: Handler) {
    register_function("validate", validate);
    register_function("validate_settings", validate_settings);
    register_function("protocol_version", protocol_version);
}

/// The `validate_settings` answer for a validation outcome:
/// `{"valid":true}` or `{"valid":false,"message":...}`.
pub fn settings_response(outcome: Result<(), String>) -> CallResult {
    let response = match outcome {
        Ok(()) => SettingsValidationResponse {
            valid: true,
            message: None,
        },
        Err(message) => SettingsValidationResponse {
            valid: false,
            message: Some(message),
        },
    };
    serde_json::to_vec(&response).map_err(|err| err.to_string())
}
