//! Compiles regular expressions with the `regex` crate (RE2 syntax, like Go's
//! `regexp`) and reports syntax errors the way Go does:
//! `error parsing regexp: <what>: `<where>``.

use regex::Regex;
use regex_syntax::ast::{self, ErrorKind};

pub fn compile(pattern: &str) -> Result<Regex, String> {
    if let Err(err) = ast::parse::Parser::new().parse(pattern) {
        return Err(go_error(pattern, &err));
    }
    Regex::new(pattern).map_err(|err| match err {
        regex::Error::CompiledTooBig(_) => format!("error parsing regexp: expression too large: `{}`", pattern),
        // Translation errors: mostly Unicode classes this build lacks.
        _ => format!("error parsing regexp: invalid character class range: `{}`", pattern),
    })
}

fn go_error(pattern: &str, err: &ast::Error) -> String {
    let span = err.span();
    let spanned = pattern.get(span.start.offset..span.end.offset).unwrap_or("");
    let from_start = pattern.get(span.start.offset..).unwrap_or("");
    let (what, at) = match err.kind() {
        ErrorKind::ClassUnclosed => ("missing closing ]", from_start),
        ErrorKind::GroupUnclosed => ("missing closing )", pattern),
        ErrorKind::GroupUnopened => ("unexpected )", pattern),
        ErrorKind::RepetitionMissing => ("missing argument to repetition operator", operator(from_start)),
        ErrorKind::ClassRangeInvalid | ErrorKind::ClassRangeLiteral | ErrorKind::UnicodeClassInvalid => {
            ("invalid character class range", spanned)
        }
        ErrorKind::EscapeUnexpectedEof => ("trailing backslash at end of expression", ""),
        ErrorKind::EscapeUnrecognized
        | ErrorKind::ClassEscapeInvalid
        | ErrorKind::EscapeHexEmpty
        | ErrorKind::EscapeHexInvalid
        | ErrorKind::EscapeHexInvalidDigit
        | ErrorKind::UnsupportedBackreference => ("invalid escape sequence", spanned),
        ErrorKind::RepetitionCountInvalid
        | ErrorKind::RepetitionCountUnclosed
        | ErrorKind::RepetitionCountDecimalEmpty
        | ErrorKind::DecimalEmpty
        | ErrorKind::DecimalInvalid => ("invalid repeat count", spanned),
        ErrorKind::GroupNameDuplicate { .. }
        | ErrorKind::GroupNameEmpty
        | ErrorKind::GroupNameInvalid
        | ErrorKind::GroupNameUnexpectedEof => ("invalid named capture", spanned),
        ErrorKind::NestLimitExceeded(_) => ("expression nests too deeply", pattern),
        ErrorKind::CaptureLimitExceeded => ("expression too large", pattern),
        _ => ("invalid or unsupported Perl syntax", from_start),
    };
    format!("error parsing regexp: {}: `{}`", what, at)
}

/// The repetition operator at the start of `text`: `*`, `+`, `?` or
/// `{n,m}`, with its non-greedy `?` if any.
fn operator(text: &str) -> &str {
    let end = if text.starts_with('{') {
        text.find('}').map_or(text.len(), |i| i + 1)
    } else {
        text.chars().next().map_or(0, char::len_utf8)
    };
    let end = if text[end..].starts_with('?') { end + 1 } else { end };
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_messages() {
        assert_eq!(
            compile("cc-[a+").unwrap_err(),
            "error parsing regexp: missing closing ]: `[a+`"
        );
        assert_eq!(compile("(a").unwrap_err(), "error parsing regexp: missing closing ): `(a`");
        assert_eq!(compile("a)").unwrap_err(), "error parsing regexp: unexpected ): `a)`");
        assert_eq!(
            compile("*a").unwrap_err(),
            "error parsing regexp: missing argument to repetition operator: `*`"
        );
        assert!(compile(r"cc-\d+").unwrap().is_match("cc-1234a"));
    }
}
