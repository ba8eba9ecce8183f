//! The control listener (loopback only): `GET /debug/state` shows what the
//! gateway's workers share, so operators and tests can see in-flight counts.

use super::store::{self, HostStore};
use crate::inflight;
use crate::openai::ApiError;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;
use serde::Serialize;
use std::collections::BTreeMap;

pub struct ControlStream;

#[derive(Serialize)]
struct State {
    in_flight: BTreeMap<String, u64>,
}

impl Context for ControlStream {}

impl HttpContext for ControlStream {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let method = self.get_http_request_header(":method").unwrap_or_default();
        let path = self.get_http_request_header(":path").unwrap_or_default();
        let route = path.split('?').next().unwrap_or_default();
        match (method.as_str(), route) {
            ("GET", "/debug/state") => {
                let endpoints = store::registered_endpoints();
                let state = State {
                    in_flight: inflight::snapshot(&HostStore, &endpoints)
                        .into_iter()
                        .collect(),
                };
                let body = serde_json::to_vec(&state).unwrap_or_default();
                self.send_http_response(
                    200,
                    vec![("content-type", "application/json")],
                    Some(&body),
                );
            }
            (_, "/debug/state") => reply(self, &ApiError::method_not_allowed(&method, "GET")),
            _ => reply(self, &ApiError::not_found(route)),
        }
        Action::Pause
    }
}

pub fn reply(ctx: &dyn HttpContext, e: &ApiError) {
    let mut headers = vec![("content-type", "application/json")];
    headers.extend(e.headers.iter().map(|(k, v)| (*k, v.as_str())));
    ctx.send_http_response(u32::from(e.status), headers, Some(&e.body()));
}
