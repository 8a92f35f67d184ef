//! Without the `admin` feature there is no endpoint to serve metrics, so
//! nothing is recorded: this stands in for `metrics.rs` at no cost.

use crate::breaker::Transition;

/// No metrics.
#[derive(Debug, Clone, Default)]
pub(crate) struct Metrics;

impl Metrics {
    pub(crate) fn new() -> Self {
        Self
    }

    /// Never called: durations are kept only for an endpoint.
    pub(crate) fn handler_histograms(&self, _queue: &str) -> Vec<metrics::Histogram> {
        Vec::new()
    }

    pub(crate) fn transition(&self, _breaker: &str, _t: &Transition) {}
}
