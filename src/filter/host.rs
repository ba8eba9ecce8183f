//! Host reads that cannot panic. The SDK's getters panic on any status but `Ok`
//! and `NotFound` (Envoy answers others, e.g. for request headers read in a
//! response-phase callback) and unwrap UTF-8, while a header value may legally hold
//! other bytes. A panic kills the VM, so every header read goes through here.

use proxy_wasm::types::{MapType, Status};

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_value(
        map_type: MapType,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> Status;
}

fn value(map: MapType, name: &str) -> Option<String> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes a buffer it allocated through the SDK's exported
    // allocator (a Vec<u8> allocation of `size` bytes), which we take ownership of.
    unsafe {
        match proxy_get_header_map_value(map, name.as_ptr(), name.len(), &mut data, &mut size) {
            Status::Ok if data.is_null() => Some(String::new()),
            Status::Ok => {
                let bytes = Vec::from_raw_parts(data, size, size);
                Some(String::from_utf8_lossy(&bytes).into_owned())
            }
            _ => None,
        }
    }
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_pairs(
        map_type: MapType,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> Status;
}

/// The request headers the gateway reads, in one host call (`None`: the host
/// refused or sent a malformed map).
pub fn request_headers() -> Option<crate::gateway::headers::RequestHeaders> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: as in `value`: a buffer the host allocated through the SDK's exported
    // allocator, which we take ownership of.
    unsafe {
        match proxy_get_header_map_pairs(MapType::HttpRequestHeaders, &mut data, &mut size) {
            Status::Ok if data.is_null() => Some(Default::default()),
            Status::Ok => {
                let bytes = Vec::from_raw_parts(data, size, size);
                crate::gateway::headers::RequestHeaders::from_proxy_wasm_map(&bytes)
            }
            _ => None,
        }
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
