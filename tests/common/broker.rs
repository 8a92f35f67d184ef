//! The test's own broker client: publishing, inspecting and deleting queues,
//! closing connections, and users of its own.

use super::*;

/// A plain client connection for the test's own publishing and inspection.
pub struct TestBroker {
    pub connection: Connection,
    pub channel: Channel,
    queues: Mutex<Vec<String>>,
    exchanges: Mutex<Vec<String>>,
}

#[derive(Debug, Clone)]
pub struct Got {
    pub id: String,
    pub headers: BTreeMap<String, AMQPValue>,
    pub body: Vec<u8>,
    pub redelivered: bool,
}

impl Got {
    pub fn header_str(&self, name: &str) -> Option<String> {
        match self.headers.get(name)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.to_string()),
            other => Some(format!("{other:?}")),
        }
    }

    pub fn header_u64(&self, name: &str) -> Option<u64> {
        match self.headers.get(name)? {
            AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
            AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
            AMQPValue::LongUInt(n) => Some(u64::from(*n)),
            AMQPValue::ShortShortUInt(n) => Some(u64::from(*n)),
            AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).parse().ok(),
            _ => None,
        }
    }
}

impl TestBroker {
    pub async fn connect() -> Self {
        Self::connect_to(&amqp_addr()).await
    }

    /// A client of the broker (or cluster node) at `url`.
    pub async fn connect_to(url: &str) -> Self {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "tests need RabbitMQ at {} (AMQP_ADDR, default amqp://guest:guest@127.0.0.1:5672/%2f): {e}",
                    rabbit_guard::secret::mask_url(url)
                )
            });
        let channel = connection.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        Self {
            connection,
            channel,
            queues: Mutex::new(Vec::new()),
            exchanges: Mutex::new(Vec::new()),
        }
    }

    /// Remembers the queues of a consumer so [`cleanup`](Self::cleanup) deletes them.
    pub fn track(&self, c: &ConsumerSettings) {
        let mut q = self.queues.lock().unwrap();
        q.push(c.queue.clone());
        q.push(c.dead_letter_queue());
        for d in &c.retry.delays {
            q.push(c.delay_queue(*d));
        }
        self.exchanges
            .lock()
            .unwrap()
            .push(c.dead_letter_exchange());
    }

    pub fn track_queue(&self, name: &str) {
        self.queues.lock().unwrap().push(name.to_owned());
    }

    /// Declares a durable queue `name` with `args` (track it to delete it).
    pub async fn declare_queue(&self, name: &str, args: FieldTable) {
        self.channel
            .queue_declare(
                ShortString::from(name),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await
            .unwrap_or_else(|e| panic!("declare queue {name}: {e}"));
    }

    pub fn track_exchange(&self, name: &str) {
        self.exchanges.lock().unwrap().push(name.to_owned());
    }

    pub async fn cleanup(&self) {
        let queues: Vec<String> = self.queues.lock().unwrap().drain(..).collect();
        let exchanges: Vec<String> = self.exchanges.lock().unwrap().drain(..).collect();
        delete_all(&self.connection, &queues, &exchanges).await;
    }

    /// Declares a plain durable queue (for tests that publish before the worker starts).
    pub async fn declare(&self, c: &ConsumerSettings) {
        let topology = rabbit_guard::Topology::of(0, c);
        let ch = self.connection.create_channel().await.unwrap();
        topology.declare(&ch).await.expect("declare test topology");
        let _ = ch.close(200, "ok".into()).await;
    }

    /// Publishes one message per body with ids `{prefix}-{i}`, confirmed.
    pub async fn publish_json(&self, queue: &str, prefix: &str, n: usize) -> Vec<String> {
        let mut ids = Vec::with_capacity(n);
        let mut confirms = Vec::with_capacity(n);
        for i in 0..n {
            let id = format!("{prefix}-{i}");
            let body = format!("{{\"id\":\"{id}\",\"n\":{i}}}");
            confirms.push(
                self.channel
                    .basic_publish(
                        ShortString::from(""),
                        ShortString::from(queue),
                        BasicPublishOptions::default(),
                        body.as_bytes(),
                        BasicProperties::default()
                            .with_message_id(ShortString::from(id.as_str()))
                            .with_content_type(ShortString::from("application/json"))
                            .with_delivery_mode(2),
                    )
                    .await
                    .unwrap(),
            );
            ids.push(id);
        }
        for (id, c) in ids.iter().zip(confirms) {
            let confirm = c.await.unwrap();
            assert!(
                confirm.is_ack(),
                "the broker should confirm {id} published to {queue}: {confirm:?}"
            );
        }
        ids
    }

    /// Publishes one persistent message with `headers`, confirmed.
    pub async fn publish_with_headers(
        &self,
        queue: &str,
        id: &str,
        headers: FieldTable,
        body: &[u8],
    ) {
        let confirm = self
            .channel
            .basic_publish(
                ShortString::from(""),
                ShortString::from(queue),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default()
                    .with_message_id(ShortString::from(id))
                    .with_headers(headers)
                    .with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(
            confirm.is_ack(),
            "the broker should confirm {id} published to {queue}: {confirm:?}"
        );
    }

    pub async fn publish_raw(&self, queue: &str, id: &str, body: &[u8], content_type: &str) {
        let confirm = self
            .channel
            .basic_publish(
                ShortString::from(""),
                ShortString::from(queue),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default()
                    .with_message_id(ShortString::from(id))
                    .with_content_type(ShortString::from(content_type))
                    .with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(
            confirm.is_ack(),
            "the broker should confirm {id} published to {queue}: {confirm:?}"
        );
    }

    /// (ready messages, consumers) of a queue, from a passive declare.
    pub async fn counts(&self, queue: &str) -> (u32, u32) {
        let ch = self.connection.create_channel().await.unwrap();
        let q = ch
            .queue_declare(
                ShortString::from(queue),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("queue {queue} should exist: {e}"));
        let _ = ch.close(200, "ok".into()).await;
        (q.message_count(), q.consumer_count())
    }

    /// Ready messages, or `None` when the queue does not exist.
    pub async fn ready_if_exists(&self, queue: &str) -> Option<u32> {
        let ch = self.connection.create_channel().await.unwrap();
        let q = ch
            .queue_declare(
                ShortString::from(queue),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .ok()?;
        let _ = ch.close(200, "ok".into()).await;
        Some(q.message_count())
    }

    pub async fn consumers(&self, queue: &str) -> u32 {
        self.counts(queue).await.1
    }

    pub async fn ready(&self, queue: &str) -> u32 {
        self.counts(queue).await.0
    }

    /// Takes (and acks) every message in `queue`.
    pub async fn drain(&self, queue: &str) -> Vec<Got> {
        let ch = self.connection.create_channel().await.unwrap();
        let mut out = Vec::new();
        while let Some(m) = ch
            .basic_get(ShortString::from(queue), BasicGetOptions::default())
            .await
            .unwrap()
        {
            let d = m.delivery;
            out.push(Got {
                id: d
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
                headers: d
                    .properties
                    .headers()
                    .as_ref()
                    .map(|h| {
                        h.inner()
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.clone()))
                            .collect()
                    })
                    .unwrap_or_default(),
                body: d.data.clone(),
                redelivered: d.redelivered,
            });
            d.acker.ack(BasicAckOptions::default()).await.unwrap();
        }
        let _ = ch.close(200, "ok".into()).await;
        out
    }
}

async fn delete_all(connection: &Connection, queues: &[String], exchanges: &[String]) {
    let Ok(ch) = connection.create_channel().await else {
        return;
    };
    for q in queues {
        let _ = ch
            .queue_delete(ShortString::from(q.as_str()), QueueDeleteOptions::default())
            .await;
    }
    for e in exchanges {
        let _ = ch
            .exchange_delete(ShortString::from(e.as_str()), Default::default())
            .await;
    }
}

/// A test that panics before `cleanup` still deletes its queues: the broker
/// is shared with other tests and runs.
impl Drop for TestBroker {
    fn drop(&mut self) {
        let queues: Vec<String> = self
            .queues
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..)
            .collect();
        let exchanges: Vec<String> = self
            .exchanges
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..)
            .collect();
        if queues.is_empty() && exchanges.is_empty() {
            return;
        }
        // Drop may run inside the test's runtime: clean up from a thread of our own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(c) =
                    Connection::connect(&amqp_addr(), ConnectionProperties::default()).await
                {
                    delete_all(&c, &queues, &exchanges).await;
                    let _ = c.close(200, "cleanup".into()).await;
                }
            });
        })
        .join();
    }
}

/// `rabbitmqctl list_connections` with `fields`: a line per connection.
pub fn list_connections(fields: &[&str]) -> String {
    let out = rabbitmqctl()
        .args(["list_connections", "-q", "--no-table-headers"])
        .args(fields)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("rabbitmqctl must be installed for broker-side tests");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Closes, through the broker, every connection whose client-provided name
/// is `name` (`rabbitmqctl close_connection`). Returns how many were closed.
pub fn close_connections_named(name: &str, reason: &str) -> usize {
    let text = list_connections(&["pid", "client_properties"]);
    let needle = format!("{{\"connection_name\",\"{name}\"}}");
    let mut closed = 0;
    for line in text.lines().filter(|l| l.contains(&needle)) {
        let pid = line.split_whitespace().next().unwrap();
        let status = rabbitmqctl()
            .args(["close_connection", pid, reason])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        if status.success() {
            closed += 1;
        }
    }
    closed
}

/// A broker user of a test's own (`rabbitmqctl add_user`), with a password
/// that appears nowhere else, deleted when dropped.
pub struct TempUser {
    pub user: String,
    pub password: String,
}

impl TempUser {
    pub fn create() -> Self {
        let user = unique("user").replace('.', "-");
        let password = format!("pw-{}-secret", random_below(1_000_000_000));
        let ctl = |args: &[&str]| rabbitmqctl().args(args).output().expect("rabbitmqctl");
        let added = ctl(&["add_user", &user, &password]);
        assert!(
            added.status.success(),
            "rabbitmqctl add_user {user} failed (exit {:?}): {}",
            added.status.code(),
            String::from_utf8_lossy(&added.stderr)
        );
        let permitted = ctl(&["set_permissions", "-p", "/", &user, ".*", ".*", ".*"]);
        assert!(
            permitted.status.success(),
            "rabbitmqctl set_permissions for {user} failed (exit {:?}): {}",
            permitted.status.code(),
            String::from_utf8_lossy(&permitted.stderr)
        );
        Self { user, password }
    }
}

impl Drop for TempUser {
    fn drop(&mut self) {
        let _ = rabbitmqctl().args(["delete_user", &self.user]).output();
    }
}
