//! host-namespaces-psp: replacement for the PodSecurityPolicy `hostIPC`,
//! `hostNetwork`, `hostPID` and `hostPorts` controls, with the settings,
//! defaults and messages of the Kubewarden policy of the same name. By
//! default (`{}`) host IPC, network, PID and every host port are forbidden.

use kwguest::json::{opt_bool, opt_i64, opt_object_list};
use kwguest::{CallResult, ValidationRequest};
use serde::Deserialize;
use serde_json::Value;

/// Both bounds are required in every range.
#[derive(Debug, Deserialize)]
struct PortRange {
    min: i32,
    max: i32,
}

impl PortRange {
    fn contains(&self, port: i64) -> bool {
        port >= i64::from(self.min) && port <= i64::from(self.max)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Settings {
    allow_host_ipc: bool,
    allow_host_network: bool,
    allow_host_pid: bool,
    allow_host_ports: Vec<PortRange>,
}

impl kwguest::Validatable for Settings {
    fn validate(&self) -> Result<(), String> {
        for range in &self.allow_host_ports {
            if range.min > range.max {
                return Err(format!(
                    "port min {} cannot be greater than max {}",
                    range.min, range.max
                ));
            }
        }
        Ok(())
    }
}

#[no_mangle]
pub extern "C" fn wapc_init() {
    kwguest::register_policy::<Settings>(validate);
}

fn validate(payload: &[u8]) -> CallResult {
    let req = ValidationRequest::<Settings>::decode(payload)?;
    let spec = match req.request.pod_spec() {
        Some(spec) => spec,
        None => return kwguest::accept(),
    };
    match check(spec, &req.settings) {
        Ok(None) => kwguest::accept(),
        Ok(Some(message)) => kwguest::reject(message, None),
        // Like the upstream, a Pod spec that cannot be read is accepted.
        Err(_) => kwguest::accept(),
    }
}

fn check(spec: &Value, settings: &Settings) -> Result<Option<&'static str>, String> {
    let flag = |key: &str| opt_bool(spec, key).map(|v| v.unwrap_or(false)).map_err(|e| e.to_string());
    if flag("hostIPC")? && !settings.allow_host_ipc {
        return Ok(Some("Pod has IPC enabled, but this is not allowed"));
    }
    if flag("hostNetwork")? && !settings.allow_host_network {
        return Ok(Some("Pod has host network enabled, but this is not allowed"));
    }
    if flag("hostPID")? && !settings.allow_host_pid {
        return Ok(Some("Pod has host PID enabled, but this is not allowed"));
    }
    if !host_ports_allowed(spec, "initContainers", settings)? {
        return Ok(Some("Pod is using unallowed host ports in init containers"));
    }
    if !host_ports_allowed(spec, "containers", settings)? {
        return Ok(Some("Pod is using unallowed host ports in containers"));
    }
    Ok(None)
}

fn host_ports_allowed(spec: &Value, key: &str, settings: &Settings) -> Result<bool, String> {
    let containers = opt_object_list(spec, key).map_err(|e| e.to_string())?;
    for container in containers.into_iter().flatten() {
        let ports = opt_object_list(container, "ports").map_err(|e| e.to_string())?;
        for port in ports.into_iter().flatten() {
            if let Some(host_port) = opt_i64(port, "hostPort").map_err(|e| e.to_string())? {
                if !settings.allow_host_ports.iter().any(|r| r.contains(host_port)) {
                    return Ok(false);
                }
            }
        }
    }
    Ok(true)
}
