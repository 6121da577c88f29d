#!/usr/bin/env bats
# The e2e checks of kubewarden/policies pod-privileged-policy, run on policies/dist/pod-privileged.wasm.
load helpers

@test "a privileged container is rejected" {
    run kwctl run annotated-policy.wasm -r test_data/privileged_container.json
    rejected
    says "Privileged container is not allowed"
}

@test "a pod without privileged containers is accepted" {
    run kwctl run annotated-policy.wasm -r test_data/no_privileged_containers.json
    accepted
}

@test "a deployment with a privileged container is rejected" {
    run kwctl run annotated-policy.wasm -r test_data/deployment_with_privileged_containers.json
    rejected
    says "Privileged container is not allowed"
}

@test "a statefulset with a privileged container is rejected" {
    run kwctl run annotated-policy.wasm -r test_data/statefulset_with_privileged_container.json
    rejected
    says "Privileged container is not allowed"
}

@test "a privileged init container is accepted when init containers are skipped" {
    run kwctl run annotated-policy.wasm -r test_data/privileged_init_container.json \
        --settings-path test_data/settings_skip_init_and_ephemeral_containers.json
    accepted
}

@test "a privileged ephemeral container is accepted when ephemeral containers are skipped" {
    run kwctl run annotated-policy.wasm -r test_data/privileged_ephemeral_container.json \
        --settings-path test_data/settings_skip_init_and_ephemeral_containers.json
    accepted
}
