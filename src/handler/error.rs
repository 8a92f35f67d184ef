//! What a handler returns when it fails: the error encodes what to do.

use std::fmt;
use std::time::Duration;

/// A boxed error from a handler.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Whose fault a [`HandlerError`] is, which decides what happens next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The dependency failed (down, timing out, overloaded): counts against
    /// the breaker; the message is retried through the delay queues.
    Transient,
    /// The message is bad: dead-lettered at once, not counted against the
    /// breaker.
    Permanent,
    /// Worth another try, but not the dependency's fault (a lock held by
    /// another worker, an optimistic-concurrency conflict, a message that
    /// arrived before the one it depends on): retried through the delay
    /// queues like a transient failure, never counted against the breaker,
    /// and dead-lettered when the delays are used up.
    Retry,
}

/// A handler failure, saying whose fault it is and, optionally, when to try
/// again.
///
/// - [`transient`](Self::transient): the dependency failed. It counts
///   against the breaker and the message is retried through the delay queues.
/// - [`permanent`](Self::permanent): the message itself is bad. It goes to
///   the dead-letter queue at once and does not count against the breaker.
/// - [`retry`](Self::retry): try again later, but the dependency is fine:
///   retried like a transient failure, not counted against the breaker.
///
/// [`retry_after`](Self::retry_after) picks the wait: the copy goes to the
/// shortest delay level at least that long.
///
/// Use the [`ResultExt`] helpers to classify errors with `?`:
///
/// ```
/// use std::time::Duration;
/// use rabbit_guard::handler::{HandlerError, ResultExt};
///
/// fn parse(s: &str) -> Result<u32, HandlerError> {
///     let n: u32 = s.parse().permanent()?; // a bad message: never retry it
///     Ok(n)
/// }
/// assert!(parse("x").unwrap_err().is_permanent());
///
/// // A 429 with Retry-After: 30 from the dependency.
/// let e = HandlerError::transient("429 Too Many Requests").retry_after(Duration::from_secs(30));
/// assert_eq!(e.retry_after_hint(), Some(Duration::from_secs(30)));
/// ```
#[derive(Debug)]
pub struct HandlerError {
    kind: ErrorKind,
    error: BoxError,
    retry_after: Option<Duration>,
    dependency: Option<String>,
}

impl HandlerError {
    fn new(kind: ErrorKind, err: impl Into<BoxError>) -> Self {
        Self {
            kind,
            error: err.into(),
            retry_after: None,
            dependency: None,
        }
    }

    /// The dependency failed: retry the message, count it against the breaker.
    pub fn transient(err: impl Into<BoxError>) -> Self {
        Self::new(ErrorKind::Transient, err)
    }

    /// The message is bad: dead-letter it, don't count it against the breaker.
    pub fn permanent(err: impl Into<BoxError>) -> Self {
        Self::new(ErrorKind::Permanent, err)
    }

    /// Try the message again later, without counting the failure against the
    /// breaker: the dependency is not at fault.
    pub fn retry(err: impl Into<BoxError>) -> Self {
        Self::new(ErrorKind::Retry, err)
    }

    /// Wait at least `delay` before the next attempt: the copy goes to the
    /// shortest delay level (`retry.delays`) that is at least `delay` long,
    /// instead of the level its attempt number would use. The attempt still
    /// counts. When no level is that long, the message is dead-lettered
    /// (reason `retries-exhausted`) with the wait in its error text. No
    /// effect on a permanent error.
    #[must_use]
    pub fn retry_after(mut self, delay: Duration) -> Self {
        self.retry_after = Some(delay);
        self
    }

    /// Which dependency failed, for a consumer guarded by several breakers
    /// (`breakers = ["billing", "inventory"]`): a transient failure counts
    /// against the breaker of that name. Without it, or with a name the
    /// consumer does not have, it counts against the consumer's first
    /// breaker. [`Context::guard`](super::Context::guard) sets it for the
    /// calls it guards.
    #[must_use]
    pub fn dependency(mut self, breaker: impl Into<String>) -> Self {
        self.dependency = Some(breaker.into());
        self
    }

    /// The dependency named with [`dependency`](Self::dependency).
    #[must_use]
    pub fn dependency_name(&self) -> Option<&str> {
        self.dependency.as_deref()
    }

    /// Whose fault it is.
    #[must_use]
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The wait asked for with [`retry_after`](Self::retry_after).
    #[must_use]
    pub fn retry_after_hint(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The underlying error.
    #[must_use]
    pub fn error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self.error.as_ref()
    }

    /// The underlying error, owned.
    #[must_use]
    pub fn into_error(self) -> BoxError {
        self.error
    }

    /// True for a [`transient`](Self::transient) error.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }

    /// True for a [`permanent`](Self::permanent) error.
    #[must_use]
    pub fn is_permanent(&self) -> bool {
        self.kind == ErrorKind::Permanent
    }

    /// True for a [`retry`](Self::retry) error.
    #[must_use]
    pub fn is_retry(&self) -> bool {
        self.kind == ErrorKind::Retry
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.error)?;
        let mut source = self.error.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

/// `.transient()?`, `.permanent()?` and `.retry()?` on any `Result` whose
/// error converts into a [`BoxError`].
pub trait ResultExt<T> {
    /// Classify the error as the dependency's fault.
    ///
    /// # Errors
    ///
    /// The original error, as a transient [`HandlerError`].
    fn transient(self) -> Result<T, HandlerError>;

    /// Classify the error as the message's fault.
    ///
    /// # Errors
    ///
    /// The original error, as a permanent [`HandlerError`].
    fn permanent(self) -> Result<T, HandlerError>;

    /// Worth retrying, but not the dependency's fault.
    ///
    /// # Errors
    ///
    /// The original error, as a [`HandlerError::retry`].
    fn retry(self) -> Result<T, HandlerError>;
}

impl<T, E: Into<BoxError>> ResultExt<T> for Result<T, E> {
    fn transient(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::transient)
    }

    fn permanent(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::permanent)
    }

    fn retry(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::retry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kind_and_the_wait_survive_the_builder() {
        let e = HandlerError::transient("503").retry_after(Duration::from_secs(7));
        assert_eq!(e.kind(), ErrorKind::Transient);
        assert_eq!(e.retry_after_hint(), Some(Duration::from_secs(7)));
        assert_eq!(e.to_string(), "503");
        let e = HandlerError::retry("locked");
        assert!(e.is_retry() && !e.is_transient() && !e.is_permanent());
        assert_eq!(e.retry_after_hint(), None);
        let e = HandlerError::transient("503").dependency("inventory");
        assert_eq!(e.dependency_name(), Some("inventory"));
        assert_eq!(e.to_string(), "503", "the name is not part of the text");
    }
}
