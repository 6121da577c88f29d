//! Locating the Pod spec inside Pods and the workload kinds that embed a Pod
//! template, working on `serde_json::Value` (no k8s-openapi in Debian, and a
//! typed model would dwarf the policies).

use serde_json::{Map, Value};

/// Path of the Pod spec inside an object of the given kind, as path segments.
/// `None` for kinds that carry no Pod spec.
pub fn pod_spec_path(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "Pod" => Some(&["spec"]),
        "Deployment" | "ReplicaSet" | "StatefulSet" | "DaemonSet" | "Job"
        | "ReplicationController" => Some(&["spec", "template", "spec"]),
        "CronJob" => Some(&["spec", "jobTemplate", "spec", "template", "spec"]),
        _ => None,
    }
}

/// The Pod spec of `object` (of kind `kind`), if present and an object.
pub fn pod_spec<'a>(kind: &str, object: &'a Value) -> Option<&'a Value> {
    let mut current = object;
    for segment in pod_spec_path(kind)? {
        current = current.get(segment)?;
    }
    current.is_object().then(|| current)
}

/// Mutable access to the Pod spec of `object`, if present and an object.
pub fn pod_spec_mut<'a>(kind: &str, object: &'a mut Value) -> Option<&'a mut Value> {
    let mut current = object;
    for segment in pod_spec_path(kind)? {
        current = current.get_mut(segment)?;
    }
    current.is_object().then(|| current)
}

/// Writes `spec` back as the Pod spec of `object`, creating missing
/// intermediate objects (a mutating policy may build a template from
/// scratch). Fails for kinds without a Pod spec, or when something on the
/// path exists but is not a JSON object.
pub fn set_pod_spec(kind: &str, object: &mut Value, spec: Value) -> Result<(), String> {
    let path = pod_spec_path(kind).ok_or_else(|| format!("kind {} has no pod spec", kind))?;
    let (last, parents) = path.split_last().expect("pod spec paths are never empty");
    let mut current = object;
    for segment in parents {
        current = as_object_mut(current, segment)?
            .entry(segment.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    as_object_mut(current, last)?.insert(last.to_string(), spec);
    Ok(())
}

fn as_object_mut<'a>(value: &'a mut Value, segment: &str) -> Result<&'a mut Map<String, Value>, String> {
    if value.is_null() {
        *value = Value::Object(Map::new());
    }
    value
        .as_object_mut()
        .ok_or_else(|| format!("cannot set pod spec: parent of '{}' is not an object", segment))
}

/// All containers of a Pod spec: `containers`, then (unless skipped)
/// `initContainers` and `ephemeralContainers`. Missing lists are empty.
pub fn containers<'a>(
    spec: &'a Value,
    include_init: bool,
    include_ephemeral: bool,
) -> impl Iterator<Item = &'a Value> + 'a {
    let list = move |key: &str, wanted: bool| {
        spec.get(key)
            .filter(|_| wanted)
            .and_then(Value::as_array)
            .map(|items| items.iter())
            .into_iter()
            .flatten()
    };
    list("containers", true)
        .chain(list("initContainers", include_init))
        .chain(list("ephemeralContainers", include_ephemeral))
}

/// The `securityContext` of a container (or the Pod-level one, when given a
/// Pod spec): `None` when absent or null, an error when it is not an object.
pub fn security_context(holder: &Value) -> Result<Option<&Value>, crate::json::TypeMismatch> {
    match holder.get("securityContext") {
        None | Some(Value::Null) => Ok(None),
        Some(sc @ Value::Object(_)) => Ok(Some(sc)),
        Some(_) => Err(crate::json::TypeMismatch {
            key: "securityContext".to_string(),
            expected: "a map",
        }),
    }
}

/// Mutable access to the `securityContext` object of a container or Pod
/// spec, created (or replacing a null) when missing. `None` when `holder` is
/// not an object or its `securityContext` is not an object.
pub fn security_context_mut(holder: &mut Value) -> Option<&mut Map<String, Value>> {
    crate::json::object_entry(holder, "securityContext")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn finds_pod_specs() {
        let pod = json!({"spec": {"containers": []}});
        assert_eq!(pod_spec("Pod", &pod), Some(&json!({"containers": []})));

        let deploy = json!({"spec": {"template": {"spec": {"containers": [{"name": "a"}]}}}});
        assert_eq!(pod_spec("Deployment", &deploy).unwrap()["containers"][0]["name"], "a");

        let cron = json!({"spec": {"jobTemplate": {"spec": {"template": {"spec": {"x": 1}}}}}});
        assert_eq!(pod_spec("CronJob", &cron), Some(&json!({"x": 1})));

        assert_eq!(pod_spec("Service", &pod), None);
        assert_eq!(pod_spec("Pod", &Value::Null), None);
        assert_eq!(pod_spec("Deployment", &pod), None);
    }

    #[test]
    fn writes_pod_specs() {
        let mut deploy = json!({"metadata": {"name": "d"}});
        set_pod_spec("Deployment", &mut deploy, json!({"containers": []})).unwrap();
        assert_eq!(deploy["spec"]["template"]["spec"], json!({"containers": []}));

        pod_spec_mut("Deployment", &mut deploy).unwrap()["hostNetwork"] = json!(true);
        assert_eq!(deploy["spec"]["template"]["spec"]["hostNetwork"], json!(true));

        let mut bad = json!({"spec": 3});
        assert!(set_pod_spec("Pod", &mut json!(null), json!({})).is_ok());
        assert!(set_pod_spec("Job", &mut bad, json!({})).is_err());
        assert!(set_pod_spec("Service", &mut bad, json!({})).is_err());
    }

    #[test]
    fn lists_containers() {
        let spec = json!({
            "containers": [{"name": "c"}],
            "initContainers": [{"name": "i"}],
            "ephemeralContainers": [{"name": "e"}]
        });
        let names = |init, eph| -> Vec<String> {
            containers(&spec, init, eph)
                .map(|c| c["name"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(names(true, true), ["c", "i", "e"]);
        assert_eq!(names(false, false), ["c"]);
        assert_eq!(containers(&json!({}), true, true).count(), 0);
    }
}
