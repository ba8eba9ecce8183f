//! The requests a replica received, bounded, for tests (`GET /sim/requests`).

use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

#[derive(Debug, Clone, Serialize)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub headers: BTreeMap<String, String>,
    /// Parsed JSON, or the raw text when it is not JSON.
    pub body: Value,
    pub received_at_ms: u64,
}

pub struct Recorder {
    capacity: usize,
    items: Mutex<VecDeque<Received>>,
}

impl Recorder {
    pub fn new(capacity: usize) -> Self {
        Recorder {
            capacity,
            items: Mutex::new(VecDeque::new()),
        }
    }

    pub fn push(&self, r: Received) {
        let mut items = self.items.lock().unwrap_or_else(|e| e.into_inner());
        if items.len() >= self.capacity {
            items.pop_front();
        }
        if self.capacity > 0 {
            items.push_back(r);
        }
    }

    pub fn list(&self) -> Vec<Received> {
        self.items
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    pub fn clear(&self) {
        self.items.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(path: &str) -> Received {
        Received {
            method: "POST".into(),
            path: path.into(),
            headers: BTreeMap::new(),
            body: Value::Null,
            received_at_ms: 0,
        }
    }

    #[test]
    fn keeps_the_latest() {
        let rec = Recorder::new(2);
        for p in ["/a", "/b", "/c"] {
            rec.push(r(p));
        }
        let paths: Vec<_> = rec.list().into_iter().map(|x| x.path).collect();
        assert_eq!(paths, vec!["/b", "/c"]);
        rec.clear();
        assert!(rec.list().is_empty());
    }
}
