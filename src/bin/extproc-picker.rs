//! extproc-picker: the gateway's endpoint picker as an Envoy `ext_proc` gRPC
//! service (the way GIE's EPP is deployed), running the same scheduler as the Wasm
//! filter (`inference_gateway::extproc`). The benchmarks put it behind Envoy to
//! measure the sidecar hop the filter avoids.
//!
//! Envoy's ext_proc filter is configured with request headers SEND, request body
//! BUFFERED, everything else SKIP/NONE: the picker answers the headers with
//! CONTINUE, the whole body with a header mutation that sets
//! `x-gateway-destination-endpoint`, and releases the in-flight count when Envoy
//! closes the gRPC stream. Envoy closes it when the HTTP stream ends, or earlier
//! once no more processing is due (envoyproxy/envoy#41425), so with responses
//! skipped the count may cover only the routing step; GIE's EPP processes
//! response headers for that. Snapshots are pushed to
//! `POST /v1/snapshot` on the ingest listener, in the collector's format.

use clap::Parser;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{
    body_mutation, processing_request, processing_response, BodyMutation, BodyResponse,
    CommonResponse, HeaderMutation, HeadersResponse, HttpHeaders, ImmediateResponse,
    ProcessingRequest, ProcessingResponse,
};
use futures_util::{Stream, StreamExt};
use inference_gateway::config::Config;
use inference_gateway::deploy::process::shutdown_signal;
use inference_gateway::extproc::Picker;
use inference_gateway::gateway::{HeadAction, RequestHead};
use inference_gateway::openai::{ApiError, ApiKind};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tonic::{Request, Response, Status, Streaming};

const DESTINATION_HEADER: &str = "x-gateway-destination-endpoint";
/// Streams so far: seeds each stream's RNG differently.
static STREAMS: AtomicU64 = AtomicU64::new(0);

#[derive(Parser, Debug)]
#[command(about = "The inference-gateway endpoint picker as an Envoy ext_proc gRPC service")]
struct Args {
    /// gRPC (ext_proc) listen address.
    #[arg(long, default_value = "127.0.0.1:9002")]
    grpc: SocketAddr,
    /// Snapshot ingest listen address (POST /v1/snapshot).
    #[arg(long, default_value = "127.0.0.1:9003")]
    ingest: SocketAddr,
    /// The plugin configuration (JSON, the filter's gateway configuration).
    #[arg(long)]
    config: PathBuf,
    /// Environment variable holding the ingest bearer token.
    #[arg(long, default_value = "IGW_INGEST_TOKEN")]
    token_env: String,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct Service {
    picker: Arc<Picker>,
}

/// Releases the in-flight count however the stream ends (closed or reset).
struct Holding {
    picker: Arc<Picker>,
    endpoint: Option<String>,
}

impl Drop for Holding {
    fn drop(&mut self) {
        if let Some(e) = self.endpoint.take() {
            self.picker.release(&e);
        }
    }
}

fn header(h: &HttpHeaders, name: &str) -> Option<String> {
    h.headers.as_ref()?.headers.iter().find_map(|v| {
        (v.key.eq_ignore_ascii_case(name)).then(|| {
            if v.raw_value.is_empty() {
                v.value.clone()
            } else {
                String::from_utf8_lossy(&v.raw_value).into_owned()
            }
        })
    })
}

fn set_header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.into(),
            raw_value: value.as_bytes().to_vec(),
            ..Default::default()
        }),
        // OVERWRITE_IF_EXISTS_OR_ADD: a client-sent destination is replaced.
        append_action: 2,
        ..Default::default()
    }
}

fn respond(r: processing_response::Response) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(r),
        ..Default::default()
    }
}

fn immediate(e: &ApiError) -> ProcessingResponse {
    let mut set_headers = vec![set_header("content-type", "application/json")];
    set_headers.extend(e.headers.iter().map(|(k, v)| set_header(k, v)));
    respond(processing_response::Response::ImmediateResponse(
        ImmediateResponse {
            status: Some(HttpStatus {
                code: i32::from(e.status),
            }),
            headers: Some(HeaderMutation {
                set_headers,
                ..Default::default()
            }),
            body: e.body(),
            details: e.code.to_string(),
            ..Default::default()
        },
    ))
}

/// CONTINUE, optionally with a header mutation and a body.
fn common(
    set: Vec<HeaderValueOption>,
    remove: Vec<String>,
    body: Option<Vec<u8>>,
) -> CommonResponse {
    CommonResponse {
        header_mutation: Some(HeaderMutation {
            set_headers: set,
            remove_headers: remove,
        }),
        body_mutation: body.map(|b| BodyMutation {
            mutation: Some(body_mutation::Mutation::Body(b)),
        }),
        ..Default::default()
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalProcessor for Service {
    type ProcessStream = ResponseStream;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let mut inbound = request.into_inner();
        let picker = Arc::clone(&self.picker);
        let out = async_stream::stream! {
            let mut holding = Holding { picker: Arc::clone(&picker), endpoint: None };
            let mut kind: Option<ApiKind> = None;
            let mut objective: Option<String> = None;
            let mut rng = fastrand::Rng::with_seed(
                now_ms() ^ STREAMS.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            );
            // One HTTP request per stream: headers, body, maybe response headers.
            while let Some(msg) = inbound.next().await {
                let Ok(msg) = msg else { break };
                let Some(req) = msg.request else { continue };
                match req {
                    processing_request::Request::RequestHeaders(h) => {
                        let method = header(&h, ":method").unwrap_or_default();
                        let path = header(&h, ":path").unwrap_or_default();
                        let content_type = header(&h, "content-type");
                        let content_length = header(&h, "content-length");
                        objective = header(&h, inference_gateway::routing::OBJECTIVE_HEADER);
                        let head = RequestHead {
                            method: &method,
                            path: &path,
                            content_type: content_type.as_deref(),
                            content_length: content_length.as_deref(),
                            end_of_stream: h.end_of_stream,
                        };
                        let reply = match picker.head(&head) {
                            HeadAction::Pass => common(vec![], vec![DESTINATION_HEADER.into()], None),
                            HeadAction::Reject(e) => { yield Ok(immediate(&e)); continue; }
                            HeadAction::Respond(body) => {
                                let mut r = immediate(&ApiError::new(200, "", "", String::new()));
                                if let Some(processing_response::Response::ImmediateResponse(i)) = r.response.as_mut() {
                                    i.body = body;
                                }
                                yield Ok(r);
                                continue;
                            }
                            HeadAction::Buffer(k) => {
                                kind = Some(k);
                                common(vec![], vec![DESTINATION_HEADER.into()], None)
                            }
                        };
                        yield Ok(respond(processing_response::Response::RequestHeaders(
                            HeadersResponse { response: Some(reply) },
                        )));
                    }
                    processing_request::Request::RequestBody(b) => {
                        let Some(k) = kind.take() else {
                            yield Ok(respond(processing_response::Response::RequestBody(BodyResponse::default())));
                            continue;
                        };
                        match picker.route(k, &b.body, objective.as_deref(), now_ms(), || rng.u32(..)) {
                            Ok(routed) => {
                                holding.endpoint = routed.holding;
                                let mut set = vec![set_header(DESTINATION_HEADER, &routed.destination)];
                                if let Some(nb) = &routed.new_body {
                                    set.push(set_header("content-length", &nb.len().to_string()));
                                }
                                yield Ok(respond(processing_response::Response::RequestBody(
                                    BodyResponse { response: Some(common(set, vec![], routed.new_body)) },
                                )));
                            }
                            Err(e) => yield Ok(immediate(&e)),
                        }
                    }
                    processing_request::Request::ResponseHeaders(_) => {
                        yield Ok(respond(processing_response::Response::ResponseHeaders(HeadersResponse::default())));
                    }
                    processing_request::Request::ResponseBody(_) => {
                        yield Ok(respond(processing_response::Response::ResponseBody(BodyResponse::default())));
                    }
                    _ => {}
                }
            }
            drop(holding);
        };
        Ok(Response::new(Box::pin(out)))
    }
}

fn main() -> ExitCode {
    inference_gateway::deploy::process::init_logging();
    let args = Args::parse();
    let config = match std::fs::read(&args.config)
        .map_err(|e| e.to_string())
        .and_then(|b| Config::from_json(&b).map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "extproc-picker: invalid configuration {}: {e}",
                args.config.display()
            );
            return ExitCode::from(2);
        }
    };
    let token = std::env::var(&args.token_env).unwrap_or_default();
    if token.len() < 8 {
        eprintln!(
            "extproc-picker: ${} must hold a token of at least 8 characters",
            args.token_env
        );
        return ExitCode::from(2);
    }
    let picker = Arc::new(Picker::new(config));
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("extproc-picker: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: Result<(), String> = rt.block_on(async move {
        let app = inference_gateway::picker::server::ingest_router(Arc::clone(&picker), token);
        let listener = tokio::net::TcpListener::bind(args.ingest)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", args.ingest))?;
        let http = tokio::spawn(async move { axum::serve(listener, app).await });
        tracing::info!(grpc = %args.grpc, ingest = %args.ingest, "extproc-picker listening");
        let served = tonic::transport::Server::builder()
            .add_service(ExternalProcessorServer::new(Service { picker }))
            .serve_with_shutdown(args.grpc, shutdown_signal())
            .await
            .map_err(|e| format!("gRPC server: {e}"));
        http.abort();
        served
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("extproc-picker: {e}");
            ExitCode::FAILURE
        }
    }
}
