#!/usr/bin/env bats
# The e2e checks of kubewarden/policies apparmor-psp-policy, run on policies/dist/apparmor-psp.wasm.
load helpers

ALLOWED='{"allowed_profiles": ["runtime/default"]}'

@test "an allowed profile is accepted" {
    run kwctl run --request-path test_data/pod_valid.json --settings-json "$ALLOWED" annotated-policy.wasm
    accepted
}

@test "no profile (the runtime's default) is accepted" {
    run kwctl run --request-path test_data/pod_no_profile.json --settings-json "$ALLOWED" annotated-policy.wasm
    accepted
}

@test "the unconfined profile is rejected" {
    run kwctl run --request-path test_data/pod_invalid.json --settings-json "$ALLOWED" annotated-policy.wasm
    rejected
}
