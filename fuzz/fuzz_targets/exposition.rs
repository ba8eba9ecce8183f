//! The collector's Prometheus text exposition parser (`collector::exposition::parse`).
//!
//! Input: byte 0 picks which metric names are wanted, the rest is the scrape body
//! (must be UTF-8, as the collector decodes it first). Invariants: only wanted
//! names come back; never more samples than lines; the line of an error exists;
//! parsing with every name wanted accepts exactly the same texts.
#![no_main]

use fuzz_support::plant;
use inference_gateway::collector::exposition::parse;
use libfuzzer_sys::fuzz_target;
use std::borrow::Cow;

fuzz_target!(|data: &[u8]| {
    let Some((sel, rest)) = fuzz_support::split_first(data) else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let want = |name: &str| match sel % 3 {
        0 => true,
        1 => name.starts_with("vllm:"),
        _ => name.len() % 2 == 0,
    };
    let lines = text.split('\n').count();
    let got = parse(text, want);
    let all = parse(text, |_| true);
    assert_eq!(got.is_ok(), all.is_ok());
    match got {
        Err(e) => {
            assert!(e.line >= 1 && e.line <= lines, "{e}");
            assert_eq!(Err(e), all.map(|_| ()));
        }
        Ok(samples) => {
            assert!(samples.len() <= lines);
            assert!(samples.iter().all(|s| want(s.name)));
            let all = all.unwrap();
            assert!(samples.len() <= all.len());
            plant("exposition", || {
                samples.iter().any(|s| {
                    s.name.starts_with("vllm:")
                        && s.labels.len() >= 3
                        && s.labels.iter().any(|(_, v)| matches!(v, Cow::Owned(_)))
                        && s.value > 1e6
                })
            });
        }
    }
});
