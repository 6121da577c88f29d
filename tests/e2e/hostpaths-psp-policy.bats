#!/usr/bin/env bats
# The e2e checks of kubewarden/policies hostpaths-psp-policy, run on policies/dist/hostpaths-psp.wasm.
load helpers

@test "rejected: /data is not an allowed host path" {
    run kwctl run annotated-policy.wasm -r test_data/request-pod-hostpaths.json \
        --settings-json '{"allowedHostPaths": [{"pathPrefix": "/var", "readOnly": false},
                                               {"pathPrefix": "/var/local/aaa", "readOnly": false}]}'
    rejected
    says "hostPath '/data' mounted as 'test-data' is not in the AllowedHostPaths list"
}

@test "accepted: no hostPath volume" {
    run kwctl run annotated-policy.wasm -r test_data/request-pod-no-hostpaths.json \
        --settings-json '{"allowedHostPaths": [{"pathPrefix": "/foo", "readOnly": true}]}'
    accepted
}

@test "accepted: the longest prefix (/var/local) decides over /var" {
    run kwctl run annotated-policy.wasm -r test_data/request-pod-precedence.json \
        --settings-json '{"allowedHostPaths": [{"pathPrefix": "/var", "readOnly": false},
                                               {"pathPrefix": "/var/local", "readOnly": true}]}'
    accepted
}
