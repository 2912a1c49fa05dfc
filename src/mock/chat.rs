//! Chat generation: what a request asks for (tools, JSON mode, thinking),
//! the checks DashScope makes, what the "model" answers (the plan), and how
//! each dialect renders it, streamed or not.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::error::ApiError;
use super::models::{ModelInfo, Thinking};
use super::schema;
use super::script::{Reply, ToolCall, text_of};
use super::validate::{check_messages, invalid, model_of, opt_bool, opt_object, opt_positive};
use crate::request::{Endpoint, Protocol};
use crate::tokens::estimate_text_tokens;
use crate::util::rng::Rng;

/// The template of DashScope's algorithm-side parameter errors (A8).
const ALGO: &str = "<400> InternalError.Algo.InvalidParameter: ";

/// `tool_choice`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum ToolChoice {
    Auto,
    None,
    Required,
    Function(String),
}

impl ToolChoice {
    fn is_forced(&self) -> bool {
        matches!(self, ToolChoice::Required | ToolChoice::Function(_))
    }
}

/// `response_format`.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Format {
    Text,
    JsonObject,
    /// The `json_schema.schema`.
    JsonSchema(Value),
}

/// What a chat request asks for, read from either dialect.
#[derive(Debug)]
pub(super) struct GenRequest {
    pub(super) model: String,
    pub(super) max_tokens: Option<u32>,
    /// Native: `parameters.incremental_output` (compatible is always
    /// incremental).
    pub(super) incremental: bool,
    /// Native: `result_format: "message"` (always for multimodal).
    pub(super) message_format: bool,
    pub(super) messages: Vec<Value>,
    /// Native `input.prompt`.
    pub(super) prompt: Option<String>,
    pub(super) tools: Vec<Value>,
    pub(super) tool_choice: ToolChoice,
    pub(super) parallel: bool,
    pub(super) format: Format,
    pub(super) enable_thinking: Option<bool>,
    pub(super) thinking_budget: Option<u32>,
}

/// Reads a chat request; shape errors only (the model's own rules come in
/// [`check`]).
pub(super) fn parse(endpoint: Endpoint, obj: &Map<String, Value>) -> Result<GenRequest, ApiError> {
    let protocol = endpoint.protocol();
    let model = model_of(obj, protocol)?;
    let empty = Map::new();
    let (params, at, messages, prompt, max_tokens, incremental, message_format) = match protocol {
        Protocol::Native => {
            let empty_input = || {
                ApiError::new(
                    http::StatusCode::BAD_REQUEST,
                    "BadRequest.EmptyInput",
                    "Required input parameter missing from request.",
                )
            };
            let input = opt_object(obj, "input")?.ok_or_else(empty_input)?;
            let has_messages = check_messages(input.get("messages"), "input.")?;
            let prompt = match input.get("prompt") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(_) => return Err(invalid("input.prompt must be a string.".into())),
            };
            if !has_messages && prompt.is_none() {
                return Err(empty_input());
            }
            let params = opt_object(obj, "parameters")?.unwrap_or(&empty);
            let max_tokens = opt_positive(params, "max_tokens", "parameters.")?;
            let incremental =
                opt_bool(params, "incremental_output", "parameters.")?.unwrap_or(false);
            let message_format = match params.get("result_format") {
                None | Some(Value::Null) => endpoint == Endpoint::NativeMultimodal,
                Some(Value::String(s)) if s == "message" => true,
                Some(Value::String(s)) if s == "text" => endpoint == Endpoint::NativeMultimodal,
                Some(_) => {
                    return Err(invalid(
                        "parameters.result_format must be \"text\" or \"message\".".into(),
                    ));
                }
            };
            let messages = input
                .get("messages")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            (
                params,
                "parameters.",
                messages,
                prompt,
                max_tokens,
                incremental,
                message_format,
            )
        }
        Protocol::Compatible => {
            if !check_messages(obj.get("messages"), "")? {
                return Err(invalid("messages must be a non-empty array.".into()));
            }
            opt_bool(obj, "stream", "")?;
            if let Some(o) = opt_object(obj, "stream_options")? {
                opt_bool(o, "include_usage", "stream_options.")?;
            }
            let max_tokens = match opt_positive(obj, "max_completion_tokens", "")? {
                Some(n) => Some(n),
                None => opt_positive(obj, "max_tokens", "")?,
            };
            let messages = obj
                .get("messages")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            (obj, "", messages, None, max_tokens, true, true)
        }
    };
    for m in &messages {
        if let Some(Value::Array(calls)) = m.get("tool_calls")
            && calls.is_empty()
            && m.get("role").and_then(Value::as_str) == Some("assistant")
        {
            return Err(ApiError::invalid_parameter(format!(
                "{ALGO}Empty tool_calls is not supported in message."
            )));
        }
    }
    let tools = match params.get("tools") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => {
            for t in list {
                let ok = t.as_object().is_some_and(|t| {
                    matches!(t.get("type"), None | Some(Value::String(_)))
                        && t.get("type")
                            .and_then(Value::as_str)
                            .is_none_or(|k| k == "function")
                        && t.get("function")
                            .and_then(|f| f.get("name"))
                            .and_then(Value::as_str)
                            .is_some_and(|n| !n.is_empty())
                        && t.get("function")
                            .and_then(|f| f.get("parameters"))
                            .is_none_or(|p| p.is_object() || p.is_null())
                });
                if !ok {
                    return Err(invalid(format!(
                        "{at}tools must be an array of {{\"type\":\"function\",\"function\":{{\"name\",\"description\",\"parameters\"}}}} objects."
                    )));
                }
            }
            list.clone()
        }
        Some(_) => return Err(invalid(format!("{at}tools must be an array."))),
    };
    let tool_choice = match params.get("tool_choice") {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) if s == "auto" => ToolChoice::Auto,
        Some(Value::String(s)) if s == "none" => ToolChoice::None,
        Some(Value::String(s)) if s == "required" => ToolChoice::Required,
        Some(Value::Object(o))
            if o.get("type")
                .and_then(Value::as_str)
                .is_none_or(|t| t == "function") =>
        {
            match o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
            {
                Some(name) => ToolChoice::Function(name.to_owned()),
                None => {
                    return Err(invalid(format!(
                        "{at}tool_choice must name a function: {{\"type\":\"function\",\"function\":{{\"name\":..}}}}."
                    )));
                }
            }
        }
        Some(_) => {
            return Err(invalid(format!(
                "{at}tool_choice must be \"auto\", \"none\", \"required\" or a function."
            )));
        }
    };
    let parallel = opt_bool(params, "parallel_tool_calls", at)?.unwrap_or(false);
    let format = match params.get("response_format") {
        None | Some(Value::Null) => Format::Text,
        Some(Value::Object(f)) => match f.get("type").and_then(Value::as_str) {
            Some("text") => Format::Text,
            Some("json_object") => Format::JsonObject,
            Some("json_schema") => match f.get("json_schema").and_then(|j| j.get("schema")) {
                Some(s @ Value::Object(_)) => Format::JsonSchema(s.clone()),
                _ => {
                    return Err(invalid(format!(
                        "{at}response_format.json_schema.schema must be an object."
                    )));
                }
            },
            _ => {
                return Err(invalid(format!(
                    "{at}response_format.type must be \"text\", \"json_object\" or \"json_schema\"."
                )));
            }
        },
        Some(_) => return Err(invalid(format!("{at}response_format must be an object."))),
    };
    let enable_thinking = opt_bool(params, "enable_thinking", at)?;
    let thinking_budget = opt_positive(params, "thinking_budget", at)?;
    Ok(GenRequest {
        model,
        max_tokens,
        incremental,
        message_format,
        messages,
        prompt,
        tools,
        tool_choice,
        parallel,
        format,
        enable_thinking,
        thinking_budget,
    })
}

/// The knobs of the checks that rest on inferred facts.
#[derive(Clone, Copy, Debug)]
pub(super) struct Rules {
    /// `json_schema` also needs the word "json" in the messages.
    pub(super) json_schema_needs_word: bool,
}

/// The parameters a request sets (compatible: top level; native: under
/// `parameters`).
fn params_of(protocol: Protocol, obj: &Map<String, Value>) -> Option<&Map<String, Value>> {
    match protocol {
        Protocol::Compatible => Some(obj),
        Protocol::Native => obj.get("parameters").and_then(Value::as_object),
    }
}

fn not_supported(param: &str, value: &Value, model: &str) -> ApiError {
    let v = match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    ApiError::invalid_parameter(format!(
        "{ALGO}Parameter '{param}'={v} is not supported for {model} model."
    ))
}

/// Whether a system or user message (or the native prompt) mentions
/// "json", in any case.
fn mentions_json(req: &GenRequest) -> bool {
    let has = |t: &str| t.to_ascii_lowercase().contains("json");
    req.prompt.as_deref().is_some_and(has)
        || req.messages.iter().any(|m| {
            matches!(
                m.get("role").and_then(Value::as_str),
                Some("system" | "user")
            ) && m.get("content").is_some_and(|c| has(&text_of(c)))
        })
}

/// The model's own rules, in DashScope's words. Returns whether the call
/// thinks.
pub(super) fn check(
    req: &GenRequest,
    obj: &Map<String, Value>,
    protocol: Protocol,
    model: &ModelInfo,
    stream: bool,
    rules: Rules,
) -> Result<bool, ApiError> {
    if model.is_stream_only() && !stream {
        return Err(ApiError::stream_only());
    }
    if let Some(params) = params_of(protocol, obj) {
        for p in model.unsupported_parameters() {
            if let Some(v) = params.get(p.as_str())
                && !v.is_null()
            {
                return Err(not_supported(p, v, model.name()));
            }
        }
    }
    if !req.tools.is_empty() && !model.supports_tools() {
        return Err(ApiError::invalid_parameter(format!(
            "{ALGO}The tool call is not supported."
        )));
    }
    let thinking = match model.thinking_mode() {
        Thinking::Unsupported => {
            if req.enable_thinking == Some(true) {
                return Err(not_supported(
                    "enable_thinking",
                    &Value::Bool(true),
                    model.name(),
                ));
            }
            false
        }
        Thinking::Optional { default } => req.enable_thinking.unwrap_or(default),
        Thinking::Always => true,
    };
    if thinking && !stream {
        return Err(ApiError::invalid_parameter(
            "parameter.enable_thinking must be set to false for non-streaming calls",
        ));
    }
    if thinking && protocol == Protocol::Native && !req.incremental {
        return Err(ApiError::invalid_parameter(format!(
            "{ALGO}The thinking mode only supports incremental output, please set incremental_output to true."
        )));
    }
    if thinking && req.tool_choice.is_forced() {
        return Err(ApiError::invalid_parameter(format!(
            "{ALGO}The tool_choice parameter does not support being set to required or object in thinking mode"
        )));
    }
    if let ToolChoice::Function(name) = &req.tool_choice
        && !tool_names(&req.tools).any(|n| n == name)
    {
        return Err(ApiError::invalid_parameter(format!(
            "{ALGO}Invalid value for \"tool_choice\": no function named \"{name}\" was specified in the \"tools\" parameter."
        )));
    }
    let format_value = || {
        params_of(protocol, obj)
            .and_then(|p| p.get("response_format"))
            .cloned()
            .unwrap_or(Value::Null)
    };
    let (kind, supported, needs_word) = match &req.format {
        Format::Text => return Ok(thinking),
        Format::JsonObject => ("json_object", model.supports_json_object(), true),
        Format::JsonSchema(_) => (
            "json_schema",
            model.supports_json_schema(),
            rules.json_schema_needs_word,
        ),
    };
    if !supported {
        return Err(not_supported(
            "response_format",
            &format_value(),
            model.name(),
        ));
    }
    if thinking {
        return Err(ApiError::invalid_parameter(format!(
            "{ALGO}The response_format parameter does not support being set to {kind} in thinking mode"
        )));
    }
    if needs_word && !mentions_json(req) {
        return Err(ApiError::invalid_parameter(format!(
            "{ALGO}'messages' must contain the word 'json' in some form, to use 'response_format' of type '{kind}'."
        )));
    }
    Ok(thinking)
}

fn tool_names(tools: &[Value]) -> impl Iterator<Item = &str> {
    tools
        .iter()
        .filter_map(|t| t.get("function")?.get("name")?.as_str())
}

fn tool_schema<'a>(tools: &'a [Value], name: &str) -> Option<&'a Value> {
    tools
        .iter()
        .find(|t| {
            t.get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                == Some(name)
        })
        .and_then(|t| t.get("function")?.get("parameters"))
}

// ---------------------------------------------------------------------------
// The plan: what the model answers, as output pieces.

/// The default reply text: every piece is four ASCII bytes, so each is
/// exactly one token by [`crate::tokens::estimate_text_tokens`].
const REPLY: &str = "This is a deterministic reply from the mock DashScope server, four \
                     bytes per token. ";
const _: () = assert!(REPLY.len().is_multiple_of(4));

/// The default reasoning, four bytes per token too.
const REASONING: &str = "Let me think this through, step by step, then answer... ";
const _: () = assert!(REASONING.len().is_multiple_of(4));

fn filler(text: &'static str, n: u32) -> String {
    let pieces = text.len() / 4;
    (0..n as usize)
        .map(|k| {
            let i = (k % pieces) * 4;
            &text[i..i + 4]
        })
        .collect()
}

/// Splits text into output pieces: four ASCII bytes, or two other
/// characters, per piece (one token or close to it).
fn split_text(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut ascii = 0;
    let mut other = 0;
    for ch in text.chars() {
        let is_ascii = ch.is_ascii();
        if (is_ascii && (ascii == 4 || other > 0)) || (!is_ascii && (other == 2 || ascii > 0)) {
            out.push(std::mem::take(&mut cur));
            ascii = 0;
            other = 0;
        }
        cur.push(ch);
        if is_ascii {
            ascii += 1;
        } else {
            other += 1;
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Splits tool-call arguments into fragments of at most 12 bytes (on
/// character boundaries); at least one fragment, possibly empty.
fn split_arguments(args: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for ch in args.chars() {
        if cur.len() + ch.len_utf8() > 12 && !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
        cur.push(ch);
    }
    if !cur.is_empty() || out.is_empty() {
        out.push(cur);
    }
    out
}

/// One tool call of the answer.
#[derive(Clone, Debug)]
pub(super) struct Call {
    pub(super) id: String,
    pub(super) name: String,
    pub(super) arguments: String,
}

/// One output piece, sent as one chunk when streaming.
#[derive(Clone, Debug)]
enum Step {
    Reasoning(String),
    Content(String),
    /// A fragment of call `call`; the first carries its id and name.
    Call {
        call: usize,
        piece: String,
        first: bool,
    },
}

/// A step with the cumulative token counts after it.
#[derive(Clone, Debug)]
struct Counted {
    step: Step,
    output: u32,
    reasoning: u32,
}

/// The answer, decided: reasoning, text and tool calls as pieces.
#[derive(Debug)]
pub(super) struct Plan {
    steps: Vec<Counted>,
    pub(super) calls: Vec<Call>,
    text: String,
    reasoning: String,
    finish: &'static str,
    thinking: bool,
    /// Output tokens in all (reasoning included).
    pub(super) output: u32,
    reasoning_tokens: u32,
}

/// What the default answer needs from the configuration.
pub(super) struct Defaults {
    pub(super) output_tokens: u32,
    pub(super) reasoning_tokens: u32,
    /// `finish_reason` of a forced `tool_choice` in compatible mode.
    pub(super) compatible_forced_finish: &'static str,
}

/// `call_` and 22 hex digits, as DashScope's ids.
fn call_id(rng: &mut impl Rng) -> String {
    let a = rng.next_u64();
    let b = rng.next_u64();
    format!("call_{:016x}{:06x}", a, b & 0xff_ffff)
}

impl Plan {
    /// Decides the answer to `req` from `reply` (scripted, or the default
    /// when it says nothing about content).
    pub(super) fn new(
        req: &GenRequest,
        protocol: Protocol,
        thinking: bool,
        reply: &Reply,
        defaults: &Defaults,
        rng: &mut impl Rng,
    ) -> Self {
        let scripted = reply.text.is_some() || !reply.calls.is_empty();
        let mut calls: Vec<ToolCall> = if scripted {
            reply.calls.clone()
        } else {
            let after_tool = req
                .messages
                .last()
                .and_then(|m| m.get("role"))
                .and_then(Value::as_str)
                == Some("tool");
            let first = tool_names(&req.tools).next();
            match (&req.tool_choice, first) {
                (ToolChoice::Function(name), _) => vec![ToolCall::generated(name.clone())],
                (ToolChoice::Required, Some(first)) => vec![ToolCall::generated(first)],
                (ToolChoice::Auto, Some(first)) if !after_tool => {
                    vec![ToolCall::generated(first)]
                }
                _ => Vec::new(),
            }
        };
        if !req.parallel {
            calls.truncate(1);
        }
        let calls: Vec<Call> = calls
            .into_iter()
            .map(|c| {
                let arguments = c.arguments.unwrap_or_else(|| {
                    tool_schema(&req.tools, &c.name)
                        .map(schema::instance)
                        .filter(Value::is_object)
                        .unwrap_or_else(|| json!({}))
                        .to_string()
                });
                Call {
                    id: call_id(rng),
                    name: c.name,
                    arguments,
                }
            })
            .collect();

        let text = match (&reply.text, calls.is_empty()) {
            (Some(t), _) => t.clone(),
            (None, false) => String::new(),
            (None, true) => match &req.format {
                Format::Text => filler(REPLY, defaults.output_tokens.max(1)),
                Format::JsonObject => {
                    let n = defaults.output_tokens.saturating_sub(4).max(1);
                    json!({ "result": filler(REPLY, n).trim_end() }).to_string()
                }
                Format::JsonSchema(s) => schema::instance(s).to_string(),
            },
        };
        let mut finish = "stop";
        let reasoning = if thinking {
            match &reply.reasoning {
                Some(r) => r.clone(),
                None => {
                    let n = match req.thinking_budget {
                        Some(b) => defaults.reasoning_tokens.min(b),
                        None => defaults.reasoning_tokens,
                    };
                    filler(REASONING, n)
                }
            }
        } else {
            String::new()
        };

        let mut steps = Vec::new();
        let (mut output, mut reasoning_tokens) = (0u32, 0u32);
        for piece in split_text(&reasoning) {
            let t = estimate_text_tokens(&piece);
            output = output.saturating_add(t);
            reasoning_tokens = reasoning_tokens.saturating_add(t);
            steps.push(Counted {
                step: Step::Reasoning(piece),
                output,
                reasoning: reasoning_tokens,
            });
        }
        let mut content_tokens = 0u32;
        let mut sent_text = String::new();
        for piece in split_text(&text) {
            let t = estimate_text_tokens(&piece);
            if let Some(max) = req.max_tokens
                && content_tokens.saturating_add(t) > max
            {
                finish = "length";
                break;
            }
            content_tokens = content_tokens.saturating_add(t);
            output = output.saturating_add(t);
            sent_text.push_str(&piece);
            steps.push(Counted {
                step: Step::Content(piece),
                output,
                reasoning: reasoning_tokens,
            });
        }
        for (i, c) in calls.iter().enumerate() {
            for (k, piece) in split_arguments(&c.arguments).into_iter().enumerate() {
                let mut t = estimate_text_tokens(&piece);
                if k == 0 {
                    t = t.saturating_add(estimate_text_tokens(&c.name));
                }
                output = output.saturating_add(t);
                steps.push(Counted {
                    step: Step::Call {
                        call: i,
                        piece,
                        first: k == 0,
                    },
                    output,
                    reasoning: reasoning_tokens,
                });
            }
        }
        if !calls.is_empty() {
            // A forced tool_choice ends with "stop" natively [C]; compatible
            // mode is not captured, so it is a knob [I].
            finish = match (&req.tool_choice, protocol) {
                (c, Protocol::Native) if c.is_forced() => "stop",
                (c, Protocol::Compatible) if c.is_forced() => defaults.compatible_forced_finish,
                _ => "tool_calls",
            };
        }
        // The output is at least one token, as before.
        if output == 0 {
            output = 1;
        }
        Plan {
            steps,
            calls,
            text: sent_text,
            reasoning,
            finish,
            thinking,
            output,
            reasoning_tokens,
        }
    }

    /// The number of output pieces (stream chunks carrying output).
    pub(super) fn pieces(&self) -> u32 {
        u32::try_from(self.steps.len()).unwrap_or(u32::MAX)
    }
}

// ---------------------------------------------------------------------------
// Rendering.

/// Everything needed to render one generation.
pub(super) struct Generation {
    pub(super) endpoint: Endpoint,
    pub(super) model: String,
    pub(super) input: u32,
    pub(super) plan: Plan,
    pub(super) incremental: bool,
    pub(super) message_format: bool,
    pub(super) include_usage: bool,
    pub(super) created: u64,
}

impl Generation {
    fn native_usage(&self, output: u32, reasoning: u32) -> Value {
        let mut u = json!({
            "input_tokens": self.input,
            "output_tokens": output,
            "total_tokens": self.input + output,
        });
        if self.plan.thinking {
            u["output_tokens_details"] = json!({ "reasoning_tokens": reasoning });
        }
        u
    }

    fn compat_usage(&self) -> Value {
        let p = &self.plan;
        let mut u = json!({
            "prompt_tokens": self.input,
            "completion_tokens": p.output,
            "total_tokens": self.input + p.output,
            "prompt_tokens_details": { "cached_tokens": 0 },
        });
        if p.thinking {
            u["completion_tokens_details"] = json!({ "reasoning_tokens": p.reasoning_tokens });
        }
        u
    }

    fn native_content(&self, text: &str) -> Value {
        if self.endpoint == Endpoint::NativeMultimodal {
            if text.is_empty() {
                json!([])
            } else {
                json!([{ "text": text }])
            }
        } else {
            Value::String(text.to_owned())
        }
    }

    /// Whether the native answer uses the message format: asked for, or
    /// needed (tool calls and reasoning have no place in `output.text`).
    fn native_message_format(&self) -> bool {
        self.message_format || !self.plan.calls.is_empty() || self.plan.thinking
    }

    /// A native `output` with `content`, optional reasoning and tool calls.
    fn native_output(
        &self,
        content: &str,
        reasoning: Option<&str>,
        calls: Option<Value>,
        finish: &str,
    ) -> Value {
        if !self.native_message_format() {
            return json!({ "text": content, "finish_reason": finish });
        }
        let mut message = json!({ "role": "assistant", "content": self.native_content(content) });
        if let Some(r) = reasoning {
            message["reasoning_content"] = Value::String(r.to_owned());
        }
        let mut choice = json!({ "finish_reason": finish, "message": message });
        if let Some(c) = calls {
            choice["message"]["tool_calls"] = c;
            choice["index"] = json!(0);
        }
        json!({ "choices": [choice] })
    }

    /// Every call whole, as in a non-stream answer.
    fn whole_calls(&self) -> Value {
        Value::Array(
            self.plan
                .calls
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    json!({
                        "index": i,
                        "id": c.id,
                        "type": "function",
                        "function": { "name": c.name, "arguments": c.arguments },
                    })
                })
                .collect(),
        )
    }

    /// The non-stream body.
    pub(super) fn body(&self, rid: &str) -> Bytes {
        let p = &self.plan;
        let calls = (!p.calls.is_empty()).then(|| self.whole_calls());
        let v = match self.endpoint.protocol() {
            Protocol::Native => json!({
                "output": self.native_output(
                    &p.text,
                    p.thinking.then_some(p.reasoning.as_str()),
                    calls,
                    p.finish,
                ),
                "usage": self.native_usage(p.output, p.reasoning_tokens),
                "request_id": rid,
            }),
            Protocol::Compatible => {
                let mut message = json!({ "role": "assistant", "content": p.text });
                if let Some(c) = calls {
                    message["tool_calls"] = c;
                }
                if p.thinking {
                    message["reasoning_content"] = Value::String(p.reasoning.clone());
                }
                json!({
                    "choices": [{
                        "message": message,
                        "finish_reason": p.finish,
                        "index": 0,
                        "logprobs": null,
                    }],
                    "object": "chat.completion",
                    "usage": self.compat_usage(),
                    "created": self.created,
                    "system_fingerprint": null,
                    "model": self.model,
                    "id": format!("chatcmpl-{rid}"),
                })
            }
        };
        Bytes::from(v.to_string())
    }

    fn compat_chunk(&self, rid: &str, choices: Value, usage: Option<Value>) -> Bytes {
        let mut v = json!({
            "id": format!("chatcmpl-{rid}"),
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
        });
        if self.include_usage {
            v["usage"] = usage.unwrap_or(Value::Null);
        }
        Bytes::from(format!("data: {v}\n\n"))
    }

    fn native_frame(&self, id: usize, data: Value) -> Bytes {
        Bytes::from(format!(
            "id:{id}\nevent:result\n:HTTP_STATUS/200\ndata:{data}\n\n"
        ))
    }

    /// A tool-call fragment as streamed.
    fn fragment(&self, call: usize, piece: &str, first: bool) -> Value {
        let c = &self.plan.calls[call];
        if first {
            json!({
                "index": call,
                "id": c.id,
                "type": "function",
                "function": { "name": c.name, "arguments": piece },
            })
        } else {
            json!({
                "index": call,
                "id": "",
                "type": "function",
                "function": { "arguments": piece },
            })
        }
    }

    /// Whether the compatible stream opens with a chunk of its own (role
    /// and empty content), rather than with the first tool-call fragment.
    fn compat_role_chunk(&self) -> bool {
        !matches!(
            self.plan.steps.first(),
            Some(Counted {
                step: Step::Call { .. },
                ..
            })
        )
    }

    /// The stream's frames, each with the delay before it. `cut`: stop
    /// after that many pieces, without any final frame.
    pub(super) fn frames(
        &self,
        rid: &str,
        gaps: &[Duration],
        cut: Option<u32>,
    ) -> VecDeque<(Duration, Bytes)> {
        let p = &self.plan;
        let n = cut.map_or(p.steps.len(), |c| (c as usize).min(p.steps.len()));
        let gap = |i: usize| -> Duration {
            // Delay before piece i (0-based).
            if i == 0 {
                Duration::ZERO
            } else {
                gaps.get(i - 1).copied().unwrap_or_default()
            }
        };
        let mut out = VecDeque::with_capacity(n + 4);
        match self.endpoint.protocol() {
            Protocol::Native => self.native_frames(rid, n, cut.is_none(), &gap, &mut out),
            Protocol::Compatible => self.compat_frames(rid, n, cut.is_none(), &gap, &mut out),
        }
        out
    }

    fn native_frames(
        &self,
        rid: &str,
        n: usize,
        whole: bool,
        gap: &dyn Fn(usize) -> Duration,
        out: &mut VecDeque<(Duration, Bytes)>,
    ) {
        let p = &self.plan;
        // The finish rides on the last piece, except when thinking without
        // tool calls (a last empty frame, as captured) or with no piece.
        let separate_final = p.steps.is_empty() || (p.thinking && p.calls.is_empty());
        let mut text_so_far = String::new();
        let mut args_so_far: Vec<String> = Vec::new();
        for (i, c) in p.steps[..n].iter().enumerate() {
            let last = i + 1 == p.steps.len();
            let finish = if last && whole && !separate_final {
                p.finish
            } else {
                "null"
            };
            let (content, reasoning, calls) = match &c.step {
                Step::Reasoning(r) => (String::new(), r.as_str(), None),
                Step::Content(t) => {
                    text_so_far.push_str(t);
                    let content = if self.incremental {
                        t.clone()
                    } else {
                        text_so_far.clone()
                    };
                    (content, "", None)
                }
                Step::Call { call, piece, first } => {
                    if *first {
                        args_so_far.push(String::new());
                    }
                    args_so_far[*call].push_str(piece);
                    let calls = if self.incremental {
                        json!([self.fragment(*call, piece, *first)])
                    } else {
                        Value::Array(
                            args_so_far
                                .iter()
                                .enumerate()
                                .map(|(k, a)| self.fragment(k, a, true))
                                .collect(),
                        )
                    };
                    let content = if self.incremental {
                        String::new()
                    } else {
                        text_so_far.clone()
                    };
                    (content, "", Some(calls))
                }
            };
            let data = json!({
                "output": self.native_output(&content, p.thinking.then_some(reasoning), calls, finish),
                "usage": self.native_usage(c.output, c.reasoning),
                "request_id": rid,
            });
            out.push_back((gap(i), self.native_frame(i + 1, data)));
        }
        if whole && separate_final {
            let content = if self.incremental {
                ""
            } else {
                text_so_far.as_str()
            };
            let data = json!({
                "output": self.native_output(content, p.thinking.then_some(""), None, p.finish),
                "usage": self.native_usage(p.output, p.reasoning_tokens),
                "request_id": rid,
            });
            out.push_back((Duration::ZERO, self.native_frame(p.steps.len() + 1, data)));
        }
    }

    fn compat_frames(
        &self,
        rid: &str,
        n: usize,
        whole: bool,
        gap: &dyn Fn(usize) -> Duration,
        out: &mut VecDeque<(Duration, Bytes)>,
    ) {
        let p = &self.plan;
        let choice = |delta: Value, finish: Value| json!([{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish }]);
        let role_chunk = self.compat_role_chunk();
        if role_chunk {
            let delta = if p.thinking {
                json!({ "content": null, "role": "assistant", "reasoning_content": "" })
            } else {
                json!({ "role": "assistant", "content": "" })
            };
            out.push_back((
                Duration::ZERO,
                self.compat_chunk(rid, choice(delta, Value::Null), None),
            ));
        }
        for (i, c) in p.steps[..n].iter().enumerate() {
            let mut delta = match &c.step {
                Step::Reasoning(r) => json!({ "content": null, "reasoning_content": r }),
                Step::Content(t) if p.thinking => {
                    json!({ "content": t, "reasoning_content": null })
                }
                Step::Content(t) => json!({ "content": t }),
                Step::Call { call, piece, first } => {
                    json!({ "tool_calls": [self.fragment(*call, piece, *first)] })
                }
            };
            if i == 0 && !role_chunk {
                delta["content"] = Value::Null;
                delta["role"] = json!("assistant");
            }
            out.push_back((
                gap(i),
                self.compat_chunk(rid, choice(delta, Value::Null), None),
            ));
        }
        if whole {
            let delta = if p.thinking {
                json!({ "content": "", "reasoning_content": null })
            } else {
                json!({})
            };
            out.push_back((
                Duration::ZERO,
                self.compat_chunk(rid, choice(delta, json!(p.finish)), None),
            ));
            if self.include_usage {
                out.push_back((
                    Duration::ZERO,
                    self.compat_chunk(rid, json!([]), Some(self.compat_usage())),
                ));
            }
            out.push_back((Duration::ZERO, Bytes::from_static(b"data: [DONE]\n\n")));
        }
    }

    /// Index in `frames` of piece `i` (1-based).
    pub(super) fn frame_index(&self, i: u32) -> usize {
        let i = i as usize;
        match self.endpoint.protocol() {
            Protocol::Native => i - 1,
            Protocol::Compatible => i - usize::from(!self.compat_role_chunk()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filler_pieces_are_one_token_each() {
        for n in [1, 7, 20, 100] {
            let t = filler(REPLY, n);
            assert_eq!(estimate_text_tokens(&t), n);
            assert_eq!(split_text(&t).len(), n as usize);
            assert_eq!(estimate_text_tokens(&filler(REASONING, n)), n);
        }
    }

    #[test]
    fn text_and_arguments_split_on_char_boundaries() {
        assert_eq!(split_text("Hello, world"), ["Hell", "o, w", "orld"]);
        assert_eq!(split_text("你好世界!"), ["你好", "世界", "!"]);
        assert_eq!(split_text(""), Vec::<String>::new());
        let args = "{\"location\": \"浙江省杭州市\"}";
        let parts = split_arguments(args);
        assert_eq!(parts.concat(), args);
        assert!(parts.iter().all(|p| p.len() <= 12));
        assert_eq!(split_arguments(""), [""]);
    }

    #[test]
    fn call_ids_look_like_dashscope_ids() {
        let mut rng = crate::util::rng::SeededRng::new(1);
        let id = call_id(&mut rng);
        assert!(id.starts_with("call_"));
        assert_eq!(id.len(), 5 + 22);
        assert!(id[5..].chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(id, call_id(&mut rng));
    }
}
