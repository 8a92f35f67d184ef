//! rabbit-guard: a RabbitMQ consumer runtime guarded by circuit breakers.
#![forbid(unsafe_code)]

pub mod breaker;
pub mod config;
pub mod secret;
