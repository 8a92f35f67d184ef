//! Shared helpers for broker tests: unique names, a broker client for
//! publishing and inspecting queues, a switchable downstream HTTP server,
//! and a worker running in-process.
#![allow(dead_code, unused_imports, unreachable_pub, missing_docs)]

mod broker;
pub mod cluster;
pub mod dlq_cli;
mod downstream;
pub mod fleet;
mod process;
pub mod prom;
pub mod proxy;
pub mod raw;
mod worker;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use rabbit_guard::breaker::{Breaker, BreakerConfig, BreakerState, Transition};
use rabbit_guard::config::{ConsumerSettings, HttpSettings, RetrySettings, Settings};
use rabbit_guard::lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use rabbit_guard::lapin::types::{AMQPValue, FieldTable, ShortString};
use rabbit_guard::lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use rabbit_guard::worker::ConsumerStats;
use rabbit_guard::{Worker, WorkerBuilder};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub fn amqp_addr() -> String {
    std::env::var("AMQP_ADDR").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// `rabbitmqctl` for the broker at `AMQP_ADDR`: the command in `RABBITMQCTL`
/// (e.g. `bash scripts/rabbitmq.sh ctl 1` for the RabbitMQ 4 node the
/// script starts), else `rabbitmqctl`.
pub fn rabbitmqctl() -> std::process::Command {
    let spec = std::env::var("RABBITMQCTL")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "rabbitmqctl".to_owned());
    let mut words = spec.split_whitespace();
    let mut cmd = std::process::Command::new(words.next().unwrap_or("rabbitmqctl"));
    cmd.args(words);
    cmd
}

/// The binary with rabbit-guard's command line: this package's
/// `rabbit-guard`, or, where these helpers are built into the application
/// crate of `tests/outside-app` (built on `rabbit_guard::App`), that
/// application's own.
pub fn cli_binary() -> &'static str {
    option_env!("CARGO_BIN_EXE_rabbit-guard")
        .or(option_env!("CARGO_BIN_EXE_outside-app"))
        .expect("a binary with rabbit-guard's command line")
}

/// A name no other test (or test run) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "rgtest.{prefix}.{}.{}.{}",
        std::process::id(),
        nanos % 1_000_000_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls the async `cond` every 50 ms until it holds or `timeout` passes
/// (for conditions that ask the broker).
pub async fn wait_until_async<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A pseudo-random number in `0..n` (tests only need variety, not quality).
pub fn random_below(n: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    u64::from(nanos.wrapping_mul(2_654_435_761)) % n.max(1)
}

pub use broker::*;
pub use downstream::*;
pub use process::*;
pub use worker::*;
