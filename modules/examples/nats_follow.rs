//! Follows the stream the `nats` module writes, with a durable consumer, and prints every
//! event: a starting point for a consumer of directory changes.
//!
//! ```sh
//! cargo run -p modules --example nats_follow -- nats://127.0.0.1:4222 univention-directory my-consumer
//! ```
//!
//! The consumer is durable: stopped and started again it goes on after the last event it
//! acknowledged. An event is acknowledged only after it was handled (here: printed), so
//! a crash in between shows it again (at-least-once to the consumer; deduplicate by the
//! `Nats-Msg-Id` header if handling twice matters).

use async_nats::jetstream::{self, consumer};
use futures::StreamExt as _;

#[tokio::main]
async fn main() -> Result<(), async_nats::Error> {
    let mut args = std::env::args().skip(1);
    let server = args
        .next()
        .unwrap_or_else(|| "nats://127.0.0.1:4222".to_owned());
    let stream = args
        .next()
        .unwrap_or_else(|| "univention-directory".to_owned());
    let name = args.next().unwrap_or_else(|| "nats-follow".to_owned());

    let client = async_nats::connect(server).await?;
    let jetstream = jetstream::new(client);
    let stream = jetstream.get_stream(&stream).await?;
    let consumer: consumer::PullConsumer = stream
        .get_or_create_consumer(
            &name,
            consumer::pull::Config {
                durable_name: Some(name.clone()),
                ack_policy: consumer::AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await?;
    let mut messages = consumer.messages().await?;
    while let Some(message) = messages.next().await {
        let message = message?;
        let id = message
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        let event: serde_json::Value = serde_json::from_slice(&message.payload)?;
        println!(
            "{} {id}: {} {} changed {}",
            message.subject, event["command"], event["dn"], event["changed"]
        );
        message.ack().await?;
    }
    Ok(())
}
