//! `demo`, `flaky-server` and `publish`: the demonstration and the two
//! helpers `docker compose up` runs beside the worker.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use tokio_util::sync::CancellationToken;

use super::output;
use crate::amqp::topology::Topology;
use crate::config::Settings;
use crate::demo::{self, FlakyServer, Timeline};

/// `rabbit-guard demo`
#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// AMQP URL of the broker (default: broker.url from the config, else localhost).
    #[arg(long)]
    pub url: Option<String>,
    /// How long the dependency is healthy before it fails.
    #[arg(long, default_value = "6s", value_parser = super::values::duration)]
    pub healthy_for: Duration,
    /// How long the dependency fails.
    #[arg(long, default_value = "12s", value_parser = super::values::duration)]
    pub fail_for: Duration,
    /// Messages published per second.
    #[arg(long, default_value_t = 40.0, value_parser = super::values::rate)]
    pub rate: f64,
    /// Workers on the queue; with more than one they form a fleet (one
    /// trip pauses them all, one of them probes).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=8))]
    pub workers: u8,
}

/// `rabbit-guard flaky-server`
#[derive(Debug, Args)]
pub(crate) struct FlakyArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Healthy (200) for this long...
    #[arg(long, default_value = "40s", value_parser = super::values::duration)]
    pub healthy: Duration,
    /// ...then failing (503) for this long, and again.
    #[arg(long, default_value = "20s", value_parser = super::values::duration)]
    pub failing: Duration,
    /// Delay every answer by this much.
    #[arg(long, default_value = "10ms", value_parser = super::values::duration)]
    pub latency: Duration,
}

/// `rabbit-guard publish`
#[derive(Debug, Args)]
pub(crate) struct PublishArgs {
    /// The queue to publish to (declared as its consumer in the config declares it).
    #[arg(long, short, value_parser = super::values::name)]
    pub queue: String,
    /// Messages per second.
    #[arg(long, default_value_t = 20.0, value_parser = super::values::rate)]
    pub rate: f64,
    /// Stop after this many (default: until Ctrl-C).
    #[arg(long)]
    pub count: Option<u64>,
    /// AMQP URL of the broker (default: broker.url from the config).
    #[arg(long)]
    pub url: Option<String>,
}

fn runtime() -> Option<tokio::runtime::Runtime> {
    super::started(
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
    )
}

fn signals(token: CancellationToken) -> Option<tokio::task::JoinHandle<crate::signal::Signal>> {
    crate::signal::shutdown_on_signal(token).ok()
}

/// Runs the demo.
pub(crate) fn demo(settings: &Settings, args: &DemoArgs) -> ExitCode {
    let Some(rt) = runtime() else {
        return ExitCode::FAILURE;
    };
    let mut broker = settings.broker.clone();
    if let Some(url) = &args.url {
        broker.url = url.clone().into();
    }
    let timeline = Timeline {
        healthy: args.healthy_for,
        failing: args.fail_for,
        publish_after: Duration::from_secs(6),
        rate: args.rate,
        workers: usize::from(args.workers),
    };
    let live = std::io::stdout().is_terminal();
    let result = rt.block_on(async {
        let stop = CancellationToken::new();
        let _signals = signals(stop.clone());
        demo::run(&broker, timeline, live, stop, output::stream()).await
    });
    match result {
        Ok(report) => {
            output::line("");
            output::line(&report.summary(&timeline));
            if (!report.interrupted && report.lost() > 0) || report.calls_while_open > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            output::error(&e.to_string());
            ExitCode::FAILURE
        }
    }
}

/// Runs the flaky dependency until SIGTERM / Ctrl-C.
pub(crate) fn flaky_server(settings: &Settings, args: &FlakyArgs) -> ExitCode {
    crate::telemetry::init(&settings.log);
    let Some(rt) = runtime() else {
        return ExitCode::FAILURE;
    };
    let result = rt.block_on(async {
        let server = FlakyServer::start(&args.listen.to_string(), false).await?;
        server.set_latency(args.latency);
        tracing::info!(addr = %server.addr(), "flaky dependency listening");
        let stop = CancellationToken::new();
        let _signals = signals(stop.clone());
        tokio::select! {
            () = server.cycle(args.healthy, args.failing) => {}
            () = stop.cancelled() => {}
        }
        let (ok, failed) = server.counts();
        tracing::info!(ok, failed, "flaky dependency stopped");
        Ok::<(), crate::Error>(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            output::error(&e.to_string());
            ExitCode::FAILURE
        }
    }
}

/// Publishes a steady stream until Ctrl-C or `--count`.
pub(crate) fn publish(settings: &Settings, args: &PublishArgs) -> ExitCode {
    crate::telemetry::init(&settings.log);
    let Some(rt) = runtime() else {
        return ExitCode::FAILURE;
    };
    let mut broker = settings.broker.clone();
    if let Some(url) = &args.url {
        broker.url = url.clone().into();
    }
    let result = rt.block_on(async {
        let connection = crate::amqp::connection::connect_once(&broker, "publish").await?;
        if let Some((i, c)) = settings
            .consumers
            .iter()
            .enumerate()
            .find(|(_, c)| c.queue == args.queue)
        {
            Topology::of(i, c).declare_on(&connection).await?;
        }
        let stop = CancellationToken::new();
        let _signals = signals(stop.clone());
        tracing::info!(queue = %args.queue, rate = args.rate, "publishing");
        let prefix = format!("msg-{}", std::process::id());
        let mut last_log = tokio::time::Instant::now();
        let sent = demo::steady(
            &connection,
            &args.queue,
            &prefix,
            args.rate,
            args.count,
            stop,
            |n| {
                if last_log.elapsed() >= Duration::from_secs(10) {
                    tracing::info!(published = n, "publishing");
                    last_log = tokio::time::Instant::now();
                }
            },
        )
        .await?;
        let _ = connection.close(200, "published".into()).await;
        Ok::<u64, crate::Error>(sent)
    });
    match result {
        Ok(sent) => {
            output::line(&format!("published {sent} messages to {}", args.queue));
            ExitCode::SUCCESS
        }
        Err(e) => {
            output::error(&e.to_string());
            ExitCode::FAILURE
        }
    }
}
