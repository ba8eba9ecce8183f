#!/usr/bin/env python3
"""Writes the hand-written seed corpus, fuzz/corpus/<target>/seed-*.

Realistic inputs taken from the repository's tests and docs: OpenAI bodies of the
four APIs (tools, content parts, Responses items), SSE streams, Model Armor
verdicts, vLLM /metrics text, plugin and collector configurations. Each target's
framing (a selector byte first, cut points, ...) is described in its source file.
Re-run after changing a seed: `python3 fuzz/seeds/make_seeds.py`.
(The snapshot seeds are binary; they come from `run.sh seeds-snapshot`.)
"""
import json, os, struct, pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / "corpus"

def write(target, name, data):
    d = ROOT / target
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (d / f"seed-{name}").write_bytes(data)

CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES = 0, 1, 2, 3

chat_simple = {"model": "food-review", "messages": [{"role": "user", "content": "Is this a good pizza?"}]}
chat_tools = {
    "model": "meta-llama/Llama-3.1-8B-Instruct",
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "text", "text": "What is the weather in Paris?"},
                                      {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C, cloudy"},
    ],
    "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather by city",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
    "tool_choice": "auto",
    "stream": True,
    "stream_options": {"include_usage": True},
    "priority": 5,
    "temperature": 0.2,
    "max_tokens": 256,
}
completions = {"model": "chat", "prompt": ["Once upon a time", "The end"], "max_tokens": 16, "stream": False}
completions_tokens = {"model": "m", "prompt": [[1, 2, 3], [4, 5]], "priority": -3}
embeddings = {"model": "text-embed", "input": ["first sentence", "second sentence"], "encoding_format": "float"}
embeddings_str = {"model": "m", "input": "hello world"}
responses = {
    "model": "food-review",
    "instructions": "Answer briefly.",
    "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "Rate this pizza."}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "8/10"}]},
        "and why?",
    ],
    "tools": [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}],
    "stream": True,
    "priority": 1,
}
responses_str = {"model": "m", "input": "Tell me a joke", "priority": 2}

bodies = [
    ("chat-simple", CHAT, json.dumps(chat_simple)),
    ("chat-tools", CHAT, json.dumps(chat_tools, indent=1)),
    ("chat-escaped-model", CHAT, '{"model":"f\\u006fod-review","messages":[{"role":"user","content":"hi"}]}'),
    ("completions", COMPLETIONS, json.dumps(completions)),
    ("completions-tokens", COMPLETIONS, json.dumps(completions_tokens)),
    ("embeddings", EMBEDDINGS, json.dumps(embeddings)),
    ("embeddings-str", EMBEDDINGS, json.dumps(embeddings_str)),
    ("responses", RESPONSES, json.dumps(responses)),
    ("responses-str", RESPONSES, json.dumps(responses_str)),
    ("not-object", CHAT, '["model","m"]'),
    ("null-model", CHAT, '{"model":null,"messages":[]}'),
]
for name, kind, body in bodies:
    write("request", name, bytes([kind]) + body.encode())

# SSE: byte 0 max_text/4, byte 1 number of cut points, cut points, stream.
def chunk(content, extra=""):
    return "data: " + json.dumps({"id": "c1", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}) + "\n\n"
sse_chat = chunk("Hello") + chunk(" world") + ": keep-alive\n\n" + \
    "data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}}) + "\n\n" + \
    "data: [DONE]\n\n"
sse_completions = "data: " + json.dumps({"choices": [{"text": "Once", "index": 0}]}) + "\r\n\r\n" + \
    "data: " + json.dumps({"choices": [{"text": " upon", "index": 0}]}) + "\r\n\r\ndata: [DONE]"
write("sse", "chat", bytes([255, 3, 10, 40, 7]) + sse_chat.encode())
write("sse", "completions-crlf", bytes([2, 2, 17, 5]) + sse_completions.encode())
write("sse", "event-lines", bytes([64, 0]) + b"event: message\nid: 7\ndata: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n")

# usage: byte 0 number of cut points, cut points, response.
usage_json = json.dumps({"id": "cmpl-1", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "the \"usage\": {\"prompt_tokens\": 999} is text"}}],
                         "usage": {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}})
usage_sse = "data: " + json.dumps({"choices": [{"delta": {"content": "hi"}}], "usage": None}) + "\n\n" + \
    "data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": 31, "completion_tokens": 7, "total_tokens": 38, "prompt_tokens_details": {"cached_tokens": 16}}}) + "\n\ndata: [DONE]\n\n"
responses_usage = json.dumps({"object": "response", "output": [{"type": "message", "content": [{"type": "output_text", "text": "ok"}]}],
                              "usage": {"input_tokens": 5, "output_tokens": 1, "total_tokens": 6}})
write("usage", "chat-json", bytes([2, 30, 200]) + usage_json.encode())
write("usage", "sse", bytes([3, 5, 90, 13]) + usage_sse.encode())
write("usage", "responses", bytes([0]) + responses_usage.encode())

# verdict: two bytes status (LE; value % 8 >= 2 means 200), body.
st = bytes([2, 0])
write("verdict", "pass", st + b'{"sanitizationResult":{"filterMatchState":"NO_MATCH_FOUND","filterResults":{},"invocationResult":"SUCCESS"}}')
write("verdict", "block", st + b'''{"sanitizationResult":{"filterMatchState":"MATCH_FOUND","filterResults":{
 "pi_and_jailbreak":{"piAndJailbreakFilterResult":{"executionState":"EXECUTION_SUCCESS","matchState":"MATCH_FOUND","confidenceLevel":"HIGH"}},
 "rai":{"raiFilterResult":{"matchState":"MATCH_FOUND","raiFilterTypeResults":{
   "dangerous":{"matchState":"MATCH_FOUND"},"harassment":{"matchState":"NO_MATCH_FOUND"}}}},
 "sdp":{"sdpFilterResult":{"inspectResult":{"matchState":"NO_MATCH_FOUND"}}},
 "malicious_uris":{"maliciousUriFilterResult":{"matchState":"NO_MATCH_FOUND"}}}}}''')
write("verdict", "maybe", st + b'{"sanitizationResult":{"filterMatchState":"MAYBE"}}')
write("verdict", "status-503", struct.pack("<H", 505) + b'{"error":{"code":503}}')

# response_text: a non-streamed response body.
write("response_text", "chat", json.dumps({"id": "chatcmpl-1", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "It looks great."}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 5, "completion_tokens": 4}}))
write("response_text", "completions", json.dumps({"object": "text_completion", "choices": [{"text": "Once upon", "index": 0}, {"text": "a time", "index": 1}]}))
write("response_text", "responses", json.dumps({"object": "response", "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello", "annotations": []}]}]}))

# plugin_config: the docs' example, the demo's (with safety), a scheduling one.
doc_cfg = {
    "max_request_body_bytes": 4194304,
    "pools": [{"name": "vllm-llama3-8b", "endpoints": ["10.0.0.11:8000", "10.0.0.12:8000"]}],
    "objectives": [{"name": "interactive", "priority": 10}, {"name": "batch", "priority": -1}],
    "models": [
        {"name": "meta-llama/Llama-3.1-8B-Instruct", "pool": "vllm-llama3-8b", "objective": "interactive"},
        {"name": "food-review", "pool": "vllm-llama3-8b", "criticality": "Standard",
         "target_models": [{"name": "food-review-v1", "weight": 90}, {"name": "food-review-v2", "weight": 10}]},
    ],
}
demo_cfg = {
    "max_request_body_bytes": 4194304, "other_paths": "reject",
    "pools": [{"name": "demo-pool", "endpoints": ["127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8003"]}],
    "models": [{"name": "food-review", "pool": "demo-pool", "criticality": "Standard",
                "target_models": [{"name": "food-review-v1", "weight": 90}, {"name": "food-review-v2", "weight": 10}]},
               {"name": "chat", "pool": "demo-pool"}],
    "safety": {"cluster": "safety_service",
               "default": {"model_response_template_id": "projects/demo/locations/local/templates/response-guard",
                           "user_prompt_template_id": "projects/demo/locations/local/templates/prompt-guard"},
               "fail_open": False, "timeout_ms": 1000},
}
write("plugin_config", "docs-example", json.dumps(doc_cfg, indent=2))
write("plugin_config", "demo", json.dumps(demo_cfg, indent=2))
write("plugin_config", "control", '{"role": "control", "ingest": {"token": "0123456789abcdef", "max_snapshot_bytes": 1048576}}')
write("plugin_config", "default-pool", json.dumps({"pools": [{"name": "a", "endpoints": ["[::1]:8000"]}, {"name": "b", "endpoints": ["127.0.0.1:1"]}],
                                                   "default_pool": "b", "destination_list": True, "snapshot_stale_after_ms": 500,
                                                   "ingest": {"token": "0123456789abcdef"}}))

# exposition: byte 0 picks the wanted names (0: all, 1: vllm:*), the scrape text.
vllm = """# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.125
# TYPE vllm:lora_requests_info gauge
vllm:lora_requests_info{max_lora="4",running_lora_adapters="sql-lora,tweet-lora",waiting_lora_adapters=""} 1.7e+09
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{le="0.3",model_name="m"} 12
vllm:e2e_request_latency_seconds_bucket{le="+Inf",model_name="m"} 20
vllm:e2e_request_latency_seconds_sum{model_name="m"} 4.5
vllm:e2e_request_latency_seconds_count{model_name="m"} 20
"""
sglang = """# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="qwen",tp_rank="0"} 2 1700000000000
sglang:num_queue_reqs{model_name="qwen"} 0
sglang:token_usage{model_name="qwen"} 0.31
"""
tgi = """tgi_queue_size 4
tgi_batch_current_size 8
tgi_batch_current_max_tokens 16384 # {trace_id="abc"} 1.0
weird_label{path="C:\\\\dir",msg="say \\"hi\\"\\n"} NaN
inf_metric -Inf
# EOF
"""
write("exposition", "vllm", b"\x01" + vllm.encode())
write("exposition", "sglang", b"\x00" + sglang.encode())
write("exposition", "tgi-escapes", b"\x00" + tgi.encode())

# collector_config: byte 0 bit 0 = JSON; the example YAML, a JSON one.
example = (pathlib.Path(__file__).resolve().parent.parent.parent / "docs" / "collector.example.yaml").read_text()
write("collector_config", "example-yaml", b"\x00" + example.encode())
write("collector_config", "json", b"\x01" + json.dumps({
    "scrape_interval_ms": 100, "push_targets": ["http://127.0.0.1:9902/v1/snapshot"], "token": "0123456789abcdef",
    "pools": [{"name": "p", "server_type": "vllm", "endpoints": ["127.0.0.1:8001", {"address": "[::1]:8002", "labels": {"zone": "b"}}]}],
}).encode())
write("collector_config", "minimal-yaml", b"\x00pools:\n  - name: p\n    endpoints: [\"127.0.0.1:8000\"]\ntoken: \"0123456789abcdef\"\npush_targets: [\"127.0.0.1:9902\"]\n")

# request_structured takes `arbitrary` bytes: a few random-looking seeds are enough.
for i, s in enumerate([b"\x03\x01food-review\x00" * 4, bytes(range(64)), b"\xff" * 48]):
    write("request_structured", f"bytes-{i}", s)
print("seeds written under", ROOT)

# snapshot: byte 0 mode. Mode 0: a push body, "IGWS", u16 LE version 1, then the
# postcard encoding of Snapshot (docs/snapshot.md), written out by hand here.
def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)
def pstr(s):
    b = s.encode()
    return varint(len(b)) + b
def pvec(items, enc):
    return varint(len(items)) + b"".join(enc(i) for i in items)
def endpoint(e):
    return (pstr(e["address"]) + bytes([1 if e.get("healthy") else 0]) + varint(e.get("scraped", 0))
            + struct.pack("<f", e.get("kv", 0.0)) + varint(e.get("waiting", 0)) + varint(e.get("running", 0))
            + pvec(e.get("running_adapters", []), pstr) + pvec(e.get("waiting_adapters", []), pstr)
            + varint(e.get("max_lora", 0)) + pstr(e.get("server_type", ""))
            + pvec(e.get("labels", []), lambda kv: pstr(kv[0]) + pstr(kv[1])))
def snapshot(gen, seq, collector, pools):
    return (b"IGWS" + struct.pack("<H", 1) + varint(gen) + varint(seq) + pstr(collector)
            + pvec(pools, lambda p: pstr(p[0]) + pvec(p[1], endpoint)))
sample = snapshot(1_700_000_000_123, 43, "c-1", [("main", [
    {"address": "127.0.0.1:8001", "healthy": True, "scraped": 1_700_000_000_100, "kv": 0.25, "waiting": 3,
     "running": 7, "running_adapters": ["sql-lora"], "max_lora": 4, "server_type": "vllm", "labels": [("zone", "a")]},
    {"address": "[::1]:8002"}])])
two_pools = snapshot(1_800_000_000_000, 1, "collector-7f3a", [
    ("demo-pool", [{"address": "10.0.0.1:8000", "healthy": True, "scraped": 1_799_999_999_990, "kv": 0.9, "waiting": 12,
                    "running": 30, "running_adapters": ["a"], "waiting_adapters": ["b", "c"], "max_lora": 2,
                    "server_type": "sglang", "labels": [("cluster", "c1"), ("region", "r1")]}]),
    ("empty", [])])
write("snapshot", "sample", b"\x00" + sample)
write("snapshot", "two-pools", b"\x00" + two_pools)
write("snapshot", "older", b"\x00" + snapshot(1_600_000_000_000, 1, "old", []))
write("snapshot", "structured", b"\x01" + bytes(range(1, 80)))
write("snapshot", "head", b"\x02POST\nBearer s3cret-token\n100\ns3cret-token")
