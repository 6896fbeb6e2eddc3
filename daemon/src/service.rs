//! Running under systemd: readiness (`READY=1` once listening with the spool open), `STATUS=` lines with
//! counters, the watchdog (`WATCHDOG=1` only while the spool is writable), `STOPPING=1` on shutdown, and socket
//! activation (a listening socket passed in `LISTEN_FDS`). Every call is a no-op outside systemd.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::store::Store;

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// Startup is finished: the daemon listens and its spool is open.
pub fn ready(addr: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(&format!("accepting webhooks on {addr}"))]);
}

/// Shutdown has begun.
pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("shutting down: finishing requests and deliveries")]);
}

/// A configuration reload has begun (systemd 253+ needs the monotonic timestamp with it).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(_) => notify(&[NotifyState::Reloading]),
    }
}

/// The reload is over (applied or refused): ready again.
pub fn reloaded() {
    notify(&[NotifyState::Ready]);
}

/// A free-form status line.
pub fn status(text: &str) {
    notify(&[NotifyState::Status(text)]);
}

/// While the service manager asks for a watchdog (`WATCHDOG_USEC`), pings it at half the interval, but only
/// after proving the spool writable: a daemon that can no longer accept events is restarted.
pub async fn watchdog(store: Store, cancel: CancellationToken) {
    let Some(interval) = sd_notify::watchdog_enabled() else { return };
    let period = (interval / 2).max(Duration::from_millis(100));
    tracing::info!(every = ?period, "systemd watchdog enabled");
    loop {
        let healthy = matches!(tokio::time::timeout(period, store.ping()).await, Ok(Ok(())));
        if healthy {
            let (events, _, deliveries) = store.gauges().snapshot();
            notify(&[
                NotifyState::Watchdog,
                NotifyState::Status(&format!(
                    "accepting webhooks; {deliveries} deliveries pending for {events} events"
                )),
            ]);
        } else {
            tracing::error!("spool not writable: withholding the watchdog ping");
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
    }
}

/// The listening socket systemd passed (socket activation), if any.
pub fn inherited_listener() -> std::io::Result<Option<std::net::TcpListener>> {
    let mut fds = listenfd::ListenFd::from_env();
    let listener = fds.take_tcp_listener(0)?;
    if let Some(l) = &listener {
        l.set_nonblocking(true)?;
    }
    Ok(listener)
}
