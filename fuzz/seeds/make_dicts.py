#!/usr/bin/env python3
"""Writes fuzz/dict/*.dict (libFuzzer dictionaries). Re-run after editing."""
import pathlib

DIR = pathlib.Path(__file__).resolve().parent.parent / "dict"

def esc(s):
    out = ""
    for ch in s.encode():
        c = chr(ch)
        if c == '"':
            out += '\\"'
        elif c == "\\":
            out += "\\\\"
        elif 0x20 <= ch < 0x7F:
            out += c
        else:
            out += f"\\x{ch:02X}"
    return out

def write(name, toks, header):
    seen, lines = set(), [f"# {header}"]
    for t in toks:
        if t not in seen:
            seen.add(t)
            lines.append(f'"{esc(t)}"')
    (DIR / name).write_text("\n".join(lines) + "\n")

json_tokens = ["{", "}", "[", "]", ",", ":", '"', "true", "false", "null", "-1", "0", "1e9", "-0.5",
               "\\u0000", '\\"', "\\\\", "\\n", "\\ud83d\\ude00"]
openai = ["model", "messages", "role", "content", "system", "user", "assistant", "tool", "developer", "type",
          "text", "input_text", "output_text", "image_url", "prompt", "input", "instructions", "stream",
          "stream_options", "include_usage", "priority", "tools", "tool_calls", "function", "arguments", "name",
          "choices", "delta", "message", "index", "finish_reason", "usage", "prompt_tokens", "completion_tokens",
          "total_tokens", "output", "object", "response"]
sse = ["data: ", "data: [DONE]", "event: ", ": keep-alive", "\n", "\n\n", "\r\n"]
armor = ["sanitizationResult", "filterMatchState", "MATCH_FOUND", "NO_MATCH_FOUND", "filterResults", "matchState",
         "raiFilterResult", "raiFilterTypeResults", "dangerous", "harassment", "pi_and_jailbreak",
         "piAndJailbreakFilterResult", "sdp", "sdpFilterResult", "inspectResult", "malicious_uris",
         "executionState", "EXECUTION_SUCCESS", "confidenceLevel", "HIGH"]
write("json.dict", json_tokens + openai + [f'"{w}"' for w in openai] + sse + armor,
      "JSON tokens, OpenAI request/response/SSE field names, Model Armor verdict fields")
cfg = ["role", "gateway", "control", "max_request_body_bytes", "other_paths", "pass", "reject", "pools", "name",
       "endpoints", "objectives", "priority", "models", "pool", "objective", "criticality", "Critical", "Standard",
       "Sheddable", "target_models", "weight", "default_pool", "ingest", "token", "max_snapshot_bytes",
       "snapshot_stale_after_ms", "scheduling", "profiles", "destination_list", "safety", "cluster", "default",
       "model_response_template_id", "user_prompt_template_id", "fail_open", "timeout_ms",
       "model_armor_settings", "projects/p/locations/l/templates/t", "127.0.0.1:8000", "[::1]:8000",
       "0123456789abcdef"]
write("plugin_config.dict", json_tokens + cfg + [f'"{w}"' for w in cfg], "JSON tokens and plugin configuration fields")
prom = ["# HELP ", "# TYPE ", " gauge", " counter", " histogram", "# EOF", "vllm:", "sglang:", "tgi_",
        "num_requests_running", "num_requests_waiting", "gpu_cache_usage_perc", "lora_requests_info",
        "running_lora_adapters", "waiting_lora_adapters", "max_lora", "model_name", "{", "}", "=", '"', ",",
        '\\"', "\\\\", "\\n", " ", "\t", "\n", "\r\n", "NaN", "+Inf", "-Inf", "1e+09", "0.5", " 1700000000000",
        ' # {trace_id="a"} 1', "_bucket", 'le="+Inf"']
write("prometheus.dict", prom, "Prometheus text exposition tokens")
col = ["scrape_interval_ms", "scrape_timeout_ms", "dns_refresh_interval_ms", "push_targets", "token", "token_env",
       "push_timeout_ms", "push_backoff_initial_ms", "push_backoff_max_ms", "listen", "pools", "name",
       "server_type", "labels", "endpoints", "address", "vllm", "sglang", "tgi", "triton-trtllm", "llamacpp",
       "IGW_INGEST_TOKEN", "127.0.0.1:9902", "http://127.0.0.1:9902/v1/snapshot", "host.example:8000",
       "[::1]:8000", ": ", "- ", "\n  - ", "\n    ", "\n", "{", "}", "[", "]", ",", '"', "---", "~", "null", "&a",
       "*a", "!!str", "|", ">", "#"]
write("collector_config.dict", col, "collector configuration fields, YAML and JSON tokens")
print("dictionaries written under", DIR)
