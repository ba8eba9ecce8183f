//! Steady client load for the end-to-end tests that change the gateway under
//! traffic (membership, migration): clients sending short chat completions back
//! to back, each outcome logged with the time it was sent.

use super::api::server_id;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One request: when it was sent, and the replica that answered or the error.
pub type Outcome = (Instant, Result<String, String>);

pub struct Traffic {
    log: Arc<Mutex<Vec<Outcome>>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    /// `clients` clients posting `model` chat completions of `max_tokens` tokens
    /// to `url` until [`Traffic::stop`] (at most 50,000 requests each).
    pub fn start(url: String, clients: usize, model: &str, max_tokens: u32) -> Traffic {
        let log: Arc<Mutex<Vec<Outcome>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..clients)
            .map(|i| {
                let (log, stop, url) = (log.clone(), stop.clone(), url.clone());
                let body = json!({"model": model, "max_tokens": max_tokens,
                                  "messages": [{"role": "user", "content": format!("client {i}")}]});
                tokio::spawn(async move {
                    let client = super::http_client();
                    for _ in 0..50_000 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let sent = Instant::now();
                        let outcome = send(&client, &url, &body).await;
                        log.lock().unwrap().push((sent, outcome));
                    }
                })
            })
            .collect();
        Traffic { log, stop, tasks }
    }

    /// When the first request sent at or after `after` was answered by `replica`.
    pub fn first_on(&self, replica: &str, after: Instant) -> Option<Instant> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .find(|(sent, r)| *sent >= after && r.as_ref().is_ok_and(|id| id == replica))
            .map(|(sent, _)| *sent)
    }

    /// Polls until `replica` answers a request sent at or after `after`; panics
    /// after `timeout`.
    pub async fn wait_first_on(&self, replica: &str, after: Instant, timeout: Duration) -> Instant {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(t) = self.first_on(replica, after) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "{replica} got no request within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Polls until `n` requests were sent at or after `from`; returns when.
    pub async fn wait_count(&self, from: Instant, n: usize, timeout: Duration) -> Instant {
        let deadline = Instant::now() + timeout;
        loop {
            let count = self.since(from, Instant::now()).len();
            if count >= n {
                return Instant::now();
            }
            assert!(
                Instant::now() < deadline,
                "only {count} of {n} requests within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The outcomes of the requests sent in `[from, to)`.
    pub fn since(&self, from: Instant, to: Instant) -> Vec<Result<String, String>> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .map(|(_, r)| r.clone())
            .collect()
    }

    /// Stops the clients and returns everything they saw.
    pub async fn stop(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("a client task panicked");
        }
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

async fn send(client: &reqwest::Client, url: &str, body: &Value) -> Result<String, String> {
    let resp = client
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if resp.status() != 200 {
        let status = resp.status();
        return Err(format!(
            "{status}: {}",
            resp.text().await.unwrap_or_default()
        ));
    }
    let id = server_id(&resp);
    resp.bytes()
        .await
        .map(|_| id.clone())
        .map_err(|e| format!("body from {id}: {e}"))
}

/// The failed outcomes, for an assertion message.
pub fn failures(log: &[Outcome]) -> Vec<&String> {
    log.iter().filter_map(|(_, r)| r.as_ref().err()).collect()
}
