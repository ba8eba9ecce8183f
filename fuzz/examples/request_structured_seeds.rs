//! Writes the seeds of the `request_structured` target: `arbitrary` input bytes
//! that decode to *accepted* request bodies of every API, streamed or not, with
//! one prompt part or several. Random bytes rarely decode to a body the parser
//! accepts (a `Json` enum choice per value), so without these seeds libFuzzer
//! spends its time on rejected bodies and never reaches the deep ones.
//!
//! Sampling, not construction: the bytes are whatever `arbitrary` decodes, so the
//! seeds stay valid only while `request_body::Body` keeps its shape. Re-run after
//! changing it:
//!
//! ```sh
//! cd fuzz && cargo run --release --example request_structured_seeds
//! ```
//!
//! Deliberately left out: the bucket of the planted bug (a streamed Responses body
//! with two or more prompt parts), which the fuzzer must reach by itself.

use std::collections::BTreeMap;

use arbitrary::{Arbitrary, Unstructured};
use fuzz_support::request_body::Body;
use inference_gateway::openai::request::parse;
use inference_gateway::openai::ApiKind;

/// Samples drawn; deterministic (fixed PRNG seed), so a re-run writes the same files.
const DRAWS: u64 = 3_000_000;
/// Seeds kept per bucket (the shortest ones).
const PER_BUCKET: usize = 4;

/// SplitMix64: a reproducible byte source for sampling; not worth a dependency.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

fn main() {
    let out_dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/request_structured");
    let mut rng = SplitMix(0x5eed);
    // (api, stream, several prompt parts) → shortest inputs found.
    let mut buckets: BTreeMap<(u8, bool, bool), Vec<Vec<u8>>> = BTreeMap::new();
    for _ in 0..DRAWS {
        let len = 16 + (rng.next() % 496) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        let Ok(body) = Body::arbitrary_take_rest(Unstructured::new(&bytes)) else {
            continue;
        };
        let api = body.api();
        let Ok(p) = parse(api, &body.render()) else {
            continue;
        };
        let several = p.prompt.split('\n').count() >= 2;
        if api == ApiKind::Responses && p.stream && several {
            continue; // the planted bug's bucket
        }
        let key = (api as u8, p.stream, several);
        let kept = buckets.entry(key).or_default();
        kept.push(bytes);
        kept.sort_by_key(Vec::len);
        kept.truncate(PER_BUCKET);
    }
    let mut written = 0;
    for ((api, stream, several), kept) in &buckets {
        for (i, bytes) in kept.iter().enumerate() {
            let name = format!(
                "seed-gen-api{api}-stream{}-parts{}-{i}",
                *stream as u8,
                if *several { "N" } else { "1" }
            );
            std::fs::write(out_dir.join(name), bytes).expect("write a seed");
            written += 1;
        }
        println!(
            "api {api} stream {stream} several parts {several}: {} seeds",
            kept.len()
        );
    }
    println!("{written} seeds in {}", out_dir.display());
}
