//! Publishing copies (to delay queues and the dead-letter exchange) with
//! publisher confirms: the original is acked only after its copy is confirmed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::Confirmation;
use tokio::time::Instant;
use tracing::debug;

use crate::amqp::topology::Topology;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection};

/// A new channel in confirm mode, for tools that publish and wait.
pub(crate) async fn confirm_channel(connection: &Connection) -> Result<Channel, crate::Error> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| crate::Error::broker("opening a channel", e))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| crate::Error::broker("enabling publisher confirms", e))?;
    Ok(channel)
}

/// Why a message (a copy, a replay, an import) was not safely stored.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The broker confirmed it negatively.
    #[error("the broker refused it (nack)")]
    Nacked,
    /// It was returned: no queue is bound where it was sent.
    #[error(
        "it could not be routed to {routing_key:?} via exchange {exchange:?} (does the queue exist?)"
    )]
    Unroutable {
        /// The exchange it was published to (`""`: the default exchange).
        exchange: String,
        /// Its routing key.
        routing_key: String,
    },
    /// The channel or connection failed (or the broker closed the channel).
    #[error("{}", crate::error::describe(.0))]
    Broker(lapin::Error),
    /// No confirm came in time (a broker blocked by a resource alarm).
    #[error("no confirm within {}", humantime::format_duration(*.0))]
    TimedOut(Duration),
}

/// Publishes with `mandatory` on a confirm-mode `channel` and waits for the
/// broker's confirm: the one confirmed publish every copy, replay, import
/// and demo message goes through.
///
/// # Errors
///
/// [`PublishError`] when the broker did not store it.
///
/// # Cancel safety
///
/// Not cancel safe: dropped after the publish went out, the message may or
/// may not be stored.
pub(crate) async fn confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), PublishError> {
    let unroutable = || PublishError::Unroutable {
        exchange: crate::text::truncate(exchange, 80),
        routing_key: crate::text::truncate(routing_key, 80),
    };
    let (Ok(exchange_name), Ok(key)) = (super::short(exchange), super::short(routing_key)) else {
        // No queue or exchange has a name that long.
        return Err(unroutable());
    };
    let confirm = channel
        .basic_publish(
            exchange_name,
            key,
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            properties,
        )
        .await
        .map_err(PublishError::Broker)?
        .await
        .map_err(PublishError::Broker)?;
    match confirm {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(_)) => Err(unroutable()),
        Confirmation::Nack(_) => Err(PublishError::Nacked),
    }
}

/// A confirm-mode channel on the publishing connection. Cheap to clone;
/// shared by a consumer's tasks. When the broker closes the channel (a
/// publish to an exchange that was deleted, say), the next publish opens a
/// new one on the same connection.
#[derive(Debug, Clone)]
pub(crate) struct Publisher {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    connection: Arc<Connection>,
    /// `None` until the first publish of a lazily opened publisher.
    channel: Mutex<Option<Channel>>,
    /// One reopen at a time.
    reopening: tokio::sync::Mutex<()>,
    timeout: Duration,
    /// When the topology was last declared again after a failed copy.
    redeclared: Mutex<Option<Instant>>,
}

/// Declaring the topology again after a failed copy happens at most this often.
const REDECLARE_EVERY: Duration = Duration::from_secs(1);

impl Publisher {
    /// A confirm-mode channel on `connection`. A copy not confirmed within
    /// `timeout` (a broker blocked by a resource alarm for that long) is
    /// given up, and its original returned to the queue before the broker's
    /// consumer timeout would close the channel.
    pub(crate) async fn open(
        connection: Arc<Connection>,
        timeout: Duration,
    ) -> Result<Self, lapin::Error> {
        let channel = open_confirm(&connection).await?;
        let publisher = Self::lazy(connection, timeout);
        *publisher
            .inner
            .channel
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(channel);
        Ok(publisher)
    }

    /// As [`open`](Self::open), but the channel is opened by the first
    /// publish: for handlers' own publishes, which most consumers never make.
    pub(crate) fn lazy(connection: Arc<Connection>, timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                connection,
                channel: Mutex::new(None),
                reopening: tokio::sync::Mutex::new(()),
                timeout,
                redeclared: Mutex::new(None),
            }),
        }
    }

    /// How long one copy may wait for its confirm.
    pub(crate) fn timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// False once the publishing connection is lost: a new session needs a
    /// new publisher then.
    pub(crate) fn is_open(&self) -> bool {
        self.inner.connection.status().connected()
    }

    /// The channel, if it is open.
    fn current(&self) -> Option<Channel> {
        self.inner
            .channel
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .filter(|c| c.status().connected())
    }

    /// The channel, opened (again) if it is not open: never opened yet, or
    /// closed by the broker.
    async fn channel(&self) -> Result<Channel, lapin::Error> {
        if let Some(channel) = self.current() {
            return Ok(channel);
        }
        let _one = self.inner.reopening.lock().await;
        if let Some(channel) = self.current() {
            return Ok(channel);
        }
        let fresh = open_confirm(&self.inner.connection).await?;
        *self
            .inner
            .channel
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(fresh.clone());
        Ok(fresh)
    }

    /// Declares `topology` again (after a copy found its queue or exchange
    /// missing), at most once a second; a failure is only logged.
    pub(crate) async fn redeclare(&self, topology: &Topology) {
        {
            let mut last = self
                .inner
                .redeclared
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.is_some_and(|at| at.elapsed() < REDECLARE_EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        let declared = topology.declare_on(&self.inner.connection).await;
        match declared {
            Ok(()) => {
                debug!(topology = %topology, "declared the topology again after a failed copy");
            }
            Err(e) => {
                debug!(topology = %topology, error = %e, "could not declare the topology again");
            }
        }
    }

    /// Publishes (mandatory) and waits for the broker's confirm.
    pub(crate) async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let publish = async {
            let channel = self.channel().await.map_err(PublishError::Broker)?;
            confirmed(&channel, exchange, routing_key, body, properties).await
        };
        tokio::time::timeout(self.timeout(), publish)
            .await
            .unwrap_or(Err(PublishError::TimedOut(self.timeout())))
    }

    pub(crate) async fn close(&self) {
        if let Some(channel) = self.current() {
            let _ = channel.close(200, "consumer stopped".into()).await;
        }
    }
}

async fn open_confirm(connection: &Connection) -> Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}
