//! Scripted decisions: what the mock's "model" answers, and which faults
//! happen, request by request.

use std::fmt;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::config::Fault;
use super::error::ApiError;

/// What the mock answers one request: the model's "decision" (a text, tool
/// calls, or its own default answer), optionally thinking first, and
/// optionally a [`Fault`].
///
/// # Example
///
/// ```
/// use serde_json::json;
/// use tower_qwen::mock::{ApiError, Fault, Reply, ToolCall};
///
/// // Call one tool with these arguments.
/// let call = Reply::tool_call(ToolCall::new("get_weather", json!({"city": "Paris"})));
/// // Two calls in parallel (sent only when the request allows parallel calls).
/// let both = Reply::tool_calls([
///     ToolCall::new("get_weather", json!({"city": "Paris"})),
///     ToolCall::generated("get_time"), // arguments from the tool's schema
/// ]);
/// // A text answer, throttled after three tokens of it.
/// let cut = Reply::text("It is sunny in Paris today.").with_fault(Fault::StreamError {
///     after_tokens: 3,
///     error: ApiError::rate_quota(),
/// });
/// # let _ = (call, both, cut);
/// ```
///
/// # Default
///
/// The mock's own answer: filler text of
/// [`output_tokens`](super::MockDashScopeBuilder::output_tokens) tokens, or,
/// when the request offers tools, a call of its first tool (forced
/// `tool_choice`: the named one) until the conversation carries a tool
/// result; no fault.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reply {
    pub(crate) text: Option<String>,
    pub(crate) calls: Vec<ToolCall>,
    pub(crate) reasoning: Option<String>,
    pub(crate) fault: Option<Fault>,
    pub(crate) task_failure: Option<ApiError>,
}

impl Reply {
    /// The mock's own answer (see [Default](#default)).
    pub fn model() -> Self {
        Self::default()
    }

    /// Answers with this text (in JSON mode, the text is sent as given).
    pub fn text(text: impl Into<String>) -> Self {
        Self {
            text: Some(text.into()),
            ..Self::default()
        }
    }

    /// Answers with one tool call.
    pub fn tool_call(call: ToolCall) -> Self {
        Self::tool_calls([call])
    }

    /// Answers with these tool calls, in order. Without
    /// `parallel_tool_calls: true` in the request only the first is sent
    /// (QWEN-API.md A8: the parameter's default is not documented; the mock
    /// takes it as `false`, an inferred default).
    pub fn tool_calls(calls: impl IntoIterator<Item = ToolCall>) -> Self {
        Self {
            calls: calls.into_iter().collect(),
            ..Self::default()
        }
    }

    /// The mock's own answer with `fault`.
    pub fn fault(fault: Fault) -> Self {
        Self::default().with_fault(fault)
    }

    /// For an async task submission: the task ends `FAILED` with `error`'s
    /// code and message (instead of `SUCCEEDED`).
    pub fn failed_task(error: ApiError) -> Self {
        Self {
            task_failure: Some(error),
            ..Self::default()
        }
    }

    /// Adds text sent before the tool calls (or replaces the text).
    pub fn with_text(mut self, text: impl Into<String>) -> Self {
        self.text = Some(text.into());
        self
    }

    /// Adds `fault` to this answer: error answers replace it; stream faults
    /// (`StreamError`, `Stall`, `ResetMidBody`, `StreamCut`) happen after
    /// `after_tokens` of its output pieces.
    pub fn with_fault(mut self, fault: Fault) -> Self {
        self.fault = Some(fault);
        self
    }

    /// The reasoning sent before the answer when the request thinks
    /// (`enable_thinking`, or a thinking-only model). Default is filler of
    /// [`reasoning_tokens`](super::MockDashScopeBuilder::reasoning_tokens).
    pub fn with_reasoning(mut self, reasoning: impl Into<String>) -> Self {
        self.reasoning = Some(reasoning.into());
        self
    }
}

/// One tool call the mock's model makes. See [`Reply::tool_call`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolCall {
    pub(crate) name: String,
    /// The arguments' JSON text; `None`: generated from the tool's schema.
    pub(crate) arguments: Option<String>,
}

impl ToolCall {
    /// Calls `name` with these arguments (sent as a JSON string, as the
    /// service does).
    pub fn new(name: impl Into<String>, arguments: Value) -> Self {
        Self {
            name: name.into(),
            arguments: Some(arguments.to_string()),
        }
    }

    /// Calls `name` with this exact arguments string, which need not be
    /// valid JSON (to test a client against a model's malformed output).
    pub fn raw(name: impl Into<String>, arguments: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            arguments: Some(arguments.into()),
        }
    }

    /// Calls `name` with a minimal valid instance of its `parameters`
    /// schema from the request's `tools` (required properties, their types,
    /// the first enum value); `{}` if the request does not declare it.
    pub fn generated(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            arguments: None,
        }
    }
}

/// Which kind of endpoint a scripted request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RequestKind {
    /// Chat (native text or multimodal generation, compatible chat).
    Chat,
    /// Embeddings.
    Embedding,
    /// An async task submission.
    Task,
}

/// A request as a [`Script`] sees it.
#[derive(Debug)]
pub struct ScriptRequest<'a> {
    pub(crate) seq: u64,
    pub(crate) kind: RequestKind,
    pub(crate) compatible: bool,
    pub(crate) stream: bool,
    pub(crate) model: &'a str,
    pub(crate) body: &'a Map<String, Value>,
    pub(crate) messages: &'a [Value],
    pub(crate) workspace: Option<&'a str>,
}

impl ScriptRequest<'_> {
    /// The request's number among the requests the script has seen,
    /// from 1.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The kind of endpoint.
    pub fn kind(&self) -> RequestKind {
        self.kind
    }

    /// Whether it came to an OpenAI-compatible endpoint.
    pub fn is_compatible(&self) -> bool {
        self.compatible
    }

    /// Whether it asked for a stream.
    pub fn is_stream(&self) -> bool {
        self.stream
    }

    /// The model it names.
    pub fn model(&self) -> &str {
        self.model
    }

    /// The whole JSON body.
    pub fn body(&self) -> &Map<String, Value> {
        self.body
    }

    /// The chat messages (empty for other requests).
    pub fn messages(&self) -> &[Value] {
        self.messages
    }

    /// The text of the last `user` message (a string content, or its text
    /// parts joined), if any.
    pub fn last_user_message(&self) -> Option<String> {
        let m = self
            .messages
            .iter()
            .rev()
            .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))?;
        Some(text_of(m.get("content")?))
    }

    /// The role of the last message (`"tool"` after tool results).
    pub fn last_role(&self) -> Option<&str> {
        self.messages.last()?.get("role")?.as_str()
    }

    /// The names of the tools the request offers.
    pub fn tool_names(&self) -> Vec<&str> {
        tools_of(self.body)
            .iter()
            .filter_map(|t| t.get("function")?.get("name")?.as_str())
            .collect()
    }

    /// The `X-DashScope-WorkSpace` header, if sent.
    pub fn workspace(&self) -> Option<&str> {
        self.workspace
    }
}

/// The `tools` of a request, in either dialect.
pub(crate) fn tools_of(body: &Map<String, Value>) -> &[Value] {
    let v = body
        .get("tools")
        .or_else(|| body.get("parameters").and_then(|p| p.get("tools")));
    v.and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// A message content as text: the string, or the `text` parts joined.
pub(crate) fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

type ReplyFn = Arc<dyn Fn(&ScriptRequest<'_>) -> Option<Reply> + Send + Sync>;

#[derive(Clone)]
enum When {
    Any,
    Nth(u64),
    UserSays(String),
    Fn(ReplyFn),
}

#[derive(Clone)]
struct Rule {
    when: When,
    reply: Option<Reply>,
    /// How many requests it may answer; `None`: any number.
    uses: Option<u64>,
}

/// What the mock answers, request by request: an ordered list of rules.
///
/// Each request that passes validation (authentication, body, model,
/// parameters) at a chat, embedding or task endpoint is offered to the rules
/// in the order they were added; the first rule that answers decides its
/// [`Reply`], and a rule with a limited number of uses is spent by it.
/// Requests no rule answers get the mock's own answer (and the random
/// faults of the [`FaultPlan`](super::FaultPlan), if any). A scripted error
/// answer (`Fault::Error`, `Fault::ErrorIn200`, `Fault::Reset`) replaces the
/// call before the quota is consulted, so it is charged nothing; any other
/// reply goes through the quota like an unscripted request (a throttled
/// request still spends its rule).
///
/// Scripts are obeyed as given: a scripted tool call is sent even when the
/// request offers no such tool or says `tool_choice: "none"`.
///
/// # Example
///
/// ```
/// use serde_json::json;
/// use tower_qwen::mock::{ApiError, Fault, MockDashScope, Reply, Script, ToolCall};
///
/// let script = Script::new()
///     // The first two requests fail with a 503...
///     .times(2, Reply::fault(Fault::Error(ApiError::service_unavailable())))
///     // ...any question about the weather calls the tool...
///     .when_user_says("weather", Reply::tool_call(ToolCall::new("get_weather", json!({"city": "Paris"}))))
///     // ...and a conversation that carries a tool result gets the answer.
///     .when(|req| (req.last_role() == Some("tool")).then(|| Reply::text("Sunny, 21 °C.")));
/// let builder = MockDashScope::builder().script(script);
/// # let _ = builder;
/// ```
#[derive(Clone, Default)]
pub struct Script {
    rules: Vec<Rule>,
}

impl fmt::Debug for Script {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Script")
            .field("rules", &self.rules.len())
            .finish()
    }
}

impl Script {
    /// No rules: every request gets the mock's own answer.
    pub fn new() -> Self {
        Self::default()
    }

    fn push(mut self, when: When, reply: Option<Reply>, uses: Option<u64>) -> Self {
        self.rules.push(Rule { when, reply, uses });
        self
    }

    /// The next request that reaches this rule gets `reply`; then the rule
    /// is spent. `Script::new().then(a).then(b)` answers the first request
    /// with `a` and the second with `b`.
    pub fn then(self, reply: Reply) -> Self {
        self.push(When::Any, Some(reply), Some(1))
    }

    /// The next `n` requests that reach this rule get `reply` ("fail the
    /// first N requests with X").
    pub fn times(self, n: u64, reply: Reply) -> Self {
        self.push(When::Any, Some(reply), Some(n))
    }

    /// Every request that reaches this rule gets `reply`.
    pub fn always(self, reply: Reply) -> Self {
        self.push(When::Any, Some(reply), None)
    }

    /// The `n`-th request the script sees (counting from 1) gets `reply`.
    pub fn nth(self, n: u64, reply: Reply) -> Self {
        self.push(When::Nth(n), Some(reply), Some(1))
    }

    /// Every request whose last `user` message contains `text` gets
    /// `reply`.
    pub fn when_user_says(self, text: impl Into<String>, reply: Reply) -> Self {
        self.push(When::UserSays(text.into()), Some(reply), None)
    }

    /// Every request for which `decide` returns a reply gets it.
    pub fn when<F>(self, decide: F) -> Self
    where
        F: Fn(&ScriptRequest<'_>) -> Option<Reply> + Send + Sync + 'static,
    {
        self.push(When::Fn(Arc::new(decide)), None, None)
    }

    /// The number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether there are no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

/// A script being played: the rules with their remaining uses, and the
/// number of requests seen.
#[derive(Default)]
pub(crate) struct ScriptRun {
    rules: Vec<Rule>,
    seen: u64,
}

impl fmt::Debug for ScriptRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScriptRun")
            .field("rules", &self.rules.len())
            .field("seen", &self.seen)
            .finish()
    }
}

impl ScriptRun {
    pub(crate) fn new(script: &Script) -> Self {
        Self {
            rules: script.rules.clone(),
            seen: 0,
        }
    }

    /// The next request's number, counted whether or not a rule answers.
    pub(crate) fn next_seq(&mut self) -> u64 {
        self.seen += 1;
        self.seen
    }

    /// Whether the script has rules at all (nothing to decide otherwise).
    pub(crate) fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The reply for `req`, spending a use of the rule that gives it;
    /// `None` when no rule answers. (Closures run here, under the script's
    /// lock; they cannot reach the mock.)
    pub(crate) fn decide(&mut self, req: &ScriptRequest<'_>) -> Option<Reply> {
        for rule in &mut self.rules {
            if rule.uses == Some(0) {
                continue;
            }
            let reply = match &rule.when {
                When::Any => rule.reply.clone(),
                When::Nth(n) => (req.seq == *n).then(|| rule.reply.clone()).flatten(),
                When::UserSays(text) => req
                    .last_user_message()
                    .is_some_and(|m| m.contains(text.as_str()))
                    .then(|| rule.reply.clone())
                    .flatten(),
                When::Fn(f) => f(req),
            };
            if let Some(reply) = reply {
                if let Some(u) = rule.uses.as_mut() {
                    *u -= 1;
                }
                return Some(reply);
            }
        }
        None
    }
}
