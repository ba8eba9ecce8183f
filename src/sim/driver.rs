//! Runs the [`Engine`] in real time: one task plans a step, sleeps for its
//! duration, completes it and hands each token to its request's stream. Engine
//! time is seconds since the driver started; back-to-back steps are paced by
//! absolute deadlines, so sub-millisecond steps do not each pay a timer tick.

use super::engine::{Engine, NewRequest, Rejected, RequestId, TokenEvent};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, Notify};

/// How far engine time may trail real time (a starved process) before it jumps
/// forward instead of running the missed steps back to back.
const MAX_LAG: f64 = 0.05;

struct Inner {
    engine: Engine,
    streams: HashMap<RequestId, mpsc::UnboundedSender<TokenEvent>>,
}

struct Shared {
    inner: Mutex<Inner>,
    wake: Arc<Notify>,
    epoch: Instant,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Lets the loop see that everyone is gone and end.
        self.wake.notify_one();
    }
}

#[derive(Clone)]
pub struct Driver {
    shared: Arc<Shared>,
}

impl Driver {
    /// Starts the engine loop on the current tokio runtime.
    pub fn start(engine: Engine) -> Driver {
        let wake = Arc::new(Notify::new());
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                engine,
                streams: HashMap::new(),
            }),
            wake: Arc::clone(&wake),
            epoch: Instant::now(),
        });
        tokio::spawn(run(Arc::downgrade(&shared), wake));
        Driver { shared }
    }

    /// Queues a request; its tokens arrive on the returned stream. Dropping the
    /// stream before the last token aborts the request and frees its blocks.
    pub fn submit(&self, req: NewRequest) -> Result<TokenStream, Rejected> {
        let now = self.shared.now();
        let (tx, rx) = mpsc::unbounded_channel();
        let id = {
            let mut inner = self.shared.lock();
            let id = inner.engine.submit(req, now)?;
            inner.streams.insert(id, tx);
            id
        };
        self.shared.wake.notify_one();
        Ok(TokenStream {
            id,
            rx,
            shared: Arc::clone(&self.shared),
            done: false,
        })
    }

    /// Reads the engine (for metrics and state) at the current engine time and
    /// wall-clock Unix time.
    pub fn inspect<R>(&self, f: impl FnOnce(&Engine, f64, f64) -> R) -> R {
        let now = self.shared.now();
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        f(&self.shared.lock().engine, now, wall)
    }
}

pub struct TokenStream {
    pub id: RequestId,
    rx: mpsc::UnboundedReceiver<TokenEvent>,
    shared: Arc<Shared>,
    done: bool,
}

impl TokenStream {
    /// The next token; None after the last one.
    pub async fn next(&mut self) -> Option<TokenEvent> {
        if self.done {
            return None;
        }
        let ev = self.rx.recv().await?;
        if ev.last {
            self.done = true;
        }
        Some(ev)
    }
}

impl Drop for TokenStream {
    fn drop(&mut self) {
        let now = self.shared.now();
        let mut inner = self.shared.lock();
        inner.streams.remove(&self.id);
        if !self.done && inner.engine.abort(self.id, now) {
            drop(inner);
            // Freed capacity may let waiting requests in.
            self.shared.wake.notify_one();
        }
    }
}

async fn run(weak: Weak<Shared>, wake: Arc<Notify>) {
    // End of the last step when steps run back to back; None when idle.
    let mut busy_until: Option<f64> = None;
    loop {
        let Some(shared) = weak.upgrade() else {
            return;
        };
        let real = shared.now();
        let start = match busy_until {
            Some(t) if real - t <= MAX_LAG => t,
            _ => real,
        };
        let step = shared.lock().engine.schedule(start);
        let Some(step) = step else {
            busy_until = None;
            drop(shared);
            wake.notified().await;
            continue;
        };
        let end = start + step.duration;
        let deadline = shared.epoch + Duration::from_secs_f64(end.max(0.0));
        drop(shared);
        if deadline > Instant::now() {
            tokio::time::sleep_until(deadline.into()).await;
        } else {
            // A free step: let the request handlers run before the next one.
            tokio::task::yield_now().await;
        }
        let Some(shared) = weak.upgrade() else {
            return;
        };
        let mut inner = shared.lock();
        let events = inner.engine.complete(end);
        for ev in events {
            let gone = match inner.streams.get(&ev.id) {
                Some(tx) => tx.send(ev).is_err(),
                None => false,
            };
            if ev.last || gone {
                inner.streams.remove(&ev.id);
            }
        }
        busy_until = Some(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::engine::{Costs, EngineConfig};

    fn driver(step_ms: f64) -> Driver {
        let costs = Costs::resolve(&EngineConfig::default(), step_ms, 0.0);
        Driver::start(Engine::new(EngineConfig::default(), costs))
    }

    fn req(max_tokens: u32) -> NewRequest {
        NewRequest {
            model: "m".into(),
            prompt: (0..40).collect(),
            max_tokens,
            priority: 0,
        }
    }

    #[tokio::test]
    async fn tokens_arrive_in_order_and_take_engine_time() {
        let d = driver(5.0);
        let t = Instant::now();
        let mut s = d.submit(req(4)).unwrap();
        let mut got = Vec::new();
        while let Some(ev) = s.next().await {
            got.push((ev.index, ev.last));
        }
        assert_eq!(got, vec![(0, false), (1, false), (2, false), (3, true)]);
        // Four steps of at least 5 ms each.
        assert!(
            t.elapsed() >= Duration::from_millis(20),
            "{:?}",
            t.elapsed()
        );
        assert!(s.next().await.is_none());
        d.inspect(|e, _, _| assert!(!e.has_work()));
    }

    #[tokio::test]
    async fn dropping_a_stream_aborts_the_request() {
        let d = driver(5.0);
        let mut s = d.submit(req(10_000)).unwrap();
        s.next().await.expect("first token");
        d.inspect(|e, _, _| {
            assert_eq!(e.num_running(), 1);
            assert!(e.kv_usage() > 0.0);
        });
        drop(s);
        d.inspect(|e, _, _| {
            assert_eq!((e.num_running(), e.num_waiting()), (0, 0));
            assert_eq!(e.kv_usage(), 0.0);
        });
    }

    #[tokio::test]
    async fn zero_cost_steps_still_finish_and_the_loop_ends_with_the_driver() {
        let d = driver(0.0);
        let mut s = d.submit(req(200)).unwrap();
        let mut n = 0;
        while s.next().await.is_some() {
            n += 1;
        }
        assert_eq!(n, 200);
        let weak = Arc::downgrade(&d.shared);
        drop(s);
        drop(d);
        assert!(weak.upgrade().is_none(), "nothing keeps the engine alive");
    }
}
