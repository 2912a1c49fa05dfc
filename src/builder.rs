//! [`ServiceBuilderExt`]: one method per tower-qwen layer on tower's
//! `ServiceBuilder`, in the style of tower-http.
//!
//! The methods are prefixed `qwen_` so they never collide with tower's own
//! `retry`, `timeout`, `rate_limit` and `concurrency_limit`.
//!
//! # Order
//!
//! Outermost first, as the crate docs explain: fallback → retry → circuit
//! breaker → coalesce → rate limit → concurrency → timeout → client.
//!
//! # Example
//!
//! ```
//! # #[cfg(not(all(feature = "retry", feature = "circuit-breaker", feature = "rate-limit", feature = "concurrency", feature = "timeout")))]
//! # fn main() {}
//! # #[cfg(all(feature = "retry", feature = "circuit-breaker", feature = "rate-limit", feature = "concurrency", feature = "timeout"))]
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! use std::num::NonZeroUsize;
//! use std::time::Duration;
//! use http_body_util::Full;
//! use bytes::Bytes;
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_qwen::builder::ServiceBuilderExt;
//! use tower_qwen::circuit_breaker::CircuitBreakerLayer;
//! use tower_qwen::concurrency::ConcurrencyLimitLayer;
//! use tower_qwen::key::ByAccountModel;
//! use tower_qwen::rate_limit::{QuotaTable, RateLimitLayer};
//! use tower_qwen::retry::RetryLayer;
//! use tower_qwen::timeout::TimeoutLayer;
//!
//! let svc = ServiceBuilder::new()
//!     .qwen_retry(RetryLayer::new())
//!     .qwen_circuit_breaker(CircuitBreakerLayer::new())
//!     .qwen_rate_limit(RateLimitLayer::qwen(QuotaTable::qwen(), ByAccountModel::new()))
//!     .qwen_concurrency_limit(ConcurrencyLimitLayer::new(NonZeroUsize::new(16).unwrap()))
//!     .qwen_timeout(TimeoutLayer::new().idle(Duration::from_secs(60)))
//!     .service_fn(|_req: http::Request<Full<Bytes>>| async {
//!         Ok::<_, std::convert::Infallible>(http::Response::new(String::from("{}")))
//!     });
//! let req = http::Request::post("/compatible-mode/v1/chat/completions")
//!     .body(Full::new(Bytes::from_static(br#"{"model":"qwen-plus","messages":[]}"#)))
//!     .unwrap();
//! let res = svc.oneshot(req).await.unwrap();
//! assert_eq!(res.status(), 200);
//! # }
//! ```

#[allow(unused_imports)]
use tower::ServiceBuilder;
#[allow(unused_imports)]
use tower_layer::Stack;

mod sealed {
    pub trait Sealed<T> {}
    impl<L> Sealed<L> for tower::ServiceBuilder<L> {}
}

/// Adds tower-qwen's layers to `tower::ServiceBuilder`. See the
/// [module docs](self) for an example.
///
/// This trait is sealed.
pub trait ServiceBuilderExt<L>: sealed::Sealed<L> + Sized {
    /// Adds a [retry](crate::retry) layer.
    #[cfg(feature = "retry")]
    #[cfg_attr(docsrs, doc(cfg(feature = "retry")))]
    fn qwen_retry<C>(
        self,
        layer: crate::retry::RetryLayer<C>,
    ) -> ServiceBuilder<Stack<crate::retry::RetryLayer<C>, L>>;

    /// Adds a [model fallback](crate::fallback) layer.
    #[cfg(feature = "fallback")]
    #[cfg_attr(docsrs, doc(cfg(feature = "fallback")))]
    fn qwen_fallback<C>(
        self,
        layer: crate::fallback::FallbackLayer<C>,
    ) -> ServiceBuilder<Stack<crate::fallback::FallbackLayer<C>, L>>;

    /// Adds a [circuit breaker](crate::circuit_breaker).
    #[cfg(feature = "circuit-breaker")]
    #[cfg_attr(docsrs, doc(cfg(feature = "circuit-breaker")))]
    fn qwen_circuit_breaker<C, P: crate::key::Keys>(
        self,
        layer: crate::circuit_breaker::CircuitBreakerLayer<C, P>,
    ) -> ServiceBuilder<Stack<crate::circuit_breaker::CircuitBreakerLayer<C, P>, L>>;

    /// Adds a [rate limiter](crate::rate_limit).
    #[cfg(feature = "rate-limit")]
    #[cfg_attr(docsrs, doc(cfg(feature = "rate-limit")))]
    #[allow(clippy::type_complexity)] // the layer's five parameters
    fn qwen_rate_limit<B, K, C, W, Q>(
        self,
        layer: crate::rate_limit::RateLimitLayer<B, K, C, W, Q>,
    ) -> ServiceBuilder<Stack<crate::rate_limit::RateLimitLayer<B, K, C, W, Q>, L>>;

    /// Adds a [concurrency limit](crate::concurrency).
    #[cfg(feature = "concurrency")]
    #[cfg_attr(docsrs, doc(cfg(feature = "concurrency")))]
    fn qwen_concurrency_limit<C>(
        self,
        layer: crate::concurrency::ConcurrencyLimitLayer<C>,
    ) -> ServiceBuilder<Stack<crate::concurrency::ConcurrencyLimitLayer<C>, L>>;

    /// Adds the [timeouts](crate::timeout).
    #[cfg(feature = "timeout")]
    #[cfg_attr(docsrs, doc(cfg(feature = "timeout")))]
    fn qwen_timeout(
        self,
        layer: crate::timeout::TimeoutLayer,
    ) -> ServiceBuilder<Stack<crate::timeout::TimeoutLayer, L>>;

    /// Adds [embedding request merging](crate::coalesce).
    #[cfg(feature = "coalesce")]
    #[cfg_attr(docsrs, doc(cfg(feature = "coalesce")))]
    fn qwen_coalesce(
        self,
        layer: crate::coalesce::CoalesceLayer,
    ) -> ServiceBuilder<Stack<crate::coalesce::CoalesceLayer, L>>;
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    #[cfg(feature = "retry")]
    fn qwen_retry<C>(
        self,
        layer: crate::retry::RetryLayer<C>,
    ) -> ServiceBuilder<Stack<crate::retry::RetryLayer<C>, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "fallback")]
    fn qwen_fallback<C>(
        self,
        layer: crate::fallback::FallbackLayer<C>,
    ) -> ServiceBuilder<Stack<crate::fallback::FallbackLayer<C>, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "circuit-breaker")]
    fn qwen_circuit_breaker<C, P: crate::key::Keys>(
        self,
        layer: crate::circuit_breaker::CircuitBreakerLayer<C, P>,
    ) -> ServiceBuilder<Stack<crate::circuit_breaker::CircuitBreakerLayer<C, P>, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "rate-limit")]
    #[allow(clippy::type_complexity)]
    fn qwen_rate_limit<B, K, C, W, Q>(
        self,
        layer: crate::rate_limit::RateLimitLayer<B, K, C, W, Q>,
    ) -> ServiceBuilder<Stack<crate::rate_limit::RateLimitLayer<B, K, C, W, Q>, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "concurrency")]
    fn qwen_concurrency_limit<C>(
        self,
        layer: crate::concurrency::ConcurrencyLimitLayer<C>,
    ) -> ServiceBuilder<Stack<crate::concurrency::ConcurrencyLimitLayer<C>, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "timeout")]
    fn qwen_timeout(
        self,
        layer: crate::timeout::TimeoutLayer,
    ) -> ServiceBuilder<Stack<crate::timeout::TimeoutLayer, L>> {
        self.layer(layer)
    }

    #[cfg(feature = "coalesce")]
    fn qwen_coalesce(
        self,
        layer: crate::coalesce::CoalesceLayer,
    ) -> ServiceBuilder<Stack<crate::coalesce::CoalesceLayer, L>> {
        self.layer(layer)
    }
}
