//! Built-in handlers, so the binary is useful without writing Rust:
//! [`HttpHandler`] (`handler = "http"`) and [`NoopHandler`] (`handler = "noop"`).

mod http;
mod noop;

pub use http::HttpHandler;
pub use noop::NoopHandler;
