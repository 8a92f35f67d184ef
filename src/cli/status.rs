//! `rabbit-guard status`: a running worker's breakers, consumers and
//! connections, from its admin endpoint.

use std::process::ExitCode;

use clap::Args;
use serde_json::Value;

use super::{admin_client, output};
use crate::config::Settings;

/// `rabbit-guard status`
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The admin endpoint, e.g. http://127.0.0.1:9090 (default: from admin.listen).
    #[arg(long)]
    pub admin: Option<String>,
    /// Print the endpoint's JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        Value::Bool(true) => "yes".into(),
        Value::Bool(false) => "no".into(),
        other => other.to_string(),
    }
}

fn seconds(v: &Value) -> String {
    let Some(secs) = v.as_f64() else {
        return "-".into();
    };
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let secs = secs.max(0.0) as u64;
    humantime::format_duration(std::time::Duration::from_secs(secs)).to_string()
}

fn percent(v: &Value) -> String {
    v.as_f64()
        .map_or("-".into(), |r| format!("{:.1}%", r * 100.0))
}

/// Runs `status`.
pub(crate) fn run(settings: &Settings, args: &StatusArgs) -> ExitCode {
    let Some(base) = admin_client::base_url(settings, args.admin.as_deref()) else {
        output::error("no admin endpoint: set admin.listen in the config, or pass --admin URL");
        return ExitCode::from(2);
    };
    let Some(runtime) = super::started(super::worker_runtime(1)) else {
        return ExitCode::FAILURE;
    };
    let status = match runtime.block_on(admin_client::get_json(&base, "/status")) {
        Ok(v) => v,
        Err(e) => {
            output::error(&e);
            return ExitCode::FAILURE;
        }
    };
    if args.json {
        output::line(&status.to_string());
        return ExitCode::SUCCESS;
    }
    let empty = Vec::new();
    output::line(&format!(
        "{:<20} {:<12} {:<10} {:>8} {:>7} {:<12} CONSUMERS",
        "BREAKER", "STATE", "FOR", "FAILING", "WINDOW", "NEXT PROBE"
    ));
    for b in status["breakers"].as_array().unwrap_or(&empty) {
        let next = b["next_half_open"]
            .as_str()
            .map_or("-".to_owned(), |t| t.get(11..19).unwrap_or(t).to_owned());
        let consumers: Vec<String> = b["consumers"]
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .map(s)
            .collect();
        output::line(&format!(
            "{:<20} {:<12} {:<10} {:>8} {:>7} {:<12} {}",
            s(&b["name"]),
            s(&b["state"]),
            seconds(&b["for_seconds"]),
            percent(&b["window"]["failure_rate"]),
            s(&b["window"]["calls"]),
            next,
            consumers.join(", ")
        ));
        if let Some(last) = b["last_change"].as_object() {
            output::line(&format!(
                "{:<20} last change: {} -> {} ({}), {} of {} calls failed",
                "",
                s(&last["from"]),
                s(&last["to"]),
                s(&last["reason"]),
                s(&last["failures"]),
                s(&last["calls"])
            ));
        }
    }
    output::line("");
    output::line(&format!(
        "{:<28} {:<20} {:>10} {:>9} {:>9} {:>9} {:>7} {:>7}",
        "QUEUE", "BREAKER", "SUBSCRIBED", "IN FLIGHT", "RECEIVED", "ACKED", "FAILED", "DEAD"
    ));
    for c in status["consumers"].as_array().unwrap_or(&empty) {
        output::line(&format!(
            "{:<28} {:<20} {:>10} {:>9} {:>9} {:>9} {:>7} {:>7}",
            s(&c["queue"]),
            s(&c["breaker"]),
            s(&c["subscribed"]),
            s(&c["in_flight"]),
            s(&c["received"]),
            s(&c["acked"]),
            s(&c["failed"]),
            s(&c["dead_lettered"])
        ));
    }
    output::line("");
    output::line(&format!(
        "{:<36} {:>4} {:>8} {:>11}",
        "CONNECTION", "UP", "BLOCKED", "RECONNECTS"
    ));
    for c in status["connections"].as_array().unwrap_or(&empty) {
        output::line(&format!(
            "{:<36} {:>4} {:>8} {:>11}",
            s(&c["name"]),
            s(&c["up"]),
            s(&c["blocked"]),
            s(&c["reconnects"])
        ));
    }
    ExitCode::SUCCESS
}
