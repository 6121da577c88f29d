#!/usr/bin/env bats
# The e2e checks of kubewarden/policies allow-privilege-escalation-psp-policy, run on
# policies/dist/allow-privilege-escalation-psp.wasm (the upstream suite names the module policy.wasm).
load helpers

@test "accepted: allowPrivilegeEscalation disabled" {
    run kwctl run -r test_data/req_pod_with_allowPrivilegeEscalation_disabled.json policy.wasm
    accepted
}

@test "accepted: no security context" {
    run kwctl run policy.wasm -r test_data/req_pod_without_security_context.json
    accepted
}

@test "rejected: a container allows privilege escalation" {
    run kwctl run -r test_data/req_pod_with_container_with_security_context_and_allowPrivilegeEscalation.json \
        --settings-json '{"allowPrivilegeEscalation": false}' policy.wasm
    rejected
    says "one of the containers has privilege escalation enabled"
}

@test "rejected: an init container allows privilege escalation" {
    run kwctl run -r test_data/req_pod_with_init_container_with_security_context_and_allowPrivilegeEscalation.json \
        policy.wasm
    rejected
    says "one of the init containers has privilege escalation enabled"
}
