//! # rabbit-guard
//!
//! A RabbitMQ consumer runtime that keeps a failing dependency from turning a
//! queue into a dead-letter pile. Each consumer's handler is guarded by a
//! circuit [`breaker`]; when the dependency fails, the breaker opens and the
//! consumer **stops consuming at the broker** (`basic.cancel`), so messages
//! wait in the queue. After the open time it takes only as many messages as
//! there are probes (`basic.qos`), and when they succeed it resumes at full
//! speed.
//!
//! ```no_run
//! use rabbit_guard::config::{Sources, load};
//! use rabbit_guard::handler::{Context, Handler, HandlerError, Json, ResultExt};
//! use rabbit_guard::Worker;
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! struct Order { id: u64 }
//!
//! struct Orders { client: reqwest::Client }
//!
//! impl Handler for Orders {
//!     type Message = Json<Order>;
//!
//!     async fn handle(&self, Json(order): Json<Order>, _ctx: &Context) -> Result<(), HandlerError> {
//!         let response = self.client
//!             .post(format!("http://127.0.0.1:8080/orders/{}", order.id))
//!             .send()
//!             .await
//!             .transient()?; // refused, timed out: the dependency failed
//!         match response.status() {
//!             s if s.is_success() => Ok(()),
//!             // The dependency failed: retried, counted against the breaker.
//!             s if s.is_server_error() || s.as_u16() == 429 => {
//!                 Err(HandlerError::transient(format!("orders answered {s}")))
//!             }
//!             // 400, 422: the message is bad; no retry will fix it.
//!             s => Err(HandlerError::permanent(format!("orders rejected {}: {s}", order.id))),
//!         }
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     // config/default.toml names `handler = "orders"` for a consumer.
//!     let settings = load(&Sources::from_env(None), &["orders"])?;
//!     Worker::builder(settings)
//!         .handler("orders", Orders { client: reqwest::Client::new() })
//!         .run()
//!         .await?;
//!     Ok(())
//! }
//! ```
//!
//! Classify by whose fault a failure is: `error_for_status().transient()`
//! would retry a 422 and count it against the breaker, so one bad message
//! would help open it.
//!
//! The parts: [`handler`] (the trait users implement, and functions as
//! handlers), [`breaker`] (the state machine and health checks),
//! [`builtin_handlers`] (`http` and `noop`), [`worker`] (wiring, statistics
//! and shutdown), [`config`] (layered, validated settings), [`dead_letter`]
//! (browse, replay, purge, export), [`testing`] (run a handler without a
//! broker and see what the worker would do), [`cli`] (the `rabbit-guard`
//! command line, and [`App`] for an application's own binary), [`status`]
//! (the admin endpoint's JSON), [`telemetry`], [`secret`] and
//! [`trace_context`]. The AMQP client comes with it: [`lapin`].
#![forbid(unsafe_code)]

// The public face: these modules, and the re-exports below. Everything
// else is the runtime's own.
pub mod breaker;
pub mod builtin_handlers;
#[cfg(feature = "cli")]
pub mod cli;
pub mod config;
pub mod dead_letter;
pub mod handler;
pub mod secret;
pub mod status;
pub mod telemetry;
pub mod testing;
pub mod trace_context;
pub mod worker;

#[cfg(feature = "admin")]
mod admin;
mod amqp;
mod backoff;
mod consumer;
// The demo's parts serve only the `demo`, `flaky-server` and `publish` commands.
#[cfg(all(feature = "demo", feature = "cli"))]
mod demo;
mod error;
mod fleet;
mod limits;
#[cfg(feature = "admin")]
mod metrics;
#[cfg(not(feature = "admin"))]
#[path = "metrics_off.rs"]
mod metrics;
mod signal;
mod text;

/// The AMQP client rabbit-guard is built on (lapin 4, with rabbit-guard's
/// patches: `vendor/README.md`), for the types its API takes and gives:
/// [`BasicProperties`](lapin::BasicProperties) for
/// [`Context::publish`](handler::Context::publish), [`FieldTable`](lapin::types::FieldTable)
/// and [`AMQPValue`](lapin::types::AMQPValue) for headers. Use it from here
/// rather than depending on `lapin` yourself: its version then always
/// matches.
pub use lapin;

pub use amqp::publish::PublishError;
pub use amqp::topology::Topology;
pub use breaker::HealthCheck;
#[cfg(feature = "cli")]
pub use cli::App;
pub use error::Error;
pub use handler::{BoxError, Handler};
pub use worker::{Worker, WorkerBuilder};

#[cfg(test)]
mod proptests;
