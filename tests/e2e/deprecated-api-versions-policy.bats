#!/usr/bin/env bats
# The e2e checks of kubewarden/policies deprecated-api-versions-policy, run on
# policies/dist/deprecated-api-versions.wasm.
load helpers

@test "a deprecated API version is rejected when deprecations deny" {
    run kwctl run --request-path test_data/ingress_creation.json \
        --settings-json '{"kubernetes_version": "1.19.0", "deny_on_deprecation_default": true}' annotated-policy.wasm
    rejected
}

@test "deprecations deny by default" {
    run kwctl run --request-path test_data/ingress_creation.json --settings-json '{"kubernetes_version": "1.19.0"}' \
        annotated-policy.wasm
    rejected
}

@test "a deprecated API version is accepted when deprecations do not deny" {
    run kwctl run --request-path test_data/ingress_creation.json \
        --settings-json '{"kubernetes_version": "1.19.0", "deny_on_deprecation": false}' annotated-policy.wasm
    accepted
}

@test "a removed API version is rejected" {
    run kwctl run --request-path test_data/ingress_creation.json --settings-json '{"kubernetes_version": "1.25.0"}' \
        annotated-policy.wasm
    rejected
}

@test "everything is accepted on a Kubernetes older than the deprecation" {
    run kwctl run --request-path test_data/ingress_creation.json --settings-json '{"kubernetes_version": "1.10.0"}' \
        annotated-policy.wasm
    accepted
}

@test "a current Ingress is accepted" {
    run kwctl run --request-path test_data/valid_ingress.json --settings-json '{"kubernetes_version": "1.25.0"}' \
        annotated-policy.wasm
    accepted
}

@test "a deprecated Ingress is rejected" {
    run kwctl run --request-path test_data/deprecated_ingress.json \
        --settings-json '{"kubernetes_version": "1.25.0"}' annotated-policy.wasm
    rejected
}
