//! Turning a body into a handler's `Message` type.

use serde::de::DeserializeOwned;

use super::Context;

/// A body that could not be decoded. The message is dead-lettered with reason
/// `decode`; the breaker is not told.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

/// How a message body becomes a handler's `Message`.
///
/// Provided: [`Json<T>`] for any `T: DeserializeOwned` (the usual choice),
/// `Vec<u8>` for raw bytes, `String` for UTF-8 text, and `()` to ignore the body.
pub trait Decode: Sized + Send + 'static {
    /// Decodes the body of `ctx`.
    ///
    /// # Errors
    ///
    /// [`DecodeError`] when the body is not a valid `Self`.
    fn decode(ctx: &Context) -> Result<Self, DecodeError>;
}

/// A JSON body, deserialized with serde. Destructure it in the handler's
/// signature: `async fn handle(&self, Json(order): Json<Order>, ctx: &Context)`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Json<T>(pub T);

impl<T: DeserializeOwned + Send + 'static> Decode for Json<T> {
    fn decode(ctx: &Context) -> Result<Self, DecodeError> {
        serde_json::from_slice(ctx.body())
            .map(Json)
            .map_err(|e| DecodeError(format!("body is not valid JSON for this handler: {e}")))
    }
}

impl Decode for Vec<u8> {
    fn decode(ctx: &Context) -> Result<Self, DecodeError> {
        Ok(ctx.body().to_vec())
    }
}

impl Decode for String {
    fn decode(ctx: &Context) -> Result<Self, DecodeError> {
        String::from_utf8(ctx.body().to_vec())
            .map_err(|e| DecodeError(format!("body is not UTF-8: {e}")))
    }
}

impl Decode for () {
    fn decode(_: &Context) -> Result<Self, DecodeError> {
        Ok(())
    }
}
