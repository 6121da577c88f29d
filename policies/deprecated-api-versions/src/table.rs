//! Deprecated and removed Kubernetes APIs: the Kubernetes (`k8s`) part of the
//! deprecation data the upstream policy embeds (Fairwinds pluto's list), with
//! the flowcontrol entries under their real kinds and extended to Kubernetes
//! 1.32. The first entry matching a request wins.

use crate::semver::Version;

pub struct Rule {
    /// `group/version`.
    pub version: &'static str,
    pub kind: &'static str,
    pub deprecated_in: Option<Version>,
    pub removed_in: Option<Version>,
    pub replacement_api: &'static str,
}

impl Rule {
    fn removed(&self, k8s: &Version) -> bool {
        self.removed_in.as_ref().map_or(false, |removed| k8s >= removed)
    }

    fn deprecated(&self, k8s: &Version) -> bool {
        self.deprecated_in.as_ref().map_or(false, |deprecated| k8s >= deprecated)
    }

    /// The API is deprecated or removed in Kubernetes `k8s`.
    pub fn applies(&self, k8s: &Version) -> bool {
        self.removed(k8s) || self.deprecated(k8s)
    }

    /// Deprecated but still served in Kubernetes `k8s`.
    pub fn only_deprecated(&self, k8s: &Version) -> bool {
        !self.removed(k8s) && self.deprecated(k8s)
    }

    pub fn message(&self) -> String {
        let mut parts = vec![format!("{} {} cannot be used.", self.version, self.kind)];
        if let Some(deprecated) = &self.deprecated_in {
            parts.push(format!("It has been deprecated starting from {}.", deprecated));
        }
        if let Some(removed) = &self.removed_in {
            parts.push(format!("It has been removed starting from {}.", removed));
        }
        parts.push(format!("It has been replaced by {}.", self.replacement_api));
        parts.join(" ")
    }
}

macro_rules! rule {
    ($version:literal, $kind:literal, $deprecated:expr, $removed:expr, $replacement:literal) => {
        Rule {
            version: $version,
            kind: $kind,
            deprecated_in: $deprecated,
            removed_in: $removed,
            replacement_api: $replacement,
        }
    };
}

pub static RULES: &[Rule] = &[
    rule!("extensions/v1beta1", "Deployment", Some(Version::new(1, 9, 0)), Some(Version::new(1, 16, 0)), "apps/v1"),
    rule!("apps/v1beta2", "Deployment", Some(Version::new(1, 9, 0)), Some(Version::new(1, 16, 0)), "apps/v1"),
    rule!("apps/v1beta1", "Deployment", Some(Version::new(1, 9, 0)), Some(Version::new(1, 16, 0)), "apps/v1"),
    rule!("apps/v1beta1", "StatefulSet", Some(Version::new(1, 9, 0)), Some(Version::new(1, 16, 0)), "apps/v1"),
    rule!("apps/v1beta2", "StatefulSet", Some(Version::new(1, 9, 0)), Some(Version::new(1, 16, 0)), "apps/v1"),
    rule!("extensions/v1beta1", "NetworkPolicy", Some(Version::new(1, 9, 0)), Some(Version::new(1, 16, 0)), "networking.k8s.io/v1"),
    rule!("extensions/v1beta1", "Ingress", Some(Version::new(1, 14, 0)), Some(Version::new(1, 22, 0)), "networking.k8s.io/v1"),
    rule!("networking.k8s.io/v1beta1", "Ingress", Some(Version::new(1, 19, 0)), Some(Version::new(1, 22, 0)), "networking.k8s.io/v1"),
    rule!("networking.k8s.io/v1beta1", "IngressClass", Some(Version::new(1, 19, 0)), Some(Version::new(1, 22, 0)), "networking.k8s.io/v1"),
    rule!("apps/v1beta2", "DaemonSet", Some(Version::new(1, 9, 0)), Some(Version::new(1, 16, 0)), "apps/v1"),
    rule!("extensions/v1beta1", "DaemonSet", Some(Version::new(1, 9, 0)), Some(Version::new(1, 16, 0)), "apps/v1"),
    rule!("extensions/v1beta1", "PodSecurityPolicy", Some(Version::new(1, 10, 0)), Some(Version::new(1, 16, 0)), "policy/v1beta1"),
    rule!("policy/v1beta1", "PodSecurityPolicy", Some(Version::new(1, 21, 0)), Some(Version::new(1, 25, 0)), ""),
    rule!("extensions/v1beta1", "ReplicaSet", None, Some(Version::new(1, 16, 0)), "apps/v1"),
    rule!("apps/v1beta1", "ReplicaSet", None, Some(Version::new(1, 16, 0)), "apps/v1"),
    rule!("apps/v1beta2", "ReplicaSet", None, Some(Version::new(1, 16, 0)), "apps/v1"),
    rule!("scheduling.k8s.io/v1beta1", "PriorityClass", Some(Version::new(1, 14, 0)), Some(Version::new(1, 22, 0)), "scheduling.k8s.io/v1"),
    rule!("scheduling.k8s.io/v1alpha1", "PriorityClass", Some(Version::new(1, 14, 0)), Some(Version::new(1, 17, 0)), "scheduling.k8s.io/v1"),
    rule!("apiextensions.k8s.io/v1beta1", "CustomResourceDefinition", Some(Version::new(1, 16, 0)), Some(Version::new(1, 22, 0)), "apiextensions.k8s.io/v1"),
    rule!("admissionregistration.k8s.io/v1beta1", "MutatingWebhookConfiguration", Some(Version::new(1, 16, 0)), Some(Version::new(1, 22, 0)), "admissionregistration.k8s.io/v1"),
    rule!("admissionregistration.k8s.io/v1beta1", "ValidatingWebhookConfiguration", Some(Version::new(1, 16, 0)), Some(Version::new(1, 22, 0)), "admissionregistration.k8s.io/v1"),
    rule!("rbac.authorization.k8s.io/v1alpha1", "ClusterRoleBinding", Some(Version::new(1, 17, 0)), Some(Version::new(1, 22, 0)), "rbac.authorization.k8s.io/v1"),
    rule!("rbac.authorization.k8s.io/v1alpha1", "ClusterRole", Some(Version::new(1, 17, 0)), Some(Version::new(1, 22, 0)), "rbac.authorization.k8s.io/v1"),
    rule!("rbac.authorization.k8s.io/v1alpha1", "ClusterRoleBindingList", Some(Version::new(1, 17, 0)), Some(Version::new(1, 22, 0)), "rbac.authorization.k8s.io/v1"),
    rule!("rbac.authorization.k8s.io/v1alpha1", "ClusterRoleList", Some(Version::new(1, 17, 0)), Some(Version::new(1, 22, 0)), "rbac.authorization.k8s.io/v1"),
    rule!("rbac.authorization.k8s.io/v1alpha1", "Role", Some(Version::new(1, 17, 0)), Some(Version::new(1, 22, 0)), "rbac.authorization.k8s.io/v1"),
    rule!("rbac.authorization.k8s.io/v1alpha1", "RoleBinding", Some(Version::new(1, 17, 0)), Some(Version::new(1, 22, 0)), "rbac.authorization.k8s.io/v1"),
    rule!("rbac.authorization.k8s.io/v1alpha1", "RoleList", Some(Version::new(1, 17, 0)), Some(Version::new(1, 22, 0)), "rbac.authorization.k8s.io/v1"),
    rule!("rbac.authorization.k8s.io/v1alpha1", "RoleBindingList", Some(Version::new(1, 17, 0)), Some(Version::new(1, 22, 0)), "rbac.authorization.k8s.io/v1"),
    rule!("rbac.authorization.k8s.io/v1beta1", "ClusterRoleBinding", Some(Version::new(1, 17, 0)), Some(Version::new(1, 22, 0)), "rbac.authorization.k8s.io/v1"),
    rule!("rbac.authorization.k8s.io/v1beta1", "ClusterRole", Some(Version::new(1, 17, 0)), Some(Version::new(1, 22, 0)), "rbac.authorization.k8s.io/v1"),
    rule!("rbac.authorization.k8s.io/v1beta1", "ClusterRoleBindingList", Some(Version::new(1, 17, 0)), Some(Version::new(1, 22, 0)), "rbac.authorization.k8s.io/v1"),
    rule!("rbac.authorization.k8s.io/v1beta1", "ClusterRoleList", Some(Version::new(1, 17, 0)), Some(Version::new(1, 22, 0)), "rbac.authorization.k8s.io/v1"),
    rule!("rbac.authorization.k8s.io/v1beta1", "Role", Some(Version::new(1, 17, 0)), Some(Version::new(1, 22, 0)), "rbac.authorization.k8s.io/v1"),
    rule!("rbac.authorization.k8s.io/v1beta1", "RoleBinding", Some(Version::new(1, 17, 0)), Some(Version::new(1, 22, 0)), "rbac.authorization.k8s.io/v1"),
    rule!("rbac.authorization.k8s.io/v1beta1", "RoleList", Some(Version::new(1, 17, 0)), Some(Version::new(1, 22, 0)), "rbac.authorization.k8s.io/v1"),
    rule!("rbac.authorization.k8s.io/v1beta1", "RoleBindingList", Some(Version::new(1, 17, 0)), Some(Version::new(1, 22, 0)), "rbac.authorization.k8s.io/v1"),
    rule!("node.k8s.io/v1beta1", "RuntimeClass", Some(Version::new(1, 22, 0)), Some(Version::new(1, 25, 0)), "node.k8s.io/v1"),
    rule!("policy/v1beta1", "PodDisruptionBudget", Some(Version::new(1, 21, 0)), Some(Version::new(1, 25, 0)), "policy/v1"),
    rule!("policy/v1beta1", "PodDisruptionBudgetList", Some(Version::new(1, 21, 0)), Some(Version::new(1, 25, 0)), "policy/v1"),
    rule!("autoscaling/v2beta1", "HorizontalPodAutoscaler", Some(Version::new(1, 22, 0)), Some(Version::new(1, 25, 0)), "autoscaling/v2"),
    rule!("autoscaling/v2beta1", "HorizontalPodAutoscalerList", Some(Version::new(1, 22, 0)), Some(Version::new(1, 25, 0)), "autoscaling/v2"),
    rule!("autoscaling/v2beta2", "HorizontalPodAutoscaler", Some(Version::new(1, 23, 0)), Some(Version::new(1, 26, 0)), "autoscaling/v2"),
    rule!("autoscaling/v2beta2", "HorizontalPodAutoscalerList", Some(Version::new(1, 23, 0)), Some(Version::new(1, 26, 0)), "autoscaling/v2"),
    rule!("batch/v1beta1", "CronJob", Some(Version::new(1, 21, 0)), Some(Version::new(1, 25, 0)), "batch/v1"),
    rule!("batch/v1beta1", "CronJobList", Some(Version::new(1, 21, 0)), Some(Version::new(1, 25, 0)), "batch/v1"),
    rule!("storage.k8s.io/v1beta1", "CSINode", Some(Version::new(1, 17, 0)), Some(Version::new(1, 22, 0)), "storage.k8s.io/v1"),
    rule!("storage.k8s.io/v1beta1", "CSIDriver", Some(Version::new(1, 19, 0)), Some(Version::new(1, 22, 0)), "storage.k8s.io/v1"),
    rule!("storage.k8s.io/v1beta1", "CSIStorageCapacity", Some(Version::new(1, 24, 0)), Some(Version::new(1, 27, 0)), "storage.k8s.io/v1"),
    rule!("storage.k8s.io/v1beta1", "StorageClass", Some(Version::new(1, 6, 0)), Some(Version::new(1, 22, 0)), "storage.k8s.io/v1"),
    rule!("storage.k8s.io/v1beta1", "VolumeAttachment", Some(Version::new(1, 13, 0)), Some(Version::new(1, 22, 0)), "storage.k8s.io/v1"),
    rule!("apiregistration.k8s.io/v1beta1", "APIService", Some(Version::new(1, 10, 0)), Some(Version::new(1, 22, 0)), "apiregistration.k8s.io/v1"),
    rule!("authentication.k8s.io/v1beta1", "TokenReview", Some(Version::new(1, 6, 0)), Some(Version::new(1, 22, 0)), "authentication.k8s.io/v1"),
    rule!("certificates.k8s.io/v1beta1", "CertificateSigningRequest", Some(Version::new(1, 19, 0)), Some(Version::new(1, 22, 0)), "certificates.k8s.io/v1"),
    rule!("coordination.k8s.io/v1beta1", "Lease", Some(Version::new(1, 14, 0)), Some(Version::new(1, 22, 0)), "coordination.k8s.io/v1"),
    rule!("events.k8s.io/v1beta1", "Event", Some(Version::new(1, 19, 0)), Some(Version::new(1, 25, 0)), "events.k8s.io/v1"),
    rule!("discovery.k8s.io/v1beta1", "EndpointSlice", Some(Version::new(1, 21, 0)), Some(Version::new(1, 25, 0)), "discovery.k8s.io/v1"),
    rule!("flowcontrol.apiserver.k8s.io/v1beta1", "FlowSchema", Some(Version::new(1, 23, 0)), Some(Version::new(1, 26, 0)), "flowcontrol.apiserver.k8s.io/v1beta2"),
    rule!("flowcontrol.apiserver.k8s.io/v1beta1", "PriorityLevelConfiguration", Some(Version::new(1, 23, 0)), Some(Version::new(1, 26, 0)), "flowcontrol.apiserver.k8s.io/v1beta2"),
    rule!("flowcontrol.apiserver.k8s.io/v1beta2", "FlowSchema", Some(Version::new(1, 26, 0)), Some(Version::new(1, 29, 0)), "flowcontrol.apiserver.k8s.io/v1beta3"),
    rule!("flowcontrol.apiserver.k8s.io/v1beta2", "PriorityLevelConfiguration", Some(Version::new(1, 26, 0)), Some(Version::new(1, 29, 0)), "flowcontrol.apiserver.k8s.io/v1beta3"),
    rule!("flowcontrol.apiserver.k8s.io/v1beta3", "FlowSchema", Some(Version::new(1, 29, 0)), Some(Version::new(1, 32, 0)), "flowcontrol.apiserver.k8s.io/v1"),
    rule!("flowcontrol.apiserver.k8s.io/v1beta3", "PriorityLevelConfiguration", Some(Version::new(1, 29, 0)), Some(Version::new(1, 32, 0)), "flowcontrol.apiserver.k8s.io/v1"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingress_message() {
        let rule = RULES.iter().find(|r| r.version == "extensions/v1beta1" && r.kind == "Ingress").unwrap();
        assert_eq!(
            rule.message(),
            "extensions/v1beta1 Ingress cannot be used. It has been deprecated starting from 1.14.0. \
             It has been removed starting from 1.22.0. It has been replaced by networking.k8s.io/v1."
        );
        assert!(rule.only_deprecated(&Version::new(1, 19, 0)));
        assert!(!rule.only_deprecated(&Version::new(1, 25, 0)));
        assert!(!rule.applies(&Version::new(1, 10, 0)));
    }
}
