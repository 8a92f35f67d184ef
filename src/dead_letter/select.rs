//! Which dead letters a command applies to.

use std::time::Duration;

use super::DeadLetter;

/// Selects dead letters by id, reason, age and text. Every given criterion
/// must match; no criterion selects everything (callers decide whether that
/// is allowed without `--all`).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct Selector {
    /// Message ids (any of them).
    pub ids: Vec<String>,
    /// rabbit-guard's or the broker's reason.
    pub reason: Option<String>,
    /// Dead-lettered at most this long ago.
    pub since: Option<Duration>,
    /// Text in the error or the body (case-insensitive).
    pub grep: Option<String>,
}

impl Selector {
    /// True when no criterion is set.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.reason.is_none() && self.since.is_none() && self.grep.is_none()
    }

    /// Whether `dl` is selected at `now`.
    #[must_use]
    pub fn matches(&self, dl: &DeadLetter, now: std::time::SystemTime) -> bool {
        if !self.ids.is_empty()
            && !dl
                .message_id
                .as_ref()
                .is_some_and(|id| self.ids.iter().any(|want| want == id))
        {
            return false;
        }
        if let Some(reason) = &self.reason
            && !dl.has_reason(reason)
        {
            return false;
        }
        if let Some(since) = self.since
            && dl.age(now).is_none_or(|age| age > since)
        {
            return false;
        }
        if let Some(text) = &self.grep {
            let needle = text.to_lowercase();
            let in_error = dl
                .error
                .as_ref()
                .is_some_and(|e| e.to_lowercase().contains(&needle));
            let in_body = String::from_utf8_lossy(&dl.body)
                .to_lowercase()
                .contains(&needle);
            if !in_error && !in_body {
                return false;
            }
        }
        true
    }
}
