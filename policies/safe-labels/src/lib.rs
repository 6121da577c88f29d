//! safe-labels: validates the labels of any object, with the settings,
//! defaults and messages of the Kubewarden `safe-labels` policy (a Go policy
//! upstream):
//!
//! * `denied_labels`: labels that must not be present;
//! * `mandatory_labels`: labels that must be present;
//! * `constrained_labels`: label name -> regular expression (Go RE2 syntax,
//!   unanchored match) its value must match, when present.
//!
//! Violations are reported in one message, in the order denied, constrained,
//! missing mandatory, joined with `. `. Labels are listed in key order (the
//! API server serializes them sorted); missing mandatory labels sorted too
//! (upstream: set order).

mod goregex;

use std::collections::{BTreeMap, BTreeSet};

use kwguest::CallResult;
use regex::Regex;
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Default, Deserialize)]
struct RawSettings {
    #[serde(default)]
    denied_labels: Option<Vec<String>>,
    #[serde(default)]
    mandatory_labels: Option<Vec<String>>,
    #[serde(default)]
    constrained_labels: Option<BTreeMap<String, Option<String>>>,
}

struct Settings {
    denied: BTreeSet<String>,
    mandatory: BTreeSet<String>,
    constrained: BTreeMap<String, Regex>,
}

impl Settings {
    /// Decodes and compiles the settings; the error text is what the upstream
    /// reports after `Provided settings are not valid: `.
    fn from_value(value: Value) -> Result<Settings, String> {
        let raw: RawSettings = serde_json::from_value(value).map_err(|e| e.to_string())?;
        let mut constrained = BTreeMap::new();
        for (label, expression) in raw.constrained_labels.unwrap_or_default() {
            let expression = match expression {
                Some(expression) => expression,
                None => return Err(format!("constrained label {:?} cannot be null", label)),
            };
            constrained.insert(label, goregex::compile(&expression)?);
        }
        Ok(Settings {
            denied: raw.denied_labels.unwrap_or_default().into_iter().collect(),
            mandatory: raw.mandatory_labels.unwrap_or_default().into_iter().collect(),
            constrained,
        })
    }

    fn check(&self) -> Result<(), String> {
        let mut errors = Vec::new();
        let constrained_and_denied: Vec<&str> = self
            .constrained
            .keys()
            .filter(|label| self.denied.contains(*label))
            .map(String::as_str)
            .collect();
        if !constrained_and_denied.is_empty() {
            errors.push(format!(
                "These labels cannot be constrained and denied at the same time: {}",
                constrained_and_denied.join(",")
            ));
        }
        let mandatory_and_denied: Vec<&str> = self
            .mandatory
            .intersection(&self.denied)
            .map(String::as_str)
            .collect();
        if !mandatory_and_denied.is_empty() {
            errors.push(format!(
                "These labels cannot be mandatory and denied at the same time: {}",
                mandatory_and_denied.join(",")
            ));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

#[no_mangle]
pub extern "C" fn wapc_init() {
    kwguest::register_policy_with(validate, validate_settings);
}

fn validate_settings(payload: &[u8]) -> CallResult {
    let outcome = serde_json::from_slice::<Value>(payload)
        .map_err(|e| e.to_string())
        .and_then(Settings::from_value)
        .and_then(|settings| settings.check());
    kwguest::settings_response(outcome.map_err(|e| format!("Provided settings are not valid: {}", e)))
}

#[derive(Deserialize)]
struct Payload {
    #[serde(default)]
    request: Value,
    #[serde(default)]
    settings: Value,
}

fn validate(payload: &[u8]) -> CallResult {
    let payload: Payload = match serde_json::from_slice(payload) {
        Ok(payload) => payload,
        Err(_) => return kwguest::reject("Not a valid JSON document", Some(400)),
    };
    let settings = match Settings::from_value(payload.settings) {
        Ok(settings) => settings,
        Err(err) => return kwguest::reject(&err, Some(400)),
    };
    let labels = payload
        .request
        .pointer("/object/metadata/labels")
        .and_then(Value::as_object);

    let mut denied = Vec::new();
    let mut constrained = Vec::new();
    let mut present = BTreeSet::new();
    for (label, value) in labels.into_iter().flatten() {
        present.insert(label.as_str());
        if settings.denied.contains(label) {
            denied.push(label.as_str());
            continue;
        }
        if let Some(regex) = settings.constrained.get(label) {
            let text = match value {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            };
            if !regex.is_match(&text) {
                constrained.push(label.as_str());
            }
        }
    }
    let missing: Vec<&str> = settings
        .mandatory
        .iter()
        .map(String::as_str)
        .filter(|label| !present.contains(label))
        .collect();

    let mut errors = Vec::new();
    if !denied.is_empty() {
        errors.push(format!("The following labels are denied: {}", denied.join(",")));
    }
    if !constrained.is_empty() {
        errors.push(format!(
            "The following labels are violating user constraints: {}",
            constrained.join(",")
        ));
    }
    if !missing.is_empty() {
        errors.push(format!(
            "The following mandatory labels are missing: {}",
            missing.join(",")
        ));
    }
    if errors.is_empty() {
        kwguest::accept()
    } else {
        kwguest::reject(&errors.join(". "), None)
    }
}
