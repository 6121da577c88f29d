#!/usr/bin/env bats
# The e2e checks of kubewarden/policies user-group-psp-policy, run on policies/dist/user-group-psp.wasm.
# Upstream runs the three container-image checks against the registry (the policy asks the host for the
# image's configuration); here the registry's answer is replayed from sessions/policy-server-image.yml.
load helpers

REGISTRY_ANSWER="$BATS_TEST_DIRNAME/sessions/policy-server-image.yml"

evaluate() {
    run kwctl run --request-path "test_data/e2e/$1.json" --settings-path "test_data/e2e/$2.json" \
        "${@:3}" annotated-policy.wasm
}

@test "RunAsAny accepts a pod without user, group or supplemental groups" {
    evaluate empty_security_context_pod settings_run_as_any
    accepted
}

@test "MustRunAs rejects a user ID outside the ranges" {
    evaluate invalid_user_id settings_must_run_as
    rejected
    says '"message":"User ID outside defined ranges"'
}

@test "MustRunAs accepts a valid container user without mutating, whatever the pod says" {
    evaluate pod_user_150 settings_must_run_as_100_200
    accepted
    not_mutated
}

@test "MustRunAs rejects a group ID outside the ranges" {
    evaluate invalid_group_id settings_must_run_as
    rejected
    says '"message":"Group ID is outside defined ranges"'
}

@test "MustRunAs rejects a supplemental group outside the ranges" {
    evaluate invalid_supplemental_group_ settings_must_run_as
    rejected
    says '"message":"Group ID is outside defined ranges"'
}

@test "MustRunAs fills in a missing user, group and supplemental groups" {
    evaluate empty_security_context_pod settings_must_run_as
    accepted
    mutated
}

@test "MustRunAs with validate_only rejects missing values instead of filling them in" {
    evaluate empty_security_context_pod settings_must_run_as_validate_only
    rejected
    not_mutated
}

@test "MayRunAs accepts a pod without group and supplemental groups" {
    evaluate empty_security_context_pod settings_may_run_as
    accepted
}

@test "MayRunAs rejects a group ID outside the ranges" {
    evaluate invalid_group_id settings_may_run_as
    rejected
    says '"message":"Group ID is outside defined ranges"'
}

@test "MayRunAs rejects a supplemental group outside the ranges" {
    evaluate invalid_supplemental_group_ settings_may_run_as
    rejected
    says '"message":"Group ID is outside defined ranges"'
}

@test "MustRunAs accepts valid user, group and supplemental groups" {
    evaluate valid_security_context settings_must_run_as
    accepted
}

@test "MustRunAsNonRoot rejects user 0" {
    evaluate zero_as_user_id settings_must_run_as_non_root
    rejected
    says '"message":"Invalid user ID: cannot run container with root ID (0)"'
}

@test "MustRunAsNonRoot fills in a missing user" {
    evaluate empty_security_context_pod settings_must_run_as_non_root
    accepted
    mutated
}

@test "MustRunAsNonRoot with validate_only rejects a missing user instead" {
    evaluate empty_security_context_pod settings_must_run_as_non_root_validate_only
    rejected
    not_mutated
}

@test "MustRunAsNonRoot accepts a user that is not root" {
    evaluate valid_security_context settings_must_run_as_non_root
    accepted
}

@test "MustRunAs with overwrite replaces valid values" {
    evaluate valid_security_context settings_must_run_as_overwrite
    accepted
    mutated
}

@test "settings refused: the container image check is not a boolean" {
    evaluate invalid_container_image_user_id settings_invalid_container_image_verification
    refused
    says 'invalid type: integer `1`, expected a boolean'
}

@test "settings refused: overwrite with validate_only" {
    evaluate valid_security_context settings_must_run_as_overwrite_validate_only
    refused
    says "Provided settings are not valid: validate_only cannot be true when overwrite is true"
}

@test "registry (replayed): the image's user is outside the ranges" {
    evaluate invalid_container_image_user_id settings_must_run_as_container_image_user_validation \
        --replay-host-capabilities-interactions "$REGISTRY_ANSWER"
    rejected
    says '"message":"User ID defined in the container image is outside defined ranges"'
}

@test "registry (replayed): the image's group is outside the ranges" {
    evaluate invalid_container_image_user_id settings_must_run_as_container_image_group_validation \
        --replay-host-capabilities-interactions "$REGISTRY_ANSWER"
    rejected
    says '"message":"Group ID defined in the container image is outside defined ranges"'
}

@test "registry (replayed): RunAsAny accepts whatever the image says" {
    evaluate invalid_container_image_user_id settings_run_as_any_and_validate_container \
        --replay-host-capabilities-interactions "$REGISTRY_ANSWER"
    accepted
}
