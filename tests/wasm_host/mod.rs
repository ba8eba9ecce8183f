//! A proxy-wasm host (ABI 0.2.1) on wasmtime that runs the compiled filter, so its
//! behaviour is tested without Envoy. It emulates what the filter uses: header
//! maps, body buffers, shared data with Envoy's CAS semantics (shared by several
//! VMs, as Envoy's workers share it), HTTP callouts, local replies, properties,
//! metrics, logs, time, and the few WASI calls Rust's std makes.
//!
//! ```ignore
//! let host = Host::new();
//! let mut vm = host.vm();
//! vm.configure(r#"{"pools": …}"#).unwrap();
//! let s = vm.stream();
//! vm.request_headers(s, &[(":method", "POST"), …], false);
//! let action = vm.request_body(s, br#"{"model": …}"#, true);
//! vm.end(s);
//! ```
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use wasmtime::{Caller, Engine, Extern, Instance, Linker, Memory, Module, Store, TypedFunc};

const OK: i32 = 0;
const NOT_FOUND: i32 = 1;
const BAD_ARGUMENT: i32 = 2;
const CAS_MISMATCH: i32 = 8;
/// The fuel a VM starts with: never runs out in a test.
const FUEL: u64 = u64::MAX / 2;

/// proxy-wasm actions: what a callback returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    Pause,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    pub status: u32,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl LocalResponse {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

#[derive(Debug, Clone)]
pub struct HttpCall {
    pub token: u32,
    pub context: u32,
    pub upstream: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub timeout_ms: u32,
}

/// Shared data: key → (value, cas), as Envoy keeps it per vm_id.
#[derive(Default)]
pub struct SharedData {
    entries: HashMap<String, (Vec<u8>, u32)>,
    next_cas: u32,
}

/// A callout's answer while `proxy_on_http_call_response` runs: headers, body.
type CallResponse = (Vec<(String, String)>, Vec<u8>);

/// Per-stream host state.
#[derive(Default, Debug, Clone)]
pub struct StreamState {
    pub request_headers: Vec<(String, String)>,
    pub request_body: Vec<u8>,
    pub request_trailers: Vec<(String, String)>,
    pub response_headers: Vec<(String, String)>,
    pub response_body: Vec<u8>,
    pub local_response: Option<LocalResponse>,
    pub resumed_request: bool,
    pub resumed_response: bool,
    /// The last response body callback paused and nothing resumed the stream
    /// since: Envoy still holds those bytes (see [`Vm::response_chunk`]).
    pub response_held: bool,
    /// Properties the filter set (Envoy keeps them as filter state `wasm.<name>`).
    pub properties: HashMap<String, Vec<u8>>,
}

#[derive(Default)]
struct HostState {
    shared: Arc<Mutex<SharedData>>,
    plugin_config: Vec<u8>,
    streams: HashMap<u32, StreamState>,
    /// The context the current callback runs for.
    current: u32,
    logs: Vec<(i32, String)>,
    calls: Vec<HttpCall>,
    next_token: u32,
    call_response: Option<CallResponse>,
    metrics: Vec<(String, i32, i64)>,
    now_ns: u64,
    rng: u64,
    /// How often the filter called each host function (see [`Vm::host_calls`]).
    host_calls: HashMap<&'static str, u64>,
    /// The shared-data keys it read, in order (see [`Vm::shared_reads`]).
    shared_reads: Vec<String>,
    /// Bytes the host copied into the module's memory (buffers, headers, shared
    /// data, properties) and read out of it (keys, values, bodies it set).
    bytes_in: u64,
    bytes_out: u64,
    /// The root's timer period, once it set one.
    tick_period_ms: Option<u32>,
}

/// Counts a host call by name.
fn counted(c: &mut Caller<'_, HostState>, name: &'static str) {
    *c.data_mut().host_calls.entry(name).or_default() += 1;
}

impl HostState {
    fn stream(&mut self) -> &mut StreamState {
        let id = self.current;
        self.streams.entry(id).or_default()
    }

    fn map(&mut self, map_type: i32) -> Option<&mut Vec<(String, String)>> {
        match map_type {
            0 => Some(&mut self.stream().request_headers),
            1 => Some(&mut self.stream().request_trailers),
            2 => Some(&mut self.stream().response_headers),
            6 => self.call_response.as_mut().map(|c| &mut c.0),
            _ => None,
        }
    }

    fn buffer(&mut self, buffer_type: i32) -> Option<&mut Vec<u8>> {
        match buffer_type {
            0 => Some(&mut self.stream().request_body),
            1 => Some(&mut self.stream().response_body),
            4 => self.call_response.as_mut().map(|c| &mut c.1),
            7 => Some(&mut self.plugin_config),
            _ => None,
        }
    }
}

fn engine_and_module() -> &'static (Engine, Module) {
    static COMPILED: OnceLock<(Engine, Module)> = OnceLock::new();
    COMPILED.get_or_init(|| {
        // Fuel metering: every Wasm instruction executed costs one unit (a few
        // structural ones cost none), a deterministic count of the module's work.
        let mut config = wasmtime::Config::new();
        config.consume_fuel(true);
        // Epoch interruption only for the sampling profiler (`profile`): it adds
        // a check per loop and call, not fuel.
        config.epoch_interruption(profiling());
        let engine = Engine::new(&config).expect("wasmtime engine");
        let module = Module::from_file(&engine, env!("GATEWAY_WASM"))
            .unwrap_or_else(|e| panic!("cannot load {}: {e:#}", env!("GATEWAY_WASM")));
        (engine, module)
    })
}

/// `WASM_PROFILE=1`: VMs sample their Wasm stacks (see [`profile`]).
fn profiling() -> bool {
    std::env::var("WASM_PROFILE").is_ok_and(|v| v == "1")
}

/// A sampling profile of the module (with `WASM_PROFILE=1`): a thread advances the
/// engine's epoch every `period`; at each tick the running VM records the Wasm
/// function on top of its stack (self time) and every function on it (total).
/// Wall-clock samples of Cranelift's code, not fuel: where the time goes, to
/// find what to cut; the fuel figures stay the measure. Returns what `run`
/// returns and the samples, `(function, self, total)`, most self first.
pub fn profile<T>(
    period: std::time::Duration,
    run: impl FnOnce() -> T,
) -> (T, Vec<(String, u64, u64)>) {
    assert!(profiling(), "set WASM_PROFILE=1 to profile");
    let (engine, _) = engine_and_module();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ticker = {
        let (engine, stop) = (engine.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(period);
                engine.increment_epoch();
            }
        })
    };
    SAMPLES.lock().unwrap().clear();
    let out = run();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    ticker.join().expect("profile ticker");
    let mut rows: Vec<(String, u64, u64)> = SAMPLES
        .lock()
        .unwrap()
        .drain()
        .map(|(name, (own, total))| (name, own, total))
        .collect();
    rows.sort_by(|a, b| b.1.cmp(&a.1).then(b.2.cmp(&a.2)));
    (out, rows)
}

/// Function name → (samples on top, samples anywhere on the stack).
static SAMPLES: Mutex<Option<HashMap<String, (u64, u64)>>> = Mutex::new(None);

trait SamplesExt {
    fn clear(&mut self);
    fn drain(&mut self) -> std::collections::hash_map::IntoIter<String, (u64, u64)>;
}

impl SamplesExt for Option<HashMap<String, (u64, u64)>> {
    fn clear(&mut self) {
        *self = Some(HashMap::new());
    }
    fn drain(&mut self) -> std::collections::hash_map::IntoIter<String, (u64, u64)> {
        self.take().unwrap_or_default().into_iter()
    }
}

fn sample(backtrace: &wasmtime::WasmBacktrace) {
    let mut samples = SAMPLES.lock().unwrap();
    let Some(map) = samples.as_mut() else {
        return;
    };
    let mut seen = std::collections::HashSet::new();
    for (depth, frame) in backtrace.frames().iter().enumerate() {
        let name = frame
            .func_name()
            .map_or_else(|| format!("func[{}]", frame.func_index()), str::to_string);
        let entry = map.entry(name.clone()).or_default();
        if depth == 0 {
            entry.0 += 1;
        }
        if seen.insert(name) {
            entry.1 += 1;
        }
    }
}

/// Several VMs (Envoy workers) over one shared-data store.
#[derive(Clone, Default)]
pub struct Host {
    shared: Arc<Mutex<SharedData>>,
}

impl Host {
    pub fn new() -> Self {
        Host::default()
    }

    pub fn vm(&self) -> Vm {
        Vm::new(Arc::clone(&self.shared))
    }

    /// Overwrites a shared-data value, as another writer would.
    pub fn set_shared(&self, key: &str, value: &[u8]) {
        let mut s = self.shared.lock().unwrap();
        s.next_cas += 1;
        let cas = s.next_cas;
        s.entries.insert(key.to_string(), (value.to_vec(), cas));
    }

    /// A shared-data value, as the filter stored it.
    pub fn shared(&self, key: &str) -> Option<Vec<u8>> {
        self.shared
            .lock()
            .unwrap()
            .entries
            .get(key)
            .map(|(v, _)| v.clone())
    }

    /// An endpoint's in-flight count, read from the packed table
    /// (`igw.inflight`, see `inference_gateway::inflight`).
    pub fn in_flight(&self, endpoint: &str) -> u64 {
        let table = self.shared("igw.inflight").unwrap_or_default();
        inference_gateway::inflight::count(&table, inference_gateway::inflight::key(endpoint))
    }

    /// Every shared-data key and the size of its value.
    pub fn shared_sizes(&self) -> Vec<(String, usize)> {
        let mut out: Vec<(String, usize)> = self
            .shared
            .lock()
            .unwrap()
            .entries
            .iter()
            .map(|(k, (v, _))| (k.clone(), v.len()))
            .collect();
        out.sort();
        out
    }
}

pub struct Vm {
    store: Store<HostState>,
    instance: Instance,
    memory: Memory,
    root: u32,
    next_context: u32,
    /// Set when a call into the module trapped: the VM is dead, as in Envoy.
    pub crashed: Option<String>,
    /// The fuel left at the last [`Vm::reset_cost`].
    fuel_mark: u64,
}

/// A deterministic cost figure of the module (see [`Vm::cost`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cost {
    /// Wasm instructions executed (wasmtime fuel).
    pub instructions: u64,
    /// Calls into the host's `env` functions.
    pub host_calls: u64,
    /// Bytes the host copied into module memory.
    pub bytes_in: u64,
    /// Bytes the host read out of module memory.
    pub bytes_out: u64,
}

fn mem(caller: &mut Caller<'_, HostState>) -> Memory {
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => m,
        _ => panic!("the module exports no memory"),
    }
}

fn read(caller: &mut Caller<'_, HostState>, ptr: i32, len: i32) -> Vec<u8> {
    let m = mem(caller);
    let (p, l) = (ptr as u32 as usize, len as u32 as usize);
    let bytes = m
        .data(&caller)
        .get(p..p + l)
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    caller.data_mut().bytes_out += bytes.len() as u64;
    bytes
}

fn read_str(caller: &mut Caller<'_, HostState>, ptr: i32, len: i32) -> String {
    String::from_utf8_lossy(&read(caller, ptr, len)).into_owned()
}

fn write_u32(caller: &mut Caller<'_, HostState>, at: i32, v: u32) {
    let m = mem(caller);
    m.write(caller, at as u32 as usize, &v.to_le_bytes())
        .expect("return slot in memory");
}

/// Copies `data` into guest memory the guest allocated, and writes the pointer and
/// size into the return slots.
fn give(caller: &mut Caller<'_, HostState>, data: &[u8], ret_ptr: i32, ret_size: i32) {
    let alloc: TypedFunc<i32, i32> = caller
        .get_export("proxy_on_memory_allocate")
        .and_then(Extern::into_func)
        .expect("proxy_on_memory_allocate")
        .typed(&*caller)
        .expect("allocator signature");
    let ptr = alloc
        .call(&mut *caller, data.len() as i32)
        .expect("allocation");
    let m = mem(caller);
    m.write(&mut *caller, ptr as u32 as usize, data)
        .expect("allocated memory");
    write_u32(caller, ret_ptr, ptr as u32);
    write_u32(caller, ret_size, data.len() as u32);
    caller.data_mut().bytes_in += data.len() as u64;
}

pub fn serialize_map(pairs: &[(String, String)]) -> Vec<u8> {
    inference_gateway::gateway::headers::serialize_map(pairs)
}

fn deserialize_map(bytes: &[u8]) -> Vec<(String, String)> {
    let u32_at = |i: usize| {
        bytes
            .get(i..i + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .unwrap_or(0)
    };
    let n = u32_at(0);
    let mut p = 4 + n * 8;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let (kl, vl) = (u32_at(4 + i * 8), u32_at(8 + i * 8));
        let k = String::from_utf8_lossy(&bytes[p..p + kl]).into_owned();
        p += kl + 1;
        let v = String::from_utf8_lossy(&bytes[p..p + vl]).into_owned();
        p += vl + 1;
        out.push((k, v));
    }
    out
}

fn link(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_log",
        |mut c: Caller<'_, HostState>, level: i32, p: i32, l: i32| {
            counted(&mut c, "proxy_log");
            let line = read_str(&mut c, p, l);
            c.data_mut().logs.push((level, line));
            OK
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut c: Caller<'_, HostState>, t: i32, start: i32, size: i32, rp: i32, rs: i32| {
            counted(&mut c, "proxy_get_buffer_bytes");
            let Some(buf) = c.data_mut().buffer(t) else {
                return NOT_FOUND;
            };
            let start = (start as u32 as usize).min(buf.len());
            let end = start.saturating_add(size as u32 as usize).min(buf.len());
            let data = buf[start..end].to_vec();
            give(&mut c, &data, rp, rs);
            OK
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut c: Caller<'_, HostState>, t: i32, start: i32, size: i32, p: i32, l: i32| {
            counted(&mut c, "proxy_set_buffer_bytes");
            let data = read(&mut c, p, l);
            let Some(buf) = c.data_mut().buffer(t) else {
                return NOT_FOUND;
            };
            let (start, size) = (start as u32 as usize, size as u32 as usize);
            // Envoy: start 0 replaces the first `size` bytes; start at or past the
            // end appends; anything else is refused.
            if start == 0 {
                let cut = size.min(buf.len());
                buf.splice(..cut, data);
            } else if start >= buf.len() {
                buf.extend(data);
            } else {
                return BAD_ARGUMENT;
            }
            OK
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut c: Caller<'_, HostState>, t: i32, rp: i32, rs: i32| {
            counted(&mut c, "proxy_get_header_map_pairs");
            let Some(map) = c.data_mut().map(t) else {
                return NOT_FOUND;
            };
            let data = serialize_map(map);
            give(&mut c, &data, rp, rs);
            OK
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut c: Caller<'_, HostState>, t: i32, p: i32, l: i32| {
            counted(&mut c, "proxy_set_header_map_pairs");
            let pairs = deserialize_map(&read(&mut c, p, l));
            let Some(map) = c.data_mut().map(t) else {
                return NOT_FOUND;
            };
            *map = pairs;
            OK
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut c: Caller<'_, HostState>, t: i32, kp: i32, kl: i32, rp: i32, rs: i32| {
            counted(&mut c, "proxy_get_header_map_value");
            let key = read_str(&mut c, kp, kl).to_ascii_lowercase();
            let Some(map) = c.data_mut().map(t) else {
                return NOT_FOUND;
            };
            let Some(v) = map.iter().find(|(k, _)| *k == key).map(|(_, v)| v.clone()) else {
                return NOT_FOUND;
            };
            give(&mut c, v.as_bytes(), rp, rs);
            OK
        },
    )?;
    for (name, replace) in [
        ("proxy_add_header_map_value", false),
        ("proxy_replace_header_map_value", true),
    ] {
        linker.func_wrap(
            "env",
            name,
            move |mut c: Caller<'_, HostState>, t: i32, kp: i32, kl: i32, vp: i32, vl: i32| {
                counted(&mut c, name);
                let key = read_str(&mut c, kp, kl).to_ascii_lowercase();
                let value = read_str(&mut c, vp, vl);
                let Some(map) = c.data_mut().map(t) else {
                    return NOT_FOUND;
                };
                if replace {
                    map.retain(|(k, _)| *k != key);
                }
                map.push((key, value));
                OK
            },
        )?;
    }
    linker.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut c: Caller<'_, HostState>, t: i32, kp: i32, kl: i32| {
            counted(&mut c, "proxy_remove_header_map_value");
            let key = read_str(&mut c, kp, kl).to_ascii_lowercase();
            let Some(map) = c.data_mut().map(t) else {
                return NOT_FOUND;
            };
            map.retain(|(k, _)| *k != key);
            OK
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut c: Caller<'_, HostState>, kp: i32, kl: i32, rp: i32, rs: i32, rcas: i32| {
            counted(&mut c, "proxy_get_shared_data");
            let key = read_str(&mut c, kp, kl);
            c.data_mut().shared_reads.push(key.clone());
            let found = c.data().shared.lock().unwrap().entries.get(&key).cloned();
            let Some((value, cas)) = found else {
                return NOT_FOUND;
            };
            give(&mut c, &value, rp, rs);
            write_u32(&mut c, rcas, cas);
            OK
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut c: Caller<'_, HostState>, kp: i32, kl: i32, vp: i32, vl: i32, cas: i32| {
            counted(&mut c, "proxy_set_shared_data");
            let key = read_str(&mut c, kp, kl);
            let value = read(&mut c, vp, vl);
            let shared = Arc::clone(&c.data().shared);
            let mut s = shared.lock().unwrap();
            s.next_cas += 1;
            let next = s.next_cas;
            // Envoy: a CAS is checked only against an existing key, and 0 means none.
            if let Some((v, current)) = s.entries.get_mut(&key) {
                if cas != 0 && cas as u32 != *current {
                    return CAS_MISMATCH;
                }
                *v = value;
                *current = next;
            } else {
                s.entries.insert(key, (value, next));
            }
            OK
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut c: Caller<'_, HostState>,
         status: i32,
         _dp: i32,
         _dl: i32,
         bp: i32,
         bl: i32,
         hp: i32,
         hl: i32,
         _grpc: i32| {
            counted(&mut c, "proxy_send_local_response");
            let body = read(&mut c, bp, bl);
            let headers = deserialize_map(&read(&mut c, hp, hl));
            c.data_mut().stream().local_response = Some(LocalResponse {
                status: status as u32,
                headers,
                body,
            });
            OK
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_http_call",
        |mut c: Caller<'_, HostState>,
         up: i32,
         ul: i32,
         hp: i32,
         hl: i32,
         bp: i32,
         bl: i32,
         _tp: i32,
         _tl: i32,
         timeout: i32,
         rt: i32| {
            counted(&mut c, "proxy_http_call");
            let upstream = read_str(&mut c, up, ul);
            let headers = deserialize_map(&read(&mut c, hp, hl));
            let body = read(&mut c, bp, bl);
            let st = c.data_mut();
            st.next_token += 1;
            let call = HttpCall {
                token: st.next_token,
                context: st.current,
                upstream,
                headers,
                body,
                timeout_ms: timeout as u32,
            };
            st.calls.push(call);
            let token = st.next_token;
            write_u32(&mut c, rt, token);
            OK
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_property",
        |mut c: Caller<'_, HostState>, _p: i32, _l: i32, _rp: i32, _rs: i32| {
            counted(&mut c, "proxy_get_property");
            NOT_FOUND
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_property",
        |mut c: Caller<'_, HostState>, p: i32, l: i32, vp: i32, vl: i32| {
            counted(&mut c, "proxy_set_property");
            let path = read_str(&mut c, p, l);
            let value = read(&mut c, vp, vl);
            c.data_mut().stream().properties.insert(path, value);
            OK
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_define_metric",
        |mut c: Caller<'_, HostState>, t: i32, np: i32, nl: i32, rid: i32| {
            counted(&mut c, "proxy_define_metric");
            let name = read_str(&mut c, np, nl);
            let metrics = &mut c.data_mut().metrics;
            let id = match metrics.iter().position(|(n, _, _)| *n == name) {
                Some(i) => i,
                None => {
                    metrics.push((name, t, 0));
                    metrics.len() - 1
                }
            };
            write_u32(&mut c, rid, id as u32);
            OK
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_increment_metric",
        |mut c: Caller<'_, HostState>, id: i32, by: i64| {
            counted(&mut c, "proxy_increment_metric");
            match c.data_mut().metrics.get_mut(id as usize) {
                Some(m) => {
                    m.2 += by;
                    OK
                }
                None => NOT_FOUND,
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_record_metric",
        |mut c: Caller<'_, HostState>, id: i32, v: i64| {
            counted(&mut c, "proxy_record_metric");
            match c.data_mut().metrics.get_mut(id as usize) {
                Some(m) => {
                    m.2 = v;
                    OK
                }
                None => NOT_FOUND,
            }
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut c: Caller<'_, HostState>, rp: i32| {
            counted(&mut c, "proxy_get_current_time_nanoseconds");
            let now = c.data().now_ns;
            let m = mem(&mut c);
            m.write(&mut c, rp as u32 as usize, &now.to_le_bytes())
                .expect("time slot");
            OK
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |mut c: Caller<'_, HostState>, ms: i32| {
            counted(&mut c, "proxy_set_tick_period_milliseconds");
            c.data_mut().tick_period_ms = Some(ms as u32);
            OK
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_effective_context",
        |mut c: Caller<'_, HostState>, id: i32| {
            counted(&mut c, "proxy_set_effective_context");
            c.data_mut().current = id as u32;
            OK
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_continue_stream",
        |mut c: Caller<'_, HostState>, t: i32| {
            counted(&mut c, "proxy_continue_stream");
            let s = c.data_mut().stream();
            match t {
                0 => s.resumed_request = true,
                1 => {
                    s.resumed_response = true;
                    s.response_held = false;
                }
                _ => return BAD_ARGUMENT,
            }
            OK
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_close_stream",
        |mut c: Caller<'_, HostState>, _t: i32| {
            counted(&mut c, "proxy_close_stream");
            OK
        },
    )?;
    linker.func_wrap("env", "proxy_done", |mut c: Caller<'_, HostState>| {
        counted(&mut c, "proxy_done");
        OK
    })?;
    // WASI, as Rust's std on wasm32-wasip1 uses it.
    linker.func_wrap(
        "wasi_snapshot_preview1",
        "fd_write",
        |mut c: Caller<'_, HostState>, _fd: i32, iovs: i32, n: i32, written: i32| {
            let mut total = 0u32;
            let mut text = Vec::new();
            for i in 0..n {
                let iov = read(&mut c, iovs + i * 8, 8);
                let (p, l) = (
                    i32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]),
                    i32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]),
                );
                text.extend(read(&mut c, p, l));
                total += l as u32;
            }
            c.data_mut()
                .logs
                .push((4, String::from_utf8_lossy(&text).into_owned()));
            write_u32(&mut c, written, total);
            0
        },
    )?;
    linker.func_wrap(
        "wasi_snapshot_preview1",
        "random_get",
        |mut c: Caller<'_, HostState>, p: i32, l: i32| {
            let mut bytes = Vec::with_capacity(l as usize);
            for _ in 0..l {
                let st = c.data_mut();
                st.rng ^= st.rng << 13;
                st.rng ^= st.rng >> 7;
                st.rng ^= st.rng << 17;
                bytes.push(st.rng as u8);
            }
            let m = mem(&mut c);
            m.write(&mut c, p as u32 as usize, &bytes)
                .expect("random buffer");
            0
        },
    )?;
    linker.func_wrap(
        "wasi_snapshot_preview1",
        "environ_sizes_get",
        |mut c: Caller<'_, HostState>, np: i32, sp: i32| {
            write_u32(&mut c, np, 0);
            write_u32(&mut c, sp, 0);
            0
        },
    )?;
    linker.func_wrap(
        "wasi_snapshot_preview1",
        "environ_get",
        |_c: Caller<'_, HostState>, _a: i32, _b: i32| 0,
    )?;
    linker.func_wrap(
        "wasi_snapshot_preview1",
        "proc_exit",
        |_c: Caller<'_, HostState>, code: i32| -> wasmtime::Result<()> {
            Err(wasmtime::Error::msg(format!("proc_exit({code})")))
        },
    )?;
    Ok(())
}

impl Vm {
    fn new(shared: Arc<Mutex<SharedData>>) -> Vm {
        let (engine, module) = engine_and_module();
        let mut linker = Linker::new(engine);
        link(&mut linker).expect("host functions link");
        linker
            .define_unknown_imports_as_traps(module)
            .expect("unknown imports");
        let state = HostState {
            shared,
            now_ns: 1_700_000_000_000_000_000,
            rng: 0x2545_f491_4f6c_dd1d,
            ..Default::default()
        };
        let mut store = Store::new(engine, state);
        store.set_fuel(FUEL).expect("fuel is enabled");
        if profiling() {
            store.set_epoch_deadline(1);
            store.epoch_deadline_callback(|ctx| {
                sample(&wasmtime::WasmBacktrace::capture(&ctx));
                Ok(wasmtime::UpdateDeadline::Continue(1))
            });
        }
        let instance = linker.instantiate(&mut store, module).expect("instantiate");
        let memory = instance.get_memory(&mut store, "memory").expect("memory");
        let mut vm = Vm {
            store,
            instance,
            memory,
            root: 1,
            next_context: 2,
            crashed: None,
            fuel_mark: FUEL,
        };
        vm.call0("_initialize", ());
        vm.call0("proxy_on_context_create", (1, 0));
        vm
    }

    fn call<P: wasmtime::WasmParams, R: wasmtime::WasmResults + Default>(
        &mut self,
        name: &str,
        params: P,
    ) -> R {
        if let Some(why) = &self.crashed {
            panic!("call to {name} on a crashed VM ({why})");
        }
        let f = match self.instance.get_typed_func::<P, R>(&mut self.store, name) {
            Ok(f) => f,
            Err(e) => panic!("export {name}: {e:#}"),
        };
        match f.call(&mut self.store, params) {
            Ok(r) => r,
            Err(e) => {
                let why = format!("{name} trapped: {e:#}\nlogs:\n{}", self.logs().join("\n"));
                self.crashed = Some(why.clone());
                R::default()
            }
        }
    }

    fn call0<P: wasmtime::WasmParams>(&mut self, name: &str, params: P) {
        self.call::<P, ()>(name, params)
    }

    fn call_i32<P: wasmtime::WasmParams>(&mut self, name: &str, params: P) -> i32 {
        self.call::<P, i32>(name, params)
    }

    fn set_current(&mut self, context: u32) {
        self.store.data_mut().current = context;
    }

    /// Loads a plugin configuration; `Err` with the logs when the filter rejects it.
    pub fn configure(&mut self, config: &str) -> Result<(), String> {
        self.store.data_mut().plugin_config = config.as_bytes().to_vec();
        self.set_current(self.root);
        let ok = self.call_i32(
            "proxy_on_configure",
            (self.root as i32, config.len() as i32),
        );
        self.assert_alive();
        if ok == 1 {
            Ok(())
        } else {
            Err(self.logs().join("\n"))
        }
    }

    /// The root's timer period, if it set one.
    pub fn tick_period_ms(&self) -> Option<u32> {
        self.store.data().tick_period_ms
    }

    /// The root's timer fires (as Envoy does every tick period; only once the root
    /// set one).
    pub fn tick(&mut self) {
        assert!(self.tick_period_ms().is_some(), "no tick period set");
        self.set_current(self.root);
        self.call0("proxy_on_tick", (self.root as i32,));
        self.assert_alive();
    }

    /// A new HTTP stream (context) under the root.
    pub fn stream(&mut self) -> u32 {
        let id = self.next_context;
        self.next_context += 1;
        self.set_current(id);
        self.store
            .data_mut()
            .streams
            .insert(id, StreamState::default());
        self.call0("proxy_on_context_create", (id as i32, self.root as i32));
        id
    }

    fn action(v: i32) -> Action {
        if v == 0 {
            Action::Continue
        } else {
            Action::Pause
        }
    }

    pub fn request_headers(
        &mut self,
        s: u32,
        headers: &[(&str, &str)],
        end_of_stream: bool,
    ) -> Action {
        self.set_current(s);
        self.store.data_mut().stream().request_headers = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let a = self.call_i32(
            "proxy_on_request_headers",
            (s as i32, headers.len() as i32, end_of_stream as i32),
        );
        Self::action(a)
    }

    /// Delivers a body chunk; as with Envoy buffering, the size passed is the
    /// whole body received so far.
    pub fn request_body(&mut self, s: u32, chunk: &[u8], end_of_stream: bool) -> Action {
        self.set_current(s);
        let st = self.store.data_mut().stream();
        st.request_body.extend_from_slice(chunk);
        let size = st.request_body.len();
        let a = self.call_i32(
            "proxy_on_request_body",
            (s as i32, size as i32, end_of_stream as i32),
        );
        Self::action(a)
    }

    /// Request trailers: the end of a request whose last body chunk did not end
    /// the stream.
    pub fn request_trailers(&mut self, s: u32, trailers: &[(&str, &str)]) -> Action {
        self.set_current(s);
        self.store.data_mut().stream().request_trailers = trailers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let a = self.call_i32(
            "proxy_on_request_trailers",
            (s as i32, trailers.len() as i32),
        );
        Self::action(a)
    }

    pub fn response_headers(
        &mut self,
        s: u32,
        headers: &[(&str, &str)],
        end_of_stream: bool,
    ) -> Action {
        self.set_current(s);
        self.store.data_mut().stream().response_headers = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let a = self.call_i32(
            "proxy_on_response_headers",
            (s as i32, headers.len() as i32, end_of_stream as i32),
        );
        Self::action(a)
    }

    /// A response body chunk. Streamed (`buffered` false): the buffer holds just
    /// this chunk, as when the filter passed earlier ones on.
    pub fn response_body(
        &mut self,
        s: u32,
        chunk: &[u8],
        end_of_stream: bool,
        buffered: bool,
    ) -> Action {
        self.set_current(s);
        let st = self.store.data_mut().stream();
        if !buffered {
            st.response_body.clear();
        }
        st.response_body.extend_from_slice(chunk);
        let size = st.response_body.len();
        let a = self.call_i32(
            "proxy_on_response_body",
            (s as i32, size as i32, end_of_stream as i32),
        );
        Self::action(a)
    }

    /// A streamed response chunk as Envoy delivers it: while the filter holds
    /// the body (its last callback paused, no resume since), the buffer keeps the
    /// earlier bytes and grows; otherwise it holds just this chunk.
    pub fn response_chunk(&mut self, s: u32, chunk: &[u8], end_of_stream: bool) -> Action {
        let held = self.state(s).response_held;
        let a = self.response_body(s, chunk, end_of_stream, held);
        self.set_current(s);
        self.store.data_mut().stream().response_held = a == Action::Pause;
        a
    }

    /// Answers the callout `token` (`status` None: the call failed or timed out).
    pub fn http_call_response(&mut self, token: u32, status: Option<u16>, body: &[u8]) {
        let call = self
            .calls()
            .into_iter()
            .find(|c| c.token == token)
            .expect("known callout token");
        let headers = status
            .map(|s| vec![(":status".to_string(), s.to_string())])
            .unwrap_or_default();
        let n = headers.len();
        self.store.data_mut().call_response = Some((headers, body.to_vec()));
        self.set_current(call.context);
        self.call0(
            "proxy_on_http_call_response",
            (
                call.context as i32,
                token as i32,
                n as i32,
                body.len() as i32,
                0,
            ),
        );
        self.store.data_mut().call_response = None;
    }

    /// Ends a stream however it ended (done, log, delete), as Envoy does.
    pub fn end(&mut self, s: u32) {
        self.set_current(s);
        self.call_i32("proxy_on_done", (s as i32,));
        self.call0("proxy_on_log", (s as i32,));
        self.call0("proxy_on_delete", (s as i32,));
    }

    pub fn state(&self, s: u32) -> StreamState {
        self.store
            .data()
            .streams
            .get(&s)
            .cloned()
            .unwrap_or_default()
    }

    pub fn request_header(&self, s: u32, name: &str) -> Option<String> {
        self.state(s)
            .request_headers
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    pub fn local_response(&self, s: u32) -> Option<LocalResponse> {
        self.state(s).local_response
    }

    pub fn calls(&self) -> Vec<HttpCall> {
        self.store.data().calls.clone()
    }

    pub fn logs(&self) -> Vec<String> {
        self.store
            .data()
            .logs
            .iter()
            .map(|(_, l)| l.clone())
            .collect()
    }

    pub fn metric(&self, name: &str) -> Option<i64> {
        self.store
            .data()
            .metrics
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|m| m.2)
    }

    /// A property the filter set on stream `s`, as text.
    pub fn property(&self, s: u32, name: &str) -> Option<String> {
        self.state(s)
            .properties
            .get(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// Host calls by function (every `env` import; not the WASI ones) since the
    /// last [`Vm::reset_host_calls`] or [`Vm::reset_cost`].
    pub fn host_calls(&self) -> HashMap<&'static str, u64> {
        self.store.data().host_calls.clone()
    }

    pub fn reset_host_calls(&mut self) {
        self.store.data_mut().host_calls.clear();
        self.store.data_mut().shared_reads.clear();
    }

    /// The shared-data keys read since the last [`Vm::reset_host_calls`].
    pub fn shared_reads(&self) -> Vec<String> {
        self.store.data().shared_reads.clone()
    }

    /// What the module cost since the last [`Vm::reset_cost`]: instructions
    /// executed (fuel), host calls, bytes copied across the boundary.
    pub fn cost(&self) -> Cost {
        let st = self.store.data();
        Cost {
            instructions: self.fuel_mark - self.store.get_fuel().expect("fuel is enabled"),
            host_calls: st.host_calls.values().sum(),
            bytes_in: st.bytes_in,
            bytes_out: st.bytes_out,
        }
    }

    pub fn reset_cost(&mut self) {
        self.fuel_mark = self.store.get_fuel().expect("fuel is enabled");
        let st = self.store.data_mut();
        st.host_calls.clear();
        st.shared_reads.clear();
        st.bytes_in = 0;
        st.bytes_out = 0;
    }

    pub fn advance_ms(&mut self, ms: u64) {
        self.advance_us(ms * 1_000);
    }

    pub fn advance_us(&mut self, us: u64) {
        self.store.data_mut().now_ns += us * 1_000;
    }

    pub fn now_ms(&self) -> u64 {
        self.store.data().now_ns / 1_000_000
    }

    /// Panics with the trap and logs if the VM has crashed.
    pub fn assert_alive(&self) {
        if let Some(why) = &self.crashed {
            panic!("the VM crashed: {why}");
        }
    }
}
