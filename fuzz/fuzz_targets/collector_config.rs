//! The collector's configuration file, YAML or JSON
//! (`collector::config::RawCollectorConfig::parse`), and its validation with no
//! environment. Invariant: validation of a parsed configuration never panics, and
//! a valid one has every pool's endpoints under that pool.
#![no_main]

use fuzz_support::plant;
use inference_gateway::collector::config::RawCollectorConfig;
use libfuzzer_sys::fuzz_target;
use std::time::Duration;

fuzz_target!(|data: &[u8]| {
    let Some((sel, rest)) = fuzz_support::split_first(data) else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let json = sel & 1 == 1;
    let Ok(raw) = RawCollectorConfig::parse(text, json) else {
        return;
    };
    let npools = raw.pools.len();
    let valid =
        raw.validate(|name| (name == "IGW_INGEST_TOKEN").then(|| "0123456789abcdef".to_string()));
    if let Ok(cfg) = &valid {
        assert_eq!(cfg.pools.len(), npools);
        let _ = cfg.dns_sources();
    }
    plant("collector_config", || {
        !json
            && valid.as_ref().is_ok_and(|c| {
                c.pools.len() >= 3 && c.scrape_interval >= Duration::from_millis(100)
            })
    });
});
