//! `rabbit-guard status`: a running worker's breakers, consumers and
//! connections, from its admin endpoint.

use std::process::ExitCode;

use clap::Args;

use super::{admin_client, output};
use crate::config::Settings;
use crate::status::StatusView;
use crate::text::printable;

/// `rabbit-guard status`
#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// The admin endpoint, e.g. http://127.0.0.1:9090 (default: from admin.listen).
    #[arg(long)]
    pub admin: Option<String>,
    /// Print the endpoint's JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn seconds(secs: f64) -> String {
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let secs = secs.max(0.0) as u64;
    humantime::format_duration(std::time::Duration::from_secs(secs)).to_string()
}

fn percent(rate: f64) -> String {
    format!("{:.1}%", rate * 100.0)
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
    let status = match runtime.block_on(admin_client::get_json::<StatusView>(&base, "/status")) {
        Ok(v) => v,
        Err(e) => {
            output::error(&e);
            return ExitCode::FAILURE;
        }
    };
    if args.json {
        output::line(&serde_json::to_string(&status).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    for line in render(&status) {
        output::line(&line);
    }
    ExitCode::SUCCESS
}

/// The tables `status` prints.
fn render(status: &StatusView) -> Vec<String> {
    let mut out = vec![format!(
        "{:<20} {:<12} {:<10} {:>8} {:>7} {:<12} CONSUMERS",
        "BREAKER", "STATE", "FOR", "FAILING", "WINDOW", "NEXT PROBE"
    )];
    for b in &status.breakers {
        let next = b
            .next_half_open
            .as_deref()
            .map_or("-".to_owned(), |t| t.get(11..19).unwrap_or(t).to_owned());
        out.push(format!(
            "{:<20} {:<12} {:<10} {:>8} {:>7} {:<12} {}",
            printable(&b.name),
            b.state,
            seconds(b.for_seconds),
            percent(b.window.failure_rate),
            b.window.calls,
            next,
            printable(&b.consumers.join(", "))
        ));
        if let Some(last) = &b.last_change {
            out.push(format!(
                "{:<20} last change: {} -> {} ({}), {} of {} calls failed",
                "", last.from, last.to, last.reason, last.failures, last.calls
            ));
        }
    }
    out.push(String::new());
    out.push(format!(
        "{:<28} {:<20} {:>10} {:>9} {:>9} {:>9} {:>7} {:>7}",
        "QUEUE", "BREAKER", "SUBSCRIBED", "IN FLIGHT", "RECEIVED", "ACKED", "FAILED", "DEAD"
    ));
    for c in &status.consumers {
        out.push(format!(
            "{:<28} {:<20} {:>10} {:>9} {:>9} {:>9} {:>7} {:>7}",
            printable(&c.queue),
            printable(&c.breaker),
            yes(c.subscribed),
            c.in_flight,
            c.received,
            c.acked,
            c.failed,
            c.dead_lettered
        ));
    }
    out.push(String::new());
    out.push(format!(
        "{:<36} {:>4} {:>8} {:>11}",
        "CONNECTION", "UP", "BLOCKED", "RECONNECTS"
    ));
    for c in &status.connections {
        out.push(format!(
            "{:<36} {:>4} {:>8} {:>11}",
            printable(&c.name),
            yes(c.up),
            yes(c.blocked),
            c.reconnects
        ));
    }
    out
}
