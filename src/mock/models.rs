//! The mock's model catalogue: which models exist and what each supports.

use std::num::NonZeroU32;

/// What a model is called for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ModelKind {
    /// Chat (text generation, multimodal generation).
    Chat,
    /// Text embeddings.
    Embedding,
    /// An async task API (image synthesis, batch embedding, transcription),
    /// called with `X-DashScope-Async: enable`.
    Task,
}

/// Whether and how a model thinks (`enable_thinking`, `reasoning_content`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Thinking {
    /// No thinking mode: `enable_thinking: true` is refused.
    Unsupported,
    /// Hybrid models (Qwen3, qwen-plus, qwen-turbo, qwen-flash):
    /// `enable_thinking` switches it, `default` when absent (open-source
    /// Qwen3 `true`, commercial models `false`).
    Optional {
        /// Whether the model thinks when the request does not say.
        default: bool,
    },
    /// Thinking-only models (QwQ, QVQ): always think.
    Always,
}

/// How the native dialect answers an unknown model.
///
/// The captures disagree (QWEN-API.md A8): most show `400 InvalidParameter`
/// "Model not exist.", some a `404`; the official SDK knows a code
/// `Model.NotExist` for 404 but no capture shows it on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum NativeModelError {
    /// `400 {"code":"InvalidParameter","message":"Model not exist."}`.
    #[default]
    InvalidParameter,
    /// `404 {"code":"Model.NotExist","message":"Model not exist."}`.
    NotExist,
}

/// One model of the mock's catalogue and what it supports.
///
/// Requests are checked against it as DashScope checks them: a model that
/// does not exist gets the service's "model not found" error, `tools` on a
/// model without function calling "The tool call is not supported.", a
/// parameter in its [unsupported](ModelInfo::unsupported_parameter) list
/// "Parameter 'x'=v is not supported for m model.", and so on (see the
/// [module docs](super)).
///
/// # Example
///
/// ```
/// use tower_qwen::mock::{MockDashScope, ModelInfo, Thinking};
///
/// let builder = MockDashScope::builder()
///     // A model of your own, thinking by default, without function calling.
///     .model(ModelInfo::chat("my-reasoner").tools(false).thinking(Thinking::Optional { default: true }))
///     // A third-party model that refuses `temperature`.
///     .model(ModelInfo::chat("kimi-k3").unsupported_parameter("temperature"));
/// # let _ = builder;
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelInfo {
    name: String,
    kind: ModelKind,
    tools: bool,
    json_object: bool,
    json_schema: bool,
    thinking: Thinking,
    stream_only: bool,
    open_source: bool,
    embedding_batch_limit: u32,
    unsupported: Vec<String>,
}

impl ModelInfo {
    /// A chat model with function calling and JSON mode (`json_object`), no
    /// `json_schema`, no thinking, served with and without streaming.
    pub fn chat(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            kind: ModelKind::Chat,
            tools: true,
            json_object: true,
            json_schema: false,
            thinking: Thinking::Unsupported,
            stream_only: false,
            open_source: false,
            embedding_batch_limit: 10,
            unsupported: Vec::new(),
        }
    }

    /// An embedding model taking up to 10 texts per request.
    pub fn embedding(name: impl Into<String>) -> Self {
        Self {
            kind: ModelKind::Embedding,
            tools: false,
            json_object: false,
            ..Self::chat(name)
        }
    }

    /// An async task model (image synthesis and the like).
    pub fn task(name: impl Into<String>) -> Self {
        Self {
            kind: ModelKind::Task,
            tools: false,
            json_object: false,
            ..Self::chat(name)
        }
    }

    /// What the mock serves a model it does not know when
    /// [`accept_any_model`](super::MockDashScopeBuilder::accept_any_model)
    /// is on: any endpoint, every capability (function calling, both JSON
    /// modes, thinking off by default).
    pub fn any(name: impl Into<String>) -> Self {
        Self::chat(name)
            .json_schema(true)
            .thinking(Thinking::Optional { default: false })
    }

    /// Whether `tools` / `tool_choice` are supported. Default is `true` for
    /// chat models.
    pub fn tools(mut self, yes: bool) -> Self {
        self.tools = yes;
        self
    }

    /// Whether `response_format: {"type":"json_object"}` is supported.
    /// Default is `true` for chat models.
    pub fn json_object(mut self, yes: bool) -> Self {
        self.json_object = yes;
        self
    }

    /// Whether `response_format: {"type":"json_schema"}` is supported
    /// ("only some qwen-plus models"). Default is `false`.
    pub fn json_schema(mut self, yes: bool) -> Self {
        self.json_schema = yes;
        self
    }

    /// The thinking mode. Default is [`Thinking::Unsupported`].
    pub fn thinking(mut self, thinking: Thinking) -> Self {
        self.thinking = thinking;
        self
    }

    /// Whether non-stream calls are refused ("This model only support
    /// stream mode…"). Default is `false`.
    pub fn stream_only(mut self, yes: bool) -> Self {
        self.stream_only = yes;
        self
    }

    /// Whether the native models list reports it as open source. Default is
    /// `false`.
    pub fn open_source(mut self, yes: bool) -> Self {
        self.open_source = yes;
        self
    }

    /// The most texts one embedding request may carry. Default is 10.
    pub fn embedding_batch_limit(mut self, limit: NonZeroU32) -> Self {
        self.embedding_batch_limit = limit.get();
        self
    }

    /// Refuses requests that set `parameter` (top level in compatible mode,
    /// under `parameters` natively) with DashScope's "Parameter
    /// '`parameter`'=`value` is not supported for `model` model.".
    pub fn unsupported_parameter(mut self, parameter: impl Into<String>) -> Self {
        self.unsupported.push(parameter.into());
        self
    }

    /// The model's name (case-sensitive, as DashScope's are).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What it is called for.
    pub fn kind(&self) -> ModelKind {
        self.kind
    }

    /// Whether it supports function calling.
    pub fn supports_tools(&self) -> bool {
        self.tools
    }

    /// Whether it supports `response_format` `json_object`.
    pub fn supports_json_object(&self) -> bool {
        self.json_object
    }

    /// Whether it supports `response_format` `json_schema`.
    pub fn supports_json_schema(&self) -> bool {
        self.json_schema
    }

    /// Its thinking mode.
    pub fn thinking_mode(&self) -> Thinking {
        self.thinking
    }

    /// Whether it refuses non-stream calls.
    pub fn is_stream_only(&self) -> bool {
        self.stream_only
    }

    /// Whether the native list calls it open source.
    pub fn is_open_source(&self) -> bool {
        self.open_source
    }

    /// Its embedding batch limit.
    pub fn get_embedding_batch_limit(&self) -> u32 {
        self.embedding_batch_limit
    }

    /// The parameters it refuses.
    pub fn unsupported_parameters(&self) -> &[String] {
        &self.unsupported
    }

    /// Whether a request to an endpoint of `kind` may name this model.
    pub(crate) fn serves(&self, kind: ModelKind) -> bool {
        self.kind == kind
            // Batch embedding runs as a task on the embedding path.
            || (kind == ModelKind::Task && self.kind == ModelKind::Embedding)
    }

    /// The mock's default catalogue: the models of QWEN-API.md (A1, A3, A6,
    /// A8) with the capabilities the mock gives them. This is the mock's
    /// choice, not the service's current matrix (which changes by region
    /// and date): add, replace or drop models with
    /// [`model`](super::MockDashScopeBuilder::model) and
    /// [`models`](super::MockDashScopeBuilder::models).
    ///
    /// * `qwen-max`, `qwen-max-latest`, `qwen-max-2025-01-25`, `qwen3-max`,
    ///   `qwen-long`: chat, function calling, `json_object`, no thinking
    ///   (`qwen-long`: no function calling);
    /// * `qwen-plus`, `qwen-plus-latest`, `qwen-plus-2025-07-14`,
    ///   `qwen-plus-0919`: also `json_schema`, thinking off by default;
    ///   `qwen-turbo`, `qwen-turbo-latest`, `qwen-flash`: thinking off by
    ///   default;
    /// * open-source `qwen3-235b-a22b`, `qwen3-32b`, `qwen3-30b-a3b`,
    ///   `qwen3-14b`, `qwen3-8b`, `qwen3-4b`, `qwen3-1.7b`, `qwen3-0.6b`:
    ///   thinking **on** by default; `qwen2.5-72b-instruct`,
    ///   `qwen2.5-14b-instruct-1m`, `qwen2.5-7b-instruct-1m`: no thinking;
    /// * `qwq-plus`, `qwq-plus-latest`, `qwq-32b`: thinking only, stream
    ///   only, function calling; `qvq-max`, `qvq-max-latest`, `qvq-plus`:
    ///   thinking only, stream only, no tools; `qwen-omni-turbo`,
    ///   `qwen-omni-turbo-latest`, `qwen3-omni-flash`: stream only;
    /// * `qwen-vl-max`, `qwen-vl-plus`: chat (multimodal), no tools, no JSON
    ///   mode;
    /// * embeddings `text-embedding-v1`, `text-embedding-v2` (25 texts per
    ///   request), `text-embedding-v3`, `text-embedding-v4` (10), and the
    ///   async `text-embedding-async-v1`/`v2`;
    /// * task models `wanx-v1`, `wanx2.1-t2i-turbo`, `wanx2.1-t2i-plus`,
    ///   `paraformer-v2`.
    pub fn catalogue() -> Vec<ModelInfo> {
        let mut out = Vec::new();
        let hybrid = Thinking::Optional { default: false };
        for name in [
            "qwen-max",
            "qwen-max-latest",
            "qwen-max-2025-01-25",
            "qwen3-max",
        ] {
            out.push(Self::chat(name));
        }
        out.push(Self::chat("qwen-long").tools(false));
        for name in [
            "qwen-plus",
            "qwen-plus-latest",
            "qwen-plus-2025-07-14",
            "qwen-plus-0919",
        ] {
            out.push(Self::chat(name).json_schema(true).thinking(hybrid));
        }
        for name in ["qwen-turbo", "qwen-turbo-latest", "qwen-flash"] {
            out.push(Self::chat(name).thinking(hybrid));
        }
        for name in [
            "qwen3-235b-a22b",
            "qwen3-32b",
            "qwen3-30b-a3b",
            "qwen3-14b",
            "qwen3-8b",
            "qwen3-4b",
            "qwen3-1.7b",
            "qwen3-0.6b",
        ] {
            out.push(
                Self::chat(name)
                    .open_source(true)
                    .thinking(Thinking::Optional { default: true }),
            );
        }
        for name in [
            "qwen2.5-72b-instruct",
            "qwen2.5-14b-instruct-1m",
            "qwen2.5-7b-instruct-1m",
        ] {
            out.push(Self::chat(name).open_source(true));
        }
        for name in ["qwq-plus", "qwq-plus-latest", "qwq-32b"] {
            out.push(
                Self::chat(name)
                    .json_object(false)
                    .thinking(Thinking::Always)
                    .stream_only(true)
                    .open_source(name == "qwq-32b"),
            );
        }
        for name in ["qvq-max", "qvq-max-latest", "qvq-plus"] {
            out.push(
                Self::chat(name)
                    .tools(false)
                    .json_object(false)
                    .thinking(Thinking::Always)
                    .stream_only(true),
            );
        }
        for name in [
            "qwen-omni-turbo",
            "qwen-omni-turbo-latest",
            "qwen3-omni-flash",
        ] {
            out.push(
                Self::chat(name)
                    .tools(false)
                    .json_object(false)
                    .stream_only(true),
            );
        }
        for name in ["qwen-vl-max", "qwen-vl-plus"] {
            out.push(Self::chat(name).tools(false).json_object(false));
        }
        let limit = |n| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        for (name, n) in [
            ("text-embedding-v1", 25),
            ("text-embedding-v2", 25),
            ("text-embedding-v3", 10),
            ("text-embedding-v4", 10),
        ] {
            out.push(Self::embedding(name).embedding_batch_limit(limit(n)));
        }
        for name in [
            "text-embedding-async-v1",
            "text-embedding-async-v2",
            "wanx-v1",
            "wanx2.1-t2i-turbo",
            "wanx2.1-t2i-plus",
            "paraformer-v2",
        ] {
            out.push(Self::task(name));
        }
        out
    }
}
