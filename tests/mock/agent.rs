//! The mock for agent developers (#15): function calling, JSON mode,
//! thinking, models, scripted decisions and faults, all through the crate's
//! own client ([`QwenClient`]) on loopback and tokio's paused clock.

use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio::time::advance;
use tower::ServiceExt;
use tower_qwen::body::Body;
use tower_qwen::classify::{Classifier, Outcome, PermanentReason as P, ThrottleCause as T};
use tower_qwen::client::QwenClient;
use tower_qwen::mock::{
    ApiError, Fault, MockDashScopeBuilder, MockHandle, ModelInfo, Reply, RequestKind, Script,
    ToolCall,
};
use tower_qwen::sse::parse_events;

use super::{CHAT, KEY, NATIVE, builder};

const TASK: &str = "/api/v1/services/aigc/text2image/image-synthesis";

async fn mock(b: MockDashScopeBuilder) -> MockHandle {
    b.start().await.expect("mock starts")
}

fn client(m: &MockHandle) -> QwenClient {
    QwenClient::builder()
        .base_url(m.base_url().parse().unwrap())
        .api_key(KEY)
        .unwrap()
        .build()
        .unwrap()
}

struct Got {
    status: StatusCode,
    body: Bytes,
}

impl Got {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The JSON of every `data:` payload but `[DONE]`.
    fn chunks(&self) -> Vec<Value> {
        parse_events(&self.body)
            .into_iter()
            .filter(|e| e.data != "[DONE]")
            .map(|e| {
                serde_json::from_str(&e.data).unwrap_or_else(|err| panic!("{err}: {}", e.data))
            })
            .collect()
    }

    fn native_error(&self) -> (u16, String, String) {
        let v = self.json();
        (
            self.status.as_u16(),
            v["code"].as_str().unwrap_or_default().to_owned(),
            v["message"].as_str().unwrap_or_default().to_owned(),
        )
    }

    fn compat_error(&self) -> (u16, String, String) {
        let v = self.json();
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        (
            self.status.as_u16(),
            v["error"]["code"].as_str().unwrap_or_default().to_owned(),
            v["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        )
    }
}

fn compat(body: Value) -> http::Request<Body> {
    let stream = body["stream"] == json!(true);
    let mut b = http::Request::post(CHAT).header("content-type", "application/json");
    if stream {
        b = b.header("accept", "text/event-stream");
    }
    b.body(Body::from(body.to_string())).unwrap()
}

fn native(body: Value, stream: bool) -> http::Request<Body> {
    let mut b = http::Request::post(NATIVE).header("content-type", "application/json");
    if stream {
        b = b.header("x-dashscope-sse", "enable");
    }
    b.body(Body::from(body.to_string())).unwrap()
}

async fn send(c: &QwenClient, req: http::Request<Body>) -> Got {
    let res = c.clone().oneshot(req).await.expect("an answer");
    let status = res.status();
    let body = res
        .into_body()
        .collect()
        .await
        .expect("whole body")
        .to_bytes();
    Got { status, body }
}

fn weather_tool() -> Value {
    json!({
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {"type": "string", "description": "A city"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    "days": {"type": "integer", "minimum": 1},
                    "detail": {"type": "boolean"},
                },
                "required": ["location", "unit", "days"],
            },
        },
    })
}

fn time_tool() -> Value {
    json!({"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}})
}

/// A compatible chat body with the weather tool.
fn compat_tools(text: &str) -> Value {
    json!({
        "model": "qwen-plus",
        "messages": [{"role": "user", "content": text}],
        "tools": [weather_tool(), time_tool()],
    })
}

/// A native chat body with the weather tool, streamed incrementally.
fn native_tools(text: &str, stream: bool) -> Value {
    json!({
        "model": "qwen-plus",
        "input": {"messages": [{"role": "user", "content": text}]},
        "parameters": {
            "result_format": "message",
            "incremental_output": stream,
            "tools": [weather_tool(), time_tool()],
        },
    })
}

fn assert_call_id(id: &Value) {
    let id = id.as_str().expect("an id");
    assert!(id.starts_with("call_") && id.len() == 27, "{id}");
    assert!(id[5..].chars().all(|c| c.is_ascii_hexdigit()), "{id}");
}

/// The weather tool's generated arguments: a minimal valid instance.
fn assert_weather_args(args: &Value) {
    let s = args.as_str().expect("arguments are a JSON string");
    let v: Value = serde_json::from_str(s).expect("valid JSON");
    assert_eq!(
        v,
        json!({"location": "example", "unit": "celsius", "days": 1})
    );
}

// ---------------------------------------------------------------------------
// 1. Function calling

#[tokio::test(start_paused = true)]
async fn tool_calls_non_stream_in_both_dialects() {
    let m = mock(builder()).await;
    let c = client(&m);
    let g = send(&c, compat(compat_tools("Weather in Hangzhou?"))).await;
    assert_eq!(g.status, 200, "{}", g.text());
    let v = g.json();
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], "");
    assert_eq!(choice["message"]["role"], "assistant");
    let calls = choice["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "one call without parallel_tool_calls");
    assert_eq!(calls[0]["index"], 0);
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[0]["function"]["name"], "get_current_weather");
    assert_call_id(&calls[0]["id"]);
    assert_weather_args(&calls[0]["function"]["arguments"]);
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0);

    let g = send(
        &c,
        native(native_tools("Weather in Hangzhou?", false), false),
    )
    .await;
    let v = g.json();
    let choice = &v["output"]["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], "");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_current_weather");
    assert_call_id(&call["id"]);
    assert_weather_args(&call["function"]["arguments"]);
    assert_eq!(
        v["usage"]["total_tokens"],
        v["usage"]["input_tokens"].as_u64().unwrap()
            + v["usage"]["output_tokens"].as_u64().unwrap()
    );
}

#[tokio::test(start_paused = true)]
async fn tool_choice_none_forced_and_the_follow_up_turn() {
    let m = mock(builder()).await;
    let c = client(&m);
    // "none": a text answer.
    let mut body = compat_tools("Weather?");
    body["tool_choice"] = json!("none");
    let v = send(&c, compat(body)).await.json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(v["choices"][0]["message"]["tool_calls"].is_null());
    assert!(
        !v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .is_empty()
    );

    // Forced by name: that tool, and the native "stop" quirk (captured),
    // mirrored in compatible mode by default (inferred).
    let mut body = compat_tools("What time is it?");
    body["tool_choice"] = json!({"type": "function", "function": {"name": "get_time"}});
    let v = send(&c, compat(body.clone())).await.json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        v["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
        "get_time"
    );
    assert_eq!(
        v["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
        "{}"
    );
    let mut nbody = native_tools("What time is it?", false);
    nbody["parameters"]["tool_choice"] =
        json!({"type": "function", "function": {"name": "get_time"}});
    let v = send(&c, native(nbody, false)).await.json();
    assert_eq!(v["output"]["choices"][0]["finish_reason"], "stop");
    let m2 = mock(builder().compatible_forced_tool_choice_stops(false)).await;
    let v = send(&client(&m2), compat(body)).await.json();
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");

    // The follow-up turn: the assistant's call and the tool's result are
    // answered in text.
    let call = json!({"index": 0, "id": "call_cec4c19d27624537b583af", "type": "function",
        "function": {"name": "get_current_weather", "arguments": "{\"location\": \"Hangzhou\"}"}});
    let mut body = compat_tools("Weather in Hangzhou?");
    body["messages"] = json!([
        {"role": "user", "content": "Weather in Hangzhou?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "Sunny, 25 C", "tool_call_id": "call_cec4c19d27624537b583af"},
    ]);
    let v = send(&c, compat(body)).await.json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(v["choices"][0]["message"]["tool_calls"].is_null());
}

#[tokio::test(start_paused = true)]
async fn compatible_tool_call_stream_fragments() {
    let script = Script::new().always(Reply::tool_calls([
        ToolCall::new(
            "get_current_weather",
            json!({"location": "浙江省杭州市", "unit": "celsius", "days": 2}),
        ),
        ToolCall::generated("get_time"),
    ]));
    let m = mock(builder().script(script)).await;
    let c = client(&m);
    let mut body = compat_tools("Weather and time?");
    body["stream"] = json!(true);
    body["parallel_tool_calls"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let g = send(&c, compat(body.clone())).await;
    assert!(g.text().ends_with("data: [DONE]\n\n"), "{}", g.text());
    let chunks = g.chunks();
    // No empty first chunk: the first is already a fragment, with role and
    // content null.
    let first = &chunks[0]["choices"][0]["delta"];
    assert_eq!(first["role"], "assistant");
    assert!(first["content"].is_null() && first.get("content").is_some());
    let mut args = ["".to_string(), "".to_string()];
    let mut names = [0, 0];
    let mut ids = Vec::new();
    let mut finish = Vec::new();
    for ch in &chunks {
        let Some(choice) = ch["choices"].get(0) else {
            // The usage tail.
            assert!(ch["usage"]["completion_tokens"].as_u64().unwrap() > 0);
            continue;
        };
        if !choice["finish_reason"].is_null() {
            finish.push(choice["finish_reason"].clone());
            assert_eq!(
                choice["delta"],
                json!({}),
                "finish rides in its own empty delta"
            );
            continue;
        }
        for frag in choice["delta"]["tool_calls"].as_array().unwrap() {
            let i = frag["index"].as_u64().unwrap() as usize;
            assert_eq!(frag["type"], "function");
            if let Some(n) = frag["function"].get("name") {
                assert!(n.is_string());
                names[i] += 1;
                assert_call_id(&frag["id"]);
                ids.push(frag["id"].clone());
            } else {
                // Continuations never repeat the name or a non-empty id.
                assert_eq!(frag["id"], "");
            }
            args[i].push_str(frag["function"]["arguments"].as_str().unwrap());
        }
    }
    assert_eq!(names, [1, 1]);
    assert_ne!(ids[0], ids[1]);
    assert_eq!(finish, [json!("tool_calls")]);
    let a: Value = serde_json::from_str(&args[0]).unwrap();
    assert_eq!(a["location"], "浙江省杭州市");
    assert_eq!(args[1], "{}");
    assert!(chunks.len() > 4, "arguments come in several fragments");

    // Without parallel_tool_calls, only the first scripted call is made.
    body["parallel_tool_calls"] = json!(false);
    let g = send(&c, compat(body)).await;
    let calls: usize = g
        .chunks()
        .iter()
        .filter_map(|c| {
            c["choices"].get(0)?["delta"]["tool_calls"]
                .as_array()
                .cloned()
        })
        .flatten()
        .filter(|f| f["function"].get("name").is_some())
        .count();
    assert_eq!(calls, 1);
}

#[tokio::test(start_paused = true)]
async fn native_tool_call_stream_fragments() {
    let m = mock(builder()).await;
    let c = client(&m);
    let g = send(&c, native(native_tools("Weather?", true), true)).await;
    let events = parse_events(&g.body);
    assert!(events.iter().all(|e| e.event.as_deref() == Some("result")));
    assert!(!g.text().contains("[DONE]"));
    let chunks = g.chunks();
    let last = chunks.len() - 1;
    let mut args = String::new();
    for (i, ch) in chunks.iter().enumerate() {
        let choice = &ch["output"]["choices"][0];
        assert_eq!(
            choice["message"]["content"], "",
            "content is \"\" on every chunk"
        );
        let frag = &choice["message"]["tool_calls"][0];
        if i == 0 {
            assert_eq!(frag["function"]["name"], "get_current_weather");
            assert_call_id(&frag["id"]);
        } else {
            assert!(frag["function"].get("name").is_none());
            assert_eq!(frag["id"], "");
        }
        args.push_str(frag["function"]["arguments"].as_str().unwrap());
        // The string "null" until the last fragment, which carries the
        // finish reason.
        let want = if i == last { "tool_calls" } else { "null" };
        assert_eq!(choice["finish_reason"], want);
    }
    assert!(last >= 2);
    assert_weather_args(&json!(args));
    // Cumulative usage: the last chunk's counts everything.
    let u = &chunks[last]["usage"];
    assert!(
        u["output_tokens"].as_u64().unwrap()
            >= chunks[0]["usage"]["output_tokens"].as_u64().unwrap()
    );
}

#[tokio::test(start_paused = true)]
async fn native_cumulative_streams_send_tool_call_snapshots() {
    let m = mock(builder()).await;
    let c = client(&m);
    // `incremental_output: false`: every frame holds the calls so far.
    let chunks = send(&c, native(native_tools("Weather?", false), true))
        .await
        .chunks();
    let mut last_len = 0;
    for ch in &chunks {
        let call = &ch["output"]["choices"][0]["message"]["tool_calls"][0];
        assert_eq!(call["function"]["name"], "get_current_weather");
        assert_call_id(&call["id"]);
        let len = call["function"]["arguments"].as_str().unwrap().len();
        assert!(len > last_len, "arguments grow");
        last_len = len;
    }
    let last = &chunks[chunks.len() - 1]["output"]["choices"][0];
    assert_eq!(last["finish_reason"], "tool_calls");
    assert_weather_args(&last["message"]["tool_calls"][0]["function"]["arguments"]);
}

#[tokio::test(start_paused = true)]
async fn function_calling_errors_in_the_services_words() {
    let m = mock(builder()).await;
    let c = client(&m);
    let algo = "<400> InternalError.Algo.InvalidParameter: ";
    // A model without function calling.
    let mut body = compat_tools("x");
    body["model"] = json!("qwen-vl-max");
    let g = send(&c, compat(body)).await;
    let want = format!("{algo}The tool call is not supported.");
    assert_eq!(
        g.compat_error(),
        (400, "invalid_parameter_error".into(), want.clone())
    );
    let mut body = native_tools("x", false);
    body["model"] = json!("qwen-vl-max");
    assert_eq!(
        send(&c, native(body, false)).await.native_error(),
        (400, "InvalidParameter".into(), want)
    );
    // A forced name that is not among the tools.
    let mut body = compat_tools("x");
    body["tool_choice"] = json!({"type": "function", "function": {"name": "AgentOutput"}});
    assert_eq!(
        send(&c, compat(body)).await.compat_error().2,
        format!(
            "{algo}Invalid value for \"tool_choice\": no function named \"AgentOutput\" was specified in the \"tools\" parameter."
        )
    );
    // An assistant turn with empty tool_calls.
    let mut body = compat_tools("x");
    body["messages"] = json!([
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "", "tool_calls": []},
        {"role": "user", "content": "y"},
    ]);
    assert_eq!(
        send(&c, compat(body)).await.compat_error().2,
        format!("{algo}Empty tool_calls is not supported in message.")
    );
    // A forced choice in thinking mode.
    let mut body = compat_tools("x");
    body["enable_thinking"] = json!(true);
    body["stream"] = json!(true);
    body["tool_choice"] = json!("required");
    assert_eq!(
        send(&c, compat(body)).await.compat_error().2,
        format!(
            "{algo}The tool_choice parameter does not support being set to required or object in thinking mode"
        )
    );
    // None of them reached the model.
    assert_eq!(m.stats().calls("qwen-plus"), 0);
    assert_eq!(c.retry_stats().retries(), 0);
}

#[tokio::test(start_paused = true)]
async fn tool_calls_are_deterministic_for_a_seed() {
    let ids = |seed| async move {
        let m = mock(builder().seed(seed)).await;
        let v = send(&client(&m), compat(compat_tools("x"))).await.json();
        v["choices"][0]["message"]["tool_calls"][0]["id"].clone()
    };
    assert_eq!(ids(1).await, ids(1).await);
    assert_ne!(ids(1).await, ids(2).await);
}

// ---------------------------------------------------------------------------
// Scripted decisions, and an agent loop end to end

#[tokio::test(start_paused = true)]
async fn scripts_decide_by_order_by_message_and_by_closure() {
    let script = Script::new()
        .when_user_says(
            "weather",
            Reply::tool_call(ToolCall::new(
                "get_current_weather",
                json!({"location": "Paris"}),
            )),
        )
        .when(|req| {
            (req.last_role() == Some("tool") && req.kind() == RequestKind::Chat)
                .then(|| Reply::text(format!("Answered after {} messages.", req.messages().len())))
        })
        .then(Reply::text("first"))
        .then(Reply::text("second"));
    let m = mock(builder().script(script)).await;
    let c = client(&m);
    let ask = |text: &str| {
        compat(json!({"model": "qwen-plus", "messages": [{"role": "user", "content": text}]}))
    };
    let content = |g: Got| g.json()["choices"][0]["message"]["content"].clone();
    assert_eq!(content(send(&c, ask("hello")).await), "first");
    let g = send(&c, ask("what is the weather?")).await.json();
    let call = &g["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["arguments"], "{\"location\":\"Paris\"}");
    assert_eq!(g["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(content(send(&c, ask("again")).await), "second");
    // Spent: the mock's own answer.
    let own = content(send(&c, ask("and again")).await);
    assert!(
        own.as_str()
            .unwrap()
            .starts_with("This is a deterministic reply")
    );
    let body = json!({"model": "qwen-plus", "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": null, "tool_calls": [call]},
        {"role": "tool", "content": "21 C", "tool_call_id": call["id"]},
    ]});
    assert_eq!(
        content(send(&c, compat(body)).await),
        "Answered after 3 messages."
    );
    assert_eq!(m.stats().scripted, 4);

    // Replaced at run time, counting anew.
    m.set_script(Script::new().nth(2, Reply::text("the second one")));
    assert!(
        content(send(&c, ask("a")).await)
            .as_str()
            .unwrap()
            .starts_with("This is")
    );
    assert_eq!(content(send(&c, ask("b")).await), "the second one");
}

#[tokio::test(start_paused = true)]
async fn an_agent_loop_runs_to_its_answer() {
    let script = Script::new().when(|req| {
        if req.last_role() == Some("tool") {
            let result = req.messages().last()?["content"].as_str()?.to_owned();
            Some(Reply::text(format!("It is {result} in Paris.")))
        } else {
            Some(Reply::tool_call(ToolCall::new(
                "get_current_weather",
                json!({"location": "Paris", "unit": "celsius", "days": 1}),
            )))
        }
    });
    let m = mock(builder().script(script)).await;
    let c = client(&m);
    let mut messages = vec![json!({"role": "user", "content": "Weather in Paris?"})];
    let mut answer = None;
    for _ in 0..4 {
        let body = json!({"model": "qwen-plus", "messages": messages, "tools": [weather_tool()], "stream": true});
        let g = send(&c, compat(body)).await;
        // Merge the streamed message as an OpenAI client does.
        let (mut text, mut calls): (String, Vec<Value>) = (String::new(), Vec::new());
        for ch in g.chunks() {
            let Some(choice) = ch["choices"].get(0) else {
                continue;
            };
            if let Some(t) = choice["delta"]["content"].as_str() {
                text.push_str(t);
            }
            for f in choice["delta"]["tool_calls"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let i = f["index"].as_u64().unwrap() as usize;
                if calls.len() <= i {
                    calls.push(json!({"index": i, "id": f["id"], "type": "function", "function": {"name": f["function"]["name"], "arguments": ""}}));
                }
                let a = calls[i]["function"]["arguments"]
                    .as_str()
                    .unwrap()
                    .to_owned();
                calls[i]["function"]["arguments"] =
                    json!(a + f["function"]["arguments"].as_str().unwrap_or(""));
            }
        }
        if calls.is_empty() {
            answer = Some(text);
            break;
        }
        messages.push(json!({"role": "assistant", "content": "", "tool_calls": calls}));
        for call in &calls {
            let args: Value =
                serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
            assert_eq!(args["location"], "Paris");
            messages.push(json!({"role": "tool", "content": "21 C", "tool_call_id": call["id"]}));
        }
    }
    assert_eq!(answer.as_deref(), Some("It is 21 C in Paris."));
    assert_eq!(m.stats().calls("qwen-plus"), 2);
}

// ---------------------------------------------------------------------------
// 2. JSON mode

#[tokio::test(start_paused = true)]
async fn json_mode_answers_json_or_the_services_error() {
    let m = mock(builder()).await;
    let c = client(&m);
    let body = |text: &str, format: Value| json!({"model": "qwen-plus", "messages": [{"role": "system", "content": "You answer in JSON."}, {"role": "user", "content": text}], "response_format": format});
    let v = send(&c, compat(body("2+2?", json!({"type": "json_object"}))))
        .await
        .json();
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        serde_json::from_str::<Value>(content).unwrap().is_object(),
        "{content}"
    );
    // Streamed: the deltas add up to JSON.
    let mut s = body("2+2?", json!({"type": "json_object"}));
    s["stream"] = json!(true);
    let text: String = send(&c, compat(s))
        .await
        .chunks()
        .iter()
        .filter_map(|c| {
            c["choices"].get(0)?["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert!(
        serde_json::from_str::<Value>(&text).unwrap().is_object(),
        "{text}"
    );
    // Native: parameters.response_format.
    let n = json!({"model": "qwen-plus", "input": {"messages": [{"role": "user", "content": "Reply in json"}]},
        "parameters": {"result_format": "message", "response_format": {"type": "json_object"}}});
    let v = send(&c, native(n, false)).await.json();
    let content = v["output"]["choices"][0]["message"]["content"]
        .as_str()
        .unwrap();
    assert!(serde_json::from_str::<Value>(content).is_ok());

    // Without the word "json": the service's rule, in both dialects.
    let msg = "<400> InternalError.Algo.InvalidParameter: 'messages' must contain the word 'json' in some form, to use 'response_format' of type 'json_object'.";
    let plain = json!({"model": "qwen-plus", "messages": [{"role": "user", "content": "2+2?"}], "response_format": {"type": "json_object"}});
    assert_eq!(
        send(&c, compat(plain)).await.compat_error(),
        (400, "invalid_parameter_error".into(), msg.into())
    );
    let n = json!({"model": "qwen-plus", "input": {"messages": [{"role": "user", "content": "2+2?"}]},
        "parameters": {"response_format": {"type": "json_object"}}});
    assert_eq!(
        send(&c, native(n, false)).await.native_error(),
        (400, "InvalidParameter".into(), msg.into())
    );

    // json_schema: schema-shaped, no keyword needed, only where supported.
    let schema = json!({"type": "json_schema", "json_schema": {"name": "answer", "strict": true, "schema": {
        "type": "object", "properties": {"result": {"type": "integer"}, "unit": {"enum": ["apples"]}},
        "required": ["result", "unit"]}}});
    let plain = |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "2+2?"}], "response_format": schema});
    let v = send(&c, compat(plain("qwen-plus"))).await.json();
    let content: Value =
        serde_json::from_str(v["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
    assert_eq!(content, json!({"result": 0, "unit": "apples"}));
    let g = send(&c, compat(plain("qwen-max"))).await;
    assert_eq!(g.status, 400);
    assert!(
        g.compat_error().2.contains("Parameter 'response_format'="),
        "{}",
        g.text()
    );
    // Structured output in thinking mode is refused.
    let mut t = body("2+2?", json!({"type": "json_object"}));
    t["enable_thinking"] = json!(true);
    t["stream"] = json!(true);
    assert_eq!(send(&c, compat(t)).await.status, 400);
}

// ---------------------------------------------------------------------------
// 3. Thinking

#[tokio::test(start_paused = true)]
async fn thinking_streams_reasoning_first_in_both_dialects() {
    let m = mock(builder().output_tokens(std::num::NonZeroU32::new(3).unwrap())).await;
    let c = client(&m);
    // qwen3-32b thinks by default; the budget caps the reasoning.
    let body = json!({"model": "qwen3-32b", "messages": [{"role": "user", "content": "hi"}], "stream": true,
        "stream_options": {"include_usage": true}, "thinking_budget": 5});
    let g = send(&c, compat(body)).await;
    let chunks = g.chunks();
    let first = &chunks[0]["choices"][0]["delta"];
    assert_eq!(
        first,
        &json!({"content": null, "role": "assistant", "reasoning_content": ""})
    );
    let (mut reasoning, mut content) = (String::new(), String::new());
    let mut saw_content = false;
    for ch in &chunks[1..] {
        let Some(choice) = ch["choices"].get(0) else {
            continue;
        };
        let d = &choice["delta"];
        if let Some(r) = d["reasoning_content"].as_str() {
            assert!(!saw_content, "reasoning comes first");
            assert!(d["content"].is_null());
            reasoning.push_str(r);
        }
        if let Some(t) = d["content"].as_str() {
            saw_content |= !t.is_empty();
            assert!(d["reasoning_content"].is_null());
            content.push_str(t);
        }
    }
    assert!(!reasoning.is_empty() && !content.is_empty());
    let tail = &chunks[chunks.len() - 1];
    assert_eq!(
        tail["usage"]["completion_tokens_details"]["reasoning_tokens"],
        5
    );
    assert_eq!(tail["usage"]["completion_tokens"], 5 + 3);

    // Native: both keys on every chunk, reasoning tokens in usage, a last
    // empty chunk with the finish reason.
    let body = json!({"model": "qwen-plus", "input": {"messages": [{"role": "user", "content": "hi"}]},
        "parameters": {"result_format": "message", "incremental_output": true, "enable_thinking": true}});
    let chunks = send(&c, native(body, true)).await.chunks();
    for ch in &chunks {
        let msg = &ch["output"]["choices"][0]["message"];
        assert!(
            msg["content"].is_string() && msg["reasoning_content"].is_string(),
            "{ch}"
        );
    }
    let last = &chunks[chunks.len() - 1];
    assert_eq!(last["output"]["choices"][0]["finish_reason"], "stop");
    assert_eq!(last["output"]["choices"][0]["message"]["content"], "");
    assert_eq!(
        last["usage"]["output_tokens_details"]["reasoning_tokens"],
        12
    );
    assert_eq!(last["usage"]["output_tokens"], 12 + 3);
    assert_eq!(chunks[0]["output"]["choices"][0]["finish_reason"], "null");
}

#[tokio::test(start_paused = true)]
async fn thinking_is_refused_where_the_service_refuses_it() {
    let m = mock(builder()).await;
    let c = client(&m);
    let msg = "parameter.enable_thinking must be set to false for non-streaming calls";
    let body = json!({"model": "qwen3-32b", "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(
        send(&c, compat(body)).await.compat_error(),
        (400, "invalid_parameter_error".into(), msg.into())
    );
    let body = json!({"model": "qwen-plus", "input": {"messages": [{"role": "user", "content": "hi"}]},
        "parameters": {"enable_thinking": true}});
    assert_eq!(
        send(&c, native(body, false)).await.native_error(),
        (400, "InvalidParameter".into(), msg.into())
    );
    // With thinking off, the same model answers without streaming.
    let body = json!({"model": "qwen3-32b", "enable_thinking": false, "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(send(&c, compat(body)).await.status, 200);
    // Thinking-only models are stream-only.
    let body = json!({"model": "qwq-plus", "messages": [{"role": "user", "content": "hi"}]});
    let e = send(&c, compat(body)).await.compat_error();
    assert!(
        e.2.starts_with("This model only support stream mode"),
        "{e:?}"
    );
    // A model without a thinking mode refuses enable_thinking.
    let body = json!({"model": "qwen-max", "enable_thinking": true, "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(
        send(&c, compat(body)).await.compat_error().2,
        "<400> InternalError.Algo.InvalidParameter: Parameter 'enable_thinking'=true is not supported for qwen-max model."
    );
}

// ---------------------------------------------------------------------------
// 4. Models

#[tokio::test(start_paused = true)]
async fn models_are_listed_and_their_parameters_checked() {
    let m = mock(
        builder().model(
            ModelInfo::chat("kimi-k3")
                .tools(false)
                .unsupported_parameter("temperature"),
        ),
    )
    .await;
    let c = client(&m);
    let get = |path: &str| http::Request::get(path).body(Body::empty()).unwrap();
    let v = send(&c, get("/compatible-mode/v1/models")).await.json();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&"qwen-plus")
            && ids.contains(&"kimi-k3")
            && ids.contains(&"text-embedding-v4")
    );
    assert!(
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["object"] == "model" && d["owned_by"] == "system")
    );
    assert_eq!(
        send(&c, get("/compatible-mode/v1/models/qwen-max"))
            .await
            .json()["id"],
        "qwen-max"
    );
    let g = send(&c, get("/compatible-mode/v1/models/qwen-nope")).await;
    assert_eq!(
        (g.status.as_u16(), g.json()["error"]["code"].clone()),
        (404, json!("model_not_found"))
    );
    let v = send(&c, get("/api/v1/models?page_no=2&page_size=5"))
        .await
        .json();
    assert_eq!(v["output"]["page_no"], 2);
    assert_eq!(v["output"]["models"].as_array().unwrap().len(), 5);
    assert_eq!(v["output"]["total"].as_u64().unwrap() as usize, ids.len());
    let v = send(&c, get("/api/v1/models?model=qwen3-32b")).await.json();
    assert_eq!(
        v["output"]["models"],
        json!([{"model": "qwen3-32b", "provider": "qwen", "opensource": true}])
    );
    assert!(
        m.models()
            .iter()
            .any(|i| i.name() == "kimi-k3" && !i.supports_tools())
    );

    // A parameter the model does not support.
    let body = json!({"model": "kimi-k3", "temperature": 0.7, "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(
        send(&c, compat(body)).await.compat_error(),
        (400, "invalid_parameter_error".into(),
         "<400> InternalError.Algo.InvalidParameter: Parameter 'temperature'=0.7 is not supported for kimi-k3 model.".into())
    );
    // Models can be added and removed at run time.
    m.remove_model("kimi-k3");
    let body = json!({"model": "kimi-k3", "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(send(&c, compat(body.clone())).await.status, 404);
    m.set_model(ModelInfo::chat("kimi-k3"));
    assert_eq!(send(&c, compat(body)).await.status, 200);
}

// ---------------------------------------------------------------------------
// 5. Scripted faults

#[tokio::test(start_paused = true)]
async fn the_first_requests_fail_then_the_client_heals() {
    let script = Script::new().times(
        2,
        Reply::fault(Fault::Error(ApiError::service_unavailable())),
    );
    let m = mock(builder().script(script)).await;
    let c = client(&m);
    let ask = json!({"model": "qwen-plus", "messages": [{"role": "user", "content": "hi"}]});
    let g = send(&c, compat(ask.clone())).await;
    assert_eq!(g.status, 200);
    let s = m.stats();
    assert_eq!((s.status(503), s.status(200), s.scripted), (2, 1, 2));
    assert_eq!(c.retry_stats().retries(), 2);
    // A scripted error is not charged to the quota.
    assert_eq!(s.admitted("qwen-plus"), 1);

    // One request, by number, gets a 200 with an error body.
    m.set_script(Script::new().nth(
        2,
        Reply::fault(Fault::ErrorIn200(ApiError::data_inspection_failed())),
    ));
    assert_eq!(send(&c, compat(ask.clone())).await.status, 200);
    let g = send(&c, compat(ask)).await;
    assert_eq!(
        (g.status.as_u16(), g.json()["error"]["code"].clone()),
        (200, json!("data_inspection_failed"))
    );
}

#[tokio::test(start_paused = true)]
async fn throttling_mid_stream_after_partial_content() {
    let fault = Fault::StreamError {
        after_tokens: 3,
        error: ApiError::rate_quota(),
    };
    let m =
        mock(builder().script(
            Script::new().always(Reply::text("Sunny all week in Paris.").with_fault(fault)),
        ))
        .await;
    let c = client(&m);
    let body = json!({"model": "qwen-plus", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let g = send(&c, compat(body)).await;
    let chunks = g.chunks();
    let text: String = chunks
        .iter()
        .filter_map(|c| {
            c["choices"].get(0)?["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(text, "Sunny all we");
    assert_eq!(chunks.last().unwrap()["error"]["code"], "limit_requests");
    assert!(!g.text().contains("[DONE]"));
    let n = json!({"model": "qwen-plus", "input": {"messages": [{"role": "user", "content": "hi"}]},
        "parameters": {"incremental_output": true}});
    let g = send(&c, native(n, true)).await;
    let events = parse_events(&g.body);
    assert_eq!(events.len(), 4);
    assert_eq!(events[3].event.as_deref(), Some("error"));
    assert_eq!(events[3].http_status, Some(429));
    // Content had reached the caller: no retry.
    assert_eq!(c.retry_stats().retries(), 0);
}

#[tokio::test(start_paused = true)]
async fn frames_without_blank_lines_nested_messages_and_failed_tasks() {
    let m = mock(builder().sse_without_blank_lines(true)).await;
    let c = client(&m);
    let n = json!({"model": "qwen-plus", "input": {"messages": [{"role": "user", "content": "hi"}]},
        "parameters": {"incremental_output": true}});
    let g = send(&c, native(n, true)).await;
    assert!(!g.text().contains("\n\n"), "{}", g.text());
    // The crate's SSE reader still splits the frames.
    assert_eq!(parse_events(&g.body).len(), 20);

    // An error whose message holds nested JSON: overloaded in both dialects.
    let classify = Classifier::new();
    m.set_script(Script::new().always(Reply::fault(Fault::ErrorIn200(
        ApiError::engine_overloaded(),
    ))));
    let raw = |path: &str, body: Value| {
        http::Request::post(format!("{}{path}", m.base_url()))
            .header("authorization", format!("Bearer {KEY}"))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(Bytes::from(body.to_string())))
            .unwrap()
    };
    let plain: hyper_util::client::legacy::Client<_, http_body_util::Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    for (path, body) in [
        (
            CHAT,
            json!({"model": "qwen-plus", "messages": [{"role": "user", "content": "hi"}]}),
        ),
        (
            NATIVE,
            json!({"model": "qwen-plus", "input": {"prompt": "hi"}}),
        ),
    ] {
        let res = plain.request(raw(path, body)).await.unwrap();
        let (parts, b) = res.into_parts();
        let bytes = b.collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        let msg = v["message"]
            .as_str()
            .or(v["error"]["message"].as_str())
            .unwrap();
        assert!(
            serde_json::from_str::<Value>(msg).is_ok(),
            "nested JSON: {msg}"
        );
        assert_eq!(
            classify.classify(parts.status, &parts.headers, &bytes),
            Outcome::throttled(T::Overloaded)
        );
    }

    // An async task that ends FAILED, and the task list.
    m.set_script(Script::new().nth(2, Reply::failed_task(ApiError::data_inspection_failed())));
    let submit = |prompt: &str| {
        http::Request::post(TASK)
            .header("content-type", "application/json")
            .header("x-dashscope-async", "enable")
            .body(Body::from(
                json!({"model": "wanx-v1", "input": {"prompt": prompt}}).to_string(),
            ))
            .unwrap()
    };
    let ok = send(&c, submit("a cat")).await.json()["output"]["task_id"].clone();
    let bad = send(&c, submit("a dog")).await.json()["output"]["task_id"].clone();
    advance(Duration::from_secs(5)).await;
    let get = |path: String| http::Request::get(path).body(Body::empty()).unwrap();
    let v = send(&c, get(format!("/api/v1/tasks/{}", bad.as_str().unwrap())))
        .await
        .json();
    assert_eq!(v["output"]["task_status"], "FAILED");
    assert_eq!(v["output"]["code"], "DataInspectionFailed");
    assert_eq!(
        v["output"]["message"],
        "Output data may contain inappropriate content."
    );
    let v = send(&c, get(format!("/api/v1/tasks/{}", ok.as_str().unwrap())))
        .await
        .json();
    assert_eq!(v["output"]["task_status"], "SUCCEEDED");
    let v = send(&c, get("/api/v1/tasks?page_no=1&page_size=10".into()))
        .await
        .json();
    assert_eq!(v["total"], 2);
    assert_eq!(v["data"][0]["task_id"], bad, "newest first");
    let v = send(&c, get("/api/v1/tasks?status=FAILED".into()))
        .await
        .json();
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
    assert_eq!(v["data"][0]["code"], "DataInspectionFailed");
}

#[tokio::test(start_paused = true)]
async fn the_workspace_header_is_seen() {
    let m = mock(builder().script(Script::new().when(|req| {
        req.workspace()
            .map(|w| Reply::text(format!("workspace {w}")))
    })))
    .await;
    let c = QwenClient::builder()
        .base_url(m.base_url().parse().unwrap())
        .api_key(KEY)
        .unwrap()
        .workspace("ws-123")
        .build()
        .unwrap();
    let v = send(
        &c,
        compat(json!({"model": "qwen-plus", "messages": [{"role": "user", "content": "hi"}]})),
    )
    .await
    .json();
    assert_eq!(v["choices"][0]["message"]["content"], "workspace ws-123");
    assert_eq!(m.stats().workspace("ws-123"), 1);
}

// ---------------------------------------------------------------------------
// 6. Retry until the first output token

#[tokio::test(start_paused = true)]
async fn a_fault_right_after_the_role_chunk_is_retried() {
    let fault = Fault::StreamError {
        after_tokens: 0,
        error: ApiError::service_unavailable(),
    };
    let m = mock(builder().script(Script::new().then(Reply::fault(fault)))).await;
    let c = client(&m);
    let body = json!({"model": "qwen-plus", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let g = send(&c, compat(body)).await;
    assert!(!g.text().contains("\"error\""), "{}", g.text());
    assert!(g.text().ends_with("data: [DONE]\n\n"));
    // One role chunk: the failed attempt's never reached the caller.
    assert_eq!(g.text().matches("\"role\":\"assistant\"").count(), 1);
    assert_eq!(c.retry_stats().retries(), 1);
    assert_eq!(m.stats().requests, 2);
}

#[tokio::test(start_paused = true)]
async fn a_fault_after_real_content_reaches_the_caller() {
    let fault = Fault::StreamError {
        after_tokens: 2,
        error: ApiError::service_unavailable(),
    };
    let m = mock(builder().script(Script::new().then(Reply::fault(fault)))).await;
    let c = client(&m);
    let body = json!({"model": "qwen-plus", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let g = send(&c, compat(body)).await;
    let chunks = g.chunks();
    assert_eq!(
        chunks.last().unwrap()["error"]["code"],
        "service_unavailable"
    );
    assert_eq!(
        chunks.len(),
        4,
        "role chunk, two tokens, the error: {}",
        g.text()
    );
    advance(Duration::from_secs(60)).await;
    assert_eq!(c.retry_stats().retries(), 0);
    assert_eq!(m.stats().requests, 1);
}

// ---------------------------------------------------------------------------
// 7. Mock and classifier agree on every code the mock sends

/// Every error the mock answers with, and how the classifier must read it.
fn every_error() -> Vec<(ApiError, Outcome)> {
    vec![
        (ApiError::rate_quota(), Outcome::throttled(T::Requests)),
        (ApiError::allocation_quota(), Outcome::throttled(T::Tokens)),
        (ApiError::burst_rate(), Outcome::throttled(T::Burst)),
        (
            ApiError::engine_overloaded(),
            Outcome::throttled(T::Overloaded),
        ),
        (
            ApiError::free_allocated_quota(),
            Outcome::Permanent {
                reason: P::FreeQuotaExhausted,
            },
        ),
        (
            ApiError::free_tier_only(),
            Outcome::Permanent {
                reason: P::FreeQuotaExhausted,
            },
        ),
        (
            ApiError::arrearage(),
            Outcome::Permanent { reason: P::Billing },
        ),
        (
            ApiError::invalid_api_key(),
            Outcome::Permanent { reason: P::Auth },
        ),
        (ApiError::internal_error(), Outcome::TRANSIENT),
        (ApiError::service_unavailable(), Outcome::TRANSIENT),
        (ApiError::gateway_timeout(), Outcome::TRANSIENT),
        (
            ApiError::data_inspection_failed(),
            Outcome::Permanent {
                reason: P::ContentFilter,
            },
        ),
        (
            ApiError::invalid_parameter("Range of input length should be [1, 6000]"),
            Outcome::Permanent {
                reason: P::InvalidRequest,
            },
        ),
        (
            ApiError::stream_only(),
            Outcome::Permanent {
                reason: P::StreamOnly,
            },
        ),
        (
            ApiError::model_not_found("qwen-x"),
            Outcome::Permanent {
                reason: P::ModelNotFound,
            },
        ),
        (
            ApiError::model_not_exist(),
            Outcome::Permanent {
                reason: P::ModelNotFound,
            },
        ),
        (
            ApiError::async_not_supported(),
            Outcome::Permanent {
                reason: P::AccessDenied,
            },
        ),
        (
            ApiError::sync_not_supported(),
            Outcome::Permanent {
                reason: P::AccessDenied,
            },
        ),
        (
            ApiError::request_too_large(),
            Outcome::Permanent {
                reason: P::TooLarge,
            },
        ),
    ]
}

#[tokio::test(start_paused = true)]
async fn every_code_reads_the_same_in_both_dialects_wherever_it_arrives() {
    let m = mock(builder()).await;
    let c = Classifier::new();
    let plain: hyper_util::client::legacy::Client<_, http_body_util::Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let call = |path: &str, stream: bool| {
        let body = if path == CHAT {
            json!({"model": "qwen-plus", "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
        } else {
            json!({"model": "qwen-plus", "input": {"prompt": "hi"}, "parameters": {"incremental_output": true}})
        };
        let mut b = http::Request::post(format!("{}{path}", m.base_url()))
            .header("authorization", format!("Bearer {KEY}"))
            .header("content-type", "application/json");
        if stream && path == NATIVE {
            b = b.header("x-dashscope-sse", "enable");
        }
        b.body(http_body_util::Full::new(Bytes::from(body.to_string())))
            .unwrap()
    };
    for (error, want) in every_error() {
        for (how, fault, stream) in [
            ("as the answer", Fault::Error(error.clone()), false),
            ("in a 200", Fault::ErrorIn200(error.clone()), false),
            (
                "mid-stream",
                Fault::StreamError {
                    after_tokens: 2,
                    error: error.clone(),
                },
                true,
            ),
        ] {
            m.set_script(Script::new().always(Reply::fault(fault)));
            let mut seen = Vec::new();
            for path in [NATIVE, CHAT] {
                let res = plain.request(call(path, stream)).await.unwrap();
                let (parts, body) = res.into_parts();
                let bytes = body.collect().await.unwrap().to_bytes();
                let got = if stream {
                    // The verdict of the error frame after the content.
                    let mut scanner = tower_qwen::sse::SseScanner::new();
                    let mut found = None;
                    scanner.feed(&bytes, |data, meta| {
                        if let Some(o) = c.classify_event(meta, data).filter(|o| !o.is_success()) {
                            found.get_or_insert(o);
                        }
                    });
                    found.unwrap_or(Outcome::Success)
                } else {
                    c.classify(parts.status, &parts.headers, &bytes)
                };
                seen.push(got);
            }
            // In a 200 the status cannot help: only the code decides, and
            // an unknown one is not retried blindly.
            assert_eq!(seen[0], seen[1], "{error} {how}: native vs compatible");
            assert_eq!(seen[0], want, "{error} {how}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_compatible_gateway_timeout_in_a_200_is_retried_like_the_native_one() {
    let m = mock(builder()).await;
    for (i, req) in [
        compat(json!({"model": "qwen-plus", "messages": [{"role": "user", "content": "hi"}]})),
        native(
            json!({"model": "qwen-plus", "input": {"prompt": "hi"}}),
            false,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        m.set_script(
            Script::new().then(Reply::fault(Fault::ErrorIn200(ApiError::gateway_timeout()))),
        );
        let c = client(&m);
        let g = send(&c, req).await;
        assert_eq!(g.status, 200);
        assert!(!g.text().contains("imed out"), "{i}: {}", g.text());
        assert_eq!(c.retry_stats().retries(), 1, "{i}");
    }
}
