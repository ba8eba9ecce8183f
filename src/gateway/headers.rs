//! The request headers the gateway reads, taken from the host in one call.
//!
//! Reading them one by one cost a host call each (six per request, and a remove
//! for a destination header that is almost never there); proxy-wasm hands the
//! whole map over at once in its serialized form, parsed here without the host.

use crate::auth::API_KEY_HEADER;
use crate::routing::OBJECTIVE_HEADER;

/// The header the ORIGINAL_DST cluster routes on.
pub const DESTINATION_HEADER: &str = "x-gateway-destination-endpoint";

/// The values the gateway uses; the first of repeated headers, as a single-value
/// read returns. Values that are not UTF-8 are read lossily.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestHeaders {
    pub method: String,
    pub path: String,
    pub content_type: Option<String>,
    pub content_length: Option<String>,
    pub request_id: Option<String>,
    pub objective: Option<String>,
    pub api_key: Option<String>,
    pub authorization: Option<String>,
    /// The client sent `x-gateway-destination-endpoint` (it must be removed).
    pub destination: bool,
}

impl RequestHeaders {
    /// From proxy-wasm's serialized map: a little-endian `u32` count, then a
    /// (`u32` name length, `u32` value length) pair per header, then each name and
    /// value followed by a NUL. `None` when the bytes do not hold such a map.
    pub fn from_proxy_wasm_map(bytes: &[u8]) -> Option<RequestHeaders> {
        let mut h = RequestHeaders::default();
        if bytes.is_empty() {
            return Some(h);
        }
        let u32_at = |at: usize| -> Option<usize> {
            let b = bytes.get(at..at.checked_add(4)?)?;
            Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        };
        let count = u32_at(0)?;
        let mut data = 4usize.checked_add(count.checked_mul(8)?)?;
        for i in 0..count {
            let (name_len, value_len) = (u32_at(4 + i * 8)?, u32_at(8 + i * 8)?);
            let name = bytes.get(data..data.checked_add(name_len)?)?;
            data = data.checked_add(name_len + 1)?;
            let value = bytes.get(data..data.checked_add(value_len)?)?;
            data = data.checked_add(value_len + 1)?;
            h.take(name, value);
        }
        Some(h)
    }

    fn take(&mut self, name: &[u8], value: &[u8]) {
        let text = || Some(String::from_utf8_lossy(value).into_owned());
        let first = |slot: &mut Option<String>| {
            if slot.is_none() {
                *slot = text();
            }
        };
        match name {
            b":method" if self.method.is_empty() => self.method = text().unwrap_or_default(),
            b":path" if self.path.is_empty() => self.path = text().unwrap_or_default(),
            b"content-type" => first(&mut self.content_type),
            b"content-length" => first(&mut self.content_length),
            b"x-request-id" => first(&mut self.request_id),
            n if n == OBJECTIVE_HEADER.as_bytes() => first(&mut self.objective),
            n if n == API_KEY_HEADER.as_bytes() => first(&mut self.api_key),
            b"authorization" => first(&mut self.authorization),
            n if n == DESTINATION_HEADER.as_bytes() => self.destination = true,
            _ => {}
        }
    }
}

/// The host's side of the format [`RequestHeaders::from_proxy_wasm_map`] reads
/// (what Envoy writes; the wasmtime test host writes maps with it).
pub fn serialize_map<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(K, V)]) -> Vec<u8> {
    let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
    for (k, v) in pairs {
        out.extend((k.as_ref().len() as u32).to_le_bytes());
        out.extend((v.as_ref().len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend(k.as_ref());
        out.push(0);
        out.extend(v.as_ref());
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serialize(pairs: &[(&str, &[u8])]) -> Vec<u8> {
        serialize_map(pairs)
    }

    #[test]
    fn reads_the_headers_the_gateway_uses() {
        let map = serialize(&[
            (":method", b"POST"),
            (":path", b"/v1/chat/completions"),
            ("content-type", b"application/json"),
            ("content-length", b"42"),
            ("x-request-id", b"r1"),
            ("x-request-id", b"r2"),
            ("x-gateway-inference-objective", b"batch"),
            ("x-api-key", b"k\xff"),
            ("authorization", b"Bearer t"),
            ("user-agent", b"oha"),
        ]);
        let h = RequestHeaders::from_proxy_wasm_map(&map).unwrap();
        assert_eq!(
            h,
            RequestHeaders {
                method: "POST".into(),
                path: "/v1/chat/completions".into(),
                content_type: Some("application/json".into()),
                content_length: Some("42".into()),
                request_id: Some("r1".into()),
                objective: Some("batch".into()),
                api_key: Some("k\u{fffd}".into()),
                authorization: Some("Bearer t".into()),
                destination: false,
            }
        );
        let h = RequestHeaders::from_proxy_wasm_map(&serialize(&[(
            "x-gateway-destination-endpoint",
            b"",
        )]))
        .unwrap();
        assert!(h.destination);
        assert_eq!(
            RequestHeaders::from_proxy_wasm_map(&[]),
            Some(RequestHeaders::default())
        );
    }

    #[test]
    fn malformed_maps_are_refused_without_panicking() {
        let good = serialize(&[(":path", b"/v1/completions"), ("a", b"b")]);
        for cut in 0..good.len() - 1 {
            if cut == 0 {
                continue;
            }
            assert_eq!(
                RequestHeaders::from_proxy_wasm_map(&good[..cut]),
                None,
                "{cut}"
            );
        }
        let huge = [0xff, 0xff, 0xff, 0xff, 1, 0, 0, 0];
        assert_eq!(RequestHeaders::from_proxy_wasm_map(&huge), None);
    }
}
