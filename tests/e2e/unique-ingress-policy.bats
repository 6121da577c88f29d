#!/usr/bin/env bats
# The e2e checks of kubewarden/policies unique-ingress-policy, run on policies/dist/unique-ingress.wasm.
# The cluster's Ingresses are replayed from upstream's recorded sessions (one list_resources_all call).
load helpers

evaluate() {
    run kwctl run annotated-policy.wasm -r ./test_data/ingress.json --allow-context-aware \
        --replay-host-capabilities-interactions "./test_data/$1.yml"
}

@test "accept because Ingress host is unique" {
    evaluate k8s_ctx_no_duplicates
    accepted
}

@test "reject because Ingress host is not unique" {
    evaluate k8s_ctx_duplicate
    rejected
    says 'ingress host conflicts with an existing ingress <foo.bar.com>'
}

@test "without --allow-context-aware the cluster is not read: rejected with the host's refusal" {
    run kwctl run annotated-policy.wasm -r ./test_data/ingress.json
    rejected
    says '"code":500'
    says 'cannot list the Ingresses of the cluster: Policy has not been granted access to Kubernetes networking.k8s.io/v1/Ingress resources'
}
