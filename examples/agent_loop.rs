//! A small agent loop (tool call -> tool result -> answer) against the mock
//! DashScope, with the model's decisions scripted, through the crate's own
//! client.
//!
//! ```text
//! cargo run --example agent_loop
//! cargo run --example agent_loop -- --stream
//! ```
//!
//! The script plays the model: a question about the weather and the time
//! makes it call both tools at once; once the tool results are in the
//! conversation it answers from them. The first request also fails with a
//! `503`, which the client's retry layer heals. Point the same loop at the
//! real service by changing the base URL and the key; only the script is the
//! mock's.

use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;
use tower_qwen::BoxError;
use tower_qwen::body::Body;
use tower_qwen::client::{COMPATIBLE_CHAT, QwenClient};
use tower_qwen::mock::{ApiError, Fault, MockDashScope, Reply, Script, ToolCall};

/// The tools this agent offers, in the OpenAI shape both dialects use.
fn tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {"type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"]}}},
        {"type": "function", "function": {
            "name": "get_time",
            "description": "Local time in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    ])
}

/// Runs a tool: the agent's side of the loop.
fn run_tool(name: &str, arguments: &str) -> String {
    let args: Value = serde_json::from_str(arguments).unwrap_or(Value::Null);
    let city = args["city"].as_str().unwrap_or("somewhere");
    match name {
        "get_weather" => format!(
            "{city}: sunny, 21 degrees {}",
            args["unit"].as_str().unwrap_or("celsius")
        ),
        "get_time" => format!("{city}: 14:05"),
        other => format!("unknown tool {other}"),
    }
}

/// What the mock's model decides, request by request.
fn script() -> Script {
    Script::new()
        // The very first call fails: the client retries it.
        .then(Reply::fault(Fault::Error(ApiError::service_unavailable())))
        .when(|req| {
            if req.last_role() == Some("tool") {
                // Answer from the tool results in the conversation.
                let results: Vec<&str> = req
                    .messages()
                    .iter()
                    .filter(|m| m["role"] == "tool")
                    .filter_map(|m| m["content"].as_str())
                    .collect();
                return Some(Reply::text(format!("Here you go: {}.", results.join("; "))));
            }
            let question = req.last_user_message()?.to_lowercase();
            let mut calls = Vec::new();
            if question.contains("weather") {
                calls.push(ToolCall::new(
                    "get_weather",
                    json!({"city": "Paris", "unit": "celsius"}),
                ));
            }
            if question.contains("time") {
                calls.push(ToolCall::new("get_time", json!({"city": "Paris"})));
            }
            (!calls.is_empty()).then(|| Reply::tool_calls(calls))
        })
}

/// One assistant turn: its text and tool calls, merged from a stream as an
/// OpenAI client merges deltas (by `index`, concatenating arguments), or
/// read whole.
fn assistant_turn(body: &[u8], stream: bool) -> Result<(String, Vec<Value>), BoxError> {
    if !stream {
        let v: Value = serde_json::from_slice(body)?;
        let message = &v["choices"][0]["message"];
        let calls = message["tool_calls"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        return Ok((message["content"].as_str().unwrap_or("").to_owned(), calls));
    }
    let (mut text, mut calls) = (String::new(), Vec::<Value>::new());
    for event in tower_qwen::sse::parse_events(body) {
        if event.data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(&event.data)?;
        if let Some(err) = chunk.get("error") {
            return Err(format!("stream failed: {err}").into());
        }
        let Some(delta) = chunk["choices"].get(0).map(|c| &c["delta"]) else {
            continue;
        };
        text.push_str(delta["content"].as_str().unwrap_or(""));
        for frag in delta["tool_calls"].as_array().into_iter().flatten() {
            let i = frag["index"].as_u64().unwrap_or(0) as usize;
            if calls.len() <= i {
                calls.resize(
                    i + 1,
                    json!({"type": "function", "function": {"name": "", "arguments": ""}}),
                );
            }
            let call = &mut calls[i];
            call["index"] = json!(i);
            if let Some(id) = frag["id"].as_str().filter(|id| !id.is_empty()) {
                call["id"] = json!(id);
            }
            for key in ["name", "arguments"] {
                if let Some(piece) = frag["function"][key].as_str() {
                    let joined = format!("{}{piece}", call["function"][key].as_str().unwrap_or(""));
                    call["function"][key] = json!(joined);
                }
            }
        }
    }
    Ok((text, calls))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    let stream = std::env::args().any(|a| a == "--stream");
    let mock = MockDashScope::builder().script(script()).start().await?;
    let client = QwenClient::builder()
        .base_url(mock.base_url().parse()?)
        .api_key(MockDashScope::DEFAULT_KEY)?
        .build()?;

    let question = "What is the weather and the time in Paris?";
    println!("user: {question}");
    let mut messages = vec![json!({"role": "user", "content": question})];
    let mut answer = None;
    for _turn in 0..5 {
        let mut body = json!({
            "model": "qwen-plus",
            "messages": messages,
            "tools": tools(),
            "parallel_tool_calls": true,
        });
        if stream {
            body["stream"] = json!(true);
        }
        let req = http::Request::post(COMPATIBLE_CHAT)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))?;
        let res = client.clone().oneshot(req).await?;
        if !res.status().is_success() {
            return Err(format!("HTTP {}", res.status()).into());
        }
        let bytes = res.into_body().collect().await?.to_bytes();
        let (text, calls) = assistant_turn(&bytes, stream)?;
        if calls.is_empty() {
            answer = Some(text);
            break;
        }
        messages.push(json!({"role": "assistant", "content": text, "tool_calls": calls}));
        for call in &calls {
            let (name, arguments) = (
                call["function"]["name"].as_str().unwrap_or(""),
                call["function"]["arguments"].as_str().unwrap_or("{}"),
            );
            let result = run_tool(name, arguments);
            println!("tool:  {name}({arguments}) -> {result}");
            messages.push(json!({"role": "tool", "content": result, "tool_call_id": call["id"]}));
        }
    }
    let answer = answer.ok_or("no answer after 5 turns")?;
    println!("model: {answer}");
    assert_eq!(
        answer,
        "Here you go: Paris: sunny, 21 degrees celsius; Paris: 14:05."
    );
    let stats = mock.stats();
    println!(
        "upstream calls: {}, retried: {}, scripted: {}",
        stats.requests,
        client.retry_stats().retries(),
        stats.scripted
    );
    assert_eq!(client.retry_stats().retries(), 1);
    mock.shutdown().await;
    Ok(())
}
