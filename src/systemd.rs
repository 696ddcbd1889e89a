//! The systemd service protocol (sd_notify(3)) for `Type=notify`: READY=1, STOPPING=1, the
//! WATCHDOG=1 keep-alive, and RELOADING=1 around a configuration reload. Outbound only, to
//! the socket systemd names in `NOTIFY_SOCKET`; without it every call is a no-op. Messages
//! carry listener addresses and counts, never a secret (principle 3).

use std::time::Duration;

use sd_notify::NotifyState;

/// Sends `states` to the service manager. A failure is logged, never fatal: the relay must
/// keep serving even if systemd's socket is gone (systemd then times the start out itself).
fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(
            error = %e,
            "cannot notify systemd through NOTIFY_SOCKET: under Type=notify it then fails the start after TimeoutStartSec= (or restarts the service after WatchdogSec=); check that RestrictAddressFamilies= keeps AF_UNIX and NotifyAccess= is not none"
        );
    }
}

/// READY=1: the spool is recovered and every listener is bound and accepting. `status` is
/// what `systemctl status` shows.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// STOPPING=1: the ordered shutdown has begun (listeners close, sessions and attempts drain).
pub fn stopping() {
    send(&[
        NotifyState::Stopping,
        NotifyState::Status("shutting down: draining sessions and delivery attempts"),
    ]);
}

/// RELOADING=1, for SIGHUP (`ExecReload=`) and `mailbridge reload` (issue 9 §5). A reload
/// calls this before it re-reads the configuration and [`ready`] once the new snapshot is live
/// or rejected (`crate::reload::Reloader::reload_notify`). For `Type=notify-reload`
/// (systemd 253+) RELOADING=1 must come with MONOTONIC_USEC, which this sends; under
/// `Type=notify` systemd ignores it, and READY=1 ends the reload either way.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// The interval at which to send WATCHDOG=1: half of `WatchdogSec=` (sd_watchdog_enabled(3)
/// recommends pinging at half the timeout), or `None` when the unit sets no watchdog or the
/// variables are meant for another process (`WATCHDOG_PID`).
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|d| !d.is_zero())
        .map(|d| d / 2)
}

/// Sends WATCHDOG=1 every `interval` while `health` says the daemon works. That this task
/// runs at all shows the runtime still schedules tasks; `health` adds what a live runtime
/// alone does not prove (the delivery scheduler still running). When `health` fails, it sends
/// WATCHDOG=trigger with the reason, so systemd restarts the service now (Restart=on-failure)
/// instead of waiting out `WatchdogSec`; the spool recovery at the next start picks the queue
/// up again.
pub async fn watchdog(
    interval: Duration,
    health: impl Fn() -> Result<(), String>,
    mut notify: impl FnMut(&[NotifyState]),
) {
    let mut tick = tokio::time::interval(interval);
    // After a stall, one ping, not a burst: systemd only needs the latest.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match health() {
            Ok(()) => notify(&[NotifyState::Watchdog]),
            Err(why) => {
                tracing::error!(reason = %why, "watchdog: the daemon is not healthy; asking systemd to restart it");
                let status = format!("unhealthy: {why}");
                notify(&[NotifyState::Status(&status), NotifyState::WatchdogTrigger]);
                return;
            }
        }
    }
}

/// [`watchdog`] with the real socket.
pub async fn run_watchdog(interval: Duration, health: impl Fn() -> Result<(), String>) {
    watchdog(interval, health, send).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    #[tokio::test(start_paused = true)]
    async fn watchdog_pings_at_the_interval_and_triggers_when_unhealthy() {
        let sent = Arc::new(Mutex::new(Vec::<(Duration, String)>::new()));
        let healthy = Arc::new(AtomicBool::new(true));
        let t0 = tokio::time::Instant::now();
        let task = {
            let sent = sent.clone();
            let healthy = healthy.clone();
            tokio::spawn(watchdog(
                Duration::from_secs(30),
                move || {
                    if healthy.load(Ordering::SeqCst) {
                        Ok(())
                    } else {
                        Err("the delivery scheduler stopped".into())
                    }
                },
                move |states| {
                    let msg: Vec<String> = states.iter().map(|s| s.to_string()).collect();
                    sent.lock().unwrap().push((t0.elapsed(), msg.join("\n")));
                },
            ))
        };
        // Paused clock: sleeping auto-advances time once every task waits.
        tokio::time::sleep(Duration::from_secs(65)).await;
        let pings: Vec<_> = sent.lock().unwrap().clone();
        assert_eq!(
            pings,
            vec![
                (Duration::ZERO, "WATCHDOG=1".to_string()),
                (Duration::from_secs(30), "WATCHDOG=1".to_string()),
                (Duration::from_secs(60), "WATCHDOG=1".to_string()),
            ]
        );
        healthy.store(false, Ordering::SeqCst);
        task.await.unwrap();
        let last = sent.lock().unwrap().last().cloned().unwrap();
        assert_eq!(
            last,
            (
                Duration::from_secs(90),
                "STATUS=unhealthy: the delivery scheduler stopped\nWATCHDOG=trigger".to_string()
            )
        );
    }
}
