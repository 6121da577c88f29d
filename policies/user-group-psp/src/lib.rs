//! user-group-psp: replacement for the PodSecurityPolicy `runAsUser`,
//! `runAsGroup` and `supplementalGroups` controls, with the settings,
//! defaults, messages and mutations of the Kubewarden policy of the same name.
//!
//! Containers and init containers are checked (init containers first). A
//! container whose user/group is missing gets the default (the minimum of the
//! first range) under `MustRunAs`, and `runAsNonRoot: true` under
//! `MustRunAsNonRoot`; when any container was mutated, the Pod-level security
//! context is enforced and mutated the same way. `supplementalGroups` is
//! enforced on the Pod security context.
//!
//! `validate_only: true` turns the mutations into rejections. Unlike the
//! upstream (which then rejects even valid values), only *missing* values are
//! rejected in that mode: `Missing user ID`, `Missing group ID`, `Missing
//! supplemental group ID`, or, for `MustRunAsNonRoot`, `RunAsNonRoot should be
//! set to true` unless the container sets `runAsNonRoot: true` or a non-zero
//! `runAsUser`.
//!
//! `validate_container_image_configuration: true` also checks the `USER` of
//! each container image, fetched through the host capability
//! `kubewarden/oci/v1/oci_manifest_config`.

mod settings;

use kwguest::json::{opt_array, opt_bool, opt_i64, opt_object_list, opt_str};
use kwguest::podspec::pod_spec_mut;
use kwguest::{CallResult, Level, ValidationRequest};
use serde_json::{Map, Value};
use settings::{Rule, RuleStrategy, Settings};

#[no_mangle]
pub extern "C" fn wapc_init() {
    kwguest::register_policy::<Settings>(validate);
}

/// Why a request is rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Violation {
    UserIdOutsideRanges,
    GroupIdOutsideRanges,
    ShouldRunAsNonRoot,
    CannotUseRootUserId,
    ImageConfigGroupId(String),
    ImageConfigUserId(String),
    ImageConfigUserIdOutsideRanges,
    ImageConfigUserIdCannotBeRoot,
    ImageConfigGroupIdOutsideRanges,
    MissingUserId,
    MissingGroupId,
    MissingSupplementalGroupId,
    /// The object is not a valid Kubernetes object.
    CannotParse,
    /// The container image configuration could not be obtained.
    Host(String),
}

impl Violation {
    fn message(&self) -> String {
        match self {
            Violation::UserIdOutsideRanges => "User ID outside defined ranges".to_string(),
            Violation::GroupIdOutsideRanges => "Group ID is outside defined ranges".to_string(),
            Violation::ShouldRunAsNonRoot => "RunAsNonRoot should be set to true".to_string(),
            Violation::CannotUseRootUserId => {
                "Invalid user ID: cannot run container with root ID (0)".to_string()
            }
            Violation::ImageConfigGroupId(id) => format!(
                "Invalid group ID in the container image configuration: \"{}\"",
                id
            ),
            Violation::ImageConfigUserId(id) => format!(
                "Invalid user ID in the container image configuration: \"{}\"",
                id
            ),
            Violation::ImageConfigUserIdOutsideRanges => {
                "User ID defined in the container image is outside defined ranges".to_string()
            }
            Violation::ImageConfigUserIdCannotBeRoot => {
                "User ID defined in the container image cannot be root ID (0)".to_string()
            }
            Violation::ImageConfigGroupIdOutsideRanges => {
                "Group ID defined in the container image is outside defined ranges".to_string()
            }
            Violation::MissingUserId => "Missing user ID".to_string(),
            Violation::MissingGroupId => "Missing group ID".to_string(),
            Violation::MissingSupplementalGroupId => "Missing supplemental group ID".to_string(),
            Violation::CannotParse => "Cannot parse validation request".to_string(),
            Violation::Host(message) => message.clone(),
        }
    }
}

impl From<kwguest::json::TypeMismatch> for Violation {
    fn from(_: kwguest::json::TypeMismatch) -> Self {
        Violation::CannotParse
    }
}

/// `(user, group)` from an image's `USER` directive (`uid` or `uid:gid`).
type ImageIds = (Option<i64>, Option<i64>);

fn validate(payload: &[u8]) -> CallResult {
    let req = ValidationRequest::<Settings>::decode(payload)?;
    let kind = req.request.object_kind().to_string();
    let mut object = req.request.object;
    let spec = match pod_spec_mut(&kind, &mut object) {
        Some(spec) => spec,
        // No Pod spec, no data to validate.
        None => return kwguest::accept(),
    };
    match enforce(spec, &req.settings) {
        Ok(true) => kwguest::mutate(object),
        Ok(false) => kwguest::accept(),
        Err(violation) => kwguest::reject(&violation.message(), None),
    }
}

/// Checks (and mutates) a Pod spec; `Ok(true)` when it was mutated.
fn enforce(spec: &mut Value, settings: &Settings) -> Result<bool, Violation> {
    let mut mutated = false;
    for key in ["initContainers", "containers"] {
        opt_object_list(spec, key)?;
        if let Some(containers) = spec.get_mut(key).and_then(Value::as_array_mut) {
            for container in containers.iter_mut() {
                mutated |= enforce_container(container, settings)?;
            }
        }
    }
    // Container security contexts take precedence over the Pod one: it is
    // only enforced when some container had to be fixed.
    if mutated {
        mutated |= enforce_holder(spec, settings, None)?;
    }
    mutated |= enforce_supplemental_groups(spec, settings)?;
    Ok(mutated)
}

fn enforce_container(container: &mut Value, settings: &Settings) -> Result<bool, Violation> {
    let image = if settings.validate_container_image_configuration {
        image_ids(container)?
    } else {
        None
    };
    enforce_holder(container, settings, image)
}

/// Enforces the user and group rules on the `securityContext` of `holder` (a
/// container or a Pod spec), writing back a mutated security context.
fn enforce_holder(
    holder: &mut Value,
    settings: &Settings,
    image: Option<Result<ImageIds, Violation>>,
) -> Result<bool, Violation> {
    let current = kwguest::podspec::security_context(holder)?.cloned();
    let mut mutated = false;
    let mut sc = current;
    if let Some(new) = enforce_run_as_user(sc.as_ref(), settings, image.clone())? {
        sc = Some(new);
        mutated = true;
    }
    if let Some(new) = enforce_run_as_group(sc.as_ref(), settings, image)? {
        sc = Some(new);
        mutated = true;
    }
    if mutated {
        if let (Some(map), Some(sc)) = (holder.as_object_mut(), sc) {
            map.insert("securityContext".to_string(), sc);
        }
    }
    Ok(mutated)
}

fn empty() -> Value {
    Value::Object(Map::new())
}

fn set(sc: &mut Value, key: &str, value: Value) {
    if let Some(map) = sc.as_object_mut() {
        map.insert(key.to_string(), value);
    }
}

fn default_id(strategy: &RuleStrategy) -> Option<i64> {
    strategy.ranges.first().map(|range| range.min)
}

fn enforce_run_as_user(
    sc: Option<&Value>,
    settings: &Settings,
    image: Option<Result<ImageIds, Violation>>,
) -> Result<Option<Value>, Violation> {
    // An unreadable image USER is an error whatever the rule.
    let image_user = match image {
        Some(ids) => ids?.0,
        None => None,
    };
    let mut sc = sc.cloned().unwrap_or_else(empty);
    let strategy = &settings.run_as_user;
    let run_as_user = opt_i64(&sc, "runAsUser")?;
    match strategy.rule {
        Rule::MustRunAs => {
            if let Some(user) = image_user {
                if !strategy.is_valid_id(user) {
                    return Err(Violation::ImageConfigUserIdOutsideRanges);
                }
            }
            if strategy.overwrite || (run_as_user.is_none() && !settings.validate_only) {
                if let Some(id) = default_id(strategy) {
                    set(&mut sc, "runAsUser", Value::from(id));
                    return Ok(Some(sc));
                }
            }
            match run_as_user {
                Some(user) if !strategy.is_valid_id(user) => Err(Violation::UserIdOutsideRanges),
                None if settings.validate_only => Err(Violation::MissingUserId),
                _ => Ok(None),
            }
        }
        Rule::MustRunAsNonRoot => {
            if image_user == Some(0) {
                return Err(Violation::ImageConfigUserIdCannotBeRoot);
            }
            let run_as_non_root = opt_bool(&sc, "runAsNonRoot")?;
            if run_as_non_root == Some(false) {
                return Err(Violation::ShouldRunAsNonRoot);
            }
            if run_as_user == Some(0) {
                return Err(Violation::CannotUseRootUserId);
            }
            if settings.validate_only {
                return if run_as_non_root == Some(true) || run_as_user.is_some() {
                    Ok(None)
                } else {
                    Err(Violation::ShouldRunAsNonRoot)
                };
            }
            set(&mut sc, "runAsNonRoot", Value::Bool(true));
            Ok(Some(sc))
        }
        Rule::MayRunAs | Rule::RunAsAny => Ok(None),
    }
}

fn enforce_run_as_group(
    sc: Option<&Value>,
    settings: &Settings,
    image: Option<Result<ImageIds, Violation>>,
) -> Result<Option<Value>, Violation> {
    let mut sc = sc.cloned().unwrap_or_else(empty);
    let strategy = &settings.run_as_group;
    let run_as_group = opt_i64(&sc, "runAsGroup")?;
    let check_image_group = |image: Option<Result<ImageIds, Violation>>| -> Result<(), Violation> {
        if let Some(ids) = image {
            if let Some(group) = ids?.1 {
                if !strategy.is_valid_id(group) {
                    return Err(Violation::ImageConfigGroupIdOutsideRanges);
                }
            }
        }
        Ok(())
    };
    match strategy.rule {
        Rule::MustRunAs => {
            check_image_group(image)?;
            if strategy.overwrite || (run_as_group.is_none() && !settings.validate_only) {
                if let Some(id) = default_id(strategy) {
                    set(&mut sc, "runAsGroup", Value::from(id));
                    return Ok(Some(sc));
                }
            }
            match run_as_group {
                Some(group) if !strategy.is_valid_id(group) => Err(Violation::GroupIdOutsideRanges),
                None if settings.validate_only => Err(Violation::MissingGroupId),
                _ => Ok(None),
            }
        }
        Rule::MayRunAs => {
            check_image_group(image)?;
            match run_as_group {
                Some(group) if !strategy.is_valid_id(group) => Err(Violation::GroupIdOutsideRanges),
                _ => Ok(None),
            }
        }
        Rule::RunAsAny | Rule::MustRunAsNonRoot => Ok(None),
    }
}

fn enforce_supplemental_groups(spec: &mut Value, settings: &Settings) -> Result<bool, Violation> {
    let strategy = &settings.supplemental_groups;
    let sc = kwguest::podspec::security_context(spec)?;
    let groups: Option<Vec<i64>> = match sc {
        None => None,
        Some(sc) => match opt_array(sc, "supplementalGroups")? {
            None => None,
            Some(items) => Some(
                items
                    .iter()
                    .map(|item| item.as_i64().ok_or(Violation::CannotParse))
                    .collect::<Result<_, _>>()?,
            ),
        },
    };
    let all_valid = |groups: &[i64]| groups.iter().all(|g| strategy.is_valid_id(*g));
    match strategy.rule {
        Rule::MustRunAs => {
            if strategy.overwrite || (groups.is_none() && !settings.validate_only) {
                if let Some(id) = default_id(strategy) {
                    if let Some(sc) = kwguest::podspec::security_context_mut(spec) {
                        sc.insert("supplementalGroups".to_string(), Value::from(vec![id]));
                        return Ok(true);
                    }
                }
            }
            match groups {
                Some(groups) if !all_valid(&groups) => Err(Violation::GroupIdOutsideRanges),
                Some(groups) if groups.is_empty() && settings.validate_only => {
                    Err(Violation::MissingSupplementalGroupId)
                }
                None if settings.validate_only => Err(Violation::MissingSupplementalGroupId),
                _ => Ok(false),
            }
        }
        Rule::MayRunAs => match groups {
            Some(groups) if !all_valid(&groups) => Err(Violation::GroupIdOutsideRanges),
            _ => Ok(false),
        },
        Rule::RunAsAny | Rule::MustRunAsNonRoot => Ok(false),
    }
}

/// The user and group of a container's image, from its OCI configuration.
/// `None` for Windows images, which the check skips.
fn image_ids(container: &Value) -> Result<Option<Result<ImageIds, Violation>>, Violation> {
    let image = match opt_str(container, "image")? {
        Some(image) => image,
        None => return Err(Violation::CannotParse),
    };
    let request = serde_json::to_vec(&Value::from(image)).map_err(|e| Violation::Host(e.to_string()))?;
    let response = kwguest::host_call("kubewarden", "oci", "v1/oci_manifest_config", &request)
        .map_err(|err| {
            Violation::Host(format!(
                "Cannot fetch the manifest and configuration of image {}: {}",
                image, err
            ))
        })?;
    let response: Value = serde_json::from_slice(&response).map_err(|err| {
        Violation::Host(format!(
            "Cannot decode the manifest and configuration of image {}: {}",
            image, err
        ))
    })?;
    let config = &response["config"];
    if config.get("os").and_then(Value::as_str) == Some("windows") {
        kwguest::log(
            Level::Warn,
            &format!(
                "Windows containers are not supported by the policy. Skipping container image configuration user validation. image={}",
                image
            ),
        );
        return Ok(None);
    }
    let user = config
        .pointer("/config/User")
        .and_then(Value::as_str)
        .unwrap_or("");
    Ok(Some(parse_image_user(user)))
}

/// `uid[:gid]`; an empty `USER` means the image does not set one.
fn parse_image_user(user: &str) -> Result<ImageIds, Violation> {
    if user.is_empty() {
        return Ok((None, None));
    }
    let parts: Vec<&str> = user.split(':').collect();
    let uid = parts[0]
        .parse::<i64>()
        .map_err(|_| Violation::ImageConfigUserId(parts[0].to_string()))?;
    if parts.len() == 2 {
        let gid = parts[1]
            .parse::<i64>()
            .map_err(|_| Violation::ImageConfigGroupId(parts[1].to_string()))?;
        return Ok((Some(uid), Some(gid)));
    }
    Ok((Some(uid), None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_users() {
        assert_eq!(parse_image_user(""), Ok((None, None)));
        assert_eq!(parse_image_user("1000"), Ok((Some(1000), None)));
        assert_eq!(parse_image_user("1000:10"), Ok((Some(1000), Some(10))));
        assert_eq!(
            parse_image_user("nginx"),
            Err(Violation::ImageConfigUserId("nginx".to_string()))
        );
        assert_eq!(
            parse_image_user("1:x"),
            Err(Violation::ImageConfigGroupId("x".to_string()))
        );
    }
}
