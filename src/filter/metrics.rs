//! Counters through the host's stats, defined on first use and cached per VM.
//! Names carry their labels as `.label.value` pairs, which Envoy's `stats_tags`
//! turn into Prometheus labels (see `envoy/envoy.yaml`).

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;
use std::cell::RefCell;
use std::collections::HashMap;

thread_local! {
    static IDS: RefCell<HashMap<String, u32>> = RefCell::new(HashMap::new());
}

/// Label values may not contain the separator; anything odd becomes `_`.
pub fn label(v: &str) -> String {
    v.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Adds 1 to the counter `name`. Metrics never fail a request: errors are logged.
pub fn inc(name: &str) {
    add(name, 1);
}

/// Adds `n` to the counter `name`.
pub fn add(name: &str, n: u64) {
    if let Some(id) = id(name) {
        if let Err(e) = hostcalls::increment_metric(id, n.min(i64::MAX as u64) as i64) {
            log::warn!("inference-gateway: cannot increment metric {name}: {e:?}");
        }
    }
}

/// Defines the counter `name` (at 0) so that it is exported before its first
/// event: rates and dashboards then see a series from the start.
pub fn define(name: &str) {
    let _ = id(name);
}

fn id(name: &str) -> Option<u32> {
    IDS.with(|ids| {
        let mut ids = ids.borrow_mut();
        if let Some(id) = ids.get(name) {
            return Some(*id);
        }
        match hostcalls::define_metric(MetricType::Counter, name) {
            Ok(id) => {
                ids.insert(name.to_string(), id);
                Some(id)
            }
            Err(e) => {
                log::warn!("inference-gateway: cannot define metric {name}: {e:?}");
                None
            }
        }
    })
}
