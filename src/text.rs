//! Text from outside (headers, bodies, error texts, HTTP headers) made safe
//! to show on a terminal or in a log line.

use std::fmt::Write;

/// True for characters a terminal would act on rather than show: C0 and C1
/// controls, DEL, and the bidirectional overrides that reorder what is
/// shown (`U+202A`–`U+202E`, `U+2066`–`U+2069`).
fn is_hostile(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every control character escaped (`\u{1b}`, `\n`, `\t`), so
/// hostile text cannot move the cursor, recolour or clear the terminal, or
/// forge extra output lines.
#[must_use]
pub(crate) fn printable(s: &str) -> String {
    escape(s, false)
}

/// As [`printable`], but keeps line breaks and tabs: for a multi-line body.
#[must_use]
#[cfg_attr(not(feature = "cli"), allow(dead_code))] // read by `dlq show`
pub(crate) fn printable_lines(s: &str) -> String {
    escape(s, true)
}

fn escape(s: &str, keep_lines: bool) -> String {
    if !s.chars().any(is_hostile) {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' | '\t' if keep_lines => out.push(c),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if is_hostile(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out
}

/// What a caught panic said: its message when it is text.
#[must_use]
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic payload)".to_owned())
}

/// An error and its causes on one line (`outer: cause: root`), a cause
/// whose text the line already holds left out.
#[must_use]
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// Cuts `s` to at most `max` bytes on a character boundary, marking the cut.
#[must_use]
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max.saturating_sub(3);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(printable("plain é"), "plain é");
        assert_eq!(printable("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(printable("x\ny\r\t"), "x\\ny\\r\\t");
        assert_eq!(printable("\u{7f}\u{9b}\u{202e}"), "\\u{7f}\\u{9b}\\u{202e}");
        assert_eq!(
            printable_lines("{\n\t\"a\": \"\u{1b}\"\n}"),
            "{\n\t\"a\": \"\\u{1b}\"\n}"
        );
    }
}
