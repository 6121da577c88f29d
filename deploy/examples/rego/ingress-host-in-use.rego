# Kubewarden `executionMode: gatekeeper`: an Ingress may not claim a host that another Ingress of the
# cluster already serves (what the library's unique-ingress policy checks, as a Gatekeeper template).
#
# The Ingresses are the cluster's: the policy is granted `networking.k8s.io/v1/Ingress` in
# contextAwareResources, and kwserver puts each one at
# data.inventory.namespace[<namespace>]["networking.k8s.io/v1"].Ingress[<name>] before each evaluation.
package ingress.hosts

import rego.v1

reviewed := [object.get(input.review, "namespace", ""), object.get(input.review, "name", "")]

requested contains rule.host if some rule in input.review.object.spec.rules

in_use contains host if {
	some namespace, name
	other := data.inventory.namespace[namespace]["networking.k8s.io/v1"].Ingress[name]
	[namespace, name] != reviewed
	some rule in other.spec.rules
	host := rule.host
}

violation contains {"msg": sprintf("ingress host conflicts with an existing ingress <%v>", [host])} if {
	some host in requested & in_use
}
