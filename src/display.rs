//! How values a user gave appear in messages: once, and as written.

/// A value a user gave, for messages: in backticks and as typed (no Rust
/// escaping of quotes or backslashes); only control characters are
/// escaped, so that the message stays one line. Nothing typed is `""`.
pub fn shown(value: &str) -> String {
    if value.is_empty() {
        return "\"\"".into();
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('`');
    for c in value.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out.push('`');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn as_written_and_on_one_line() {
        assert_eq!(shown(r#"C:\a"b"#), r#"`C:\a"b`"#);
        assert_eq!(shown("a\nb"), "`a\\nb`");
        assert_eq!(shown(""), "\"\"");
    }
}
