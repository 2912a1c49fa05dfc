//! The Qwen client preset: a tuned hyper-util client, DashScope endpoints,
//! authentication, and request builders.
//!
//! * [`TransportConfig`] builds the [`HttpClient`]: hyper-util's pooled
//!   legacy client over rustls (ring, Mozilla roots), HTTP/1.1 and HTTP/2,
//!   a 5 s connect timeout, 20 idle connections kept per host, TCP_NODELAY,
//!   no redirects followed.
//! * [`Region`] and [`BaseUrl`] name every DashScope host (QWEN-API.md A1);
//!   a custom base URL points the stack at a gateway or the mock server.
//! * [`SetUpstreamLayer`] resolves path-only requests against the base URL
//!   and adds `Authorization: Bearer` ([`ApiKey`], never logged) and
//!   `X-DashScope-WorkSpace`.
//! * [`ChatRequest`] and [`EmbeddingRequest`] build raw `http::Request`s in
//!   either dialect with the streaming headers and options set right; raw
//!   requests work just as well.
//! * [`ChatAnswer`] reads a chat response, either dialect, streamed or not,
//!   into its text and token usage; an error in the status, in an HTTP 200
//!   body or in the stream becomes a typed [`ChatError`].
//! * [`QwenClient`] is the whole stack with Qwen defaults.
//!
//! # Example
//!
//! ```no_run
//! # #[tokio::main]
//! # async fn main() -> Result<(), tower_qwen::BoxError> {
//! use http_body_util::BodyExt;
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_qwen::client::{ApiKey, BaseUrl, ChatRequest, Region, SetUpstreamLayer, TransportConfig};
//!
//! let client = ServiceBuilder::new()
//!     .layer(SetUpstreamLayer::new(BaseUrl::region(Region::Singapore), ApiKey::from_env()?))
//!     .service(TransportConfig::new().build());
//! let res = client.oneshot(ChatRequest::new("qwen-plus").user("Hello").into_request()).await?;
//! println!("{}", String::from_utf8_lossy(&res.into_body().collect().await?.to_bytes()));
//! # Ok(()) }
//! ```

mod answer;
mod auth;
mod endpoint;
mod requests;
mod stack;
mod transport;

pub use answer::{ChatAnswer, ChatError};
pub use auth::{ApiKey, InvalidApiKey, SetUpstream, SetUpstreamLayer};
pub use endpoint::{BaseUrl, InvalidBaseUrl, Region, UnknownRegion};
pub use requests::{
    COMPATIBLE_CHAT, COMPATIBLE_EMBEDDING, ChatRequest, EmbeddingRequest, NATIVE_EMBEDDING,
    NATIVE_GENERATION, NATIVE_MULTIMODAL, TASKS, set_async,
};
pub use stack::{QwenClient, QwenClientBuilder, ResponseBody};
pub use transport::{HttpClient, TransportConfig};
