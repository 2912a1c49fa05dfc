//! Reading what admission needs from a request body (model, streaming,
//! output budget, input estimate), side by side in one run with what a
//! user would write instead: a serde derive struct (which is how this crate
//! read bodies before issue 12: any error, a repeated key included, meant
//! "no model") and a `serde_json::Value` tree.
//!
//! ```text
//! cargo bench --bench request -- --warm-up-time 1 --measurement-time 3
//! ```
//!
//! Each group is one body: `small` (one short message), `chat_2k` (ten
//! messages), `tools_4k` (a short message and a 4 KB tool schema the
//! estimate skips), `long_100k` (one 100 KB message).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use http::HeaderMap;
use serde::Deserialize;
use tower_qwen::request::RequestInfo;
use tower_qwen::tokens::estimate_text_tokens;

const PATH: &str = "/compatible-mode/v1/chat/completions";

fn bodies() -> Vec<(&'static str, String)> {
    let msg = |i: usize| {
        format!(
            r#"{{"role":"user","content":"Message number {i}: tell me about the weather in Hangzhou, briefly, in French and in English, with a table."}}"#
        )
    };
    let ten: Vec<String> = (0..10).map(msg).collect();
    let prop = |i: usize| {
        format!(
            r#""p{i}":{{"type":"string","description":"The parameter number {i} of the tool, in a long sentence."}}"#
        )
    };
    let props: Vec<String> = (0..40).map(prop).collect();
    vec![
        (
            "small",
            r#"{"model":"qwen-plus","stream":true,"max_tokens":100,"messages":[{"role":"user","content":"Hello, world"}]}"#.to_owned(),
        ),
        (
            "chat_2k",
            format!(
                r#"{{"model":"qwen-plus","max_tokens":500,"messages":[{}]}}"#,
                ten.join(",")
            ),
        ),
        (
            "tools_4k",
            format!(
                r#"{{"model":"qwen-plus","messages":[{}],"tools":[{{"type":"function","function":{{"name":"f","parameters":{{"type":"object","properties":{{{}}}}}}}}}]}}"#,
                msg(0),
                props.join(",")
            ),
        ),
        (
            "long_100k",
            format!(
                r#"{{"model":"qwen-plus","messages":[{{"role":"user","content":"{}"}}]}}"#,
                "lorem ipsum dolor sit amet ".repeat(3800)
            ),
        ),
    ]
}

/// What a user would write: a derive struct with the fields admission
/// needs (unknown fields skipped).
#[derive(Deserialize)]
struct Derived {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    messages: Option<Vec<DerivedMessage>>,
}

#[derive(Deserialize)]
struct DerivedMessage {
    #[serde(default)]
    content: Option<String>,
}

fn derived(body: &[u8]) -> (Option<String>, bool, Option<u64>, u32) {
    match serde_json::from_slice::<Derived>(body) {
        Ok(d) => {
            let tokens = d
                .messages
                .iter()
                .flatten()
                .map(|m| m.content.as_deref().map_or(0, estimate_text_tokens))
                .sum();
            (d.model, d.stream == Some(true), d.max_tokens, tokens)
        }
        Err(_) => (None, false, None, 0),
    }
}

fn value(body: &[u8]) -> (Option<String>, bool, Option<u64>, u32) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return (None, false, None, 0);
    };
    let tokens = v["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| m["content"].as_str().map_or(0, estimate_text_tokens))
        .sum();
    (
        v["model"].as_str().map(str::to_owned),
        v["stream"].as_bool() == Some(true),
        v["max_tokens"].as_u64(),
        tokens,
    )
}

fn read(c: &mut Criterion) {
    let headers = HeaderMap::new();
    for (name, body) in bodies() {
        let body = body.into_bytes();
        // All three read the same facts.
        let ours = RequestInfo::parse(PATH, &headers, Some(&body));
        assert_eq!(ours.body_error, None, "{name}");
        assert_eq!(ours.model.as_deref(), derived(&body).0.as_deref());
        assert_eq!(value(&body).0, derived(&body).0);
        let mut g = c.benchmark_group(name);
        g.throughput(criterion::Throughput::Bytes(body.len() as u64));
        g.bench_function("ours RequestInfo::parse (strict)", |b| {
            b.iter(|| RequestInfo::parse(PATH, &headers, Some(black_box(&body))))
        });
        g.bench_function("serde derive struct", |b| {
            b.iter(|| derived(black_box(&body)))
        });
        g.bench_function("serde_json::Value", |b| b.iter(|| value(black_box(&body))));
        g.finish();
    }
}

criterion_group!(benches, read);
criterion_main!(benches);
