#!/usr/bin/env bats
# kubewarden/policies echo has a placeholder e2e suite; these check the behaviour its test data describes,
# on policies/dist/echo.wasm.
load helpers

@test "an object without the echo annotation is accepted" {
    run kwctl run annotated-policy.wasm -r test_data/create_accept.json
    accepted
}

@test "an annotated object is rejected with the request as the message, code 418" {
    run kwctl run annotated-policy.wasm -r test_data/create_reject.json
    rejected
    says '"code":418'
}
