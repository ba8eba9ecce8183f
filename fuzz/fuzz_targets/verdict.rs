//! The Model Armor verdict parser (`safety::verdict`).
//!
//! Input: bytes 0–1 the HTTP status (little-endian; 0 means no answer), the rest
//! the body. Invariants: non-2xx statuses never yield a verdict; a block lists
//! sorted, deduplicated filter names.
#![no_main]

use fuzz_support::plant;
use inference_gateway::safety::{verdict, CheckFailure, Verdict};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let raw = u16::from_le_bytes([data[0], data[1]]);
    // Mostly 200, so the body matters; sometimes anything else.
    let status = match raw % 8 {
        0 => None,
        1 => Some(raw),
        _ => Some(200),
    };
    let body = &data[2..];
    let v = verdict(status, body);
    match (&v, status) {
        (Err(CheckFailure::Timeout), None) => {}
        (_, None) => panic!("a verdict without an answer: {v:?}"),
        (Err(CheckFailure::Status(s)), Some(st)) => {
            assert_eq!(*s, st);
            assert!(!(200..300).contains(s));
        }
        (_, Some(st)) => assert!((200..300).contains(&st), "{st} gave {v:?}"),
    }
    if let Ok(Verdict::Block(names)) = &v {
        assert!(names.windows(2).all(|w| w[0] < w[1]), "{names:?}");
    }
    plant(
        "verdict",
        || matches!(&v, Ok(Verdict::Block(names)) if names.iter().any(|n| n.len() >= 24)),
    );
});
