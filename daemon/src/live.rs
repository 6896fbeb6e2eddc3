//! Live channels: what plugins `publish`, streamed to web clients as Server-Sent Events at
//! `GET /live/<channel>`. Best effort by design (a slow client skips payloads rather than holding memory),
//! but each channel keeps its last payload and sends it first to every new client, so a page shows the
//! current state as soon as it connects. With plugins configured, the last payloads are also written (by a
//! thread of their own, in publish order) to the plugins' store and read back at start, so a restart does not
//! blank a dashboard.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use tokio::sync::broadcast;

/// Payloads buffered per client before it starts skipping.
const BUFFER: usize = 64;
/// Most channels (clients cannot make the daemon keep an unbounded number by asking for names).
const MAX_CHANNELS: usize = 256;

/// The channels of one daemon.
#[derive(Debug, Clone, Default)]
pub struct Live {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    /// Where last payloads go to be kept across restarts, once [`Live::persist_to`] was called.
    saver: Arc<Mutex<Option<Saver>>>,
}

/// Sends (channel, payload) to the thread that keeps last payloads.
type Saver = std::sync::mpsc::Sender<(String, Arc<str>)>;

#[derive(Debug)]
struct Channel {
    tx: broadcast::Sender<Arc<str>>,
    last: Option<Arc<str>>,
}

impl Channel {
    fn new() -> Self {
        Channel { tx: broadcast::channel(BUFFER).0, last: None }
    }
}

/// Whether a channel name is acceptable (it is part of a URL path).
pub fn valid_channel(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Live {
    /// Restores the last payloads kept in `kv`, and from now on keeps each new one there. Idempotent.
    pub fn persist_to(&self, kv: crate::plugin::kv::Kv) {
        // Never hold the saver's lock while taking the channels' (publish takes them the other way round).
        if self.saver.lock().map(|s| s.is_some()).unwrap_or(true) {
            return;
        }
        match kv.live_payloads() {
            Ok(saved) => {
                if let Ok(mut channels) = self.channels.lock() {
                    for (channel, payload) in saved.into_iter().take(MAX_CHANNELS) {
                        let c = channels.entry(channel).or_insert_with(Channel::new);
                        c.last.get_or_insert_with(|| Arc::from(payload));
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the live channels' last payloads"),
        }
        let (tx, rx) = std::sync::mpsc::channel::<(String, Arc<str>)>();
        let spawned = std::thread::Builder::new().name("hookbridge-live".into()).spawn(move || {
            // Ends when every sender is gone (the daemon's `Live` dropped).
            while let Ok((channel, payload)) = rx.recv() {
                // Only the newest payload per channel matters: skip what a later one replaces.
                let mut latest = HashMap::from([(channel, payload)]);
                while let Ok((c, p)) = rx.try_recv() {
                    latest.insert(c, p);
                }
                for (c, p) in latest {
                    if let Err(e) = kv.save_live(&c, &p) {
                        tracing::warn!(channel = %c, error = %e, "cannot keep a live channel's last payload");
                    }
                }
            }
        });
        match (spawned, self.saver.lock()) {
            (Ok(_), Ok(mut saver)) if saver.is_none() => *saver = Some(tx),
            (Err(e), _) => tracing::warn!(error = %e, "cannot start the live channel writer"),
            // Another call won the race: this writer ends with its sender, dropped here.
            _ => {}
        }
    }

    /// Sends `payload` to the channel's clients and keeps it as the channel's last payload.
    pub fn publish(&self, channel: &str, payload: &str) {
        let Ok(mut channels) = self.channels.lock() else { return };
        if !channels.contains_key(channel) && channels.len() >= MAX_CHANNELS {
            tracing::warn!(channel, "too many live channels; payload dropped");
            return;
        }
        let c = channels.entry(channel.to_owned()).or_insert_with(Channel::new);
        let payload: Arc<str> = Arc::from(payload);
        c.last = Some(Arc::clone(&payload));
        // Still under the channels' lock, so the writer sees payloads in publish order.
        if let Ok(saver) = self.saver.lock()
            && let Some(tx) = saver.as_ref()
        {
            let _ = tx.send((channel.to_owned(), Arc::clone(&payload)));
        }
        // No client listening is fine.
        let _ = c.tx.send(payload);
    }

    /// Ends every client's stream: a graceful shutdown waits for open connections, and an SSE stream never
    /// ends by itself.
    pub fn close(&self) {
        if let Ok(mut channels) = self.channels.lock() {
            // Dropping the senders: each client sees `Closed` and its stream ends.
            channels.clear();
        }
    }

    /// The channel's last payload, if any.
    pub fn last(&self, channel: &str) -> Option<Arc<str>> {
        self.channels.lock().ok()?.get(channel).and_then(|c| c.last.clone())
    }

    fn subscribe(&self, channel: &str) -> (Option<Arc<str>>, broadcast::Receiver<Arc<str>>) {
        match self.channels.lock() {
            Ok(mut channels) if channels.contains_key(channel) || channels.len() < MAX_CHANNELS => {
                let c = channels.entry(channel.to_owned()).or_insert_with(Channel::new);
                (c.last.clone(), c.tx.subscribe())
            }
            _ => (None, broadcast::channel(1).1),
        }
    }

    /// The SSE response for one client of `channel`: the last payload, then every new one.
    pub fn stream(
        &self,
        channel: &str,
    ) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>> + Send + 'static> {
        let (last, rx) = self.subscribe(channel);
        let stream = futures_util::stream::unfold((last, rx), |(last, mut rx)| async move {
            if let Some(payload) = last {
                return Some((Ok(SseEvent::default().data(&*payload)), (None, rx)));
            }
            loop {
                match rx.recv().await {
                    Ok(payload) => return Some((Ok(SseEvent::default().data(&*payload)), (None, rx))),
                    // Too slow: skip to the newest payloads.
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
    }
}
