#!/usr/bin/env bats
# The e2e checks of kubewarden/policies safe-labels-policy, run on policies/dist/safe-labels.wasm.
load helpers

@test "accepted without settings" {
    run kwctl run annotated-policy.wasm -r test_data/ingress.json
    accepted
}

@test "accepted when the labels meet the constraints" {
    run kwctl run annotated-policy.wasm -r test_data/ingress.json \
        --settings-json '{"constrained_labels": {"owner": "^team-"}}'
    accepted
}

@test "accepted when no label is denied" {
    run kwctl run annotated-policy.wasm -r test_data/ingress.json --settings-json '{"denied_labels": ["foo", "bar"]}'
    accepted
}

@test "rejected for a denied label" {
    run kwctl run annotated-policy.wasm -r test_data/ingress.json --settings-json '{"denied_labels": ["foo", "owner"]}'
    rejected
    says 'The following labels are denied: owner"'
}

@test "rejected for a label that breaks its constraint" {
    run kwctl run annotated-policy.wasm -r test_data/ingress.json \
        --settings-json '{"constrained_labels": {"cc-center": "^cc-\\d+$"}}'
    rejected
    says "The following labels are violating user constraints: cc-center"
}

@test "rejected for a missing mandatory label" {
    run kwctl run annotated-policy.wasm -r test_data/ingress.json \
        --settings-json '{"mandatory_labels": ["required"], "constrained_labels": {"foo": ".*"}}'
    rejected
    says "The following mandatory labels are missing: required"
}

@test "settings refused: a label both constrained and denied" {
    run kwctl run annotated-policy.wasm -r test_data/ingress.json \
        --settings-json '{"denied_labels": ["foo", "cc-center"], "constrained_labels": {"cc-center": "^cc-\\d+$"}}'
    [ "$status" -eq 1 ]
    says "Provided settings are not valid: These labels cannot be constrained and denied at the same time: cc-center"
}

@test "settings refused: a label both mandatory and denied" {
    run kwctl run annotated-policy.wasm -r test_data/ingress.json \
        --settings-json '{"denied_labels": ["foo", "cc-center"], "mandatory_labels": ["cc-center"]}'
    [ "$status" -eq 1 ]
    says "Provided settings are not valid: These labels cannot be mandatory and denied at the same time: cc-center"
}

@test "settings refused: a constraint that is not a regular expression" {
    run kwctl run annotated-policy.wasm -r test_data/ingress.json \
        --settings-json '{"constrained_labels": {"cc-center": "^cc-[12$"}}'
    [ "$status" -eq 1 ]
    says 'Provided settings are not valid: error parsing regexp: missing closing ]: `[12$`'
}
