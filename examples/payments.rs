//! An application built on rabbit-guard: its own `[app]` settings, an async
//! setup that opens a client from them, a plain async handler with shared
//! state, and replies to RPC requests. The whole `rabbit-guard` command line
//! comes with it, under this program's name and version:
//!
//! ```text
//! cargo run --example payments -- --config examples/payments.toml check-config
//! cargo run --example payments -- --config examples/payments.toml run
//! ```
//!
//! A request is a JSON order on the `payments.charge` queue with a
//! `message_id` (the idempotency key: a request without one is refused);
//! the handler charges it through `app.billing_url` (each status classified
//! by whose fault it is) and, when the request has a `reply_to`, answers it
//! with `{"order": ID, "charged": true}` and the request's `correlation_id`.
//! A reply that cannot be delivered never charges again: the charge is done,
//! so the handler logs it and acks.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use rabbit_guard::cli::App;
use rabbit_guard::handler::{Context, HandlerError, Json, ResultExt, with_state};
use rabbit_guard::lapin::BasicProperties;
use rabbit_guard::secret::Secret;
use serde::Deserialize;

/// The `[app]` table of the config (`RABBIT_GUARD__APP__…` overrides it).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Payments {
    /// Where the billing service is.
    billing_url: String,
    /// Its API key: masked wherever it is printed.
    api_key: Secret,
    /// How long one billing call may take.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    timeout: Duration,
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

/// What every call shares: built once by the setup.
struct Billing {
    client: reqwest::Client,
    url: String,
    api_key: Secret,
}

#[derive(Debug, Deserialize)]
struct Order {
    id: u64,
    amount_cents: i64,
}

async fn charge(
    billing: Arc<Billing>,
    Json(order): Json<Order>,
    ctx: Context,
) -> Result<(), HandlerError> {
    if order.amount_cents <= 0 {
        return Err(HandlerError::permanent(format!(
            "order {} has no amount",
            order.id
        )));
    }
    // The idempotency key: billing charges a key once, however often the
    // request is retried or redelivered. Without one, a retry could charge
    // twice: refuse it.
    let Some(key) = ctx.message_id().filter(|k| !k.trim().is_empty()) else {
        return Err(HandlerError::permanent(format!(
            "order {} has no message_id: it is the idempotency key that keeps a retried charge from charging twice",
            order.id
        )));
    };
    let response = billing
        .client
        .post(&billing.url)
        .bearer_auth(billing.api_key.expose())
        .header("Idempotency-Key", key)
        .header("Content-Type", "application/json")
        .body(serde_json::json!({ "order": order.id, "amount": order.amount_cents }).to_string())
        .send()
        .await
        .transient()?;
    match response.status() {
        s if s.is_success() => {}
        s if s.as_u16() == 429 => {
            return Err(HandlerError::transient("billing answered 429")
                .retry_after(Duration::from_secs(30)));
        }
        s if s.is_server_error() => {
            return Err(HandlerError::transient(format!("billing answered {s}")));
        }
        s => {
            return Err(HandlerError::permanent(format!(
                "billing declined order {}: {s}",
                order.id
            )));
        }
    }
    if ctx.properties().reply_to().is_some() {
        let answer = serde_json::json!({ "order": order.id, "charged": true }).to_string();
        let replied = ctx
            .reply(
                answer.as_bytes(),
                BasicProperties::default().with_content_type("application/json".into()),
            )
            .await;
        if let Err(e) = replied {
            // Charged: an error here must not send the request round again.
            tracing::warn!(order = order.id, error = %e, "charged, but the reply was not delivered");
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    // An application's own crate would pass env!("CARGO_PKG_NAME").
    App::new("payments", env!("CARGO_PKG_VERSION"))
        .about("Charges orders from a queue, guarded by a circuit breaker")
        .handlers(["charge"])
        .setup(|worker, payments: Payments| async move {
            tracing::info!(billing_url = %payments.billing_url, "payments: setting up");
            let client = reqwest::Client::builder()
                .timeout(payments.timeout)
                .build()?;
            let billing = Arc::new(Billing {
                client,
                url: payments.billing_url,
                api_key: payments.api_key,
            });
            Ok(worker.handler("charge", with_state(billing, charge)))
        })
        .main()
}
