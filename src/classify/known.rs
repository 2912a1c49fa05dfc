//! The crate's own error types and the outcome each one carries.
//!
//! Every error type this crate returns implements [`KnownError`] beside its
//! definition (it knows its own [`Outcome`]), and is listed once in the
//! [`registry!`] below, so that the classifier recognises it wherever it
//! surfaces: as the error itself, boxed into a [`BoxError`](crate::BoxError),
//! boxed twice (`BoxError::from(Box::new(e))`), behind an `Arc`, or anywhere
//! in a `source()` chain (tower's `Buffer`, a user's wrapper).
//!
//! The tests prove the list complete: one test per listed type checks that a
//! boxed value of it is recognised with its own outcome, and one reads the
//! crate's sources and fails on any `impl Error for X` whose `X` is not
//! listed.

use std::any::Any;
use std::error::Error;

use super::Outcome;

/// An error type of this crate that knows how a caller further out should
/// read it. Implemented beside each error type; listed in the registry
/// below.
pub(crate) trait KnownError: Error + 'static {
    /// The outcome this error stands for.
    fn outcome(&self) -> Outcome;
}

/// Something a known error can be looked up in: a `dyn Error` (one link of
/// a chain) or a `dyn Any` (a service's error value of any type).
#[allow(dead_code)]
trait Probe<'a>: Copy {
    fn get<T: Error + 'static>(self) -> Option<&'a T>;
}

impl<'a> Probe<'a> for &'a (dyn Error + 'static) {
    fn get<T: Error + 'static>(self) -> Option<&'a T> {
        self.downcast_ref::<T>()
    }
}

impl<'a> Probe<'a> for &'a dyn Any {
    fn get<T: Error + 'static>(self) -> Option<&'a T> {
        self.downcast_ref::<T>()
    }
}

/// The known error behind `err` itself (not its sources).
fn known_link<'a>(err: &'a (dyn Error + 'static)) -> Option<&'a dyn KnownError> {
    lookup(err)
}

/// Lists every error type of the crate, each with its feature gate and, for
/// the tests, a sample value.
macro_rules! registry {
    ($($(#[$gate:meta])* $test:ident: $t:ty = $sample:expr;)*) => {
        /// The known error `probe` holds: one of the listed types, or one
        /// boxed or shared once more.
        #[allow(unused_variables)]
        fn lookup<'a, P: Probe<'a>>(probe: P) -> Option<&'a dyn KnownError> {
            $(
                $(#[$gate])*
                {
                    if let Some(e) = probe.get::<$t>() {
                        return Some(e);
                    }
                    if let Some(e) = probe.get::<Box<$t>>() {
                        return Some(&**e);
                    }
                    if let Some(e) = probe.get::<std::sync::Arc<$t>>() {
                        return Some(&**e);
                    }
                }
            )*
            None
        }

        /// The name of every listed type, whatever the features.
        #[cfg(test)]
        const NAMES: &[&str] = &[$(stringify!($t)),*];

        #[cfg(test)]
        mod registered {
            #[allow(unused_imports)]
            use super::*;
            $(
                $(#[$gate])*
                #[test]
                fn $test() {
                    super::tests::assert_registered($sample);
                }
            )*
        }
    };
}

registry! {
    body_error: crate::request::BodyError = crate::request::RequestInfo::parse(
        "/compatible-mode/v1/chat/completions",
        &http::HeaderMap::new(),
        Some(b"not json"),
    )
    .body_error
    .unwrap();
    #[cfg(feature = "rate-limit")]
    rate_limited: crate::rate_limit::error::RateLimited = crate::rate_limit::error::RateLimited::new(
        std::time::Duration::from_secs(2),
        crate::rate_limit::error::Dimension::Requests,
    );
    #[cfg(feature = "rate-limit")]
    budget_exceeded: crate::rate_limit::error::BudgetExceeded = crate::rate_limit::error::BudgetExceeded::new(
        crate::rate_limit::Period::Day,
        100,
        100,
        std::time::Duration::from_secs(60),
    );
    #[cfg(feature = "rate-limit")]
    invalid_quota: crate::rate_limit::error::InvalidQuota =
        crate::rate_limit::error::InvalidQuota::new("sample");
    #[cfg(feature = "redis")]
    store_unavailable: crate::redis::error::StoreUnavailable =
        crate::redis::error::StoreUnavailable::down(std::time::Duration::from_secs(1));
    #[cfg(feature = "concurrency")]
    overloaded: crate::concurrency::error::Overloaded = crate::concurrency::error::Overloaded::queue_full();
    #[cfg(feature = "concurrency")]
    invalid_limit: crate::concurrency::error::InvalidLimit =
        crate::concurrency::error::InvalidLimit::new("sample");
    #[cfg(feature = "circuit-breaker")]
    circuit_open: crate::circuit_breaker::error::CircuitOpen = crate::circuit_breaker::error::CircuitOpen::new(
        Some(std::time::Duration::from_secs(5)),
        crate::circuit_breaker::State::Open,
    );
    #[cfg(feature = "circuit-breaker")]
    breaker_invalid_config: crate::circuit_breaker::error::InvalidConfig =
        crate::circuit_breaker::error::InvalidConfig::new("sample");
    #[cfg(feature = "pool")]
    exhausted: crate::pool::error::Exhausted =
        crate::pool::error::Exhausted::rate_limited(std::time::Duration::from_secs(1));
    #[cfg(feature = "pool")]
    pool_invalid_config: crate::pool::error::InvalidConfig =
        crate::pool::error::InvalidConfig::new("sample");
    #[cfg(feature = "timeout")]
    header_timeout: crate::timeout::error::HeaderTimeout =
        crate::timeout::error::HeaderTimeout::new(std::time::Duration::from_secs(1));
    #[cfg(feature = "timeout")]
    idle_timeout: crate::timeout::error::IdleTimeout =
        crate::timeout::error::IdleTimeout::new(std::time::Duration::from_secs(1));
    #[cfg(feature = "timeout")]
    deadline_exceeded: crate::timeout::error::DeadlineExceeded =
        crate::timeout::error::DeadlineExceeded::new(true);
    #[cfg(feature = "retry")]
    invalid_backoff: crate::retry::InvalidBackoff = crate::retry::InvalidBackoff::new("sample");
    #[cfg(feature = "retry")]
    invalid_budget: crate::retry::InvalidBudget = crate::retry::InvalidBudget::new("sample");
    #[cfg(feature = "coalesce")]
    batch_failed: crate::coalesce::error::BatchFailed = crate::coalesce::error::BatchFailed::malformed("sample");
    #[cfg(feature = "batch")]
    batch_error: crate::batch::error::BatchError = crate::batch::error::BatchError::expired();
    #[cfg(feature = "client")]
    invalid_api_key: crate::client::InvalidApiKey = crate::client::InvalidApiKey::not_set();
    #[cfg(feature = "client")]
    unknown_region: crate::client::UnknownRegion = "mars".parse::<crate::client::Region>().unwrap_err();
    #[cfg(feature = "client")]
    chat_error: crate::client::ChatError = crate::client::ChatError::sample();
    #[cfg(feature = "client")]
    invalid_base_url: crate::client::InvalidBaseUrl = crate::client::InvalidBaseUrl::new("sample");
    #[cfg(feature = "gateway")]
    upstream_busy: crate::gateway::error::UpstreamBusy = crate::gateway::error::UpstreamBusy {
        retry_after: std::time::Duration::from_secs(1),
        tokens: false,
        headers: http::HeaderMap::new(),
    };
    #[cfg(feature = "gateway")]
    gateway_config_error: crate::gateway::error::ConfigError =
        crate::gateway::error::ConfigError::one("sample", "sample");
    #[cfg(feature = "gateway")]
    gateway_limits_unavailable: crate::gateway::error::LimitsUnavailable =
        crate::gateway::error::LimitsUnavailable { retry_after: std::time::Duration::from_secs(1) };
    #[cfg(feature = "gateway")]
    gateway_refused: crate::gateway::error::Refused = crate::gateway::error::Refused {
        refusal: crate::gateway::error::sample_refusal(),
        message: None,
    };
    #[cfg(feature = "gateway")]
    gateway_failed: crate::gateway::error::Failed = crate::gateway::error::Failed {
        info: std::sync::Arc::default(),
        source: std::sync::Arc::new(crate::gateway::error::LimitsUnavailable { retry_after: std::time::Duration::from_secs(1) }),
    };
}

/// The links of an error's `source()` chain, from the error itself.
fn chain<'a>(err: &'a (dyn Error + 'static)) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    std::iter::successors(Some(err), |e: &&'a (dyn Error + 'static)| (*e).source())
}

/// `err` seen as a `dyn Error`, when it is one of the shapes errors travel
/// in: a [`BoxError`](crate::BoxError) (or one boxed again), another boxed
/// or shared (`Arc`) `dyn Error`, an I/O error, or one of this crate's errors.
fn as_dyn<E: 'static>(err: &E) -> Option<&(dyn Error + 'static)> {
    let any = err as &dyn Any;
    if let Some(boxed) = any.downcast_ref::<crate::BoxError>() {
        return Some(&**boxed);
    }
    if let Some(boxed) = any.downcast_ref::<Box<crate::BoxError>>() {
        return Some(&***boxed);
    }
    if let Some(boxed) = any.downcast_ref::<Box<dyn Error + Send + 'static>>() {
        return Some(&**boxed);
    }
    if let Some(boxed) = any.downcast_ref::<Box<dyn Error + 'static>>() {
        return Some(&**boxed);
    }
    if let Some(shared) = any.downcast_ref::<std::sync::Arc<dyn Error + Send + Sync + 'static>>() {
        return Some(&**shared);
    }
    if let Some(e) = any.downcast_ref::<std::io::Error>() {
        return Some(e);
    }
    lookup(any).map(|k| k as &(dyn Error + 'static))
}

/// The outcome of an error value of any type: at the first link of its
/// `source()` chain that `user` or this crate recognises (this crate's own
/// errors, bare, boxed once or twice or shared; I/O errors are transient).
/// `None` when no link is recognised.
pub(crate) fn outcome_of<E: 'static>(
    err: &E,
    user: &dyn Fn(&(dyn Error + 'static)) -> Option<Outcome>,
) -> Option<Outcome> {
    chain(as_dyn(err)?).find_map(|e| {
        user(e)
            .or_else(|| e.is::<std::io::Error>().then_some(Outcome::TRANSIENT))
            .or_else(|| known_link(e).map(KnownError::outcome))
    })
}

/// Whether `err` (of any type, boxed or not, anywhere in its chain) says a
/// circuit refused the call: the breaker's `CircuitOpen`, or a pool whose
/// every account's circuit is open. Nothing was sent upstream.
#[cfg_attr(not(feature = "fallback"), allow(dead_code))]
pub(crate) fn is_circuit_open<E: 'static>(err: &E) -> bool {
    let Some(err) = as_dyn(err) else {
        return false;
    };
    chain(err).any(|e| {
        let Some(k) = known_link(e) else {
            return false;
        };
        let k: &(dyn Error + 'static) = k;
        #[cfg(feature = "circuit-breaker")]
        if k.is::<crate::circuit_breaker::error::CircuitOpen>() {
            return true;
        }
        #[cfg(feature = "pool")]
        if k.downcast_ref::<crate::pool::error::Exhausted>()
            .is_some_and(|x| x.is_circuit_open())
        {
            return true;
        }
        let _ = k;
        false
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BoxError;

    /// A wrapper in the style of tower's `Buffer` error: the real error is
    /// its `source()`.
    #[derive(Debug)]
    struct Wrapped(BoxError);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("wrapped")
        }
    }

    impl Error for Wrapped {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            Some(&*self.0)
        }
    }

    fn none(_: &(dyn Error + 'static)) -> Option<Outcome> {
        None
    }

    /// `e` is recognised with its own outcome however it is wrapped.
    pub(super) fn assert_registered<T: KnownError + Clone + Send + Sync>(e: T) {
        let own = e.outcome();
        let name = std::any::type_name::<T>();
        assert_eq!(outcome_of(&e, &none), Some(own), "{name} bare");
        let boxed: BoxError = Box::new(e.clone());
        assert_eq!(outcome_of(&boxed, &none), Some(own), "{name} boxed");
        let twice = BoxError::from(Box::new(e.clone()));
        assert_eq!(outcome_of(&twice, &none), Some(own), "{name} boxed twice");
        let nested: Box<BoxError> = Box::new(Box::new(e.clone()));
        assert_eq!(
            outcome_of(&nested, &none),
            Some(own),
            "{name} in a Box<BoxError>"
        );
        let shared: BoxError = Box::new(std::sync::Arc::new(e.clone()));
        assert_eq!(outcome_of(&shared, &none), Some(own), "{name} in an Arc");
        let wrapped: BoxError = Box::new(Wrapped(Box::new(e)));
        assert_eq!(outcome_of(&wrapped, &none), Some(own), "{name} as a source");
    }

    /// Every `impl Error for X` in the crate's sources names a type of the
    /// registry, so a new error type cannot be forgotten.
    #[test]
    fn every_error_type_of_the_crate_is_registered() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut found = Vec::new();
        let mut dirs = vec![root];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|x| x == "rs") && !path.ends_with("tests.rs")
                {
                    let text = std::fs::read_to_string(&path).unwrap();
                    let lines: Vec<&str> = text.lines().map(str::trim).collect();
                    for (i, line) in lines.iter().enumerate() {
                        // Test modules' own error types are not the crate's.
                        if *line == "#[cfg(test)]"
                            && lines.get(i + 1).is_some_and(|l| l.starts_with("mod "))
                        {
                            break;
                        }
                        let Some(rest) = line
                            .strip_prefix("impl std::error::Error for ")
                            .or_else(|| line.strip_prefix("impl Error for "))
                        else {
                            continue;
                        };
                        let name: String = rest
                            .chars()
                            .take_while(|c| c.is_alphanumeric() || *c == '_')
                            .collect();
                        found.push((name, path.display().to_string()));
                    }
                }
            }
        }
        assert!(
            found.len() >= 20,
            "the scan found too few error types: {found:?}"
        );
        let listed: Vec<&str> = NAMES
            .iter()
            .map(|n| n.rsplit("::").next().unwrap().trim())
            .collect();
        for (name, file) in &found {
            assert!(
                listed.contains(&name.as_str()),
                "{name} ({file}) implements Error but is not in classify/known.rs's registry"
            );
        }
    }

    #[test]
    fn unknown_errors_are_not_claimed() {
        #[derive(Debug)]
        struct Foreign;
        impl std::fmt::Display for Foreign {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("foreign")
            }
        }
        impl Error for Foreign {}
        let boxed: BoxError = Box::new(Foreign);
        assert_eq!(outcome_of(&boxed, &none), None);
        assert_eq!(outcome_of(&Foreign, &none), None);
        assert_eq!(outcome_of(&"text", &none), None);
    }

    #[cfg(feature = "circuit-breaker")]
    #[test]
    fn open_circuits_are_recognised_wherever_they_are() {
        use crate::circuit_breaker::State;
        use crate::circuit_breaker::error::CircuitOpen;
        let open = CircuitOpen::new(None, State::Open);
        assert!(is_circuit_open(&open));
        let boxed: BoxError = Box::new(open);
        assert!(is_circuit_open(&boxed));
        let wrapped: BoxError = Box::new(Wrapped(BoxError::from(Box::new(open))));
        assert!(is_circuit_open(&wrapped));
        let io: BoxError = Box::new(std::io::Error::other("x"));
        assert!(!is_circuit_open(&io));
    }

    #[cfg(feature = "pool")]
    #[test]
    fn a_pool_of_open_circuits_is_an_open_circuit() {
        use crate::pool::error::Exhausted;
        let boxed: BoxError = Box::new(Exhausted::circuit_open(None));
        assert!(is_circuit_open(&boxed));
        let boxed: BoxError = Box::new(Exhausted::rate_limited(std::time::Duration::ZERO));
        assert!(!is_circuit_open(&boxed));
    }
}
