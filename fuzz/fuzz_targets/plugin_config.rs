//! The filter's plugin configuration (`config::Config::from_json`: serde plus
//! validation). On an accepted configuration: every index it holds is in range,
//! `GET /v1/models` renders valid JSON, and each configured model routes (a chat
//! request naming it is planned without a panic and lands in a configured pool).
#![no_main]

use fuzz_support::plant;
use inference_gateway::config::Config;
use inference_gateway::gateway::{models_list, plan_route};
use inference_gateway::openai::ApiKind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(cfg) = Config::from_json(data) else {
        return;
    };
    assert_eq!(cfg.model_names.len(), cfg.models.len());
    for (name, m) in &cfg.models {
        assert!(
            m.pool < cfg.pools.len(),
            "model {name} points past the pools"
        );
        let body =
            serde_json::json!({"model": name, "messages": [{"role": "user", "content": "hi"}]});
        let body = serde_json::to_vec(&body).unwrap();
        if let Ok(plan) = plan_route(&cfg, ApiKind::ChatCompletions, &body, None, 7) {
            assert!(plan.pool < cfg.pools.len());
        }
    }
    if let Some(p) = cfg.default_pool {
        assert!(p < cfg.pools.len());
    }
    let listed: serde_json::Value =
        serde_json::from_slice(&models_list(&cfg)).expect("/v1/models is JSON");
    assert!(listed.is_object());

    plant("plugin_config", || {
        cfg.models.len() >= 2
            && cfg.models.values().any(|m| {
                m.targets.len() >= 2
                    && m.targets.iter().map(|t| u64::from(t.weight)).sum::<u64>() > 100
            })
    });
});
