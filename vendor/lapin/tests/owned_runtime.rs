//! rabbit-guard's patch: a connection given a current-thread runtime that no
//! other thread drives is driven by its IO thread (handshake, acks, the
//! report of a lost connection), and keeps the broker's server properties.
//! Needs a broker at AMQP_ADDR (default amqp://127.0.0.1:5672/%2f).

use async_rs::Runtime;
use futures_lite::StreamExt;
use lapin::{
    BasicProperties, Connection, ConnectionProperties, options::*, types::AMQPValue,
    types::FieldTable, uri::AMQPUri,
};
use std::{
    io,
    net::{Shutdown, TcpListener, TcpStream},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

fn addr() -> String {
    std::env::var("AMQP_ADDR").unwrap_or_else(|_| "amqp://127.0.0.1:5672/%2f".into())
}

/// A current-thread runtime that only the connection's IO thread drives.
fn owned() -> async_rs::TokioRuntime {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    Runtime::tokio_with_runtime(rt)
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

async fn ready(connection: &Connection, queue: &str) -> u32 {
    let channel = connection.create_channel().await.unwrap();
    let q = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = channel.close(200, "counted".into()).await;
    q.message_count()
}

#[test]
fn an_owned_runtime_is_driven_by_the_io_thread_and_every_ack_reaches_the_broker() {
    const MESSAGES: u32 = 2_000;
    let caller = tokio::runtime::Runtime::new().unwrap();
    caller.block_on(async {
        let connection = tokio::time::timeout(
            Duration::from_secs(10),
            Connection::connect_with_runtime(&addr(), ConnectionProperties::default(), owned()),
        )
        .await
        .expect("the handshake runs on the owned runtime: only the IO thread can drive it")
        .expect("connect");

        let product = connection.configuration().server_properties().inner().get("product");
        assert!(
            matches!(product, Some(AMQPValue::LongString(s)) if s.as_bytes() == b"RabbitMQ"),
            "server_properties keeps connection.start's product, got {product:?}"
        );

        let queue = unique("lapin-owned-runtime");
        let channel = connection.create_channel().await.unwrap();
        channel
            .queue_declare(queue.as_str().into(), QueueDeclareOptions::default(), FieldTable::default())
            .await
            .unwrap();
        channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        for i in 0..MESSAGES {
            channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &i.to_be_bytes(),
                    BasicProperties::default(),
                )
                .await
                .unwrap();
        }
        channel.wait_for_confirms().await.unwrap();

        channel.basic_qos(100, BasicQosOptions::default()).await.unwrap();
        let mut consumer = channel
            .basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .unwrap();
        let mut acked = 0;
        while acked < MESSAGES {
            let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
                .await
                .unwrap_or_else(|_| panic!("no delivery within 10 s after {acked} of {MESSAGES}"))
                .expect("consumer ended")
                .expect("delivery");
            assert!(delivery.ack(BasicAckOptions::default()).await.unwrap(), "ack sent");
            acked += 1;
        }

        // The acks are sent by lapin's internal tasks on the owned runtime. A
        // synchronous round trip after the last one: the broker answers it
        // only after handling every frame sent before it.
        channel.basic_qos(100, BasicQosOptions::default()).await.unwrap();
        channel.basic_cancel(consumer.tag(), BasicCancelOptions::default()).await.unwrap();
        // Closing the channel requeues anything it still holds unacked.
        channel.close(200, "done".into()).await.unwrap();
        let left = ready(&connection, &queue).await;
        let cleanup = connection.create_channel().await.unwrap();
        cleanup
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
        connection.close(200, "done".into()).await.unwrap();
        assert_eq!(left, 0, "every one of {MESSAGES} acks reached the broker: {left} back in the queue after the channel closed");
    });
}

/// Forwards one client connection to the broker until `cut` is called.
struct CutProxy {
    port: u16,
    sockets: Arc<Mutex<Vec<TcpStream>>>,
}

impl CutProxy {
    fn start(broker: (String, u16)) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let sockets = Arc::new(Mutex::new(Vec::new()));
        let kept = sockets.clone();
        thread::spawn(move || {
            let Ok((client, _)) = listener.accept() else {
                return;
            };
            let Ok(server) = TcpStream::connect((broker.0.as_str(), broker.1)) else {
                return;
            };
            for (from, to) in [(&client, &server), (&server, &client)] {
                let (mut from, mut to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
                thread::spawn(move || {
                    let _ = io::copy(&mut from, &mut to);
                    let _ = to.shutdown(Shutdown::Both);
                });
            }
            kept.lock().unwrap().extend([client, server]);
        });
        Ok(Self { port, sockets })
    }

    fn cut(&self) {
        for s in self.sockets.lock().unwrap().iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

#[test]
fn a_lost_connection_is_reported_to_its_consumer_on_an_owned_runtime() {
    let broker: AMQPUri = addr().parse().expect("AMQP_ADDR");
    let proxy = CutProxy::start((broker.authority.host.clone(), broker.authority.port)).unwrap();
    let mut uri = broker.clone();
    uri.authority.host = "127.0.0.1".into();
    uri.authority.port = proxy.port;

    let caller = tokio::runtime::Runtime::new().unwrap();
    caller.block_on(async {
        let connection =
            Connection::connect_uri_with_runtime(uri, ConnectionProperties::default(), owned())
                .await
                .expect("connect through the proxy");
        let channel = connection.create_channel().await.unwrap();
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut consumer = channel
            .basic_consume(
                queue.name().clone(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();

        let cut = Instant::now();
        proxy.cut();
        // The IO loop ends, then drives the runtime until lapin's internal
        // tasks have told the consumer: without that the stream would pend.
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match consumer.next().await {
                    None | Some(Err(_)) => break,
                    Some(Ok(_)) => {}
                }
            }
        })
        .await;
        assert!(
            ended.is_ok(),
            "the consumer learns of the cut within 10 s (waited {:?})",
            cut.elapsed()
        );
        assert!(
            !connection.status().connected(),
            "the connection says it is no longer connected"
        );
    });
}
