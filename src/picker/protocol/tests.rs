//! The protocol state machine with envoy-types messages in and out, no network.

use super::*;
use crate::config::Config;
use crate::inflight;
use crate::picker::safety::SafetyCall;
use crate::snapshot::{EndpointMetrics, PoolSnapshot, Snapshot};
use envoy_types::pb::envoy::service::ext_proc::v3::ProtocolConfiguration;
use processing_response::Response as Out;

const EPS: [&str; 3] = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"];

fn picker(extra: &str) -> Arc<Picker> {
    let cfg = Config::from_json(
        format!(
            r#"{{"pools": [{{"name": "p", "endpoints": ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]}}],
                 "models": [{{"name": "m", "pool": "p"}},
                            {{"name": "r", "pool": "p", "target_models": [{{"name": "r-lora", "weight": 1}}]}}]
                 {extra}}}"#
        )
        .as_bytes(),
    )
    .unwrap();
    Arc::new(Picker::new(cfg))
}

/// Endpoint i has `waiting[i]` requests queued, scraped at 1 000 ms.
fn feed(p: &Picker, waiting: [u32; 3]) {
    let snap = Snapshot {
        generated_at_ms: 1_000,
        sequence: 1,
        collector: "t".into(),
        pools: vec![PoolSnapshot {
            name: "p".into(),
            endpoints: EPS
                .iter()
                .zip(waiting)
                .map(|(a, w)| EndpointMetrics {
                    address: a.to_string(),
                    healthy: true,
                    scraped_at_ms: 1_000,
                    waiting: w,
                    ..Default::default()
                })
                .collect(),
        }],
    };
    p.ingest(&snap.encode()).unwrap();
}

fn exchange(p: &Arc<Picker>) -> Exchange {
    Exchange::new(
        Arc::clone(p),
        Env {
            now_ns: Box::new(|| 1_050_000_000),
            rng: fastrand::Rng::with_seed(7),
        },
    )
}

fn hv(k: &str, v: &str) -> HeaderValue {
    HeaderValue {
        key: k.into(),
        raw_value: v.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn msg(r: processing_request::Request) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(r),
        ..Default::default()
    }
}

/// The first message: request headers, with the data plane's body modes.
fn headers(path: &str, extra: &[(&str, &str)], mode: i32) -> ProcessingRequest {
    let mut hs = vec![
        hv(":method", if path == "/healthz" { "GET" } else { "POST" }),
        hv(":path", path),
        hv("content-type", "application/json"),
        hv(DESTINATION_HEADER, "6.6.6.6:66"),
    ];
    hs.extend(extra.iter().map(|(k, v)| hv(k, v)));
    let mut m = msg(processing_request::Request::RequestHeaders(HttpHeaders {
        headers: Some(HeaderMap { headers: hs }),
        end_of_stream: false,
        ..Default::default()
    }));
    m.protocol_config = Some(ProtocolConfiguration {
        request_body_mode: mode,
        response_body_mode: mode,
        ..Default::default()
    });
    m
}

fn body(bytes: &[u8], eos: bool) -> ProcessingRequest {
    msg(processing_request::Request::RequestBody(HttpBody {
        body: bytes.to_vec(),
        end_of_stream: eos,
        ..Default::default()
    }))
}

fn response_headers(status: &str, served: Option<&str>) -> ProcessingRequest {
    let mut m = msg(processing_request::Request::ResponseHeaders(HttpHeaders {
        headers: Some(HeaderMap {
            headers: vec![
                hv(":status", status),
                hv("content-type", "text/event-stream"),
            ],
        }),
        ..Default::default()
    }));
    if let Some(s) = served {
        m.metadata_context = Some(Metadata {
            filter_metadata: [(
                LB_NAMESPACE.to_string(),
                Struct {
                    fields: [(SERVED_KEY.to_string(), string_value(s))].into(),
                },
            )]
            .into(),
            ..Default::default()
        });
    }
    m
}

fn response_body(bytes: &[u8], eos: bool) -> ProcessingRequest {
    msg(processing_request::Request::ResponseBody(HttpBody {
        body: bytes.to_vec(),
        end_of_stream: eos,
        ..Default::default()
    }))
}

fn with_subset(mut m: ProcessingRequest, subset: Value) -> ProcessingRequest {
    m.metadata_context = Some(Metadata {
        filter_metadata: [(
            SUBSET_NAMESPACE.to_string(),
            Struct {
                fields: [(SUBSET_KEY.to_string(), subset)].into(),
            },
        )]
        .into(),
        ..Default::default()
    });
    m
}

fn list(items: &[&str]) -> Value {
    Value {
        kind: Some(Kind::ListValue(ListValue {
            values: items.iter().map(|s| string_value(s)).collect(),
        })),
    }
}

/// The header mutation's `set` as (key, value) pairs, and its removals.
fn mutation(c: &CommonResponse) -> (Vec<(String, String)>, Vec<String>) {
    let m = c.header_mutation.clone().unwrap_or_default();
    (
        m.set_headers
            .iter()
            .filter_map(|o| o.header.as_ref())
            .map(|h| {
                (
                    h.key.clone(),
                    String::from_utf8_lossy(&h.raw_value).into_owned(),
                )
            })
            .collect(),
        m.remove_headers,
    )
}

fn metadata_destination(r: &ProcessingResponse) -> Option<String> {
    let lb = r.dynamic_metadata.as_ref()?.fields.get(LB_NAMESPACE)?;
    let Some(Kind::StructValue(s)) = &lb.kind else {
        return None;
    };
    match &s.fields.get(DESTINATION_HEADER)?.kind {
        Some(Kind::StringValue(v)) => Some(v.clone()),
        _ => None,
    }
}

/// A streamed body response's (bytes, end_of_stream).
fn streamed(r: &ProcessingResponse) -> (Vec<u8>, bool) {
    let c = match &r.response {
        Some(Out::RequestBody(b)) | Some(Out::ResponseBody(b)) => b.response.clone().unwrap(),
        other => panic!("not a body response: {other:?}"),
    };
    match c.body_mutation.and_then(|m| m.mutation) {
        Some(body_mutation::Mutation::StreamedResponse(s)) => (s.body, s.end_of_stream),
        other => panic!("not a streamed mutation: {other:?}"),
    }
}

/// An ImmediateResponse's status and parsed OpenAI error body.
fn immediate_of(r: &ProcessingResponse) -> (i32, serde_json::Value, Vec<(String, String)>) {
    let Some(Out::ImmediateResponse(i)) = &r.response else {
        panic!("not an immediate response: {r:?}")
    };
    let headers = i
        .headers
        .as_ref()
        .map(|h| {
            h.set_headers
                .iter()
                .filter_map(|o| o.header.as_ref())
                .map(|h| {
                    (
                        h.key.clone(),
                        String::from_utf8_lossy(&h.raw_value).into_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    (
        i.status.unwrap().code,
        serde_json::from_slice(&i.body).expect("a JSON body"),
        headers,
    )
}

fn in_flight(p: &Picker, ep: &str) -> u64 {
    p.in_flight(ep)
}

const BODY: &[u8] = br#"{"model":"m","prompt":"hello there","stream":true}"#;

#[test]
fn full_duplex_holds_the_request_until_the_body_ends_then_streams_it_back() {
    let p = picker("");
    feed(&p, [4, 0, 3]);
    let mut x = exchange(&p);
    assert!(
        x.on_message(headers("/v1/completions", &[], 4)).is_empty(),
        "headers held"
    );
    assert!(
        x.on_message(body(&BODY[..10], false)).is_empty(),
        "chunks held"
    );
    let out = x.on_message(body(&BODY[10..], true));
    assert_eq!(out.len(), 2, "{out:?}");
    let Some(Out::RequestHeaders(h)) = &out[0].response else {
        panic!("the header mutation comes first: {:?}", out[0])
    };
    let (set, remove) = mutation(h.response.as_ref().unwrap());
    assert_eq!(
        set,
        vec![(DESTINATION_HEADER.to_string(), "127.0.0.1:2".to_string())]
    );
    assert!(remove.is_empty());
    assert_eq!(
        metadata_destination(&out[0]).as_deref(),
        Some("127.0.0.1:2"),
        "same value in envoy.lb"
    );
    assert_eq!(streamed(&out[1]), (BODY.to_vec(), true));
    assert_eq!(in_flight(&p, "127.0.0.1:2"), 1);

    // The response streams through chunk by chunk; its end releases the count.
    let out = x.on_message(response_headers("200", None));
    assert!(matches!(out[0].response, Some(Out::ResponseHeaders(_))));
    let chunk = b"data: {\"choices\":[{\"text\":\"hi\"}]}\n\n";
    assert_eq!(
        streamed(&x.on_message(response_body(chunk, false))[0]),
        (chunk.to_vec(), false)
    );
    assert_eq!(
        in_flight(&p, "127.0.0.1:2"),
        1,
        "held while the response streams"
    );
    let last =
        b"data: {\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":5}}\n\ndata: [DONE]\n\n";
    assert_eq!(
        streamed(&x.on_message(response_body(last, true))[0]),
        (last.to_vec(), true)
    );
    assert_eq!(in_flight(&p, "127.0.0.1:2"), 0);
    drop(x);
    assert_eq!(in_flight(&p, "127.0.0.1:2"), 0, "released once");

    // The request metrics have the request, its tokens, no error.
    let all = observe::read_all(p.store());
    let (_, _, s) = all.iter().find(|(m, t, _)| m == "m" && t == "m").unwrap();
    assert_eq!((s.requests, s.running), (1, 0));
    assert!(s.errors.is_empty());
    assert_eq!(s.hist(observe::Hist::OutputTokens).unwrap().sum, 5.0);
    assert_eq!(
        s.picks().collect::<Vec<_>>(),
        vec![(crate::inflight::key("127.0.0.1:2"), 1)]
    );
}

#[test]
fn a_large_body_goes_back_in_bounded_chunks_only_the_last_ending_the_stream() {
    let p = picker("");
    let mut x = exchange(&p);
    let prompt = "x".repeat(150_000);
    let big = format!(r#"{{"model":"m","prompt":"{prompt}"}}"#).into_bytes();
    assert!(x.on_message(headers("/v1/completions", &[], 4)).is_empty());
    let mut out = Vec::new();
    for (i, c) in big.chunks(10_000).enumerate() {
        let last = (i + 1) * 10_000 >= big.len();
        out = x.on_message(body(c, last));
        if !last {
            assert!(out.is_empty());
        }
    }
    assert!(matches!(out[0].response, Some(Out::RequestHeaders(_))));
    let parts: Vec<(Vec<u8>, bool)> = out[1..].iter().map(streamed).collect();
    assert_eq!(parts.len(), 3);
    assert!(parts.iter().all(|(b, _)| b.len() <= MAX_CHUNK_BYTES));
    assert_eq!(
        parts.iter().map(|(_, e)| *e).collect::<Vec<_>>(),
        [false, false, true]
    );
    assert_eq!(parts.concat_bodies(), big);
}

trait Concat {
    fn concat_bodies(&self) -> Vec<u8>;
}
impl Concat for Vec<(Vec<u8>, bool)> {
    fn concat_bodies(&self) -> Vec<u8> {
        self.iter().flat_map(|(b, _)| b.clone()).collect()
    }
}

#[test]
fn a_body_ending_with_trailers_is_routed_on_the_trailers() {
    let p = picker("");
    let mut x = exchange(&p);
    x.on_message(headers("/v1/completions", &[], 4));
    assert!(x.on_message(body(BODY, false)).is_empty());
    let out = x.on_message(msg(processing_request::Request::RequestTrailers(
        HttpTrailers {
            trailers: Some(HeaderMap {
                headers: vec![hv("x-checksum", "abc")],
            }),
        },
    )));
    assert_eq!(out.len(), 3, "{out:?}");
    assert!(matches!(out[0].response, Some(Out::RequestHeaders(_))));
    assert_eq!(
        streamed(&out[1]),
        (BODY.to_vec(), false),
        "trailers end the stream, not the body"
    );
    assert!(matches!(out[2].response, Some(Out::RequestTrailers(_))));
    assert!(x.holding().is_some());
}

#[test]
fn the_subset_hint_narrows_the_pick_and_nothing_eligible_is_503() {
    let p = picker("");
    // 127.0.0.1:2 is idle and would win without the hint.
    feed(&p, [4, 0, 3]);
    let mut x = exchange(&p);
    let h = with_subset(
        headers("/v1/completions", &[], 4),
        list(&["127.0.0.1:3", "127.0.0.1:1"]),
    );
    x.on_message(h);
    let out = x.on_message(body(BODY, true));
    let Some(Out::RequestHeaders(h)) = &out[0].response else {
        panic!()
    };
    assert_eq!(mutation(h.response.as_ref().unwrap()).0[0].1, "127.0.0.1:3");
    assert_eq!(
        metadata_destination(&out[0]).as_deref(),
        Some("127.0.0.1:3")
    );

    for hint in [
        list(&[]),
        list(&["10.1.1.1:8000"]),
        Value {
            kind: Some(Kind::NumberValue(1.0)),
        },
    ] {
        let mut x = exchange(&p);
        x.on_message(with_subset(headers("/v1/completions", &[], 4), hint));
        let out = x.on_message(body(BODY, true));
        assert_eq!(out.len(), 1);
        let (status, err, hdrs) = immediate_of(&out[0]);
        assert_eq!(status, 503);
        assert_eq!(err["error"]["code"], "no_healthy_upstream");
        assert_eq!(err["error"]["type"], "server_error");
        assert!(hdrs.contains(&("content-type".into(), "application/json".into())));
        assert!(x.holding().is_none());
    }
    assert_eq!(
        (in_flight(&p, "127.0.0.1:1"), in_flight(&p, "127.0.0.1:3")),
        (0, 1),
        "only the routed request holds a count"
    );
}

#[test]
fn errors_are_immediate_responses_in_the_openai_shape() {
    let p = picker(r#", "scheduling": {"retry_after_seconds": 3}"#);
    // Bad JSON: 400.
    let mut x = exchange(&p);
    x.on_message(headers("/v1/chat/completions", &[], 4));
    let (status, err, _) = immediate_of(&x.on_message(body(b"{not json", true))[0]);
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (400, Some("invalid_json"))
    );
    // Messages after the answer are ignored, not answered twice.
    assert!(x.on_message(body(b"more", true)).is_empty());
    // An unknown model: 404.
    let mut x = exchange(&p);
    x.on_message(headers("/v1/completions", &[], 4));
    let (status, err, _) =
        immediate_of(&x.on_message(body(br#"{"model":"nope","prompt":"a"}"#, true))[0]);
    assert_eq!(
        (status, err["error"]["param"].as_str()),
        (404, Some("model"))
    );
    // A sheddable request to a saturated pool: 429 with retry-after.
    feed(&p, [50, 50, 50]);
    let mut x = exchange(&p);
    x.on_message(headers("/v1/completions", &[], 4));
    let out = x.on_message(body(br#"{"model":"m","prompt":"a","priority":-1}"#, true));
    let (status, err, hdrs) = immediate_of(&out[0]);
    assert_eq!(
        (status, err["error"]["type"].as_str()),
        (429, Some("rate_limit_error"))
    );
    assert!(
        hdrs.contains(&("retry-after".into(), "3".into())),
        "{hdrs:?}"
    );
    // A wrong method is answered on the headers.
    let mut x = exchange(&p);
    let mut h = headers("/v1/completions", &[], 4);
    if let Some(processing_request::Request::RequestHeaders(hh)) = h.request.as_mut() {
        hh.headers.as_mut().unwrap().headers[0] = hv(":method", "GET");
    }
    let (status, _, hdrs) = immediate_of(&x.on_message(h)[0]);
    assert_eq!(status, 405);
    assert!(hdrs.iter().any(|(k, _)| k == "allow"));
    // The error counts, by GIE's codes.
    let all = observe::read_all(p.store());
    let codes: Vec<String> = all
        .iter()
        .flat_map(|(_, _, s)| s.errors.iter().map(|(c, _)| c.clone()))
        .collect();
    for c in ["BadRequest", "InferencePoolResourceExhausted"] {
        assert!(codes.iter().any(|x| x == c), "{codes:?}");
    }
}

#[test]
fn an_oversized_body_is_refused_without_holding_it() {
    let p = picker(r#", "max_request_body_bytes": 64"#);
    let mut x = exchange(&p);
    x.on_message(headers("/v1/completions", &[], 4));
    assert!(x.on_message(body(&[b' '; 40], false)).is_empty());
    let (status, _, _) = immediate_of(&x.on_message(body(&[b' '; 40], false))[0]);
    assert_eq!(status, 413);
}

#[test]
fn buffered_mode_answers_headers_at_once_and_routes_on_the_body() {
    let p = picker("");
    feed(&p, [0, 4, 4]);
    let mut x = exchange(&p);
    let out = x.on_message(headers("/v1/completions", &[], 2));
    let Some(Out::RequestHeaders(h)) = &out[0].response else {
        panic!()
    };
    assert_eq!(
        mutation(h.response.as_ref().unwrap()).1,
        vec![DESTINATION_HEADER.to_string()],
        "a client's destination is dropped"
    );
    let out = x.on_message(body(BODY, true));
    let Some(Out::RequestBody(b)) = &out[0].response else {
        panic!()
    };
    let c = b.response.as_ref().unwrap();
    assert_eq!(
        mutation(c).0,
        vec![(DESTINATION_HEADER.to_string(), "127.0.0.1:1".to_string())]
    );
    assert!(c.body_mutation.is_none(), "the body is unchanged");
    assert_eq!(
        metadata_destination(&out[0]).as_deref(),
        Some("127.0.0.1:1")
    );
}

#[test]
fn a_weighted_rewrite_streams_the_new_body_without_the_old_length() {
    let p = picker("");
    let mut x = exchange(&p);
    x.on_message(headers("/v1/completions", &[("content-length", "30")], 4));
    let out = x.on_message(body(br#"{"model":"r","prompt":"x"}"#, true));
    let Some(Out::RequestHeaders(h)) = &out[0].response else {
        panic!()
    };
    assert_eq!(
        mutation(h.response.as_ref().unwrap()).1,
        vec!["content-length".to_string()]
    );
    assert_eq!(
        streamed(&out[1]).0,
        br#"{"model":"r-lora","prompt":"x"}"#.to_vec()
    );
}

#[test]
fn the_objective_header_is_honoured() {
    let p = picker(r#", "objectives": [{"name": "batch", "priority": -1}]"#);
    feed(&p, [50, 50, 50]);
    let mut x = exchange(&p);
    x.on_message(headers(
        "/v1/completions",
        &[(OBJECTIVE_HEADER, "batch")],
        4,
    ));
    let (status, _, _) =
        immediate_of(&x.on_message(body(br#"{"model":"m","prompt":"a"}"#, true))[0]);
    assert_eq!(status, 429, "the objective made it sheddable");
}

#[test]
fn other_paths_pass_and_their_bodies_stream_straight_back() {
    let p = picker("");
    let mut x = exchange(&p);
    let out = x.on_message(headers("/healthz", &[], 4));
    let Some(Out::RequestHeaders(h)) = &out[0].response else {
        panic!()
    };
    assert_eq!(
        mutation(h.response.as_ref().unwrap()).1,
        vec![DESTINATION_HEADER.to_string()]
    );
    assert_eq!(
        streamed(&x.on_message(body(b"abc", false))[0]),
        (b"abc".to_vec(), false)
    );
    assert_eq!(
        streamed(&x.on_message(body(b"", true))[0]),
        (Vec::new(), true)
    );
}

#[test]
fn a_reset_stream_gives_the_count_back() {
    let p = picker("");
    feed(&p, [0, 9, 9]);
    let mut x = exchange(&p);
    x.on_message(headers("/v1/completions", &[], 4));
    x.on_message(body(BODY, true));
    x.on_message(response_headers("200", None));
    assert_eq!(in_flight(&p, "127.0.0.1:1"), 1);
    drop(x); // Envoy reset the stream mid-response
    assert_eq!(in_flight(&p, "127.0.0.1:1"), 0);
    let all = observe::read_all(p.store());
    let (_, _, s) = all.iter().find(|(m, _, _)| m == "m").unwrap();
    assert_eq!(s.running, 0);
}

#[test]
fn the_served_endpoint_takes_over_the_count() {
    let p = picker("");
    feed(&p, [0, 9, 9]);
    let mut x = exchange(&p);
    x.on_message(headers("/v1/completions", &[], 4));
    x.on_message(body(BODY, true));
    assert_eq!(x.holding(), Some("127.0.0.1:1"));
    // A fallback served it: the count moves.
    x.on_message(response_headers("200", Some("127.0.0.1:3")));
    assert_eq!(
        (in_flight(&p, "127.0.0.1:1"), in_flight(&p, "127.0.0.1:3")),
        (0, 1)
    );
    // Outside the pool: ignored.
    x.on_message(response_headers("200", Some("10.9.9.9:1")));
    assert_eq!(x.holding(), Some("127.0.0.1:3"));
    x.on_message(response_body(b"{}", true));
    assert_eq!(in_flight(&p, "127.0.0.1:3"), 0);
    assert!(inflight::table(p.store()).iter().all(|_| true));
}

#[test]
fn an_upstream_error_status_is_counted() {
    let p = picker("");
    let mut x = exchange(&p);
    x.on_message(headers("/v1/completions", &[], 4));
    x.on_message(body(BODY, true));
    x.on_message(response_headers("503", None));
    x.on_message(response_body(b"{}", true));
    let all = observe::read_all(p.store());
    let (_, _, s) = all.iter().find(|(m, _, _)| m == "m").unwrap();
    assert_eq!(s.errors, vec![("ModelServerError".to_string(), 1)]);
}

#[test]
fn unsupported_body_modes_fail_clearly_and_garbage_is_harmless() {
    let p = picker("");
    let mut x = exchange(&p);
    let (status, err, _) = immediate_of(&x.on_message(headers("/v1/completions", &[], 1))[0]);
    assert_eq!(status, 500);
    assert!(err["error"]["message"]
        .as_str()
        .unwrap()
        .contains("FULL_DUPLEX_STREAMED"));
    // Empty messages, bodies before headers, a second set of headers.
    let mut x = exchange(&p);
    assert!(x.on_message(ProcessingRequest::default()).is_empty());
    let (status, _, _) = immediate_of(&x.on_message(body(b"x", true))[0]);
    assert_eq!(status, 500);
    let mut x = exchange(&p);
    x.on_message(headers("/v1/completions", &[], 4));
    let (status, _, _) = immediate_of(&x.on_message(headers("/v1/completions", &[], 4))[0]);
    assert_eq!(status, 500);
}

#[test]
fn subset_hints_parse_lists_and_strings() {
    let md = |v: Value| {
        Some(Metadata {
            filter_metadata: [(
                SUBSET_NAMESPACE.to_string(),
                Struct {
                    fields: [(SUBSET_KEY.to_string(), v)].into(),
                },
            )]
            .into(),
            ..Default::default()
        })
    };
    assert_eq!(subset_hint(None), None);
    assert_eq!(subset_hint(Some(&Metadata::default())), None);
    assert_eq!(
        subset_hint(md(list(&["10.0.0.1:80", " 10.0.0.2:80 "])).as_ref()),
        Some(vec!["10.0.0.1:80".to_string(), "10.0.0.2:80".to_string()])
    );
    assert_eq!(
        subset_hint(md(string_value("10.0.0.1:80,10.0.0.2:80")).as_ref()).map(|v| v.len()),
        Some(2)
    );
    assert_eq!(subset_hint(md(Value { kind: None }).as_ref()), Some(vec![]));
}

mod screening;
