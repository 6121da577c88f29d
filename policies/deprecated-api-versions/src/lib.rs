//! deprecated-api-versions: rejects objects of Kubernetes API versions that
//! are deprecated or removed in the configured Kubernetes release, with the
//! settings, defaults and messages of the Kubewarden policy of the same name.
//!
//! Settings: `kubernetes_version` (required, semver, an optional leading `v`)
//! and `deny_on_deprecation` (default `true`; when `false`, APIs that are
//! deprecated but not yet removed are accepted). The version is matched
//! against the request's `kind` (`group/version` and `kind`).

mod semver;
mod table;

use kwguest::{CallResult, ValidationRequest};
use semver::Version;
use serde::{Deserialize, Deserializer};

#[derive(Debug, Deserialize)]
struct Settings {
    #[serde(deserialize_with = "version")]
    kubernetes_version: Version,
    #[serde(default = "default_true")]
    deny_on_deprecation: bool,
}

fn default_true() -> bool {
    true
}

fn version<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Version, D::Error> {
    let text = String::deserialize(deserializer)?;
    Version::parse(text.strip_prefix('v').unwrap_or(&text)).map_err(serde::de::Error::custom)
}

impl kwguest::Validatable for Settings {
    fn validate(&self) -> Result<(), String> {
        if self.kubernetes_version == Version::new(0, 0, 1) {
            Err("Please provide a kubernetes version".to_string())
        } else {
            Ok(())
        }
    }
}

#[no_mangle]
pub extern "C" fn wapc_init() {
    kwguest::register_policy::<Settings>(validate);
}

fn validate(payload: &[u8]) -> CallResult {
    let req = ValidationRequest::<Settings>::decode(payload)?;
    let kind = &req.request.kind;
    let api_version = format!("{}/{}", kind.group, kind.version);
    let k8s = &req.settings.kubernetes_version;
    let rule = match table::RULES
        .iter()
        .find(|rule| rule.version == api_version && rule.kind == kind.kind && rule.applies(k8s))
    {
        Some(rule) => rule,
        None => return kwguest::accept(),
    };
    if !req.settings.deny_on_deprecation && rule.only_deprecated(k8s) {
        return kwguest::accept();
    }
    kwguest::reject(&rule.message(), None)
}
