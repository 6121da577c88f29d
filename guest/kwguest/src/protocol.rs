//! Kubewarden guest protocol types (kubewarden-compat.md §2): the payloads of
//! `validate`, `validate_settings` and `protocol_version`.

use std::collections::BTreeMap;

use serde::de::{DeserializeOwned, Deserializer};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::wapc::CallResult;

/// Payload of the `validate` operation.
///
/// `R` is the request type: the lenient [`AdmissionRequest`] for Kubernetes
/// policies (the default), or any deserializable type (e.g.
/// `serde_json::Value`) for raw policies.
#[derive(Debug, Deserialize)]
#[serde(bound(deserialize = "T: Deserialize<'de>, R: Deserialize<'de>"))]
pub struct ValidationRequest<T, R = AdmissionRequest> {
    pub request: R,
    pub settings: T,
}

impl<T: DeserializeOwned, R: DeserializeOwned> ValidationRequest<T, R> {
    /// Decodes a `validate` payload. The error is meant to be returned as is
    /// (with `?`) from the handler, which turns it into a waPC call failure.
    pub fn decode(payload: &[u8]) -> Result<Self, String> {
        decode_payload(payload)
    }
}

/// Decodes a JSON payload; on failure names the field and serde's reason:
/// `Error decoding validation payload: field `request.dryRun`: <serde_json
/// error>` (see [`crate::decode`]). The upstream Rust SDK puts the whole
/// payload where the field is; this error stays small whatever the payload.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, String> {
    serde_json::from_slice(payload).map_err(|err| crate::decode::decode_error(payload, &err))
}

/// `null` is as good as absent: the host omits null members, but a raw
/// caller or an older host may send them, and policies must not choke.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct GroupVersionKind {
    #[serde(deserialize_with = "null_as_default")]
    pub group: String,
    #[serde(deserialize_with = "null_as_default")]
    pub version: String,
    #[serde(deserialize_with = "null_as_default")]
    pub kind: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default)]
pub struct GroupVersionResource {
    #[serde(deserialize_with = "null_as_default")]
    pub group: String,
    #[serde(deserialize_with = "null_as_default")]
    pub version: String,
    #[serde(deserialize_with = "null_as_default")]
    pub resource: String,
}

/// The Kubernetes AdmissionRequest, parsed leniently: every member may be
/// missing or null. `object` is `Value::Null` for DELETE requests.
/// Free-form members (`userInfo`, `object`, `oldObject`, `options`) stay
/// `serde_json::Value`, which is all a policy needs and keeps modules small.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct AdmissionRequest {
    #[serde(deserialize_with = "null_as_default")]
    pub uid: String,
    #[serde(deserialize_with = "null_as_default")]
    pub kind: GroupVersionKind,
    #[serde(deserialize_with = "null_as_default")]
    pub resource: GroupVersionResource,
    pub sub_resource: Option<String>,
    pub request_kind: Option<GroupVersionKind>,
    pub request_resource: Option<GroupVersionResource>,
    pub request_sub_resource: Option<String>,
    #[serde(deserialize_with = "null_as_default")]
    pub name: String,
    #[serde(deserialize_with = "null_as_default")]
    pub namespace: String,
    #[serde(deserialize_with = "null_as_default")]
    pub operation: String,
    pub user_info: Value,
    pub object: Value,
    pub old_object: Value,
    pub dry_run: Option<bool>,
    pub options: Value,
}

impl AdmissionRequest {
    /// The kind of the object under review: `kind.kind` from the request,
    /// falling back to the object's own `kind` (test fixtures often omit
    /// one or the other).
    pub fn object_kind(&self) -> &str {
        if !self.kind.kind.is_empty() {
            return &self.kind.kind;
        }
        self.object.get("kind").and_then(Value::as_str).unwrap_or("")
    }

    /// The Pod spec embedded in `object`, if the object is a Pod or a
    /// workload kind known to [`crate::podspec`]; `None` otherwise (including
    /// DELETE requests, which carry no object).
    pub fn pod_spec(&self) -> Option<&Value> {
        crate::podspec::pod_spec(self.object_kind(), &self.object)
    }
}

/// Response of `validate`. Keys are snake_case; `None` members are omitted
/// (the host accepts missing optional keys).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ValidationResponse {
    pub accepted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mutated_object: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audit_annotations: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warnings: Option<Vec<String>>,
}

impl ValidationResponse {
    /// Serializes the response as the payload of a successful call.
    pub fn to_payload(&self) -> CallResult {
        serde_json::to_vec(self).map_err(|err| err.to_string())
    }
}

/// Accepts the request unchanged.
pub fn accept() -> CallResult {
    ValidationResponse {
        accepted: true,
        ..Default::default()
    }
    .to_payload()
}

/// Rejects the request with a message and an optional HTTP-like code.
pub fn reject(message: &str, code: Option<u16>) -> CallResult {
    ValidationResponse {
        accepted: false,
        message: Some(message.to_string()),
        code,
        ..Default::default()
    }
    .to_payload()
}

/// Accepts the request, replacing the object with `object` (the host turns
/// the difference into a JSON patch).
pub fn mutate(object: Value) -> CallResult {
    ValidationResponse {
        accepted: true,
        mutated_object: Some(object),
        ..Default::default()
    }
    .to_payload()
}

/// Response of `validate_settings`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SettingsValidationResponse {
    pub valid: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Semantic validation of policy settings, run after they decoded fine.
pub trait Validatable {
    /// `Err(message)` makes `validate_settings` answer `{"valid":false,...}`.
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Handler for the `validate_settings` operation.
///
/// * payload that does not decode as `T` → call failure
///   (`Error decoding validation payload: ...`), as the upstream SDK does;
/// * `T::validate` fails → `{"valid":false,"message":...}`;
/// * otherwise → `{"valid":true}`.
pub fn validate_settings<T: DeserializeOwned + Validatable>(payload: &[u8]) -> CallResult {
    let settings: T = decode_payload(payload)?;
    crate::settings_response(settings.validate())
}

/// Handler for the `protocol_version` operation: the JSON string `"v1"`.
pub fn protocol_version(_payload: &[u8]) -> CallResult {
    Ok(br#""v1""#.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Sleep {
        #[allow(dead_code)]
        sleep_milliseconds: u64,
    }
    impl Validatable for Sleep {}

    #[derive(Debug, Deserialize, Default)]
    #[serde(default)]
    struct Limit {
        max: u32,
    }
    impl Validatable for Limit {
        fn validate(&self) -> Result<(), String> {
            if self.max == 0 {
                Err("max must be positive".to_string())
            } else {
                Ok(())
            }
        }
    }

    #[test]
    fn settings_decode_error_text() {
        let err = validate_settings::<Sleep>(br#"{"sleepMilliseconds":"abc"}"#).unwrap_err();
        assert_eq!(
            err,
            r#"Error decoding validation payload: field `sleepMilliseconds`: invalid type: string "abc", expected u64 at line 1 column 26"#
        );
    }

    #[test]
    fn settings_semantic_validation() {
        assert_eq!(
            validate_settings::<Limit>(b"{}").unwrap(),
            br#"{"valid":false,"message":"max must be positive"}"#.to_vec()
        );
        assert_eq!(
            validate_settings::<Limit>(br#"{"max":3}"#).unwrap(),
            br#"{"valid":true}"#.to_vec()
        );
    }

    #[test]
    fn responses() {
        assert_eq!(accept().unwrap(), br#"{"accepted":true}"#.to_vec());
        assert_eq!(
            reject("no", Some(400)).unwrap(),
            br#"{"accepted":false,"message":"no","code":400}"#.to_vec()
        );
        assert_eq!(
            mutate(json!({"a": 1})).unwrap(),
            br#"{"accepted":true,"mutated_object":{"a":1}}"#.to_vec()
        );
        assert_eq!(protocol_version(b"").unwrap(), br#""v1""#.to_vec());
    }

    #[test]
    fn lenient_admission_request() {
        let payload = br#"{"request":{"uid":null,"kind":{"kind":"Pod"},"object":null,"extra":1},"settings":{}}"#;
        let req = ValidationRequest::<Value>::decode(payload).unwrap();
        assert_eq!(req.request.uid, "");
        assert_eq!(req.request.object_kind(), "Pod");
        assert!(req.request.object.is_null());
        assert!(req.request.pod_spec().is_none());

        let req = ValidationRequest::<Value>::decode(br#"{"request":{},"settings":{}}"#).unwrap();
        assert_eq!(req.request.operation, "");
    }

    #[test]
    fn raw_request() {
        let payload = br#"{"request":{"user":"tonio"},"settings":{}}"#;
        let req = ValidationRequest::<Value, Value>::decode(payload).unwrap();
        assert_eq!(req.request["user"], "tonio");
    }

    #[test]
    fn validate_decode_error_text() {
        let err = ValidationRequest::<Value>::decode(b"nope").unwrap_err();
        assert!(err.starts_with("Error decoding validation payload: expected"), "{}", err);
    }
}
