//! The floor of the overhead benchmark: the least any body-based router in Wasm
//! must do per request, and nothing more.
//!
//! 1. hold the request headers (`Pause`; Envoy needs
//!    `allow_on_headers_stop_iteration: true`, as for the inference-gateway filter);
//! 2. wait for the whole body and copy it into the VM's memory (a router that reads
//!    the model or the prompt must);
//! 3. set `x-gateway-destination-endpoint` to the next configured endpoint (round
//!    robin per plugin configuration per VM) and continue.
//!
//! No parsing of the body, no metrics, no shared data, no logging per request.
//! `bench overhead` runs it with the filter's Envoy wiring (the same `ORIGINAL_DST`
//! cluster keyed by that header, the same VM settings), so the filter's cost minus
//! this one is the filter's own work.

/// The header the `ORIGINAL_DST` cluster routes on (the filter's, too).
pub const DESTINATION_HEADER: &str = "x-gateway-destination-endpoint";

/// The plugin configuration: a JSON array of `"ip:port"` strings, e.g.
/// `["127.0.0.1:8001", "127.0.0.1:8002"]`.
///
/// JSON because the benchmark renders every plugin configuration through the same
/// JSON writer as the filter's (`deploy::envoy_config`); parsed by hand, without
/// serde, because the whole grammar needed is "strings of address characters
/// between brackets, separated by commas": a JSON parser would be most of this
/// module's code and none of the work it stands for. Addresses never contain a
/// quote, a backslash or a comma, so anything outside `[0-9A-Za-z.:[]_-]` inside
/// the quotes (escapes included) is rejected rather than decoded. `None`: not
/// such an array. An empty array is valid (every request is answered 503).
/// Slicing only at ASCII bytes found by `strip_*`/`split`: no input can panic.
pub fn parse_endpoints(config: &[u8]) -> Option<Vec<String>> {
    let text = std::str::from_utf8(config).ok()?.trim();
    let inner = text.strip_prefix('[')?.strip_suffix(']')?.trim();
    if inner.is_empty() {
        return Some(Vec::new());
    }
    inner
        .split(',')
        .map(|item| {
            let address = item.trim().strip_prefix('"')?.strip_suffix('"')?;
            let valid = !address.is_empty()
                && address
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".:[]_-".contains(&b));
            valid.then(|| address.to_string())
        })
        .collect()
}

/// The proxy-wasm glue (Wasm only: native builds run the parser's tests), in the
/// SDK examples' style. Its host calls are the ones the inference-gateway filter
/// makes for the same steps; like there, only a host breaking the ABI can make the
/// SDK panic, no request or configuration can.
#[cfg(target_arch = "wasm32")]
mod filter {
    use super::{parse_endpoints, DESTINATION_HEADER};
    use proxy_wasm::traits::{Context, HttpContext, RootContext};
    use proxy_wasm::types::{Action, ContextType, LogLevel};
    use std::cell::Cell;
    use std::rc::Rc;

    proxy_wasm::main! {{
        proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
    }}

    /// One per plugin configuration per worker VM.
    #[derive(Default)]
    struct Root {
        endpoints: Rc<[String]>,
        /// The round-robin position, shared by this root's streams.
        next: Rc<Cell<usize>>,
    }

    impl Context for Root {}

    impl RootContext for Root {
        fn on_configure(&mut self, _: usize) -> bool {
            let config = self.get_plugin_configuration().unwrap_or_default();
            match parse_endpoints(&config) {
                Some(endpoints) => {
                    self.endpoints = endpoints.into();
                    true
                }
                None => {
                    let _ = proxy_wasm::hostcalls::log(
                        LogLevel::Error,
                        "bench-floor-filter: the plugin configuration must be a JSON array \
                         of \"ip:port\" strings",
                    );
                    false
                }
            }
        }

        fn get_type(&self) -> Option<ContextType> {
            Some(ContextType::HttpContext)
        }

        fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
            Some(Box::new(Stream {
                endpoints: Rc::clone(&self.endpoints),
                next: Rc::clone(&self.next),
            }))
        }
    }

    struct Stream {
        endpoints: Rc<[String]>,
        next: Rc<Cell<usize>>,
    }

    impl Stream {
        /// Sets the destination to the next endpoint and lets the request go on
        /// (no endpoint configured: 503).
        fn route(&self) -> Action {
            let i = self.next.get();
            let Some(endpoint) = self.endpoints.get(i) else {
                self.send_http_response(503, vec![], None);
                return Action::Pause;
            };
            self.next.set((i + 1) % self.endpoints.len());
            self.set_http_request_header(DESTINATION_HEADER, Some(endpoint));
            Action::Continue
        }

        /// Copies the whole body into this VM (what a body-based router parses),
        /// then routes.
        fn read_body_and_route(&self, size: usize) -> Action {
            let body = self.get_http_request_body(0, size);
            std::hint::black_box(body);
            self.route()
        }
    }

    impl Context for Stream {}

    impl HttpContext for Stream {
        fn on_http_request_headers(&mut self, _: usize, end_of_stream: bool) -> Action {
            if end_of_stream {
                return self.route(); // no body to read
            }
            Action::Pause
        }

        fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
            if !end_of_stream {
                return Action::Pause; // Envoy keeps buffering
            }
            self.read_body_and_route(body_size)
        }

        fn on_http_request_trailers(&mut self, _: usize) -> Action {
            // A body that ended with trailers is complete now.
            self.read_body_and_route(usize::MAX)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_endpoints;

    #[test]
    fn a_json_array_of_addresses() {
        assert_eq!(
            parse_endpoints(b"[\"127.0.0.1:8001\", \"127.0.0.1:8002\"]"),
            Some(vec!["127.0.0.1:8001".into(), "127.0.0.1:8002".into()])
        );
        assert_eq!(
            parse_endpoints(b" [\n  \"[::1]:80\",\n  \"pod-1.ns:8000\"\n]\n"),
            Some(vec!["[::1]:80".into(), "pod-1.ns:8000".into()])
        );
        assert_eq!(parse_endpoints(b"[]"), Some(vec![]));
        assert_eq!(parse_endpoints(b" [ \n ] "), Some(vec![]));
    }

    #[test]
    fn anything_else_is_rejected_without_panicking() {
        for bad in [
            &b""[..],
            b"[",
            b"]",
            b"\"127.0.0.1:1\"",
            b"{\"role\": \"control\"}",
            b"[\"a\",]",
            b"[,]",
            b"[\"\"]",
            b"[\"a\" \"b\"]",
            b"[\"a\\\"b\"]",
            b"[\"a b\"]",
            b"[\"\xc3\xa9\"]",
            b"[\"\xff\"]",
            b"[1]",
            b"[\"]",
            b"[\"a\"]]",
        ] {
            assert_eq!(
                parse_endpoints(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn every_short_input_is_safe() {
        // Exhaustive over short strings of the characters the grammar cares about.
        let alphabet = b"[]\", a:\\\xc3";
        let mut input = Vec::new();
        for len in 0..=5u32 {
            for mut n in 0..(alphabet.len() as u32).pow(len) {
                input.clear();
                for _ in 0..len {
                    input.push(alphabet[(n % alphabet.len() as u32) as usize]);
                    n /= alphabet.len() as u32;
                }
                if let Some(list) = parse_endpoints(&input) {
                    assert!(list
                        .iter()
                        .all(|a| !a.is_empty() && !a.contains(['"', ','])));
                }
            }
        }
    }
}
