//! capabilities-psp: replacement for the PodSecurityPolicy capability
//! controls (`allowedCapabilities`, `requiredDropCapabilities`,
//! `defaultAddCapabilities`), with the settings, defaults, messages and
//! mutation of the Kubewarden policy of the same name.
//!
//! Containers and init containers are inspected. Capabilities added beyond
//! `allowed_capabilities` (unless it holds `*`), or added although listed in
//! `required_drop_capabilities`, are rejected. Accepted Pods are mutated so
//! that every container adds `default_add_capabilities` and drops
//! `required_drop_capabilities`.
//!
//! Capability sets are printed in sorted order (`{"A", "B"}`); the upstream
//! prints them in hash order.

use std::collections::BTreeSet;

use kwguest::json::{opt_object, opt_object_list, opt_string_list};
use kwguest::podspec::{pod_spec_mut, security_context, security_context_mut};
use kwguest::{CallResult, ValidationRequest};
use serde::Deserialize;
use serde_json::{Map, Value};

#[derive(Debug, Default, Deserialize)]
struct Settings {
    #[serde(default)]
    allowed_capabilities: BTreeSet<String>,
    #[serde(default)]
    required_drop_capabilities: BTreeSet<String>,
    #[serde(default)]
    default_add_capabilities: BTreeSet<String>,
}

impl Settings {
    fn allow_all(&self) -> bool {
        self.allowed_capabilities.contains("*")
    }
}

fn set(items: impl Iterator<Item = String>) -> BTreeSet<String> {
    items.collect()
}

impl kwguest::Validatable for Settings {
    fn validate(&self) -> Result<(), String> {
        let denied = set(self
            .allowed_capabilities
            .intersection(&self.required_drop_capabilities)
            .cloned());
        if !denied.is_empty() {
            return Err(format!(
                "These capabilities cannot be allowed because they are also required to be dropped: {:?}",
                denied
            ));
        }
        let denied = set(self
            .default_add_capabilities
            .intersection(&self.required_drop_capabilities)
            .cloned());
        if !denied.is_empty() {
            return Err(format!(
                "These capabilities cannot be added by default because they are also required to be dropped: {:?}",
                denied
            ));
        }
        let denied = set(self
            .default_add_capabilities
            .difference(&self.allowed_capabilities)
            .cloned());
        if !denied.is_empty() && !self.allow_all() {
            return Err(format!(
                "These capabilities cannot be added by default because they are not allowed: {:?}",
                denied
            ));
        }
        Ok(())
    }
}

#[no_mangle]
pub extern "C" fn wapc_init() {
    kwguest::register_policy::<Settings>(validate);
}

const LISTS: [&str; 2] = ["containers", "initContainers"];

fn validate(payload: &[u8]) -> CallResult {
    let req = ValidationRequest::<Settings>::decode(payload)?;
    let settings = &req.settings;
    let spec = match req.request.pod_spec() {
        Some(spec) => spec,
        None => return kwguest::accept(),
    };
    let added = match added_capabilities(spec) {
        Ok(added) => added,
        Err(err) => {
            return kwguest::reject(
                &format!("Error deserializing Pod specification: {}", err),
                None,
            )
        }
    };

    if !settings.allow_all() {
        let not_allowed = set(added.difference(&settings.allowed_capabilities).cloned());
        if !not_allowed.is_empty() {
            return kwguest::reject(
                &format!(
                    "PSP capabilities policies doesn't allow these capabilities to be added: {:?}",
                    not_allowed
                ),
                None,
            );
        }
    }
    let must_be_dropped = set(added
        .intersection(&settings.required_drop_capabilities)
        .cloned());
    if !must_be_dropped.is_empty() {
        return kwguest::reject(
            &format!(
                "PSP capabilities policies doesn't allow these capabilities to be added because they are on the `required_drop_capabilities` list: {:?}",
                must_be_dropped
            ),
            None,
        );
    }

    if settings.default_add_capabilities.is_empty() && settings.required_drop_capabilities.is_empty() {
        return kwguest::accept();
    }
    let kind = req.request.object_kind().to_string();
    let mut object = req.request.object.clone();
    let spec = match pod_spec_mut(&kind, &mut object) {
        Some(spec) => spec,
        None => return kwguest::accept(),
    };
    let mut changed = false;
    for key in LISTS {
        if let Some(containers) = spec.get_mut(key).and_then(Value::as_array_mut) {
            for container in containers.iter_mut() {
                changed |= patch_container(container, settings);
            }
        }
    }
    if changed {
        kwguest::mutate(object)
    } else {
        kwguest::accept()
    }
}

/// Every capability added by a container or an init container.
fn added_capabilities(spec: &Value) -> Result<BTreeSet<String>, String> {
    let mut caps = BTreeSet::new();
    for key in LISTS {
        let containers = opt_object_list(spec, key).map_err(|e| e.to_string())?;
        for container in containers.into_iter().flatten() {
            let sc = match security_context(container).map_err(|e| e.to_string())? {
                Some(sc) => sc,
                None => continue,
            };
            if opt_object(sc, "capabilities").map_err(|e| e.to_string())?.is_none() {
                continue;
            }
            let add = opt_string_list(&sc["capabilities"], "add").map_err(|e| e.to_string())?;
            // The "drop" list must be well-formed too, the mutation extends it.
            opt_string_list(&sc["capabilities"], "drop").map_err(|e| e.to_string())?;
            caps.extend(add.into_iter().flatten());
        }
    }
    Ok(caps)
}

/// Adds the default capabilities and the required drops a container lacks.
/// Once something changes, both `add` and `drop` are written out (possibly
/// empty), like the upstream. Containers that need nothing are left as they
/// are.
fn patch_container(container: &mut Value, settings: &Settings) -> bool {
    let current = |list: &str| -> Vec<String> {
        container
            .pointer(&format!("/securityContext/capabilities/{}", list))
            .and_then(Value::as_array)
            .map(|items| {
                items
                    .iter()
                    .filter_map(|i| i.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut add = current("add");
    let mut drop = current("drop");
    let before = (add.len(), drop.len());
    for cap in &settings.default_add_capabilities {
        if !add.contains(cap) {
            add.push(cap.clone());
        }
    }
    for cap in &settings.required_drop_capabilities {
        if !drop.contains(cap) {
            drop.push(cap.clone());
        }
    }
    if (add.len(), drop.len()) == before {
        return false;
    }
    let sc = match security_context_mut(container) {
        Some(sc) => sc,
        None => return false,
    };
    let capabilities = sc
        .entry("capabilities".to_string())
        .or_insert_with(|| Value::Object(Map::new()));
    if !capabilities.is_object() {
        *capabilities = Value::Object(Map::new());
    }
    capabilities["add"] = Value::from(add);
    capabilities["drop"] = Value::from(drop);
    true
}
