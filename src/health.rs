//! Health of the background components the cost pipeline runs beside the
//! request path: the tee writer (the drain, spool to ClickHouse), the
//! spool's committer and the rollup loop. Each reports into one [`Health`]
//! the moment it dies, however it dies: its task returned without being
//! asked to, panicked or was cancelled ([`Health::spawn`] awaits the task's
//! `JoinHandle`), or the spool failed ([`Reporter::down`]). `/-/ready` and
//! `/-/healthy` read it with a few atomic loads and no lock, and
//! `rwgate_component_up{component}` shows it (1 up, 0 down) for each
//! component this process runs.
//!
//! Nothing here restarts a component: a restart of rwgate is the remedy
//! (the spool is durable and the rollup is idempotent), which a failing
//! liveness probe brings about.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use tokio::sync::{watch, Notify};
use tokio::task::{AbortHandle, JoinHandle};

use crate::telemetry as t;

/// A background component whose death makes rwgate unhealthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    /// The drain: spool to ClickHouse.
    TeeWriter,
    /// The spool's committer (group commits of the request path's appends).
    Spool,
    /// The rollup loop: raw samples to expense rows.
    Rollup,
}

impl Component {
    const ALL: [Component; 3] = [Component::TeeWriter, Component::Spool, Component::Rollup];

    /// The `component` label of `rwgate_component_up`.
    pub fn label(self) -> &'static str {
        match self {
            Component::TeeWriter => "tee_writer",
            Component::Spool => "spool",
            Component::Rollup => "rollup",
        }
    }

    /// What stopped, as the probes say it.
    fn what(self) -> &'static str {
        match self {
            Component::TeeWriter => "the tee writer (spool to ClickHouse) stopped",
            Component::Spool => "the spool failed",
            Component::Rollup => "the rollup loop stopped",
        }
    }

    /// What it means until the restart.
    fn meanwhile(self) -> &'static str {
        match self {
            Component::TeeWriter => "the spool keeps the cost samples until it is full",
            Component::Spool => "writes with cost samples are answered 503",
            Component::Rollup => "expense rows are not updated",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// How a component died.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Down {
    #[error("it ended without being asked to")]
    Ended,
    #[error("it was cancelled")]
    Cancelled,
    #[error("it panicked: {0}")]
    Panicked(String),
    #[error(
        "a group commit failed ({write}) and its partial write could not be cut off ({truncate})"
    )]
    SpoolPoisoned { write: String, truncate: String },
}

/// The components that are down, each with how it died: one line saying
/// what stopped, why, what that means meanwhile and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dead(Vec<(Component, Down)>);

impl Dead {
    /// The components that are down.
    pub fn components(&self) -> impl Iterator<Item = Component> + '_ {
        self.0.iter().map(|(c, _)| *c)
    }
}

impl fmt::Display for Dead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (c, down) in &self.0 {
            write!(f, "{}: {down}; {}; ", c.what(), c.meanwhile())?;
        }
        f.write_str("restart rwgate")
    }
}

/// Why `/-/ready` fails.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    #[error("starting or shutting down")]
    NotServing,
    #[error("{0}")]
    Dead(Dead),
}

/// One component's state.
#[derive(Debug, Default)]
struct Slot {
    /// This process runs it.
    running: AtomicBool,
    /// How it died, once it did.
    down: OnceLock<Down>,
}

/// What the probes answer from: whether the process serves (started, not
/// shutting down) and how each of its components is.
#[derive(Debug, Default)]
pub struct Health {
    serving: AtomicBool,
    slots: [Slot; 3],
    /// Woken when a component goes down ([`died`](Self::died)).
    died: Notify,
}

impl Health {
    /// Set once everything started; cleared when shutdown begins.
    pub fn set_serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::Release);
    }

    /// `/-/ready`: serving, and no component down.
    pub fn ready(&self) -> Result<(), NotReady> {
        self.live().map_err(NotReady::Dead)?;
        match self.serving.load(Ordering::Acquire) {
            true => Ok(()),
            false => Err(NotReady::NotServing),
        }
    }

    /// `/-/healthy`: no component down (shutting down is healthy).
    pub fn live(&self) -> Result<(), Dead> {
        let dead: Vec<(Component, Down)> = Component::ALL
            .into_iter()
            .filter_map(|c| Some((c, self.slots[c.index()].down.get()?.clone())))
            .collect();
        match dead.is_empty() {
            true => Ok(()),
            false => Err(Dead(dead)),
        }
    }

    /// Waits until a component is down, and says which and how: for a
    /// process that has no probes to fail (the `rollup` role without
    /// `metrics_listen`) and ends instead.
    pub async fn died(&self) -> Dead {
        loop {
            // Registered before the check, so a death in between wakes it.
            let woken = self.died.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if let Err(dead) = self.live() {
                return dead;
            }
            woken.await;
        }
    }

    /// Registers `component` as run by this process (its gauge reads 1) and
    /// returns where it reports its death.
    pub fn reporter(self: &Arc<Health>, component: Component) -> Reporter {
        let slot = &self.slots[component.index()];
        if !slot.running.swap(true, Ordering::AcqRel) && slot.down.get().is_none() {
            metrics::gauge!(t::COMPONENT_UP, "component" => component.label()).set(1.0);
        }
        Reporter {
            health: self.clone(),
            component,
        }
    }

    /// Spawns `run(stop)` as `component`, supervised: its end before `stop`
    /// turned true (or its sender was dropped) marks the component down, and
    /// so does a panic at any time. A panic or cancellation is seen through
    /// the task's `JoinHandle`, so no way out of the task goes unnoticed.
    pub fn spawn<F, Fut>(self: &Arc<Health>, component: Component, run: F) -> Supervised
    where
        F: FnOnce(watch::Receiver<bool>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (stop, stop_rx) = watch::channel(false);
        let asked = stop_rx.clone();
        let task = tokio::spawn(run(stop_rx));
        let abort = task.abort_handle();
        let reporter = self.reporter(component);
        let supervisor = tokio::spawn(async move {
            let ended = task.await;
            let stopping = *asked.borrow() || asked.has_changed().is_err();
            let down = match ended {
                Err(e) if e.is_panic() => Down::Panicked(panic_message(&*e.into_panic())),
                _ if stopping => return,
                Ok(()) => Down::Ended,
                Err(_) => Down::Cancelled,
            };
            reporter.down(down);
        });
        Supervised {
            stop,
            supervisor,
            task: abort,
        }
    }
}

/// Where one component reports its death (cheap to clone).
#[derive(Debug, Clone)]
pub struct Reporter {
    health: Arc<Health>,
    component: Component,
}

impl Reporter {
    /// Marks the component down (the first report counts), logs it and
    /// sets its gauge to 0.
    pub fn down(&self, down: Down) {
        let slot = &self.health.slots[self.component.index()];
        if slot.down.set(down.clone()).is_ok() {
            metrics::gauge!(t::COMPONENT_UP, "component" => self.component.label()).set(0.0);
            self.health.died.notify_waiters();
            tracing::error!(
                component = self.component.label(),
                "{}: {down}; {}; restart rwgate",
                self.component.what(),
                self.component.meanwhile()
            );
        }
    }
}

/// A task started by [`Health::spawn`].
#[derive(Debug)]
pub struct Supervised {
    stop: watch::Sender<bool>,
    /// Completes right after the task.
    supervisor: JoinHandle<()>,
    task: AbortHandle,
}

impl Supervised {
    /// Asks the task to stop and waits for it until `deadline`, then
    /// cancels it (neither is a death).
    pub async fn stop(self, deadline: tokio::time::Instant) {
        let _ = self.stop.send(true);
        if tokio::time::timeout_at(deadline, self.supervisor)
            .await
            .is_err()
        {
            self.task.abort();
        }
    }

    /// Cancels the task without asking it to stop, as nothing but a fault
    /// would (tests).
    #[cfg(test)]
    pub(crate) fn kill(&self) {
        self.task.abort();
    }
}

/// The message of a panic's payload (`panic!` gives a `&str` or a `String`).
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    match (
        payload.downcast_ref::<&str>(),
        payload.downcast_ref::<String>(),
    ) {
        (Some(s), _) => (*s).to_string(),
        (_, Some(s)) => s.clone(),
        _ => "a panic without a message".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Waits (bounded) until `component` is down and returns the live error.
    async fn dead(health: &Health, component: Component) -> Dead {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match health.live() {
                    Err(d) if d.components().any(|c| c == component) => return d,
                    _ => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        })
        .await
        .expect("the component is down within 10s")
    }

    fn gauge(component: &str) -> Option<f64> {
        let text = t::metrics_handle().render();
        let series = format!("{}{{component=\"{component}\"}} ", t::COMPONENT_UP);
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .map(|v| v.parse().expect("gauge value"))
    }

    #[tokio::test]
    async fn died_waits_for_a_death_and_names_it() {
        let health = Arc::new(Health::default());
        let task = health.spawn(Component::Rollup, |_stop| async {
            tokio::time::sleep(Duration::from_millis(50)).await;
        });
        let d = tokio::time::timeout(Duration::from_secs(10), health.died())
            .await
            .expect("died() answers once the loop ended");
        assert_eq!(d.components().collect::<Vec<_>>(), [Component::Rollup]);
        // A death before the wait is seen too.
        let again = tokio::time::timeout(Duration::from_secs(1), health.died()).await;
        assert_eq!(again.ok(), Some(d));
        task.stop(tokio::time::Instant::now()).await;

        let up = Arc::new(Health::default());
        let running = up.spawn(Component::Rollup, |mut stop| async move {
            let _ = stop.wait_for(|s| *s).await;
        });
        let waited = tokio::time::timeout(Duration::from_millis(100), up.died()).await;
        assert!(waited.is_err(), "died() answered while the loop runs");
        running
            .stop(tokio::time::Instant::now() + Duration::from_secs(1))
            .await;
    }

    #[tokio::test]
    async fn a_panicking_task_is_down_with_its_message() {
        t::metrics_handle();
        let health = Arc::new(Health::default());
        health.set_serving(true);
        let task = health.spawn(Component::Rollup, |_stop| async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            panic!("boom at pass 3");
        });
        let d = dead(&health, Component::Rollup).await;
        assert_eq!(
            d.to_string(),
            "the rollup loop stopped: it panicked: boom at pass 3; expense rows are not updated; restart rwgate"
        );
        assert_eq!(health.ready(), Err(NotReady::Dead(d)));
        assert_eq!(gauge("rollup"), Some(0.0));
        task.stop(tokio::time::Instant::now() + Duration::from_secs(1))
            .await;
    }

    #[tokio::test]
    async fn a_task_that_returns_or_is_cancelled_unasked_is_down() {
        let health = Arc::new(Health::default());
        let _returned = health.spawn(Component::TeeWriter, |_stop| async {});
        assert!(dead(&health, Component::TeeWriter)
            .await
            .to_string()
            .starts_with("the tee writer (spool to ClickHouse) stopped: it ended without being asked to; the spool keeps the cost samples until it is full; "));
        let cancelled = health.spawn(Component::Rollup, |_stop| std::future::pending());
        cancelled.kill();
        assert!(dead(&health, Component::Rollup)
            .await
            .to_string()
            .contains("the rollup loop stopped: it was cancelled;"));
    }

    /// Stopped when asked, or cancelled after its deadline: not a death.
    #[tokio::test]
    async fn a_task_stopped_when_asked_stays_up() {
        t::metrics_handle();
        let health = Arc::new(Health::default());
        health.set_serving(true);
        let obedient = health.spawn(Component::TeeWriter, |mut stop| async move {
            let _ = stop.wait_for(|s| *s).await;
        });
        let stubborn = health.spawn(Component::Rollup, |_stop| std::future::pending());
        assert_eq!(gauge("tee_writer"), Some(1.0));
        assert_eq!(gauge("rollup"), Some(1.0));
        assert_eq!(gauge("spool"), None, "a component not run has no gauge");
        let now = tokio::time::Instant::now();
        obedient.stop(now + Duration::from_secs(5)).await;
        stubborn.stop(now + Duration::from_millis(50)).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(health.ready(), Ok(()));
        assert_eq!(gauge("tee_writer"), Some(1.0));
        assert_eq!(gauge("rollup"), Some(1.0));
        health.set_serving(false);
        assert_eq!(health.ready(), Err(NotReady::NotServing));
        assert_eq!(health.live(), Ok(()), "shutting down is healthy");
    }
}
