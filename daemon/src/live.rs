//! Live channels: what plugins `publish`, streamed to web clients as Server-Sent Events at
//! `GET /live/<channel>` (on the internal listener). A channel exists once a plugin has published to it:
//! a client never creates one (it waits, holding only its connection, until the channel appears), so the
//! table of channels is filled by plugins alone. Best effort by design (a slow client skips payloads rather than holding memory),
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
#[derive(Debug, Clone)]
pub struct Live {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    /// Bumped when a channel is created or the channels close, to wake clients waiting for one.
    changes: Arc<tokio::sync::watch::Sender<u64>>,
    closed: Arc<std::sync::atomic::AtomicBool>,
    /// Where last payloads go to be kept across restarts, once [`Live::persist_to`] was called.
    saver: Arc<Mutex<Option<Saver>>>,
    /// Where this daemon's payloads also go (a cluster's other nodes), once [`Live::forward_to`] was called.
    forward: Arc<Mutex<Option<Forward>>>,
}

/// What hands a payload on: (channel, payload).
pub type ForwardFn = dyn Fn(&str, Arc<str>) + Send + Sync;

/// Hands a payload published here to the other nodes of a cluster.
#[derive(Clone)]
pub struct Forward(pub Arc<ForwardFn>);

impl std::fmt::Debug for Forward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Forward")
    }
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

/// A client's start on a channel: its last payload, and a receiver of the next ones.
type Subscription = (Option<Arc<str>>, broadcast::Receiver<Arc<str>>);

/// Whether a channel name is acceptable (it is part of a URL path).
pub fn valid_channel(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Default for Live {
    fn default() -> Self {
        Live {
            channels: Arc::default(),
            changes: Arc::new(tokio::sync::watch::channel(0).0),
            closed: Arc::default(),
            saver: Arc::default(),
            forward: Arc::default(),
        }
    }
}

impl Live {
    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

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
                self.changed();
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

    /// From now on, every payload published here is also given to `forward` (a cluster's other nodes).
    pub fn forward_to(&self, forward: Forward) {
        if let Ok(mut f) = self.forward.lock() {
            *f = Some(forward);
        }
    }

    /// Sends `payload` to the channel's clients and keeps it as the channel's last payload; on a cluster,
    /// the other nodes' clients get it too.
    pub fn publish(&self, channel: &str, payload: &str) {
        let Some(payload) = self.publish_here(channel, payload) else { return };
        let forward = self.forward.lock().ok().and_then(|f| f.clone());
        if let Some(Forward(f)) = forward {
            f(channel, payload);
        }
    }

    /// [`Live::publish`] for this daemon's clients alone (a payload another node published). Returns the
    /// payload as kept, `None` when it was dropped.
    pub fn publish_here(&self, channel: &str, payload: &str) -> Option<Arc<str>> {
        let Ok(mut channels) = self.channels.lock() else { return None };
        if !channels.contains_key(channel) && channels.len() >= MAX_CHANNELS {
            tracing::warn!(channel, "too many live channels; payload dropped");
            return None;
        }
        let created = !channels.contains_key(channel);
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
        let _ = c.tx.send(Arc::clone(&payload));
        drop(channels);
        if created {
            self.changed();
        }
        Some(payload)
    }

    /// Ends every client's stream: a graceful shutdown waits for open connections, and an SSE stream never
    /// ends by itself.
    pub fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut channels) = self.channels.lock() {
            // Dropping the senders: each client sees `Closed` and its stream ends.
            channels.clear();
        }
        // Clients still waiting for a channel end too.
        self.changed();
    }

    /// The channel's last payload, if any.
    pub fn last(&self, channel: &str) -> Option<Arc<str>> {
        self.channels.lock().ok()?.get(channel).and_then(|c| c.last.clone())
    }

    /// The channel's last payload and a receiver of its next ones, if the channel exists.
    fn subscribe(&self, channel: &str) -> Option<Subscription> {
        let channels = self.channels.lock().ok()?;
        channels.get(channel).map(|c| (c.last.clone(), c.tx.subscribe()))
    }

    /// Waits until `channel` exists (or the channels close: `None`), then subscribes to it.
    async fn subscribe_when_created(&self, channel: &str) -> Option<Subscription> {
        let mut changes = self.changes.subscribe();
        loop {
            // Marked seen before looking, so that a creation between the look and the wait still wakes us.
            changes.borrow_and_update();
            if self.closed.load(std::sync::atomic::Ordering::Relaxed) {
                return None;
            }
            if let Some(s) = self.subscribe(channel) {
                return Some(s);
            }
            changes.changed().await.ok()?;
        }
    }

    /// The SSE response for one client of `channel`: the last payload, then every new one.
    pub fn stream(
        &self,
        channel: &str,
    ) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>> + Send + 'static> {
        enum State {
            Waiting(Live, String),
            Open(Option<Arc<str>>, broadcast::Receiver<Arc<str>>),
        }
        let stream = futures_util::stream::unfold(State::Waiting(self.clone(), channel.to_owned()), |state| async {
            let (mut last, mut rx) = match state {
                State::Waiting(live, channel) => live.subscribe_when_created(&channel).await?,
                State::Open(last, rx) => (last, rx),
            };
            if let Some(payload) = last.take() {
                return Some((Ok(SseEvent::default().data(&*payload)), State::Open(None, rx)));
            }
            loop {
                match rx.recv().await {
                    Ok(payload) => return Some((Ok(SseEvent::default().data(&*payload)), State::Open(None, rx))),
                    // Too slow: skip to the newest payloads.
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
    }
}
