//! Typed, lenient accessors for `serde_json::Value` objects.
//!
//! Policies work on the raw JSON of Kubernetes objects (a typed model such as
//! k8s-openapi is not vendored by Debian and would dwarf the modules). These
//! helpers read one optional member with the type the Kubernetes API gives
//! it: an absent member and an explicit `null` both read as `None`, a member
//! of the wrong type is an error (the object would not have deserialized into
//! the typed model the upstream SDKs use, which policies usually report as
//! `Cannot parse validation request`).

use serde_json::{Map, Value};

/// The member does not have the type the Kubernetes API gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeMismatch {
    pub key: String,
    pub expected: &'static str,
}

impl std::fmt::Display for TypeMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid type for `{}`, expected {}", self.key, self.expected)
    }
}

pub type Typed<T> = Result<Option<T>, TypeMismatch>;

fn member<'a>(value: &'a Value, key: &str) -> Option<&'a Value> {
    value.get(key).filter(|member| !member.is_null())
}

fn mismatch<T>(key: &str, expected: &'static str) -> Typed<T> {
    Err(TypeMismatch {
        key: key.to_string(),
        expected,
    })
}

/// `value[key]` as a boolean.
pub fn opt_bool(value: &Value, key: &str) -> Typed<bool> {
    match member(value, key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => mismatch(key, "a boolean"),
    }
}

/// `value[key]` as a signed 64-bit integer.
pub fn opt_i64(value: &Value, key: &str) -> Typed<i64> {
    match member(value, key) {
        None => Ok(None),
        Some(v) => match v.as_i64() {
            Some(n) => Ok(Some(n)),
            None => mismatch(key, "an integer"),
        },
    }
}

/// `value[key]` as a string.
pub fn opt_str<'a>(value: &'a Value, key: &str) -> Typed<&'a str> {
    match member(value, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(_) => mismatch(key, "a string"),
    }
}

/// `value[key]` as an array.
pub fn opt_array<'a>(value: &'a Value, key: &str) -> Typed<&'a Vec<Value>> {
    match member(value, key) {
        None => Ok(None),
        Some(Value::Array(items)) => Ok(Some(items)),
        Some(_) => mismatch(key, "a sequence"),
    }
}

/// `value[key]` as an object.
pub fn opt_object<'a>(value: &'a Value, key: &str) -> Typed<&'a Map<String, Value>> {
    match member(value, key) {
        None => Ok(None),
        Some(Value::Object(map)) => Ok(Some(map)),
        Some(_) => mismatch(key, "a map"),
    }
}

/// `value[key]` as an array of strings (e.g. a capability list).
pub fn opt_string_list(value: &Value, key: &str) -> Typed<Vec<String>> {
    let items = match opt_array(value, key)? {
        None => return Ok(None),
        Some(items) => items,
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        match item.as_str() {
            Some(s) => out.push(s.to_string()),
            None => return mismatch(key, "a sequence of strings"),
        }
    }
    Ok(Some(out))
}

/// `value[key]` as an array of objects (e.g. a container list), every item
/// checked to be an object.
pub fn opt_object_list<'a>(value: &'a Value, key: &str) -> Typed<&'a Vec<Value>> {
    match opt_array(value, key)? {
        None => Ok(None),
        Some(items) if items.iter().all(Value::is_object) => Ok(Some(items)),
        Some(_) => mismatch(key, "a sequence of maps"),
    }
}

/// Mutable access to the object stored at `value[key]`, creating it (or
/// replacing a `null`) when needed. `None` when `value` is not an object or
/// the member exists with another type.
pub fn object_entry<'a>(value: &'a mut Value, key: &str) -> Option<&'a mut Map<String, Value>> {
    let map = value.as_object_mut()?;
    let entry = map
        .entry(key.to_string())
        .or_insert_with(|| Value::Object(Map::new()));
    if entry.is_null() {
        *entry = Value::Object(Map::new());
    }
    entry.as_object_mut()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn typed_members() {
        let v = json!({"b": true, "n": 3, "s": "x", "a": [1], "o": {}, "z": null, "l": ["a", "b"]});
        assert_eq!(opt_bool(&v, "b"), Ok(Some(true)));
        assert_eq!(opt_bool(&v, "missing"), Ok(None));
        assert_eq!(opt_bool(&v, "z"), Ok(None));
        assert!(opt_bool(&v, "n").is_err());
        assert_eq!(opt_i64(&v, "n"), Ok(Some(3)));
        assert!(opt_i64(&v, "s").is_err());
        assert_eq!(opt_str(&v, "s"), Ok(Some("x")));
        assert_eq!(opt_array(&v, "a").unwrap().unwrap().len(), 1);
        assert!(opt_object(&v, "o").unwrap().is_some());
        assert_eq!(opt_string_list(&v, "l"), Ok(Some(vec!["a".to_string(), "b".to_string()])));
        assert!(opt_string_list(&v, "a").is_err());
        assert!(opt_object_list(&v, "a").is_err());
        assert_eq!(
            opt_i64(&v, "s").unwrap_err().to_string(),
            "invalid type for `s`, expected an integer"
        );
    }

    #[test]
    fn object_entries() {
        let mut v = json!({"sc": null});
        object_entry(&mut v, "sc").unwrap().insert("a".into(), json!(1));
        object_entry(&mut v, "new").unwrap().insert("b".into(), json!(2));
        assert_eq!(v, json!({"sc": {"a": 1}, "new": {"b": 2}}));
        assert!(object_entry(&mut json!({"x": 1}), "x").is_none());
        assert!(object_entry(&mut json!(3), "x").is_none());
    }
}
