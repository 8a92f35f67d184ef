//! A TCP proxy between the worker and the broker, on 127.0.0.1, that can cut
//! every connection, black-hole traffic, or add latency.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does with bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Pass everything through.
    None,
    /// Keep connections open but deliver nothing in either direction.
    BlackHole,
    /// Delay every chunk by this much.
    Latency(Duration),
}

struct Shared {
    fault: watch::Sender<Fault>,
    /// Bumped to cut every open connection.
    cuts: watch::Sender<u64>,
    open: AtomicUsize,
    accepted: AtomicUsize,
}

pub struct Proxy {
    pub port: u16,
    shared: Arc<Shared>,
    listener: Mutex<Option<JoinHandle<()>>>,
    target: SocketAddr,
}

/// A free port on 127.0.0.1 (nothing listens on it once this returns).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The broker's address from `AMQP_ADDR`.
pub fn broker_addr() -> SocketAddr {
    let url = super::amqp_addr();
    let rest = url.split("://").nth(1).unwrap_or("127.0.0.1:5672");
    let hostport = rest.rsplit('@').next().unwrap().split('/').next().unwrap();
    let hostport = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:5672")
    };
    let hostport = hostport.replace("localhost", "127.0.0.1");
    hostport
        .parse()
        .expect("AMQP_ADDR host must be an IP address for the proxy")
}

impl Proxy {
    /// A proxy to the broker, listening on a fresh port.
    pub async fn start() -> Self {
        let proxy = Self::new(free_port());
        proxy.listen().await;
        proxy
    }

    /// A proxy to `target` (a cluster node), listening on a fresh port.
    pub async fn start_to(target: SocketAddr) -> Self {
        let mut proxy = Self::new(free_port());
        proxy.target = target;
        proxy.listen().await;
        proxy
    }

    /// A proxy for `port` that does not listen yet (connections are refused
    /// until [`listen`](Self::listen)).
    pub fn new(port: u16) -> Self {
        let (fault, _) = watch::channel(Fault::None);
        let (cuts, _) = watch::channel(0);
        Self {
            port,
            shared: Arc::new(Shared {
                fault,
                cuts,
                open: AtomicUsize::new(0),
                accepted: AtomicUsize::new(0),
            }),
            listener: Mutex::new(None),
            target: broker_addr(),
        }
    }

    /// The AMQP URL through the proxy, with `query` appended (e.g. `?heartbeat=2`).
    pub fn url(&self, query: &str) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f{query}", self.port)
    }

    pub async fn listen(&self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
        let shared = self.shared.clone();
        let target = self.target;
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    shared.accepted.fetch_add(1, Ordering::Relaxed);
                    shared.open.fetch_add(1, Ordering::Relaxed);
                    pipe(client, server, &shared).await;
                    shared.open.fetch_sub(1, Ordering::Relaxed);
                });
            }
        });
        *self.listener.lock().unwrap() = Some(task);
    }

    /// Stops accepting and cuts every open connection.
    pub fn shut(&self) {
        if let Some(task) = self.listener.lock().unwrap().take() {
            task.abort();
        }
        self.cut_all();
    }

    /// Closes every open connection at once (both sides see a reset/EOF).
    pub fn cut_all(&self) {
        self.shared.cuts.send_modify(|n| *n += 1);
    }

    pub fn set(&self, fault: Fault) {
        self.shared.fault.send_replace(fault);
    }

    /// Connections open through the proxy now.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::Relaxed)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shut();
    }
}

async fn pipe(client: TcpStream, server: TcpStream, shared: &Shared) {
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let mut cuts = shared.cuts.subscribe();
    cuts.borrow_and_update();
    let up = pump(cr, sw, shared.fault.subscribe());
    let down = pump(sr, cw, shared.fault.subscribe());
    tokio::select! {
        () = up => {}
        () = down => {}
        _ = cuts.changed() => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    fault: watch::Receiver<Fault>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let current = *fault.borrow();
        match current {
            Fault::None => {}
            Fault::BlackHole => continue,
            Fault::Latency(d) => tokio::time::sleep(d).await,
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
