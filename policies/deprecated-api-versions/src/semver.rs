//! Just enough semantic versioning for Kubernetes release numbers:
//! `MAJOR.MINOR.PATCH[-PRE][+BUILD]`, ordered by SemVer precedence (build
//! metadata ignored). Parse errors read like the `semver` crate's.

use std::cmp::Ordering;
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub major: u64,
    pub minor: u64,
    pub patch: u64,
    pub pre: String,
}

const PRE_RELEASE: &str = "pre-release identifier";
const POSITIONS: [&str; 3] = ["major version number", "minor version number", "patch version number"];

fn quoted(ch: char) -> String {
    format!("{:?}", ch)
}

impl Version {
    pub const fn new(major: u64, minor: u64, patch: u64) -> Version {
        Version {
            major,
            minor,
            patch,
            pre: String::new(),
        }
    }

    pub fn parse(text: &str) -> Result<Version, String> {
        if text.is_empty() {
            return Err("empty string, expected a semver version".to_string());
        }
        let mut numbers = [0u64; 3];
        let mut rest = text;
        for (index, position) in POSITIONS.iter().enumerate() {
            if index > 0 {
                match rest.chars().next() {
                    Some('.') => rest = &rest[1..],
                    Some(ch) => {
                        return Err(format!(
                            "unexpected character {} after {}",
                            quoted(ch),
                            POSITIONS[index - 1]
                        ))
                    }
                    None => return Err(format!("unexpected end of input while parsing {}", position)),
                }
            }
            let digits = rest.chars().take_while(char::is_ascii_digit).count();
            if digits == 0 {
                return Err(match rest.chars().next() {
                    Some(ch) => format!("unexpected character {} while parsing {}", quoted(ch), position),
                    None => format!("unexpected end of input while parsing {}", position),
                });
            }
            if digits > 1 && rest.starts_with('0') {
                return Err(format!("invalid leading zero in {}", position));
            }
            numbers[index] = rest[..digits]
                .parse()
                .map_err(|_| format!("value of {} exceeds u64::MAX", position))?;
            rest = &rest[digits..];
        }
        let mut pre = String::new();
        if let Some(tail) = rest.strip_prefix('-') {
            let end = tail.find('+').unwrap_or(tail.len());
            pre = tail[..end].to_string();
            check_identifiers(&pre, PRE_RELEASE)?;
            rest = &tail[end..];
        }
        if let Some(build) = rest.strip_prefix('+') {
            check_identifiers(build, "build metadata")?;
            rest = "";
        }
        if let Some(ch) = rest.chars().next() {
            return Err(format!("unexpected character {} after patch version number", quoted(ch)));
        }
        Ok(Version {
            major: numbers[0],
            minor: numbers[1],
            patch: numbers[2],
            pre,
        })
    }
}

fn check_identifiers(text: &str, position: &str) -> Result<(), String> {
    for segment in text.split('.') {
        if segment.is_empty() {
            return Err(format!("empty identifier segment in {}", position));
        }
        if let Some(ch) = segment.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-')) {
            return Err(format!("unexpected character {} while parsing {}", quoted(ch), position));
        }
        // SemVer 2.0 §9: numeric pre-release identifiers have no leading zeros (build metadata may).
        let numeric = segment.bytes().all(|b| b.is_ascii_digit());
        if position == PRE_RELEASE && numeric && segment.len() > 1 && segment.starts_with('0') {
            return Err(format!("invalid leading zero in {}", position));
        }
    }
    Ok(())
}

fn compare_pre(a: &str, b: &str) -> Ordering {
    match (a.is_empty(), b.is_empty()) {
        (true, true) => return Ordering::Equal,
        (true, false) => return Ordering::Greater, // a release outranks its pre-releases
        (false, true) => return Ordering::Less,
        _ => {}
    }
    let mut left = a.split('.');
    let mut right = b.split('.');
    loop {
        match (left.next(), right.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) => {
                let order = match (x.parse::<u64>(), y.parse::<u64>()) {
                    (Ok(m), Ok(n)) => m.cmp(&n),
                    (Ok(_), Err(_)) => Ordering::Less,
                    (Err(_), Ok(_)) => Ordering::Greater,
                    (Err(_), Err(_)) => x.cmp(y),
                };
                if order != Ordering::Equal {
                    return order;
                }
            }
        }
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.major, self.minor, self.patch)
            .cmp(&(other.major, other.minor, other.patch))
            .then_with(|| compare_pre(&self.pre, &other.pre))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)?;
        if !self.pre.is_empty() {
            write!(f, "-{}", self.pre)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_orders() {
        assert_eq!(Version::parse("1.25.0").unwrap(), Version::new(1, 25, 0));
        assert!(Version::parse("1.22.0-rc.1").unwrap() < Version::new(1, 22, 0));
        assert!(Version::new(1, 9, 99) < Version::new(1, 10, 0));
        assert_eq!(Version::parse("1.2.3+build.5").unwrap().to_string(), "1.2.3");
        assert_eq!(
            Version::parse("1.25").unwrap_err(),
            "unexpected end of input while parsing patch version number"
        );
        assert_eq!(
            Version::parse("abc").unwrap_err(),
            "unexpected character 'a' while parsing major version number"
        );
        assert_eq!(Version::parse("").unwrap_err(), "empty string, expected a semver version");
        assert_eq!(Version::parse("01.2.3").unwrap_err(), "invalid leading zero in major version number");
        assert_eq!(
            Version::parse("1.25.0-01").unwrap_err(),
            "invalid leading zero in pre-release identifier"
        );
        assert!(Version::parse("1.25.0-0.rc01+007").is_ok());
    }
}
