//! proxy-wasm glue: reads from the host, asks the pure modules what to do, and
//! carries it out. Decisions live in `gateway`, `routing` and `scheduling`.

mod auth;
mod control;
mod host;
mod http;
mod metrics;
mod safety;
mod store;

use crate::config::{Config, Role};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::UNIX_EPOCH;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|id| -> Box<dyn RootContext> { Box::new(Root { config: None, snapshot: Rc::default(), rng: RefCell::new(fastrand::Rng::with_seed(u64::from(id))) }) });
}}

/// One per plugin configuration per worker VM.
struct Root {
    config: Option<Rc<Config>>,
    /// This VM's decoded copy of the metrics snapshot and the pools' members
    /// under it, shared by its streams.
    snapshot: Rc<RefCell<store::SnapshotCache>>,
    /// Seeds the streams' RNGs: seeded from the clock once per configuration, so a
    /// stream costs no clock read for its seed.
    rng: RefCell<fastrand::Rng>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        let config = match Config::from_json(&bytes) {
            Ok(c) => c,
            Err(e) => {
                log::error!("inference-gateway: {e}");
                return false;
            }
        };
        if config.role == Role::Gateway {
            store::init_in_flight(&config);
            // The cached membership is the old configuration's pools.
            self.snapshot = Rc::default();
            store::register_series(&config);
            store::publish_policies(&config);
            define_counters(&config);
            auth::configure(&config);
            // Merges the request metrics and writes the in-flight changes a
            // worker under load holds, at most `FLUSH_INTERVAL_MS` late even
            // when no request records or routes meanwhile.
            self.set_tick_period(std::time::Duration::from_millis(
                crate::observe::pending::FLUSH_INTERVAL_MS,
            ));
        }
        log::info!(
            "inference-gateway: configured as {:?} with {} pool(s), {} model(s)",
            config.role,
            config.pools.len(),
            config.models.len()
        );
        self.config = Some(Rc::new(config));
        let seed = seed(self, self.rng.borrow_mut().u32(..));
        self.rng = RefCell::new(fastrand::Rng::with_seed(seed));
        true
    }

    fn on_tick(&mut self) {
        store::flush_metrics(now_ms(self));
        store::flush_counts();
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Envoy never creates streams for a plugin whose on_configure failed.
        let config = Rc::clone(self.config.as_ref()?);
        Some(match config.role {
            Role::Gateway => Box::new(http::GatewayStream::new(
                config,
                Rc::clone(&self.snapshot),
                self.rng.borrow_mut().u64(..) ^ u64::from(context_id),
            )),
            Role::Control => Box::new(control::ControlStream::new(config)),
        })
    }
}

/// The filter's Envoy counters that exist from the start (at 0), per configured
/// model and safety check; safety blocks appear with their first `filter` label.
fn define_counters(config: &Config) {
    for name in config.models.keys() {
        metrics::define(&format!(
            "inference_gateway_shed_total.model_name.{}",
            metrics::label(name)
        ));
    }
    for (i, pool) in config.pools.iter().enumerate() {
        if config.policy(i).is_some() {
            for counter in ["spill", "capacity_refused"] {
                metrics::define(&format!(
                    "inference_pool_{counter}_total.pool_name.{}",
                    metrics::label(&pool.name)
                ));
            }
        }
    }
    if config.safety.is_some() {
        metrics::define("inference_gateway_safety_unscreened_media_total.check.prompt");
        for check in ["prompt", "response"] {
            for counter in ["checks", "failures", "fail_open"] {
                metrics::define(&format!(
                    "inference_gateway_safety_{counter}_total.check.{check}"
                ));
            }
        }
    }
}

/// Host wall clock in Unix milliseconds (0 if the host clock is before 1970).
fn now_ms(ctx: &dyn Context) -> u64 {
    ctx.get_current_time()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Host wall clock in Unix nanoseconds (0 if unavailable): request timings.
fn now_ns() -> u64 {
    proxy_wasm::hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// An RNG seed: host time mixed with `salt`, so VMs on different workers do not
/// draw the same numbers.
fn seed(ctx: &dyn Context, salt: u32) -> u64 {
    let nanos = ctx
        .get_current_time()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ u64::from(salt).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}
