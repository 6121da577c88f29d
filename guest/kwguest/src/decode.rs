//! Decode errors that stay small: the field that failed and serde's reason,
//! never the payload.
//!
//! The upstream Rust SDK puts the whole payload into its decode error
//! (`Error decoding validation payload <payload>: <error>`), so a 2 MB
//! AdmissionReview with one bad member becomes a 2 MB error, and serde's
//! reason itself quotes the bad value (`invalid type: string "<2 MB>"`). Here
//! the field is found by scanning the JSON text up to the position serde
//! reports, and serde's reason is cut in its middle past [`REASON_LIMIT`]
//! bytes, keeping both what was found and what was expected.

/// The longest serde reason kept whole, in bytes; longer ones keep their
/// first and last halves of this.
pub const REASON_LIMIT: usize = 1024;
/// The longest field path kept whole, in bytes (keys are the payload's).
pub const PATH_LIMIT: usize = 256;

/// `Error decoding validation payload: field `request.dryRun`: invalid type:
/// ... at line 1 column 2000123` (no field for an error at the top level).
/// serde_json places an error raised by a type's own parser (`deserialize_with`,
/// `Error::custom`) at the end of the enclosing object, which is then named.
pub fn decode_error(payload: &[u8], err: &serde_json::Error) -> String {
    let offset = byte_offset(payload, err.line(), err.column());
    let reason = elide_middle(&err.to_string(), REASON_LIMIT);
    match path_at(payload, offset) {
        path if path.is_empty() => format!("Error decoding validation payload: {}", reason),
        path => format!(
            "Error decoding validation payload: field `{}`: {}",
            elide_middle(&path, PATH_LIMIT),
            reason
        ),
    }
}

/// serde_json positions: `line` counts from 1, `column` is the number of
/// bytes read on that line.
fn byte_offset(json: &[u8], line: usize, column: usize) -> usize {
    if line <= 1 {
        return column.min(json.len());
    }
    let line_start = json
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .nth(line - 2)
        .map_or(json.len(), |(index, _)| index + 1);
    (line_start + column).min(json.len())
}

enum Frame {
    Object { key: Option<(usize, usize)> },
    Array { index: usize },
}

/// The path of the value being read at byte `offset` of `json`:
/// `request.object.spec.containers[0].image`, "" at the top level. An error
/// raised on an object's closing brace (a missing field) names that object.
pub fn path_at(json: &[u8], offset: usize) -> String {
    let end = offset.min(json.len());
    let mut stack: Vec<Frame> = Vec::new();
    let mut expecting_key = false;
    let mut i = 0;
    while i < end {
        match json[i] {
            b'{' => {
                stack.push(Frame::Object { key: None });
                expecting_key = true;
            }
            b'[' => {
                stack.push(Frame::Array { index: 0 });
                expecting_key = false;
            }
            b'}' | b']' => {
                stack.pop();
                expecting_key = false;
            }
            b',' => match stack.last_mut() {
                Some(Frame::Array { index }) => *index += 1,
                Some(Frame::Object { .. }) => expecting_key = true,
                None => {}
            },
            b':' => expecting_key = false,
            b'"' => {
                let start = i + 1;
                i = start;
                while i < json.len() && json[i] != b'"' {
                    i += if json[i] == b'\\' { 2 } else { 1 };
                }
                if expecting_key {
                    if let Some(Frame::Object { key }) = stack.last_mut() {
                        *key = Some((start, i.min(json.len())));
                    }
                }
            }
            _ => {}
        }
        i += 1;
    }
    let mut path = String::new();
    for frame in &stack {
        match frame {
            Frame::Object { key: Some((start, stop)) } => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(&String::from_utf8_lossy(&json[*start..*stop]));
            }
            Frame::Object { key: None } => {}
            Frame::Array { index } => path.push_str(&format!("[{}]", index)),
        }
    }
    path
}

/// `text` if it has at most `limit` bytes; else its first and last
/// `limit / 2` bytes (on character boundaries) around
/// `... (truncated, 1,999,488 bytes) ...`.
pub fn elide_middle(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_string();
    }
    let mut head = limit / 2;
    while !text.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = text.len() - limit / 2;
    while !text.is_char_boundary(tail) {
        tail += 1;
    }
    format!(
        "{}... (truncated, {} bytes) ...{}",
        &text[..head],
        thousands(tail - head),
        &text[tail..]
    )
}

fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(json: &str) -> String {
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Inner {
            flag: bool,
        }
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct Outer {
            items: Vec<Inner>,
        }
        let err = serde_json::from_str::<Outer>(json).unwrap_err();
        decode_error(json.as_bytes(), &err)
    }

    #[test]
    fn names_the_field() {
        assert_eq!(
            error_of(r#"{"items":[{"flag":true},{"flag":"no"}]}"#),
            "Error decoding validation payload: field `items[1].flag`: invalid type: string \"no\", \
             expected a boolean at line 1 column 36"
        );
        assert_eq!(
            error_of("{\n \"items\": [{}]}"),
            "Error decoding validation payload: field `items[0]`: missing field `flag` at line 2 column 13"
        );
        assert_eq!(
            error_of("{}"),
            "Error decoding validation payload: missing field `items` at line 1 column 2"
        );
        assert!(error_of("nope").starts_with("Error decoding validation payload: expected"));
        // Escapes and braces inside strings are not structure.
        assert_eq!(path_at(br#"{"a\"{":{"b":["}",1"#, 19), "a\\\"{.b[1]");
    }

    #[test]
    fn long_values_are_cut_in_the_middle() {
        let long = "x".repeat(100_000);
        let message = error_of(&format!(r#"{{"items":[{{"flag":"{}"}}]}}"#, long));
        assert!(message.len() < REASON_LIMIT + 200, "{}", message.len());
        assert!(message.starts_with(
            "Error decoding validation payload: field `items[0].flag`: invalid type: string \"xxx"
        ));
        assert!(message.contains("xxx... (truncated, 99,"));
        assert!(message.ends_with("xxx\", expected a boolean at line 1 column 100020"));
        assert_eq!(elide_middle("short", 10), "short");
        assert_eq!(elide_middle("ééééé", 4), "é... (truncated, 6 bytes) ...é");
        assert_eq!(thousands(1_999_488), "1,999,488");
        assert_eq!(thousands(999), "999");
    }
}
