//! Publishing copies (to delay queues and the dead-letter exchange) with
//! publisher confirms: the original is acked only after its copy is confirmed.

use lapin::Confirmation;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
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

/// Why a copy was not safely stored.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum PublishError {
    #[error("the broker refused the copy (nack)")]
    Nacked,
    #[error(
        "the copy could not be routed to {routing_key:?} via exchange {exchange:?} (does the queue exist?)"
    )]
    Unroutable {
        exchange: String,
        routing_key: String,
    },
    #[error("{0}")]
    Broker(lapin::Error),
    #[error("no confirm within {}", humantime::format_duration(*.0))]
    TimedOut(Duration),
}

/// A confirm-mode channel. Cheap to clone; shared by a consumer's tasks.
#[derive(Debug, Clone)]
pub(crate) struct Publisher {
    channel: Channel,
    timeout: Duration,
}

impl Publisher {
    /// A confirm-mode channel on `connection`. A copy not confirmed within
    /// `timeout` (a broker blocked by a resource alarm for that long) is
    /// given up, and its original returned to the queue before the broker's
    /// consumer timeout would close the channel.
    pub(crate) async fn open(
        connection: &Connection,
        timeout: Duration,
    ) -> Result<Self, lapin::Error> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Self { channel, timeout })
    }

    /// False once the channel is closed (its connection lost, or closed by the broker).
    pub(crate) fn is_open(&self) -> bool {
        self.channel.status().connected()
    }

    /// Publishes (mandatory) and waits for the broker's confirm.
    pub(crate) async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        tokio::time::timeout(
            self.timeout,
            self.publish(exchange, routing_key, body, properties),
        )
        .await
        .unwrap_or(Err(PublishError::TimedOut(self.timeout)))
    }

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let confirm = self
            .channel
            .basic_publish(
                ShortString::from(exchange),
                ShortString::from(routing_key),
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
            Confirmation::Ack(Some(_)) => Err(PublishError::Unroutable {
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
            }),
            Confirmation::Nack(_) => Err(PublishError::Nacked),
        }
    }

    pub(crate) async fn close(&self) {
        if self.channel.status().connected() {
            let _ = self.channel.close(200, "consumer stopped".into()).await;
        }
    }
}
