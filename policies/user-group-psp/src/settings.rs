//! Settings of user-group-psp: three rule strategies plus two switches. Every
//! member is optional; a missing strategy is `RunAsAny` with no ranges.

use serde::Deserialize;

/// An inclusive ID range. The field and type names show up in error messages
/// (`Invalid ID range: [IDRange { min: 11, max: 10 }]`), as upstream.
#[allow(clippy::upper_case_acronyms)]
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct IDRange {
    pub min: i64,
    pub max: i64,
}

/// The variant names are the accepted `rule` values; an unknown one fails to
/// decode (`unknown variant ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub(crate) enum Rule {
    MustRunAs,
    MayRunAs,
    RunAsAny,
    MustRunAsNonRoot,
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub(crate) struct RuleStrategy {
    pub rule: Rule,
    pub ranges: Vec<IDRange>,
    pub overwrite: bool,
}

impl Default for RuleStrategy {
    fn default() -> Self {
        RuleStrategy {
            rule: Rule::RunAsAny,
            ranges: Vec::new(),
            overwrite: false,
        }
    }
}

impl RuleStrategy {
    pub fn is_valid_id(&self, id: i64) -> bool {
        self.ranges.iter().any(|r| id >= r.min && id <= r.max)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Settings {
    pub run_as_user: RuleStrategy,
    pub run_as_group: RuleStrategy,
    pub supplemental_groups: RuleStrategy,
    /// Also check the `USER` of each container image (host capability
    /// `oci/v1/oci_manifest_config`).
    pub validate_container_image_configuration: bool,
    /// Reject instead of mutating.
    pub validate_only: bool,
}

fn valid_ranges(ranges: &[IDRange]) -> Result<(), String> {
    let violations: Vec<&IDRange> = ranges.iter().filter(|r| r.min > r.max).collect();
    if violations.is_empty() {
        Ok(())
    } else {
        Err(format!("Invalid ID range: {:?}", violations))
    }
}

fn valid_user_rule(strategy: &RuleStrategy) -> Result<(), String> {
    match strategy.rule {
        Rule::RunAsAny | Rule::MustRunAsNonRoot => {
            if strategy.overwrite {
                Err(format!("Cannot set overwrite field with {:?}", strategy.rule))
            } else {
                Ok(())
            }
        }
        Rule::MustRunAs => {
            if strategy.ranges.is_empty() {
                Err("Invalid run_as_user settings: Missing user ID range".to_string())
            } else {
                valid_ranges(&strategy.ranges)
                    .map_err(|e| format!("Invalid run_as_user settings: {}", e))
            }
        }
        Rule::MayRunAs => Err("Invalid run_as_user settings: invalid rule.".to_string()),
    }
}

fn valid_group_rule(strategy: &RuleStrategy, prefix: &str) -> Result<(), String> {
    match (strategy.rule, strategy.overwrite) {
        (Rule::MayRunAs, true) | (Rule::RunAsAny, true) => {
            Err(format!("Cannot set overwrite field with {:?}", strategy.rule))
        }
        (Rule::RunAsAny, false) => Ok(()),
        (Rule::MustRunAs, _) | (Rule::MayRunAs, false) => {
            if strategy.ranges.is_empty() {
                Err(format!("{}: missing ID range", prefix))
            } else {
                valid_ranges(&strategy.ranges).map_err(|e| format!("{}: {}", prefix, e))
            }
        }
        (Rule::MustRunAsNonRoot, _) => Err(format!("{}: Invalid rule.", prefix)),
    }
}

impl kwguest::Validatable for Settings {
    fn validate(&self) -> Result<(), String> {
        valid_user_rule(&self.run_as_user)?;
        valid_group_rule(&self.run_as_group, "Invalid run_as_group settings")?;
        valid_group_rule(&self.supplemental_groups, "Invalid supplemental_groups settings")?;
        // Overwriting is a mutation, which a validate-only configuration rules out.
        let overwrites = self.run_as_user.overwrite
            || self.run_as_group.overwrite
            || self.supplemental_groups.overwrite;
        if self.validate_only && overwrites {
            return Err("validate_only cannot be true when overwrite is true".to_string());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kwguest::Validatable;

    fn settings(json: &str) -> Settings {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn messages() {
        assert_eq!(settings("{}").validate(), Ok(()));
        assert_eq!(
            settings(r#"{"run_as_user":{"rule":"MustRunAs"}}"#).validate(),
            Err("Invalid run_as_user settings: Missing user ID range".to_string())
        );
        assert_eq!(
            settings(r#"{"run_as_user":{"rule":"MustRunAs","ranges":[{"min":11,"max":10}]}}"#).validate(),
            Err("Invalid run_as_user settings: Invalid ID range: [IDRange { min: 11, max: 10 }]".to_string())
        );
        assert_eq!(
            settings(r#"{"run_as_group":{"rule":"RunAsAny","overwrite":true}}"#).validate(),
            Err("Cannot set overwrite field with RunAsAny".to_string())
        );
        assert_eq!(
            settings(r#"{"supplemental_groups":{"rule":"MustRunAsNonRoot"}}"#).validate(),
            Err("Invalid supplemental_groups settings: Invalid rule.".to_string())
        );
        assert_eq!(
            settings(r#"{"validate_only":true,"run_as_group":{"rule":"MustRunAs","overwrite":true,"ranges":[{"min":1,"max":2}]}}"#)
                .validate(),
            Err("validate_only cannot be true when overwrite is true".to_string())
        );
    }
}
