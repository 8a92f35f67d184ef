//! What a handler returns when it fails: the error encodes what to do.

use std::fmt;

/// A boxed error from a handler.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A handler failure, saying whose fault it is.
///
/// - [`Transient`](Self::Transient): the dependency failed (down, timing out,
///   overloaded). It counts against the breaker and the message is retried
///   through the delay queues.
/// - [`Permanent`](Self::Permanent): the message itself is bad. It goes to the
///   dead-letter queue at once and does not count against the breaker.
///
/// Use the [`ResultExt`] helpers to classify errors with `?`:
///
/// ```
/// use rabbit_guard::handler::{HandlerError, ResultExt};
///
/// fn parse(s: &str) -> Result<u32, HandlerError> {
///     let n: u32 = s.parse().permanent()?; // a bad message: never retry it
///     Ok(n)
/// }
/// assert!(parse("x").unwrap_err().is_permanent());
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum HandlerError {
    /// The dependency failed; retry later.
    Transient(BoxError),
    /// The message is bad; dead-letter it.
    Permanent(BoxError),
}

impl HandlerError {
    /// The dependency failed: retry the message, count it against the breaker.
    pub fn transient(err: impl Into<BoxError>) -> Self {
        Self::Transient(err.into())
    }

    /// The message is bad: dead-letter it, don't count it against the breaker.
    pub fn permanent(err: impl Into<BoxError>) -> Self {
        Self::Permanent(err.into())
    }

    /// True for [`HandlerError::Transient`].
    #[must_use]
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient(_))
    }

    /// True for [`HandlerError::Permanent`].
    #[must_use]
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::Permanent(_))
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Transient(e) | Self::Permanent(e) => {
                write!(f, "{e}")?;
                let mut source = e.source();
                while let Some(s) = source {
                    write!(f, ": {s}")?;
                    source = s.source();
                }
                Ok(())
            }
        }
    }
}

/// `.transient()?` and `.permanent()?` on any `Result` whose error converts
/// into a [`BoxError`].
pub trait ResultExt<T> {
    /// Classify the error as the dependency's fault.
    ///
    /// # Errors
    ///
    /// The original error, as [`HandlerError::Transient`].
    fn transient(self) -> Result<T, HandlerError>;

    /// Classify the error as the message's fault.
    ///
    /// # Errors
    ///
    /// The original error, as [`HandlerError::Permanent`].
    fn permanent(self) -> Result<T, HandlerError>;
}

impl<T, E: Into<BoxError>> ResultExt<T> for Result<T, E> {
    fn transient(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::transient)
    }

    fn permanent(self) -> Result<T, HandlerError> {
        self.map_err(HandlerError::permanent)
    }
}
