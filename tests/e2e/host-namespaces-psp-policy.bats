#!/usr/bin/env bats
# The e2e checks of kubewarden/policies host-namespaces-psp-policy, run on policies/dist/host-namespaces-psp.wasm.
load helpers

@test "a deployment using host namespaces is rejected" {
    run kwctl run --request-path test_data/deployment_request.json --settings-path test_data/settings.json \
        annotated-policy.wasm
    rejected
}

@test "a pod using host namespaces is rejected" {
    run kwctl run --request-path test_data/pod_request.json --settings-path test_data/settings.json annotated-policy.wasm
    rejected
}
