//! Host reads that cannot panic on what clients and upstreams send. The SDK's
//! string getters unwrap UTF-8, and a header value may legally hold other bytes;
//! a panic would kill the VM, so every header read goes through here.

use proxy_wasm::hostcalls;
use proxy_wasm::types::MapType;

fn value(map: MapType, name: &str) -> Option<String> {
    match hostcalls::get_map_value_bytes(map, name) {
        Ok(Some(bytes)) => Some(String::from_utf8_lossy(&bytes).into_owned()),
        _ => None,
    }
}

pub fn request_header(name: &str) -> Option<String> {
    value(MapType::HttpRequestHeaders, name)
}

pub fn response_header(name: &str) -> Option<String> {
    value(MapType::HttpResponseHeaders, name)
}

pub fn call_response_header(name: &str) -> Option<String> {
    value(MapType::HttpCallResponseHeaders, name)
}
