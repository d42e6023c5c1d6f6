//! `/docs` and `/openapi.json`: the API described as OpenAPI 3.1, and a page that renders
//! it with no network access (no CDN: the page is plain HTML and a little JavaScript).

use serde_json::{json, Value};

fn body(schema: Value) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": schema}}})
}

/// The answers of a POST route that decodes (`queued`: it waits in the engine's queue, so
/// it can be refused 429, and 503 when the decoder has stopped) or only reads its body
/// (`/tokenize`); `openai`: a `/v1` route, which answers a bad parameter and a prompt too
/// long with OpenAI's 400.
fn ok(description: &str, media: &[&str], queued: bool, openai: bool) -> Value {
    let content: serde_json::Map<String, Value> =
        media.iter().map(|m| (m.to_string(), json!({}))).collect();
    let mut r = json!({
        "200": {"description": description, "content": content},
        "400": {"description": "the body is not JSON; the error names `body` and says where it broke"},
        "401": {"description": "missing or wrong API key (when the server has one); WWW-Authenticate: Bearer"},
        "405": {"description": "another method than this path takes; JSON error"},
        "408": {"description": "the body did not arrive in time after the head"},
        "413": {"description": "body or prompt too large; the JSON error names the field"},
        "422": {"description": "invalid parameter; the JSON error names the field"},
    });
    if openai {
        r["400"] = json!({"description": "the body is not JSON, a parameter is invalid, or the prompt is too long (code context_length_exceeded): OpenAI's invalid_request_error, param naming the field"});
        r["413"] = json!({"description": "body too large; the JSON error names `body`"});
        r.as_object_mut().map(|o| o.remove("422"));
    }
    if queued {
        r["429"] = json!({"description": "queue full; see Retry-After"});
        r["503"] = json!({"description": "the decoder stopped before or during this request"});
    }
    r
}

/// A GET route's answers; `keyed`: the API key applies (every route but the open four).
fn got(description: &str, keyed: bool) -> Value {
    let mut r = json!({
        "200": {"description": description},
        "405": {"description": "another method than GET; JSON error"},
    });
    if keyed {
        r["401"] = json!({"description": "missing or wrong API key (when the server has one)"});
    }
    r
}

pub fn openapi() -> Value {
    let params = json!({
        "type": "object",
        "properties": {
            "max_new_tokens": {"type": "integer", "minimum": 1, "default": 50, "description": "default 50, or the server's max_new_tokens when lower"},
            "temperature": {"type": "number", "minimum": 0, "description": "as TGI: decoding samples when do_sample is true or when temperature is not 1, top_k is set or top_p is below 1; otherwise greedy. 0 (or below 1e-4): greedy whatever else is set"},
            "top_k": {"type": "integer", "minimum": 1},
            "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "repetition_penalty": {"type": "number", "minimum": 0.001, "maximum": 1000},
            "seed": {"type": "integer", "minimum": 0},
            "stop": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
            "details": {"type": "boolean", "default": false},
            "do_sample": {"type": "boolean", "default": false},
            "best_of": {"type": "integer", "enum": [1]},
            "truncate": {"type": "integer", "minimum": 1, "description": "keep only the prompt's last N tokens (the language and author tokens stay, within N where they would not fit beside it); at most max_input_tokens"},
            "return_full_text": {"type": "boolean", "default": false, "description": "generated_text starts with the inputs as given"},
            "ignore_eos": {"type": "boolean", "default": false, "description": "decode all max_new_tokens, past the end-of-text token (for benchmarks)"},
            "author": {"type": "string", "description": "author control token; unknown authors fall back to `other` (the reply says so)"},
            "lang": {"type": "string", "enum": ["en", "ru", "other"], "description": "language control token (/info lists the model's); guessed from the script when absent"}
        }
    });
    // `stream` is read on `/` only: /generate always answers JSON, /generate_stream always
    // streams.
    let generate = json!({"type": "object", "required": ["inputs"], "properties": {"inputs": {"type": "string"}, "parameters": params}});
    let mut compat = generate.clone();
    compat["properties"]["stream"] = json!({"type": "boolean", "default": false});
    let stream_options = json!({"type": "object", "properties": {"include_usage": {"type": "boolean", "description": "one more chunk before [DONE], with no choices and the usage"}}});
    let stop = json!({"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}]});
    let openai_common = json!({
        "model": {"type": "string", "description": "ignored: the server has one model"},
        "temperature": {"type": "number", "minimum": 0, "default": 1, "description": "0: greedy"},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1, "description": "0: greedy"},
        "n": {"type": "integer", "enum": [1]},
        "stream": {"type": "boolean", "default": false},
        "stream_options": stream_options,
        "stop": stop,
        "seed": {"type": "integer", "minimum": 0},
        "author": {"type": "string", "description": "author control token (an extension)"},
        "lang": {"type": "string", "enum": ["en", "ru", "other"], "description": "language control token (an extension)"}
    });
    let with_common = |own: Value| {
        let mut props = openai_common.clone();
        if let (Some(p), Some(o)) = (props.as_object_mut(), own.as_object()) {
            p.extend(o.clone());
        }
        props
    };
    let max_tokens = json!({"type": "integer", "minimum": 1, "default": 16, "description": "default 16, or the server's max_new_tokens when lower"});
    let chat_max_tokens = json!({"type": "integer", "minimum": 1, "description": "default: the server's max_new_tokens"});
    let completion = json!({"type": "object", "required": ["prompt"], "properties": with_common(json!({
        "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": crate::api::MAX_PROMPTS}]},
        "max_tokens": max_tokens,
        "logprobs": {"type": "null", "description": "not supported: anything else is a 400"},
        "echo": {"type": "boolean", "enum": [false], "description": "not supported: true is a 400"}
    }))});
    let part = json!({"type": "object", "required": ["type", "text"], "properties": {"type": {"const": "text"}, "text": {"type": "string"}}});
    let chat = json!({"type": "object", "required": ["messages"], "properties": with_common(json!({
        "messages": {"type": "array", "items": {"type": "object", "required": ["role", "content"], "properties": {
            "role": {"type": "string"},
            "content": {"oneOf": [{"type": "string"}, {"type": "null"}, {"type": "array", "items": part}], "description": "text parts are joined by newlines; other parts are a 400"}}}},
        "max_tokens": chat_max_tokens,
        "max_completion_tokens": {"type": "integer", "minimum": 1, "description": "as max_tokens, which it replaces"},
        "logprobs": {"type": "boolean", "enum": [false], "description": "not supported: true is a 400"}
    }))});
    let mut models_by_id = got("model", true);
    models_by_id["404"] =
        json!({"description": "no model of that name is served (OpenAI's error shape)"});
    models_by_id["400"] = json!({"description": "the id is not valid UTF-8 once percent-decoded"});
    let mut health = got("ok", false);
    health["503"] = json!({"description": "no decoder takes requests any more"});
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "orchestrate serve",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Text Generation Inference and OpenAI compatible text generation for an orchestrate Model artifact. The prompt goes to the encoder with language and author tokens; the reply is its continuation. Errors are JSON: TGI's shape ({error, error_type, field}), OpenAI's under /v1; an unknown path is a 404 in that shape. A stream the decoder could not finish ends with an error event (no [DONE])."
        },
        "paths": {
            "/generate": {"post": {"summary": "Generate (TGI)", "requestBody": body(generate.clone()), "responses": ok("generated_text, and details when asked", &["application/json"], true, false)}},
            "/": {"post": {"summary": "Generate (TGI compat route): the reply in a JSON array, or a stream when stream is true", "requestBody": body(compat), "responses": ok("[{generated_text}], or with stream: true server-sent events as /generate_stream", &["application/json", "text/event-stream"], true, false)}},
            "/generate_stream": {"post": {"summary": "Generate as server-sent events: one per token; the last carries generated_text, details (when asked) and warnings (when any)", "requestBody": body(generate), "responses": ok("event stream", &["text/event-stream"], true, false)}},
            "/tokenize": {"post": {"summary": "Tokens of a text with their offsets", "requestBody": body(json!({"type": "object", "required": ["inputs"], "properties": {"inputs": {"type": "string"}}})), "responses": ok("[{id, text, start, stop}]", &["application/json"], false, false)}},
            "/health": {"get": {"summary": "200 while the model is loaded and a decoder takes requests, 503 once none does (no key needed)", "responses": health}},
            "/info": {"get": {"summary": "Model and server facts (TGI's Info, plus languages and authors)", "responses": got("info", true)}},
            "/metrics": {"get": {"summary": "Prometheus metrics (no key needed)", "responses": got("text exposition", false)}},
            "/docs": {"get": {"summary": "This description as a page (no key needed)", "responses": got("HTML", false)}},
            "/openapi.json": {"get": {"summary": "This description (no key needed)", "responses": got("OpenAPI 3.1", false)}},
            "/v1/models": {"get": {"summary": "The served model (OpenAI)", "responses": got("list", true)}},
            "/v1/models/{id}": {"get": {"summary": "The served model by its name (OpenAI); another name is a 404", "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}], "responses": models_by_id}},
            "/v1/completions": {"post": {"summary": "Completion (OpenAI); stream: true gives SSE ending in data: [DONE]", "requestBody": body(completion), "responses": ok("text_completion, or with stream: true server-sent events", &["application/json", "text/event-stream"], true, true)}},
            "/v1/chat/completions": {"post": {"summary": "Chat completion (OpenAI): the last user message is the prompt; this model is not tuned for dialogue", "requestBody": body(chat), "responses": ok("chat.completion, or with stream: true server-sent chat.completion.chunk events (the first names the role)", &["application/json", "text/event-stream"], true, true)}},
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
