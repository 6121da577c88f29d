#!/usr/bin/env bats
# The e2e checks of kubewarden/policies capabilities-psp-policy, run on policies/dist/capabilities-psp.wasm.
load helpers

NOT_ALLOWED="PSP capabilities policies doesn't allow these capabilities to be added"
MUTATING='{"allowed_capabilities": ["CHOWN", "KILL"], "required_drop_capabilities": ["NET_ADMIN"],
           "default_add_capabilities": ["CHOWN"]}'

@test "a star allows every capability" {
    run kwctl run --request-path test_data/req_pod_with_allowed_capabilities_accept.json \
        --settings-json '{"allowed_capabilities": ["*"]}' annotated-policy.wasm
    accepted
    run kwctl run --request-path test_data/req_pod_with_allowed_capabilities_reject.json \
        --settings-json '{"allowed_capabilities": ["*"]}' annotated-policy.wasm
    accepted
}

@test "a star does not allow a capability that must be dropped" {
    run kwctl run --request-path test_data/req_pod_with_allowed_capabilities_reject.json \
        --settings-json '{"allowed_capabilities": ["*"], "required_drop_capabilities": ["BPF"]}' annotated-policy.wasm
    rejected
    says "\"message\":\"$NOT_ALLOWED"
}

@test "adding a capability that must be dropped is rejected" {
    run kwctl run --request-path test_data/req_pod_with_capabilities_in_required_drop_capabilities.json \
        --settings-json '{"required_drop_capabilities": ["NET_ADMIN"]}' annotated-policy.wasm
    rejected
    says "\"message\":\"$NOT_ALLOWED"
}

@test "allowed capabilities are accepted" {
    run kwctl run --request-path test_data/req_pod_with_allowed_capabilities_accept.json \
        --settings-json '{"allowed_capabilities": ["CHOWN", "KILL"]}' annotated-policy.wasm
    accepted
}

@test "capabilities outside the allowed ones are rejected" {
    run kwctl run --request-path test_data/req_pod_with_allowed_capabilities_reject.json \
        --settings-json '{"allowed_capabilities": ["CHOWN", "KILL"]}' annotated-policy.wasm
    rejected
    says "\"message\":\"$NOT_ALLOWED"
}

@test "pods are mutated" {
    run kwctl run --request-path test_data/req_pod_with_mutate_capabilities.json --settings-json "$MUTATING" \
        annotated-policy.wasm
    accepted
    mutated
}

@test "deployments are mutated" {
    run kwctl run --request-path test_data/req_pod_with_mutate_capabilities_for_deployment.json \
        --settings-json "$MUTATING" annotated-policy.wasm
    accepted
    mutated
}
