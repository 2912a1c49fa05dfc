//! Configuration types of the mock: quotas, the burst guard, account states,
//! faults and latency.

use std::num::{NonZeroU32, NonZeroU64};
use std::time::Duration;

use crate::util::rng::Rng;

use super::error::ApiError;

/// A rate quota for one (account, model): requests per minute and tokens per
/// minute, each also enforced per second (limit / 60, rounded up) unless
/// smoothing is turned off.
///
/// See the [module docs](super) for how admission works.
///
/// # Default
///
/// [`Quota::unlimited`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Quota {
    rpm: Option<NonZeroU32>,
    tpm: Option<NonZeroU64>,
    no_per_second: bool,
}

impl Quota {
    /// No limit at all.
    pub const fn unlimited() -> Self {
        Self {
            rpm: None,
            tpm: None,
            no_per_second: false,
        }
    }

    /// `rpm` requests and `tpm` tokens per minute.
    pub const fn new(rpm: NonZeroU32, tpm: NonZeroU64) -> Self {
        Self {
            rpm: Some(rpm),
            tpm: Some(tpm),
            no_per_second: false,
        }
    }

    /// Only a request limit: `rpm` requests per minute.
    pub const fn per_minute(rpm: NonZeroU32) -> Self {
        Self {
            rpm: Some(rpm),
            tpm: None,
            no_per_second: false,
        }
    }

    /// Only a token limit: `tpm` tokens (input + output) per minute.
    pub const fn tokens_per_minute(tpm: NonZeroU64) -> Self {
        Self {
            rpm: None,
            tpm: Some(tpm),
            no_per_second: false,
        }
    }

    /// Replaces the request limit. `None` removes it.
    pub const fn with_rpm(mut self, rpm: Option<NonZeroU32>) -> Self {
        self.rpm = rpm;
        self
    }

    /// Replaces the token limit. `None` removes it.
    pub const fn with_tpm(mut self, tpm: Option<NonZeroU64>) -> Self {
        self.tpm = tpm;
        self
    }

    /// Whether each limit is also enforced per second (RPS = ceil(RPM / 60),
    /// TPS = ceil(TPM / 60)), as DashScope does.
    ///
    /// Default is `true`.
    pub const fn per_second(mut self, enabled: bool) -> Self {
        self.no_per_second = !enabled;
        self
    }

    /// The requests-per-minute limit.
    pub const fn rpm(&self) -> Option<NonZeroU32> {
        self.rpm
    }

    /// The tokens-per-minute limit.
    pub const fn tpm(&self) -> Option<NonZeroU64> {
        self.tpm
    }

    /// The per-second request limit, `ceil(rpm / 60)`, when enforced.
    pub fn rps(&self) -> Option<u64> {
        match (self.no_per_second, self.rpm) {
            (false, Some(r)) => Some(u64::from(r.get()).div_ceil(60)),
            _ => None,
        }
    }

    /// The per-second token limit, `ceil(tpm / 60)`, when enforced.
    pub fn tps(&self) -> Option<u64> {
        match (self.no_per_second, self.tpm) {
            (false, Some(t)) => Some(t.get().div_ceil(60)),
            _ => None,
        }
    }
}

/// DashScope's dynamic "request rate increased too quickly" protection,
/// answered with `429 Throttling.BurstRate`.
///
/// A request is refused when the requests already admitted in the current
/// second reach `max(floor, ceil(factor × average))`, where `average` is the
/// mean number of requests admitted per second over the `window` seconds
/// before the current one (idle seconds count as zero). So a cold start may
/// send `floor` requests in its first second, and a warm client may grow its
/// rate by `factor` from one window to the next.
///
/// The guard is checked after the RPM/RPS limits, so a request over both
/// answers `Throttling.RateQuota`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BurstGuard {
    pub(crate) floor: u32,
    pub(crate) factor: f64,
    pub(crate) window: u32,
}

impl BurstGuard {
    /// A guard allowing `floor` requests in any second, or `factor` times the
    /// recent average when that is more. The averaging window is 5 seconds.
    pub fn new(floor: NonZeroU32, factor: f64) -> Self {
        Self {
            floor: floor.get(),
            factor: if factor.is_finite() && factor > 0.0 {
                factor
            } else {
                1.0
            },
            window: 5,
        }
    }

    /// The number of previous seconds averaged, clamped to `1..=59`.
    ///
    /// Default is 5.
    pub fn window(mut self, seconds: u32) -> Self {
        self.window = seconds.clamp(1, 59);
        self
    }
}

/// The standing of the account behind an API key. Anything but
/// [`AccountState::Active`] refuses every call of that key with the error
/// DashScope sends in that state, so a client's "never retry" cases can be
/// exercised end to end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum AccountState {
    /// Calls are served.
    #[default]
    Active,
    /// The free quota is used up: `429 Throttling.AllocationQuota` "Free
    /// allocated quota exceeded." ([`ApiError::free_allocated_quota`]).
    FreeQuotaExhausted,
    /// The free tier is used up while "use free tier only" is on:
    /// `403 AllocationQuota.FreeTierOnly` ([`ApiError::free_tier_only`]).
    FreeTierOnly,
    /// Overdue payment: `400 Arrearage` ([`ApiError::arrearage`]).
    Arrearage,
}

impl AccountState {
    pub(crate) fn error(self) -> Option<ApiError> {
        match self {
            Self::Active => None,
            Self::FreeQuotaExhausted => Some(ApiError::free_allocated_quota()),
            Self::FreeTierOnly => Some(ApiError::free_tier_only()),
            Self::Arrearage => Some(ApiError::arrearage()),
        }
    }
}

/// A random duration: fixed, uniform, or exponential.
///
/// # Default
///
/// Zero.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Dist {
    kind: DistKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Default)]
enum DistKind {
    #[default]
    Zero,
    Fixed(Duration),
    Uniform(Duration, Duration),
    Exponential(Duration),
}

impl Dist {
    /// Always zero.
    pub const ZERO: Dist = Dist {
        kind: DistKind::Zero,
    };

    /// Always `d`.
    pub const fn fixed(d: Duration) -> Self {
        Self {
            kind: DistKind::Fixed(d),
        }
    }

    /// Uniform in `[lo, hi)` (the bounds are swapped if reversed).
    pub fn uniform(lo: Duration, hi: Duration) -> Self {
        let (lo, hi) = if lo <= hi { (lo, hi) } else { (hi, lo) };
        Self {
            kind: DistKind::Uniform(lo, hi),
        }
    }

    /// Exponential with the given mean, capped at ten times the mean (a
    /// heavy tail without unbounded outliers).
    pub const fn exponential(mean: Duration) -> Self {
        Self {
            kind: DistKind::Exponential(mean),
        }
    }

    /// Draws one duration. Uses one random number unless the distribution
    /// is zero or fixed.
    pub(crate) fn sample(&self, rng: &mut impl Rng) -> Duration {
        match self.kind {
            DistKind::Zero => Duration::ZERO,
            DistKind::Fixed(d) => d,
            DistKind::Uniform(lo, hi) => lo + (hi - lo).mul_f64(rng.next_f64()),
            DistKind::Exponential(mean) => {
                let u = rng.next_f64();
                let x = -(1.0 - u).ln();
                mean.mul_f64(x.min(10.0))
            }
        }
    }

    pub(crate) fn is_zero(&self) -> bool {
        match self.kind {
            DistKind::Zero => true,
            DistKind::Fixed(d) => d.is_zero(),
            DistKind::Uniform(lo, hi) => hi.is_zero() && lo.is_zero(),
            DistKind::Exponential(m) => m.is_zero(),
        }
    }
}

/// How long answers take.
///
/// *Time to headers* is waited before the response headers (for a stream,
/// the headers and the first chunk go together). *Per token* is waited
/// before each further output token: between stream chunks, and added up
/// before a non-stream answer. A non-stream generation of `n` tokens thus
/// takes `time_to_headers + (n - 1) × per_token`, like the stream would.
///
/// # Default
///
/// No latency.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Latency {
    pub(crate) time_to_headers: Dist,
    pub(crate) per_token: Dist,
}

impl Latency {
    /// No latency.
    pub const fn none() -> Self {
        Self {
            time_to_headers: Dist::ZERO,
            per_token: Dist::ZERO,
        }
    }

    /// The delay before the response headers.
    ///
    /// Default is zero.
    pub const fn time_to_headers(mut self, d: Dist) -> Self {
        self.time_to_headers = d;
        self
    }

    /// The delay before each output token after the first.
    ///
    /// Default is zero.
    pub const fn per_token(mut self, d: Dist) -> Self {
        self.per_token = d;
        self
    }
}

/// One kind of injected failure, drawn at random by a [`FaultPlan`] or
/// given to chosen requests by a [`Script`](super::Script).
///
/// "Tokens" below are output pieces (about one token each): reasoning
/// pieces, text pieces and tool-call argument fragments, one per chunk in
/// either dialect (compatible streams also send a first role chunk, which
/// is not a piece). `after_tokens` is clamped so that the fault always
/// happens before the last piece (and so before the final chunk); 0 puts a
/// compatible stream's fault right after its role-only first chunk.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Fault {
    /// Answer with this error (status and body in the endpoint's shape)
    /// instead of serving, e.g. [`ApiError::internal_error`] (500),
    /// [`ApiError::service_unavailable`] (503),
    /// [`ApiError::gateway_timeout`] (504).
    Error(ApiError),
    /// Answer `200 OK` whose JSON body is this error: natively
    /// `{"code","message","request_id"}`, as DashScope's gateway sometimes
    /// does; on compatible endpoints the OpenAI-shaped `{"error":{..}}`.
    /// Stream requests get the same JSON body (not an event stream).
    ErrorIn200(ApiError),
    /// Drop the TCP connection (with a reset) before any response byte.
    Reset,
    /// Send the headers and part of the body, then drop the connection with
    /// a reset. Streams: after `after_tokens` tokens; non-stream: after half
    /// the body (with a `content-length` for the whole).
    ResetMidBody {
        /// Tokens sent before the reset (streams only).
        after_tokens: u32,
    },
    /// Stop sending for `duration` (`None`: forever, until the client goes
    /// away) after `after_tokens` tokens. Non-stream requests get their
    /// headers late by `duration` (or never).
    Stall {
        /// Tokens sent before the stall (streams only).
        after_tokens: u32,
        /// How long the stall lasts; `None` is forever.
        duration: Option<Duration>,
    },
    /// Streams: after `after_tokens` tokens, an error frame and the end of
    /// the stream. Native: `event:error` with `:HTTP_STATUS/<status>` and
    /// `data:{"code","message","request_id"}`; compatible:
    /// `data: {"error":{..}}` without `[DONE]`. Non-stream requests get the
    /// error as a plain error response.
    StreamError {
        /// Tokens sent before the error frame.
        after_tokens: u32,
        /// The error sent.
        error: ApiError,
    },
    /// Streams: end the body cleanly after `after_tokens` tokens, without
    /// the final chunk (no `finish_reason`, no usage tail, no `[DONE]`).
    /// Non-stream requests are served normally.
    StreamCut {
        /// Tokens sent before the cut.
        after_tokens: u32,
    },
}

/// Faults and latency for all models or for one model; deterministic for a
/// seed (see [`MockDashScopeBuilder::seed`](super::MockDashScopeBuilder::seed)).
///
/// Each admitted request draws at most one [`Fault`]: the probabilities are
/// laid end to end on `[0, 1)` in the order they were added, and whatever
/// is left over means "no fault" (probabilities past a total of 1 never
/// fire). Throttled requests draw no fault, except that a throttled native
/// stream may be answered as a `200` event stream whose first frame is the
/// `event:error` (see [`FaultPlan::throttled_stream_as_sse`]).
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use tower_qwen::mock::{ApiError, Dist, Fault, FaultPlan, Latency};
///
/// let plan = FaultPlan::new()
///     .with(Fault::Error(ApiError::service_unavailable()), 0.05)
///     .with(Fault::Stall { after_tokens: 3, duration: None }, 0.01)
///     .latency(Latency::none().time_to_headers(Dist::uniform(
///         Duration::from_millis(200),
///         Duration::from_millis(800),
///     )));
/// # let _ = plan;
/// ```
///
/// # Default
///
/// No faults, no latency.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct FaultPlan {
    pub(crate) faults: Vec<(Fault, f64)>,
    pub(crate) latency: Latency,
    pub(crate) throttled_stream_as_sse: f64,
}

impl FaultPlan {
    /// No faults, no latency.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `fault` with probability `p` (clamped to `[0, 1]`; NaN is 0).
    pub fn with(mut self, fault: Fault, p: f64) -> Self {
        self.faults.push((fault, clamp_p(p)));
        self
    }

    /// Adds 500 `InternalError`, 503 `ServiceUnavailable` and 504
    /// `GatewayTimeout` answers, each with probability `rate / 3`.
    pub fn server_errors(self, rate: f64) -> Self {
        let p = clamp_p(rate) / 3.0;
        self.with(Fault::Error(ApiError::internal_error()), p)
            .with(Fault::Error(ApiError::service_unavailable()), p)
            .with(Fault::Error(ApiError::gateway_timeout()), p)
    }

    /// Sets the latency.
    ///
    /// Default is [`Latency::none`].
    pub fn latency(mut self, latency: Latency) -> Self {
        self.latency = latency;
        self
    }

    /// The probability that a throttled **native stream** request is
    /// answered `200 OK` with an event stream whose first frame is
    /// `event:error` + `:HTTP_STATUS/429`, instead of a real 429 status.
    ///
    /// Default is 0.
    pub fn throttled_stream_as_sse(mut self, p: f64) -> Self {
        self.throttled_stream_as_sse = clamp_p(p);
        self
    }

    /// Picks the fault for one request from one uniform draw `u` in [0, 1).
    pub(crate) fn pick(&self, u: f64) -> Option<&Fault> {
        let mut acc = 0.0;
        for (fault, p) in &self.faults {
            acc += p;
            if u < acc {
                return Some(fault);
            }
        }
        None
    }
}

fn clamp_p(p: f64) -> f64 {
    if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::SeededRng;

    #[test]
    fn per_second_limits_round_up() {
        let q = Quota::new(
            NonZeroU32::new(600).unwrap(),
            NonZeroU64::new(1_000).unwrap(),
        );
        assert_eq!(q.rps(), Some(10));
        assert_eq!(q.tps(), Some(17));
        assert_eq!(q.per_second(false).rps(), None);
        assert_eq!(
            Quota::per_minute(NonZeroU32::new(1).unwrap()).rps(),
            Some(1)
        );
        assert_eq!(Quota::unlimited().rps(), None);
    }

    #[test]
    fn faults_are_laid_end_to_end() {
        let plan = FaultPlan::new()
            .with(Fault::Reset, 0.25)
            .with(Fault::StreamCut { after_tokens: 1 }, 0.5)
            .with(Fault::Reset, 2.0);
        assert_eq!(plan.pick(0.0), Some(&Fault::Reset));
        assert_eq!(plan.pick(0.3), Some(&Fault::StreamCut { after_tokens: 1 }));
        assert_eq!(plan.pick(0.8), Some(&Fault::Reset));
        assert_eq!(
            FaultPlan::new().with(Fault::Reset, f64::NAN).pick(0.0),
            None
        );
    }

    #[test]
    fn dists_stay_in_range() {
        let mut rng = SeededRng::new(3);
        let lo = Duration::from_millis(10);
        let hi = Duration::from_millis(20);
        for _ in 0..1000 {
            let d = Dist::uniform(hi, lo).sample(&mut rng);
            assert!(d >= lo && d < hi);
            let e = Dist::exponential(lo).sample(&mut rng);
            assert!(e <= lo * 10);
        }
        assert_eq!(Dist::fixed(lo).sample(&mut rng), lo);
        assert!(Dist::ZERO.is_zero());
    }
}
