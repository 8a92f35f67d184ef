//! The 3-node RabbitMQ 4 cluster of `scripts/rabbitmq.sh start 3`.

/// The nodes' AMQP ports on 127.0.0.1 (node 1 to 3).
pub const NODES: [u16; 3] = [5673, 5674, 5675];

/// A node's AMQP URL (2 s heartbeat: losses are noticed fast).
pub fn node_url(port: u16) -> String {
    format!("amqp://guest:guest@127.0.0.1:{port}/%2f?heartbeat=2")
}

/// `scripts/rabbitmq.sh ctl N ARGS…` (N: 1-3): rabbitmqctl of one node,
/// given at most two minutes.
pub fn ctl(node: usize, args: &[&str]) -> std::process::Output {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/rabbitmq.sh");
    std::process::Command::new("timeout")
        .arg("120")
        .arg("bash")
        .arg(script)
        .arg("ctl")
        .arg(node.to_string())
        .args(args)
        .output()
        .expect("scripts/rabbitmq.sh runs")
}

/// Starts the apps of `nodes` all at once and waits for each: a node
/// whose peers stopped after it waits for them before it starts, so one at
/// a time can hang.
pub fn start_apps(nodes: &[usize]) -> Vec<(usize, std::process::Output)> {
    let starts: Vec<_> = nodes
        .iter()
        .map(|n| {
            let n = *n;
            std::thread::spawn(move || (n, ctl(n, &["start_app"])))
        })
        .collect();
    starts.into_iter().filter_map(|s| s.join().ok()).collect()
}

/// Starts these nodes' apps again when dropped (a failed test must not
/// leave the cluster short of a node), all at once.
pub struct StartAgain(pub Vec<usize>);

impl Drop for StartAgain {
    fn drop(&mut self) {
        start_apps(&self.0);
    }
}

/// Held by each test that stops nodes, so that the tests of one binary take
/// turns with the cluster.
pub static CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
