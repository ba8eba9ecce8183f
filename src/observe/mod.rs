//! Request metrics with GIE's names, kept in proxy-wasm shared data so that every
//! Envoy worker adds to the same series and the control listener can serve them
//! as Prometheus text (`GET /metrics`).
//!
//! Why not Envoy stats: Envoy histograms take integers, and GIE's
//! `inference_model_request_duration_seconds` has sub-second buckets and a
//! fractional `_sum`. So each `(model_name, target_model_name)` pair has one
//! shared-data key holding a [`Series`]: counters, the running gauge, errors by
//! code, picks by endpoint and every histogram. A request records into its worker's
//! batch ([`pending`]) when it is routed and when it ends; the batch reaches the
//! key by compare-and-swap, whatever the number of metrics it feeds.
//!
//! Everything here is host-free: the filter passes a [`SharedStore`].

pub mod pending;
pub mod render;
pub mod request;
pub mod usage;

use crate::inflight::{SharedStore, StoreError};
use serde::{Deserialize, Serialize};

/// Shared-data key prefix; the `1` is the layout version of [`Series`].
pub const KEY_PREFIX: &str = "igw.m2.";
/// The list of series keys that exist, for the control listener.
pub const INDEX_KEY: &str = "igw.m2.index";
/// Most `(model, target)` series kept. Configured models are registered at
/// startup; with a `default_pool`, clients can name any model, so the rest share
/// [`OVERFLOW_LABEL`].
pub const MAX_SERIES: usize = 512;
/// The model labels of requests recorded after [`MAX_SERIES`] is reached.
pub const OVERFLOW_LABEL: &str = "_overflow";
/// Most distinct error codes / endpoints kept per series; the rest count as "other".
pub const MAX_ERROR_CODES: usize = 32;
pub const MAX_PICK_ENDPOINTS: usize = 256;
/// The picks key of the endpoints past [`MAX_PICK_ENDPOINTS`] (`endpoint="other"`).
pub const OTHER_PICKS: u64 = 0;
/// Label values longer than this are cut (model names come from request bodies).
pub const MAX_LABEL_BYTES: usize = 128;
/// Same retry bound as the in-flight counters.
const MAX_CAS_ATTEMPTS: usize = 64;

/// GIE's buckets for `inference_model_request_duration_seconds`.
pub const DURATION_BUCKETS: [f64; 35] = [
    0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0,
    10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 180.0, 240.0, 300.0, 360.0, 480.0, 600.0, 900.0,
    1200.0, 1800.0, 2700.0, 3600.0,
];
/// GIE's buckets for `inference_model_request_sizes` (bytes, 64 B .. 1 GiB).
pub const REQUEST_SIZE_BUCKETS: [f64; 25] = [
    64.0,
    128.0,
    256.0,
    512.0,
    1024.0,
    2048.0,
    4096.0,
    8192.0,
    16384.0,
    32768.0,
    65536.0,
    131072.0,
    262144.0,
    524288.0,
    1048576.0,
    2097152.0,
    4194304.0,
    8388608.0,
    16777216.0,
    33554432.0,
    67108864.0,
    134217728.0,
    268435456.0,
    536870912.0,
    1073741824.0,
];
/// GIE's buckets for `inference_model_response_sizes` (its `32778` included, so
/// `le` values match GIE's exactly).
pub const RESPONSE_SIZE_BUCKETS: [f64; 15] = [
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
    32778.0, 65536.0,
];
/// GIE's buckets for `inference_model_input_tokens`.
pub const INPUT_TOKEN_BUCKETS: [f64; 19] = [
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
    32778.0, 65536.0, 131072.0, 262144.0, 524288.0, 1048576.0,
];
/// GIE's buckets for `inference_model_output_tokens`.
pub const OUTPUT_TOKEN_BUCKETS: [f64; 12] = [
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
];
/// Time to first token (GIE has no such metric): 5 ms .. 60 s, dense below 1 s.
pub const TTFT_BUCKETS: [f64; 20] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
    10.0, 30.0, 60.0,
];
/// GIE's buckets for `inference_model_normalized_time_per_output_token_seconds`.
pub const NTPOT_BUCKETS: [f64; 13] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
];

/// The histograms of a series, in storage order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hist {
    Duration,
    RequestSize,
    ResponseSize,
    InputTokens,
    OutputTokens,
    Ttft,
    Ntpot,
}

impl Hist {
    pub const ALL: [Hist; 7] = [
        Hist::Duration,
        Hist::RequestSize,
        Hist::ResponseSize,
        Hist::InputTokens,
        Hist::OutputTokens,
        Hist::Ttft,
        Hist::Ntpot,
    ];

    pub fn buckets(self) -> &'static [f64] {
        match self {
            Hist::Duration => &DURATION_BUCKETS,
            Hist::RequestSize => &REQUEST_SIZE_BUCKETS,
            Hist::ResponseSize => &RESPONSE_SIZE_BUCKETS,
            Hist::InputTokens => &INPUT_TOKEN_BUCKETS,
            Hist::OutputTokens => &OUTPUT_TOKEN_BUCKETS,
            Hist::Ttft => &TTFT_BUCKETS,
            Hist::Ntpot => &NTPOT_BUCKETS,
        }
    }

    const fn buckets_len(self) -> usize {
        match self {
            Hist::Duration => DURATION_BUCKETS.len(),
            Hist::RequestSize => REQUEST_SIZE_BUCKETS.len(),
            Hist::ResponseSize => RESPONSE_SIZE_BUCKETS.len(),
            Hist::InputTokens => INPUT_TOKEN_BUCKETS.len(),
            Hist::OutputTokens => OUTPUT_TOKEN_BUCKETS.len(),
            Hist::Ttft => TTFT_BUCKETS.len(),
            Hist::Ntpot => NTPOT_BUCKETS.len(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Hist::Duration => "inference_model_request_duration_seconds",
            Hist::RequestSize => "inference_model_request_sizes",
            Hist::ResponseSize => "inference_model_response_sizes",
            Hist::InputTokens => "inference_model_input_tokens",
            Hist::OutputTokens => "inference_model_output_tokens",
            Hist::Ttft => "inference_model_ttft_seconds",
            Hist::Ntpot => "inference_model_normalized_time_per_output_token_seconds",
        }
    }

    pub fn help(self) -> &'static str {
        match self {
            Hist::Duration => "Inference model response latency distribution in seconds for each model and target model.",
            Hist::RequestSize => "Inference model requests size distribution in bytes for each model and target model.",
            Hist::ResponseSize => "Inference model responses size distribution in bytes for each model and target model.",
            Hist::InputTokens => "Inference model input token count distribution for requests in each model.",
            Hist::OutputTokens => "Inference model output token count distribution for requests in each model.",
            Hist::Ttft => "Time from the request to the first response byte of streamed responses, in seconds.",
            Hist::Ntpot => "Inference model latency divided by number of output tokens in seconds for each model and target model.",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A histogram: non-cumulative counts per bucket (values above the last bound
/// count only in `count`), and the exact sum.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    fn new(kind: Hist) -> Self {
        Histogram {
            counts: vec![0; kind.buckets().len()],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, kind: Hist, value: f64) {
        if !value.is_finite() || value < 0.0 {
            return;
        }
        let buckets = kind.buckets();
        if self.counts.len() != buckets.len() {
            *self = Histogram::new(kind);
        }
        if let Some(i) = buckets.iter().position(|b| value <= *b) {
            if let Some(c) = self.counts.get_mut(i) {
                *c = c.saturating_add(1);
            }
        }
        self.sum += value;
        self.count = self.count.saturating_add(1);
    }

    /// `(le, cumulative count)` per bound, then `+Inf` is `count`.
    pub fn cumulative(&self) -> impl Iterator<Item = u64> + '_ {
        self.counts.iter().scan(0u64, |acc, c| {
            *acc = acc.saturating_add(*c);
            Some(*acc)
        })
    }
}

/// Everything recorded for one `(model_name, target_model_name)`, decoded (for
/// rendering and tests). Stored in the fixed layout of [`SeriesBytes`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Series {
    /// `inference_model_request_total`.
    pub requests: u64,
    /// `inference_model_running_requests` (summed per model when rendered).
    pub running: u64,
    /// `inference_model_request_error_total` by `error_code`.
    pub errors: Vec<(String, u64)>,
    /// `inference_gateway_endpoint_picks_total` by endpoint: 16-byte entries,
    /// [`crate::inflight::key`] of the address and the count (both u64 LE;
    /// [`OTHER_PICKS`]: past the cap); see [`Series::picks`]. The control listener
    /// names the keys from the endpoints it knows.
    #[serde(with = "serde_bytes")]
    pub pick_table: Vec<u8>,
    /// Indexed by [`Hist`].
    pub hists: Vec<Histogram>,
}

impl Series {
    /// Decodes a stored series; garbage or another layout reads as empty (and is
    /// overwritten by the next update), never as an error.
    pub fn decode(bytes: Option<&[u8]>) -> Series {
        let Some(b) = bytes.filter(|b| layout_ok(b)) else {
            let mut s = Series::default();
            s.normalize();
            return s;
        };
        let mut hists = Vec::with_capacity(Hist::ALL.len());
        for kind in Hist::ALL {
            let at = hist_offset(kind);
            hists.push(Histogram {
                count: u64_at(b, at),
                sum: f64::from_bits(u64_at(b, at + 8)),
                counts: (0..kind.buckets().len())
                    .map(|i| u64_at(b, at + 16 + 8 * i))
                    .collect(),
            });
        }
        let errors_end = picks_start(b);
        Series {
            requests: u64_at(b, REQUESTS_AT),
            running: u64_at(b, RUNNING_AT),
            errors: decode_errors(&b[ERRORS_AT..errors_end]),
            pick_table: b[errors_end..].to_vec(),
            hists,
        }
    }

    /// The stored form ([`SeriesBytes`]' layout).
    pub fn encode(&self) -> Vec<u8> {
        let mut s = self.clone();
        s.normalize();
        let errors = encode_errors(&s.errors);
        let mut out = Vec::with_capacity(ERRORS_AT + errors.len() + s.pick_table.len());
        out.extend_from_slice(&s.requests.to_le_bytes());
        out.extend_from_slice(&s.running.to_le_bytes());
        for h in &s.hists {
            out.extend_from_slice(&h.count.to_le_bytes());
            out.extend_from_slice(&h.sum.to_bits().to_le_bytes());
            for c in &h.counts {
                out.extend_from_slice(&c.to_le_bytes());
            }
        }
        out.extend_from_slice(&(errors.len() as u32).to_le_bytes());
        out.extend_from_slice(&errors);
        out.extend_from_slice(&s.pick_table[..s.pick_table.len() / 16 * 16]);
        out
    }

    fn normalize(&mut self) {
        self.hists.resize_with(Hist::ALL.len(), Histogram::default);
        for kind in Hist::ALL {
            if let Some(h) = self.hists.get_mut(kind.index()) {
                if h.counts.len() != kind.buckets().len() {
                    *h = Histogram::new(kind);
                }
            }
        }
    }

    pub fn hist(&self, kind: Hist) -> Option<&Histogram> {
        self.hists.get(kind.index())
    }

    pub fn observe(&mut self, kind: Hist, value: f64) {
        self.normalize();
        if let Some(h) = self.hists.get_mut(kind.index()) {
            h.observe(kind, value);
        }
    }

    pub fn add_error(&mut self, code: &str) {
        bump(&mut self.errors, code, MAX_ERROR_CODES);
    }

    /// `(endpoint key, picks)`, in the order endpoints were first picked.
    pub fn picks(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.pick_table
            .chunks_exact(16)
            .map(|c| (u64_at(c, 0), u64_at(c, 8)))
    }

    pub fn add_pick(&mut self, endpoint: &str) {
        self.pick_table.truncate(self.pick_table.len() / 16 * 16);
        bump_pick(&mut self.pick_table, crate::inflight::key(endpoint));
    }
}

/// The updates a request makes to its series: on a decoded [`Series`], or in
/// place on the stored bytes ([`SeriesBytes`], what [`update`] hands out).
pub trait Record {
    fn add_request(&mut self);
    /// One more (`up`) or one fewer running request.
    fn add_running(&mut self, up: bool);
    fn observe(&mut self, kind: Hist, value: f64);
    fn add_error(&mut self, code: &str);
    fn add_pick(&mut self, endpoint: &str);
}

impl Record for Series {
    fn add_request(&mut self) {
        self.requests = self.requests.saturating_add(1);
    }
    fn add_running(&mut self, up: bool) {
        self.running = if up {
            self.running.saturating_add(1)
        } else {
            self.running.saturating_sub(1)
        };
    }
    fn observe(&mut self, kind: Hist, value: f64) {
        Series::observe(self, kind, value);
    }
    fn add_error(&mut self, code: &str) {
        Series::add_error(self, code);
    }
    fn add_pick(&mut self, endpoint: &str) {
        Series::add_pick(self, endpoint);
    }
}

// The stored layout (all little-endian): requests u64, running u64; per
// histogram in `Hist::ALL` order count u64, sum f64, one u64 per bucket; the
// byte length of the error list (u32) and the list (per code: length u8, the
// code, count u64); the pick table (16-byte entries) to the end. Fixed offsets
// for everything a request touches: an update patches a few words in place
// instead of decoding and re-encoding the whole series (two per request; that
// was a fifth of a request's instructions).
const REQUESTS_AT: usize = 0;
const RUNNING_AT: usize = 8;
const HISTS_AT: usize = 16;
const fn hists_bytes() -> usize {
    let mut n = 0;
    let mut i = 0;
    while i < Hist::ALL.len() {
        n += 16 + 8 * Hist::ALL[i].buckets_len();
        i += 1;
    }
    n
}
const ERRORS_LEN_AT: usize = HISTS_AT + hists_bytes();
const ERRORS_AT: usize = ERRORS_LEN_AT + 4;

fn hist_offset(kind: Hist) -> usize {
    let mut at = HISTS_AT;
    for k in Hist::ALL.iter().take(kind.index()) {
        at += 16 + 8 * k.buckets().len();
    }
    at
}

/// `b` has the fixed part, an error list that fits and whole pick entries.
fn layout_ok(b: &[u8]) -> bool {
    b.len() >= ERRORS_AT
        && ERRORS_AT
            .checked_add(u32_at(b, ERRORS_LEN_AT) as usize)
            .is_some_and(|end| end <= b.len() && (b.len() - end).is_multiple_of(16))
}

fn picks_start(b: &[u8]) -> usize {
    ERRORS_AT + u32_at(b, ERRORS_LEN_AT) as usize
}

/// Callers check the bounds (`layout_ok`); out of range reads as 0.
fn u64_at(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

fn set_u64(b: &mut [u8], at: usize, v: u64) {
    if let Some(s) = b.get_mut(at..at + 8) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

fn decode_errors(mut b: &[u8]) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    while let Some((&len, rest)) = b.split_first() {
        let len = usize::from(len);
        if rest.len() < len + 8 {
            break;
        }
        let code = String::from_utf8_lossy(&rest[..len]).into_owned();
        out.push((code, u64_at(rest, len)));
        b = &rest[len + 8..];
    }
    out
}

fn encode_errors(errors: &[(String, u64)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (code, n) in errors {
        let mut end = code.len().min(255);
        while !code.is_char_boundary(end) {
            end -= 1;
        }
        out.push(end as u8);
        out.extend_from_slice(&code.as_bytes()[..end]);
        out.extend_from_slice(&n.to_le_bytes());
    }
    out
}

/// Adds 1 to `key`'s entry of a pick table (whole entries only); past
/// [`MAX_PICK_ENDPOINTS`] entries, to [`OTHER_PICKS`].
fn bump_pick(table: &mut Vec<u8>, key: u64) {
    bump_pick_by(table, key, 1);
}

/// [`bump_pick`] by `n`.
fn bump_pick_by(table: &mut Vec<u8>, key: u64, n: u64) {
    let find = |t: &[u8], key: u64| t.chunks_exact(16).position(|c| u64_at(c, 0) == key);
    let at = match find(table, key) {
        Some(at) => at,
        None => {
            let key = if table.len() / 16 < MAX_PICK_ENDPOINTS {
                key
            } else {
                OTHER_PICKS
            };
            match find(table, key) {
                Some(at) => at,
                None => {
                    table.extend_from_slice(&key.to_le_bytes());
                    table.extend_from_slice(&0u64.to_le_bytes());
                    table.len() / 16 - 1
                }
            }
        }
    };
    let count = u64_at(table, at * 16 + 8);
    set_u64(table, at * 16 + 8, count.saturating_add(n));
}

/// A stored series, updated in place (see the layout above).
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesBytes(Vec<u8>);

impl SeriesBytes {
    /// The stored bytes; garbage or another layout starts over empty.
    pub fn new(stored: Option<Vec<u8>>) -> SeriesBytes {
        match stored {
            Some(b) if layout_ok(&b) => SeriesBytes(b),
            _ => SeriesBytes(Series::default().encode()),
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn decode(&self) -> Series {
        Series::decode(Some(&self.0))
    }

    fn add_at(&mut self, at: usize, up: bool) {
        let n = u64_at(&self.0, at);
        let n = if up {
            n.saturating_add(1)
        } else {
            n.saturating_sub(1)
        };
        set_u64(&mut self.0, at, n);
    }
}

impl SeriesBytes {
    /// Adds a worker's batched updates ([`pending::Delta`]): each one the same
    /// in-place change a direct update makes; the running gauge may go down.
    pub fn merge(&mut self, d: &pending::Delta) {
        let requests = u64_at(&self.0, REQUESTS_AT).saturating_add(d.requests);
        set_u64(&mut self.0, REQUESTS_AT, requests);
        let running = u64_at(&self.0, RUNNING_AT).saturating_add_signed(d.running);
        set_u64(&mut self.0, RUNNING_AT, running);
        for &(kind, value) in &d.observed {
            Record::observe(self, kind, value);
        }
        if !d.errors.is_empty() {
            let end = picks_start(&self.0);
            let mut errors = decode_errors(&self.0[ERRORS_AT..end]);
            for (code, n) in &d.errors {
                bump_by(&mut errors, code, MAX_ERROR_CODES, *n);
            }
            let encoded = encode_errors(&errors);
            self.0.splice(ERRORS_AT..end, encoded.iter().copied());
            self.0[ERRORS_LEN_AT..ERRORS_AT].copy_from_slice(&(encoded.len() as u32).to_le_bytes());
        }
        if !d.picks.is_empty() {
            let start = picks_start(&self.0);
            let mut table = self.0.split_off(start);
            for &(key, n) in &d.picks {
                bump_pick_by(&mut table, key, n);
            }
            self.0.append(&mut table);
        }
    }
}

impl Record for SeriesBytes {
    fn add_request(&mut self) {
        self.add_at(REQUESTS_AT, true);
    }

    fn add_running(&mut self, up: bool) {
        self.add_at(RUNNING_AT, up);
    }

    fn observe(&mut self, kind: Hist, value: f64) {
        if !value.is_finite() || value < 0.0 {
            return;
        }
        let at = hist_offset(kind);
        if let Some(i) = kind.buckets().iter().position(|b| value <= *b) {
            self.add_at(at + 16 + 8 * i, true);
        }
        let sum = f64::from_bits(u64_at(&self.0, at + 8)) + value;
        set_u64(&mut self.0, at + 8, sum.to_bits());
        self.add_at(at, true);
    }

    /// Rare (errors only): the list is decoded and written back.
    fn add_error(&mut self, code: &str) {
        let end = picks_start(&self.0);
        let mut errors = decode_errors(&self.0[ERRORS_AT..end]);
        bump(&mut errors, code, MAX_ERROR_CODES);
        let encoded = encode_errors(&errors);
        self.0.splice(ERRORS_AT..end, encoded.iter().copied());
        self.0[ERRORS_LEN_AT..ERRORS_AT].copy_from_slice(&(encoded.len() as u32).to_le_bytes());
    }

    fn add_pick(&mut self, endpoint: &str) {
        let start = picks_start(&self.0);
        let mut table = self.0.split_off(start);
        bump_pick(&mut table, crate::inflight::key(endpoint));
        self.0.append(&mut table);
    }
}

/// Adds 1 to `key` in a bounded list; past `max` entries, to "other".
fn bump(list: &mut Vec<(String, u64)>, key: &str, max: usize) {
    bump_by(list, key, max, 1);
}

/// [`bump`] by `n`.
fn bump_by(list: &mut Vec<(String, u64)>, key: &str, max: usize, n: u64) {
    let key = if list.iter().any(|(k, _)| k == key) || list.len() < max {
        key
    } else {
        "other"
    };
    match list.iter_mut().find(|(k, _)| k == key) {
        Some((_, count)) => *count = count.saturating_add(n),
        None => list.push((key.to_string(), n)),
    }
}

/// Cuts a label value to [`MAX_LABEL_BYTES`] on a char boundary.
pub fn clip(v: &str) -> &str {
    if v.len() <= MAX_LABEL_BYTES {
        return v;
    }
    let mut end = MAX_LABEL_BYTES;
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    &v[..end]
}

/// The key of a series. The separator (0x1f, unit separator) cannot appear in
/// JSON-decoded model names without escaping, and is escaped when rendered anyway.
pub fn series_key(model: &str, target: &str) -> String {
    format!("{KEY_PREFIX}{}\u{1f}{}", clip(model), clip(target))
}

/// `(model, target)` of a series key.
pub fn labels_of(key: &str) -> Option<(&str, &str)> {
    key.strip_prefix(KEY_PREFIX)?.split_once('\u{1f}')
}

/// The registered series keys.
pub fn index(store: &dyn SharedStore) -> Vec<String> {
    store
        .get(INDEX_KEY)
        .0
        .and_then(|b| postcard::from_bytes::<Vec<String>>(&b).ok())
        .unwrap_or_default()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterError {
    Store(StoreError),
    /// [`MAX_SERIES`] reached.
    Full,
}

/// Creates the series keys (empty) that do not exist yet and lists them in the
/// index. Call at configure time: the host's CAS guards only existing keys, so
/// creating a key must not race with traffic updating it.
pub fn register(store: &dyn SharedStore, keys: &[String]) -> Result<(), RegisterError> {
    for k in keys {
        if store.get(k).0.is_none() {
            store
                .set(k, &Series::default().encode(), None)
                .map_err(RegisterError::Store)?;
        }
    }
    add_to_index(store, keys)
}

fn add_to_index(store: &dyn SharedStore, keys: &[String]) -> Result<(), RegisterError> {
    for _ in 0..MAX_CAS_ATTEMPTS {
        let (bytes, cas) = store.get(INDEX_KEY);
        let mut known: Vec<String> = bytes
            .as_deref()
            .and_then(|b| postcard::from_bytes(b).ok())
            .unwrap_or_default();
        let before = known.len();
        let mut full = false;
        for k in keys {
            if known.contains(k) {
                continue;
            }
            // The overflow series always fits: it is where the rest goes.
            if known.len() >= MAX_SERIES && *k != series_key(OVERFLOW_LABEL, OVERFLOW_LABEL) {
                full = true;
                break;
            }
            known.push(k.clone());
        }
        if known.len() == before && bytes.is_some() {
            return if full {
                Err(RegisterError::Full)
            } else {
                Ok(())
            };
        }
        let encoded = postcard::to_allocvec(&known).unwrap_or_default();
        match store.set(INDEX_KEY, &encoded, cas) {
            Ok(()) if full => return Err(RegisterError::Full),
            Ok(()) => return Ok(()),
            Err(StoreError::CasMismatch) => continue,
            Err(e) => return Err(RegisterError::Store(e)),
        }
    }
    Err(RegisterError::Store(StoreError::CasMismatch))
}

/// Applies `f` to the series at `key` with compare-and-swap: one read and one
/// write unless another worker wrote in between. A key that does not exist yet
/// (a model first seen at runtime) is registered in the index first; when the
/// index is full the update goes to the overflow series instead.
pub fn update(
    store: &dyn SharedStore,
    key: &str,
    f: impl Fn(&mut SeriesBytes),
) -> Result<(), RegisterError> {
    let mut key = key.to_string();
    for attempt in 0..MAX_CAS_ATTEMPTS {
        let (bytes, cas) = store.get(&key);
        if bytes.is_none() && attempt == 0 {
            match register(store, std::slice::from_ref(&key)) {
                Ok(()) => {}
                Err(RegisterError::Full) => {
                    key = series_key(OVERFLOW_LABEL, OVERFLOW_LABEL);
                    let _ = register(store, std::slice::from_ref(&key));
                }
                Err(e) => return Err(e),
            }
            continue;
        }
        let mut series = SeriesBytes::new(bytes);
        f(&mut series);
        match store.set(&key, series.as_bytes(), cas) {
            Ok(()) => return Ok(()),
            Err(StoreError::CasMismatch) => continue,
            Err(e) => return Err(RegisterError::Store(e)),
        }
    }
    Err(RegisterError::Store(StoreError::CasMismatch))
}

/// Every registered series with its labels, for rendering.
pub fn read_all(store: &dyn SharedStore) -> Vec<(String, String, Series)> {
    index(store)
        .iter()
        .filter_map(|k| {
            let (model, target) = labels_of(k)?;
            let bytes = store.get(k).0?;
            Some((
                model.to_string(),
                target.to_string(),
                Series::decode(Some(&bytes)),
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inflight::memory::MemoryStore;
    use std::sync::Arc;

    #[test]
    fn buckets_are_increasing() {
        for kind in Hist::ALL {
            let b = kind.buckets();
            assert!(b.windows(2).all(|w| w[0] < w[1]), "{kind:?}");
        }
    }

    #[test]
    fn histogram_buckets_sum_and_overflow() {
        let mut s = Series::default();
        for v in [0.001, 0.005, 0.3, 1.0, 5000.0] {
            s.observe(Hist::Duration, v);
        }
        s.observe(Hist::Duration, f64::NAN);
        s.observe(Hist::Duration, -1.0);
        let h = s.hist(Hist::Duration).unwrap();
        assert_eq!(h.count, 5);
        assert!((h.sum - 5001.306).abs() < 1e-9, "{}", h.sum);
        let cum: Vec<u64> = h.cumulative().collect();
        assert_eq!(cum[0], 2, "0.001 and 0.005 are <= 0.005");
        assert_eq!(cum[5], 3, "0.3 <= 0.4");
        assert_eq!(cum[8], 4, "1.0 <= 1.0");
        assert_eq!(*cum.last().unwrap(), 4, "5000 s only in +Inf");
    }

    #[test]
    fn garbage_and_foreign_layouts_decode_empty() {
        assert_eq!(Series::decode(Some(b"\xff\xff\xff")).requests, 0);
        assert_eq!(Series::decode(None).hists.len(), Hist::ALL.len());
        // A histogram with the wrong bucket count (another layout) is reset.
        let s = Series {
            hists: vec![Histogram {
                counts: vec![1, 2],
                sum: 1.0,
                count: 3,
            }],
            ..Default::default()
        };
        let d = Series::decode(Some(&s.encode()));
        assert_eq!(d.hist(Hist::Duration).unwrap().count, 0);
        assert_eq!(
            d.hist(Hist::Duration).unwrap().counts.len(),
            DURATION_BUCKETS.len()
        );
    }

    #[test]
    fn bounded_error_codes_and_picks() {
        let mut s = Series::default();
        for i in 0..(MAX_ERROR_CODES + 5) {
            s.add_error(&format!("code{i}"));
        }
        s.add_error("code0");
        assert_eq!(s.errors.len(), MAX_ERROR_CODES + 1);
        assert_eq!(s.errors.iter().find(|(k, _)| k == "other").unwrap().1, 5);
        assert_eq!(s.errors[0].1, 2);
        s.add_pick("127.0.0.1:1");
        s.add_pick("127.0.0.1:1");
        assert_eq!(
            s.picks().collect::<Vec<_>>(),
            vec![(crate::inflight::key("127.0.0.1:1"), 2)]
        );
        for i in 0..MAX_PICK_ENDPOINTS + 3 {
            s.add_pick(&format!("10.0.0.{i}:1"));
        }
        assert_eq!(s.picks().count(), MAX_PICK_ENDPOINTS + 1);
        assert_eq!(s.picks().find(|p| p.0 == OTHER_PICKS).unwrap().1, 4);
        let again = Series::decode(Some(&s.encode()));
        assert_eq!(
            again.picks().collect::<Vec<_>>(),
            s.picks().collect::<Vec<_>>()
        );
    }

    #[test]
    fn in_place_updates_match_the_decoded_series() {
        let mut decoded = Series::decode(None);
        let mut stored = SeriesBytes::new(Some(b"garbage".to_vec()));
        assert_eq!(stored.decode(), Series::decode(None));
        type Step<'a> = &'a dyn Fn(&mut dyn Record);
        let steps: [Step; 9] = [
            &|r| r.add_running(true),
            &|r| r.add_running(false),
            &|r| r.add_running(false),
            &|r| r.add_request(),
            &|r| r.observe(Hist::Duration, 0.3),
            &|r| r.observe(Hist::Ntpot, 1e9),
            &|r| r.observe(Hist::Ttft, f64::NAN),
            &|r| r.add_error("BadRequest"),
            &|r| r.add_pick("10.0.0.1:8000"),
        ];
        for step in steps.iter().chain(&steps) {
            step(&mut decoded);
            step(&mut stored);
            assert_eq!(stored.decode(), decoded);
        }
        for i in 0..MAX_PICK_ENDPOINTS + 2 {
            let e = format!("10.1.0.{i}:1");
            decoded.add_pick(&e);
            stored.add_pick(&e);
        }
        for i in 0..MAX_ERROR_CODES + 2 {
            let c = format!("code{i}");
            decoded.add_error(&c);
            stored.add_error(&c);
        }
        stored.add_request();
        decoded.add_request();
        assert_eq!(stored.decode(), decoded);
        assert_eq!(Series::decode(Some(&decoded.encode())), decoded);
        assert_eq!(stored.as_bytes(), decoded.encode());
        // A stored series with a torn pick table starts over.
        let mut torn = decoded.encode();
        torn.pop();
        assert_eq!(SeriesBytes::new(Some(torn)).decode(), Series::decode(None));
    }

    #[test]
    fn keys_round_trip_and_clip() {
        let k = series_key("food-review", "food-review-v1");
        assert_eq!(labels_of(&k), Some(("food-review", "food-review-v1")));
        let long = "é".repeat(100);
        let k = series_key(&long, "t");
        let (m, _) = labels_of(&k).unwrap();
        assert!(m.len() <= MAX_LABEL_BYTES && long.starts_with(m));
    }

    #[test]
    fn register_update_read() {
        let s = MemoryStore::default();
        let k = series_key("m", "t");
        register(&s, std::slice::from_ref(&k)).unwrap();
        register(&s, std::slice::from_ref(&k)).unwrap();
        assert_eq!(index(&s), vec![k.clone()]);
        update(&s, &k, |x| {
            x.add_request();
            x.observe(Hist::Duration, 0.25);
        })
        .unwrap();
        // An unregistered series is registered by its first update.
        update(&s, &series_key("new", "new"), |x| x.add_error("BadRequest")).unwrap();
        let all = read_all(&s);
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].0, "m");
        assert_eq!(all[0].2.requests, 1);
        assert_eq!(all[1].2.errors, vec![("BadRequest".to_string(), 1)]);
    }

    #[test]
    fn full_index_goes_to_overflow() {
        let s = MemoryStore::default();
        let keys: Vec<String> = (0..MAX_SERIES)
            .map(|i| series_key(&format!("m{i}"), "t"))
            .collect();
        register(&s, &keys).unwrap();
        assert_eq!(
            register(&s, &[series_key("late", "t")]),
            Err(RegisterError::Full)
        );
        update(&s, &series_key("late2", "t"), |x| x.add_request()).unwrap();
        let all = read_all(&s);
        assert_eq!(
            all.len(),
            MAX_SERIES + 1,
            "the overflow series is listed too"
        );
        let overflow = all.iter().find(|(m, _, _)| m == OVERFLOW_LABEL).unwrap();
        assert_eq!(overflow.2.requests, 1);
    }

    #[test]
    fn concurrent_updates_lose_nothing() {
        // Under heavy contention an update may give up (it reports so); every
        // update that reported success must be in the totals.
        let s = Arc::new(MemoryStore::default());
        let k = series_key("m", "t");
        register(s.as_ref(), std::slice::from_ref(&k)).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let s = Arc::clone(&s);
                let k = k.clone();
                std::thread::spawn(move || {
                    let mut ok = 0u64;
                    for _ in 0..500 {
                        let r = update(s.as_ref(), &k, |x| {
                            x.add_request();
                            x.observe(Hist::Duration, 0.5);
                        });
                        ok += u64::from(r.is_ok());
                    }
                    ok
                })
            })
            .collect();
        let ok: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert!(ok > 1500, "most updates succeed: {ok}");
        let all = read_all(s.as_ref());
        assert_eq!(all[0].2.requests, ok);
        assert_eq!(all[0].2.hist(Hist::Duration).unwrap().count, ok);
        assert!((all[0].2.hist(Hist::Duration).unwrap().sum - ok as f64 * 0.5).abs() < 1e-6);
    }
}
