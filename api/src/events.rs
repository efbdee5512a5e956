//! Feeds streamed text from the broker into the [`JobHub`]: one consumer
//! per api process, bound per job while the job has a subscriber here.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use chatq_common::queue::{EventSubscriber, Topology};

use crate::hub::{BindCommand, JobHub};

/// Longest pause between reconnect attempts.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(5);

/// Runs the consumer in the background until `shutdown`.
pub fn start(
    amqp_url: String,
    topology: Topology,
    hub: JobHub,
    commands: mpsc::UnboundedReceiver<BindCommand>,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        tokio::select! {
            () = run(&amqp_url, &topology, &hub, commands) => {}
            () = shutdown.cancelled() => {}
        }
    });
}

async fn run(
    url: &str,
    topology: &Topology,
    hub: &JobHub,
    mut commands: mpsc::UnboundedReceiver<BindCommand>,
) {
    let mut delay = Duration::from_millis(100);
    loop {
        match EventSubscriber::connect(url, topology).await {
            Ok(mut events) => {
                delay = Duration::from_millis(100);
                // Jobs subscribed while the broker was away, or on the old queue.
                let mut rebound = true;
                for id in hub.text_jobs() {
                    if let Err(err) = events.bind(id).await {
                        tracing::warn!(error = %err, "binding streamed text failed; reconnecting");
                        rebound = false;
                        break;
                    }
                }
                // Text may have been missed meanwhile: subscribers re-read the rows.
                hub.changed_all();
                let lost = !rebound || serve(&mut events, hub, &mut commands).await;
                events.close().await;
                if !lost {
                    return;
                }
                tracing::warn!("events consumer lost the broker; reconnecting");
            }
            Err(err) => tracing::warn!(error = %err, "events consumer cannot connect"),
        }
        // While away, subscribers are told at once that text is not routed.
        let pause = tokio::time::sleep(delay);
        tokio::pin!(pause);
        loop {
            tokio::select! {
                () = &mut pause => break,
                command = commands.recv() => match command {
                    Some(BindCommand::Bind(_, Some(reply))) => { let _ = reply.send(false); }
                    Some(_) => {}
                    None => return,
                },
            }
        }
        delay = (delay * 2).min(MAX_RECONNECT_DELAY);
    }
}

/// Serves bind commands and deliveries; true when the connection was lost,
/// false when the hub is gone.
async fn serve(
    events: &mut EventSubscriber,
    hub: &JobHub,
    commands: &mut mpsc::UnboundedReceiver<BindCommand>,
) -> bool {
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                Some(BindCommand::Bind(id, reply)) => {
                    let bound = events.bind(id).await;
                    if let Some(reply) = reply {
                        let _ = reply.send(bound.is_ok());
                    }
                    if bound.is_err() {
                        return true;
                    }
                }
                Some(BindCommand::Unbind(id)) => {
                    if events.unbind(id).await.is_err() {
                        return true;
                    }
                }
                None => return false,
            },
            next = events.next() => match next {
                Ok(Some(event)) => hub.delta(event),
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(error = %err, "events consumer failed");
                    return true;
                }
            },
        }
    }
}
