//! Shared helpers for the fuzz targets.
//!
//! # Planted bugs
//!
//! Every target has a *planted bug*: a panic behind a condition on the parser's
//! *output* that only a deep, well-formed input reaches (for example a Responses
//! body that streams, asks for usage, has a priority below -1000 and three prompt
//! parts). It is armed only when the environment variable `FUZZ_PLANTED=1` is set,
//! so the normal campaign never trips it; `run.sh planted` sets it and checks that
//! libFuzzer finds each one within a time limit. A harness whose planted bug is
//! never found is not feeding its parser anything that matters.

pub mod request_body;

use std::sync::OnceLock;

/// Whether the planted bugs are armed (`FUZZ_PLANTED=1`), read once.
pub fn planted() -> bool {
    static ARMED: OnceLock<bool> = OnceLock::new();
    *ARMED.get_or_init(|| std::env::var("FUZZ_PLANTED").is_ok_and(|v| v == "1"))
}

/// Panics with a recognisable message when the planted bugs are armed and
/// `reached` holds. `run.sh planted` looks for this message in the crash log.
#[track_caller]
pub fn plant(target: &str, reached: impl FnOnce() -> bool) {
    if planted() && reached() {
        panic!("PLANTED BUG reached in {target}");
    }
}

/// Splits `data` into chunks at the given cut points (each taken modulo the
/// remaining length), so a streaming scanner sees the same bytes split anywhere.
pub fn chunks<'a>(data: &'a [u8], cuts: &[u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    for &c in cuts {
        if rest.is_empty() {
            break;
        }
        let at = (c as usize) % (rest.len() + 1);
        let (a, b) = rest.split_at(at);
        out.push(a);
        rest = b;
    }
    out.push(rest);
    out
}

/// The first byte of `data` as a selector and the rest, or `None` when empty.
pub fn split_first(data: &[u8]) -> Option<(u8, &[u8])> {
    data.split_first().map(|(&b, rest)| (b, rest))
}
