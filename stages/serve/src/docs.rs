//! `/docs` and `/openapi.json`: the API described as OpenAPI 3.1, and a page that renders
//! it with no network access (no CDN: the page is plain HTML and a little JavaScript).

use serde_json::{json, Value};

fn body(schema: Value) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": schema}}})
}

fn ok(description: &str, media: &str) -> Value {
    json!({
        "200": {"description": description, "content": {media: {}}},
        "401": {"description": "missing or wrong API key (when the server has one)"},
        "413": {"description": "body or prompt too large; the JSON error names the field"},
        "422": {"description": "invalid parameter; the JSON error names the field"},
        "429": {"description": "queue full; see Retry-After"},
    })
}

pub fn openapi() -> Value {
    let params = json!({
        "type": "object",
        "properties": {
            "max_new_tokens": {"type": "integer", "minimum": 1, "default": 50},
            "temperature": {"type": "number", "minimum": 0, "description": "0 or absent: greedy (unless do_sample); below 1e-4: greedy"},
            "top_k": {"type": "integer", "minimum": 1},
            "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "repetition_penalty": {"type": "number", "exclusiveMinimum": 0},
            "seed": {"type": "integer", "minimum": 0},
            "stop": {"type": "array", "items": {"type": "string"}},
            "details": {"type": "boolean"},
            "do_sample": {"type": "boolean"},
            "ignore_eos": {"type": "boolean", "default": false, "description": "decode all max_new_tokens, past the end-of-text token (for benchmarks)"},
            "author": {"type": "string", "description": "author control token; unknown authors fall back to `other` (the reply says so)"},
            "lang": {"type": "string", "enum": ["en", "ru"], "description": "language control token; guessed from the script when absent"}
        }
    });
    let generate = json!({"type": "object", "required": ["inputs"], "properties": {"inputs": {"type": "string"}, "parameters": params, "stream": {"type": "boolean"}}});
    let completion = json!({"type": "object", "required": ["prompt"], "properties": {
        "model": {"type": "string"}, "prompt": {"type": "string"}, "max_tokens": {"type": "integer", "default": 16, "description": "default 16, or the server's max_new_tokens when lower"},
        "temperature": {"type": "number", "default": 1}, "top_p": {"type": "number"}, "stream": {"type": "boolean"},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}, "seed": {"type": "integer"},
        "author": {"type": "string"}, "lang": {"type": "string"}}});
    let chat = json!({"type": "object", "required": ["messages"], "properties": {
        "messages": {"type": "array", "items": {"type": "object", "properties": {"role": {"type": "string"}, "content": {"type": "string"}}}},
        "max_tokens": {"type": "integer"}, "temperature": {"type": "number"}, "stream": {"type": "boolean"}}});
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "orchestrate serve",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Text Generation Inference and OpenAI compatible text generation for an orchestrate Model artifact. The prompt goes to the encoder with language and author tokens; the reply is its continuation."
        },
        "paths": {
            "/generate": {"post": {"summary": "Generate (TGI)", "requestBody": body(generate.clone()), "responses": ok("generated_text, and details when asked", "application/json")}},
            "/": {"post": {"summary": "Generate (TGI compat route): the reply in a JSON array, or a stream when stream is true", "requestBody": body(generate.clone()), "responses": ok("[{generated_text}]", "application/json")}},
            "/generate_stream": {"post": {"summary": "Generate as server-sent events: one per token; the last carries generated_text, details (when asked) and warnings (when any)", "requestBody": body(generate), "responses": ok("event stream", "text/event-stream")}},
            "/tokenize": {"post": {"summary": "Tokens of a text with their offsets", "requestBody": body(json!({"type": "object", "required": ["inputs"], "properties": {"inputs": {"type": "string"}}})), "responses": ok("[{id, text, start, stop}]", "application/json")}},
            "/health": {"get": {"summary": "200 when the model is loaded", "responses": {"200": {"description": "ok"}}}},
            "/info": {"get": {"summary": "Model and server facts (TGI's Info, plus languages and authors)", "responses": {"200": {"description": "info"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text exposition"}}}},
            "/v1/models": {"get": {"summary": "The served model (OpenAI)", "responses": {"200": {"description": "list"}}}},
            "/v1/completions": {"post": {"summary": "Completion (OpenAI); stream: true gives SSE ending in data: [DONE]", "requestBody": body(completion), "responses": ok("text_completion", "application/json")}},
            "/v1/chat/completions": {"post": {"summary": "Chat completion (OpenAI): the last user message is the prompt; this model is not tuned for dialogue", "requestBody": body(chat), "responses": ok("chat.completion", "application/json")}},
        }
    })
}

pub const PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>orchestrate serve — API</title>
<style>
body{font:15px/1.45 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
h1{font-size:1.5rem} .op{border:1px solid #ddd;border-radius:6px;margin:.8rem 0;padding:.6rem .9rem}
.m{display:inline-block;min-width:3.5rem;font-weight:600;color:#fff;border-radius:4px;padding:0 .4rem;margin-right:.5rem;text-align:center}
.get{background:#2b7bb9}.post{background:#3a9a4a} code,pre{background:#f5f5f5;border-radius:4px}
pre{padding:.5rem;overflow:auto;font-size:13px} details{margin-top:.3rem}
</style></head><body>
<h1>orchestrate serve</h1><p id="desc">Loading <a href="/openapi.json">/openapi.json</a>…</p><div id="ops"></div>
<script>
fetch('/openapi.json').then(r=>r.json()).then(doc=>{
  document.getElementById('desc').textContent=doc.info.description+' (version '+doc.info.version+')';
  const ops=document.getElementById('ops');
  for(const [path,methods] of Object.entries(doc.paths)){
    for(const [m,op] of Object.entries(methods)){
      const d=document.createElement('div');d.className='op';
      const h=document.createElement('div');
      h.innerHTML='<span class="m '+m+'">'+m.toUpperCase()+'</span><code></code> ';
      h.querySelector('code').textContent=path;h.append(op.summary||'');d.append(h);
      const det=document.createElement('details');const s=document.createElement('summary');
      s.textContent='request and responses';det.append(s);const pre=document.createElement('pre');
      pre.textContent=JSON.stringify({requestBody:op.requestBody,responses:op.responses},null,2);
      det.append(pre);d.append(det);ops.append(d);
    }
  }
}).catch(e=>{document.getElementById('desc').textContent='cannot load /openapi.json: '+e});
</script></body></html>
"#;
