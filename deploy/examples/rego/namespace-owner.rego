# Kubewarden `executionMode: opa`: a Pod may only be created in a namespace that has an `owner` label.
#
# The namespaces are the cluster's: the policy is granted `v1/Namespace` in contextAwareResources, and
# kwserver (like Kubewarden's policy-server) puts every Namespace at data.kubernetes.namespaces[<name>]
# before each evaluation. The settings are the rest of `data` (here `data.label`, default "owner").
package policy

import rego.v1

default label := "owner"

label := data.label

namespace := data.kubernetes.namespaces[input.request.namespace]

denial := sprintf("namespace %s has no %s label", [input.request.namespace, label]) if {
	input.request.kind.kind == "Pod"
	not namespace.metadata.labels[label]
}

response := {"uid": input.request.uid, "allowed": false, "status": {"message": denial}} if {
	denial
} else := {"uid": input.request.uid, "allowed": true}

main := {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}
