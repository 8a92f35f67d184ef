//! The 3-node RabbitMQ 4 cluster of `scripts/rabbitmq.sh start 3`.

/// The nodes' AMQP ports on 127.0.0.1 (node 1 to 3).
pub const NODES: [u16; 3] = [5673, 5674, 5675];

/// A node's AMQP URL (2 s heartbeat: losses are noticed fast).
pub fn node_url(port: u16) -> String {
    format!("amqp://guest:guest@127.0.0.1:{port}/%2f?heartbeat=2")
}

/// `scripts/rabbitmq.sh ctl N ARGS…` (N: 1-3): rabbitmqctl of one node.
pub fn ctl(node: usize, args: &[&str]) -> std::process::Output {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/rabbitmq.sh");
    std::process::Command::new("bash")
        .arg(script)
        .arg("ctl")
        .arg(node.to_string())
        .args(args)
        .output()
        .expect("scripts/rabbitmq.sh runs")
}

/// Starts these nodes' apps again when dropped (a failed test must not
/// leave the cluster short of a node), all at once: a node that was not the
/// last to stop waits for its peers before it starts.
pub struct StartAgain(pub Vec<usize>);

impl Drop for StartAgain {
    fn drop(&mut self) {
        let starts: Vec<_> = self
            .0
            .iter()
            .map(|n| {
                let n = *n;
                std::thread::spawn(move || ctl(n, &["start_app"]))
            })
            .collect();
        for s in starts {
            let _ = s.join();
        }
    }
}

/// Held by each test that stops nodes, so that the tests of one binary take
/// turns with the cluster.
pub static CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
