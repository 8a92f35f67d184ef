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
    /// Only ask whether the worker is ready (`/readyz`): exit 0 when it is,
    /// 1 with the reasons when not. For container health checks.
    #[arg(long, conflicts_with = "json")]
    pub ready: bool,
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
    if args.ready {
        return match runtime.block_on(admin_client::get_json::<serde_json::Value>(
            &base, "/readyz",
        )) {
            Ok(v) if v["ready"] == true => {
                output::line("ready");
                ExitCode::SUCCESS
            }
            Ok(v) => {
                output::error(&format!("not ready: {}", v["problems"]));
                ExitCode::FAILURE
            }
            Err(e) => {
                output::error(&e);
                ExitCode::FAILURE
            }
        };
    }
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

/// A borderless table that lines up by display width.
fn table(header: &[&str]) -> comfy_table::Table {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING)
        .set_header(header.iter().copied());
    t
}

/// The tables `status` prints.
fn render(status: &StatusView) -> Vec<String> {
    let mut breakers = table(&[
        "BREAKER",
        "STATE",
        "FOR",
        "FAILING",
        "WINDOW",
        "NEXT PROBE",
        "CONSUMERS",
    ]);
    for b in &status.breakers {
        let next = match (&b.next_half_open, &b.health_check) {
            (Some(t), _) => t.get(11..19).unwrap_or(t).to_owned(),
            (None, Some(_)) if b.state == "open" => "when healthy".to_owned(),
            (None, _) => "-".to_owned(),
        };
        // In a fleet, another worker's lease decides when this one probes.
        let next = if b.fleet.as_ref().is_some_and(|f| f.gated) && b.state == "open" {
            format!("{next} (by the fleet's prober)")
        } else {
            next
        };
        breakers.add_row(vec![
            printable(&b.name),
            b.state.clone(),
            seconds(b.for_seconds),
            percent(b.window.failure_rate),
            b.window.calls.to_string(),
            next,
            printable(&b.consumers.join(", ")),
        ]);
        if let Some(last) = &b.last_change {
            breakers.add_row(vec![
                String::new(),
                format!(
                    "last change: {} -> {} ({}), {} of {} calls failed",
                    last.from, last.to, last.reason, last.failures, last.calls
                ),
            ]);
        }
        if let Some(check) = b.health_check.as_ref().filter(|c| c.checks > 0) {
            let last = match (&check.last_result, &check.last_error) {
                (_, Some(error)) => format!(
                    "failing ({} in a row): {}",
                    check.failures_in_a_row,
                    printable(error)
                ),
                (Some(result), None) => result.clone(),
                (None, None) => "-".to_owned(),
            };
            breakers.add_row(vec![
                String::new(),
                format!(
                    "health check {}: {} of {} passed, last {last}",
                    printable(&check.target),
                    check.passes,
                    check.checks
                ),
            ]);
        }
    }
    let mut consumers = table(&[
        "QUEUE",
        "BREAKER",
        "SUBSCRIBED",
        "IN FLIGHT",
        "RECEIVED",
        "ACKED",
        "FAILED",
        "DEAD",
    ]);
    for c in &status.consumers {
        consumers.add_row(vec![
            printable(&c.queue),
            printable(&if c.breakers.len() > 1 {
                c.breakers.join(", ")
            } else {
                c.breaker.clone()
            }),
            yes(c.subscribed).to_owned(),
            c.in_flight.to_string(),
            c.received.to_string(),
            c.acked.to_string(),
            c.failed.to_string(),
            c.dead_lettered.to_string(),
        ]);
    }
    let mut out = vec![
        breakers.to_string(),
        String::new(),
        consumers.to_string(),
        String::new(),
        connections(status),
    ];
    if let Some(f) = &status.fleet {
        out.push(String::new());
        out.push(fleet_line(f));
    }
    out
}

/// Where the worker stands with its fleet, on one line.
fn fleet_line(f: &crate::status::FleetView) -> String {
    let mut line = format!(
        "fleet {}: {} as {} ({} sent, {} received, {} ignored)",
        printable(&f.exchange),
        f.state,
        printable(&f.worker),
        f.sent,
        f.received,
        f.ignored
    );
    if f.refused > 0 {
        line.push_str(&format!(", {} refused (not from a member)", f.refused));
    }
    if let Some(error) = &f.error {
        line.push_str(": ");
        line.push_str(&printable(error));
    }
    for p in &f.problems {
        line.push_str(&format!(
            "\n  {}: {}",
            printable(&p.kind),
            printable(&p.detail)
        ));
    }
    line
}

fn connections(status: &StatusView) -> String {
    let mut connections = table(&[
        "CONNECTION",
        "NODE",
        "BROKER",
        "UP",
        "BLOCKED",
        "RECONNECTS",
    ]);
    for c in &status.connections {
        connections.add_row(vec![
            printable(&c.name),
            printable(c.node.as_deref().unwrap_or("-")),
            printable(c.broker.as_deref().unwrap_or("-")),
            yes(c.up).to_owned(),
            yes(c.blocked).to_owned(),
            c.reconnects.to_string(),
        ]);
    }
    connections.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{BreakerView, ConsumerView};

    #[test]
    fn the_tables_show_every_breaker_and_consumer() {
        let status = StatusView {
            breakers: vec![BreakerView {
                name: "billing".into(),
                state: "open".into(),
                consumers: vec!["orders".into()],
                ..BreakerView::default()
            }],
            consumers: vec![ConsumerView {
                queue: "注文".into(),
                breaker: "billing".into(),
                received: 160,
                ..ConsumerView::default()
            }],
            ..StatusView::default()
        };
        let text = render(&status).join("\n");
        assert!(
            text.contains("billing") && text.contains("open") && text.contains("160"),
            "{text}"
        );
        assert!(text.contains("注文"), "{text}");
    }

    #[test]
    fn a_fleet_member_says_who_probes_and_where_it_stands() {
        let status = StatusView {
            breakers: vec![BreakerView {
                name: "billing".into(),
                state: "open".into(),
                next_half_open: Some("2026-12-02T10:00:08.000Z".into()),
                fleet: Some(crate::status::BreakerFleetView {
                    gated: true,
                    ..crate::status::BreakerFleetView::default()
                }),
                ..BreakerView::default()
            }],
            fleet: Some(crate::status::FleetView {
                exchange: "rg.fleet".into(),
                worker: "w1#9".into(),
                state: "local-only".into(),
                error: Some("lost\u{1b}[2J".into()),
                refused: 3,
                problems: vec![crate::status::FleetProblem {
                    kind: "fleet.lease".into(),
                    breaker: Some("billing".into()),
                    detail:
                        "the probe lease \"rg.fleet.lease.billing\" exists and is not exclusive"
                            .into(),
                    since: "2026-12-02T10:00:08.000Z".into(),
                }],
                ..crate::status::FleetView::default()
            }),
            ..StatusView::default()
        };
        let text = render(&status).join("\n");
        assert!(text.contains("by the fleet's prober"), "{text}");
        assert!(
            text.contains("fleet rg.fleet: local-only as w1#9"),
            "{text}"
        );
        assert!(text.contains("3 refused (not from a member)"), "{text}");
        assert!(
            text.contains("fleet.lease: the probe lease \"rg.fleet.lease.billing\" exists and is not exclusive"),
            "{text}"
        );
        assert!(!text.contains('\u{1b}'), "{text}");
    }

    #[test]
    fn a_breaker_waiting_for_its_health_check_says_so_and_why() {
        let status = StatusView {
            breakers: vec![BreakerView {
                name: "billing".into(),
                state: "open".into(),
                health_check: Some(crate::status::HealthCheckView {
                    target: "http://billing/health".into(),
                    checks: 7,
                    failures_in_a_row: 7,
                    last_result: Some("fail".into()),
                    last_error: Some("HTTP 503\u{1b}[2J".into()),
                    ..crate::status::HealthCheckView::default()
                }),
                ..BreakerView::default()
            }],
            ..StatusView::default()
        };
        let text = render(&status).join("\n");
        assert!(text.contains("when healthy"), "{text}");
        assert!(
            text.contains("health check http://billing/health: 0 of 7 passed, last failing (7 in a row): HTTP 503"),
            "{text}"
        );
        assert!(
            !text.contains('\u{1b}'),
            "a control character reached the terminal: {text}"
        );
    }
}
