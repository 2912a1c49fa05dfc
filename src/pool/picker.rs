//! The pool's decision, kept pure: how much room an account has for one
//! call (from a rate-limit [`Snapshot`] and the account's circuit
//! [`State`]), which of two accounts is better, and the power-of-two-choices
//! pick with its fallback scan. No clock reads, no locks, no allocation.

use std::cmp::Ordering;
use std::time::Duration;

use crate::circuit_breaker::State;
use crate::rate_limit::{DimState, Snapshot};

/// What the circuit of an account allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Health {
    /// Closed (or forced closed): calls pass.
    Healthy,
    /// Open with its time up (the next call is a probe) or degraded (calls
    /// pass at a low rate): usable, but only when no healthy account can
    /// take the call now.
    Suspect,
    /// Open with time left, forced open, or half-open (its probe slots may
    /// all be taken): skipped. `retry_after` is the time until it probes,
    /// when known.
    Unavailable { retry_after: Option<Duration> },
}

impl Health {
    /// The health of a circuit in `state`; `open_remaining` is asked only
    /// for an open circuit (it reads the clock).
    pub(crate) fn of(state: State, open_remaining: impl FnOnce() -> Option<Duration>) -> Self {
        match state {
            State::Closed | State::ForcedClosed => Health::Healthy,
            State::Degraded => Health::Suspect,
            State::Open => match open_remaining() {
                Some(d) if !d.is_zero() => Health::Unavailable {
                    retry_after: Some(d),
                },
                _ => Health::Suspect,
            },
            _ => Health::Unavailable { retry_after: None },
        }
    }
}

/// Room for one call in an account's rate limits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Headroom {
    /// The call could go now; `level` in `[0, 1]` is the fuller fraction of
    /// the tighter quota, scaled by its current rate (slow start, recovery
    /// after an upstream throttle).
    Ready { level: f64 },
    /// The call would wait about this long.
    Wait(Duration),
}

impl Headroom {
    /// Full buckets (no limiter, or a key the limiter has not seen).
    pub(crate) const FULL: Headroom = Headroom::Ready { level: 1.0 };

    /// The room in `snapshot` for a call of one request and `tokens`
    /// tokens.
    ///
    /// The request quota is exact (`retry_after` is the wait for one unit).
    /// The token wait is estimated from the snapshot (a cost above the
    /// burst goes when the bucket is full; otherwise the missing tokens
    /// refill at the rate implied by `reset`): the limiter inside the
    /// account books the real slot, this only ranks accounts.
    pub(crate) fn of(snapshot: &Snapshot, tokens: u32) -> Self {
        let (mut level, mut wait) = (1.0f64, Duration::ZERO);
        if let Some(r) = &snapshot.requests {
            if r.retry_after.is_zero() {
                level = level.min(fraction(r.remaining, r.limit) * rate(r));
            } else {
                wait = wait.max(r.retry_after);
            }
        }
        if let Some(t) = &snapshot.tokens {
            let need = u64::from(tokens.max(1));
            let limit = u64::from(t.limit.max(1));
            if need > limit {
                // Admitted only when the bucket is full (no debt).
                if t.reset.is_zero() {
                    level = level.min(rate(t));
                } else {
                    wait = wait.max(t.reset);
                }
            } else if t.remaining >= need {
                level = level.min(fraction(t.remaining, t.limit) * rate(t));
            } else {
                let missing = need - t.remaining;
                let empty = limit.saturating_sub(t.remaining).max(1);
                let est = t.reset.mul_f64(missing as f64 / empty as f64);
                wait = wait.max(est.max(t.retry_after));
            }
        }
        if wait.is_zero() {
            Headroom::Ready {
                level: level.clamp(0.0, 1.0),
            }
        } else {
            Headroom::Wait(wait)
        }
    }
}

fn fraction(remaining: u64, limit: u32) -> f64 {
    if limit == 0 {
        1.0
    } else {
        (remaining as f64 / f64::from(limit)).min(1.0)
    }
}

fn rate(d: &DimState) -> f64 {
    if d.rate.is_finite() {
        d.rate.clamp(0.0, 1.0)
    } else {
        1.0
    }
}

/// How good an account is for one call. Better scores order greater:
/// ready and healthy (by level) > ready and suspect (by level) > waiting
/// and healthy (shorter first) > waiting and suspect (shorter first) >
/// unavailable.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Score {
    /// The circuit refuses calls.
    Unavailable { retry_after: Option<Duration> },
    /// The call would wait `wait` for the account's rate limit.
    Waiting { suspect: bool, wait: Duration },
    /// The call could go now.
    Ready { suspect: bool, level: f64 },
}

impl Score {
    /// The score of an account in `health` with `headroom` (asked only for
    /// an available account).
    pub(crate) fn of(health: Health, headroom: impl FnOnce() -> Headroom) -> Self {
        let suspect = match health {
            Health::Healthy => false,
            Health::Suspect => true,
            Health::Unavailable { retry_after } => return Score::Unavailable { retry_after },
        };
        match headroom() {
            Headroom::Ready { level } => Score::Ready { suspect, level },
            Headroom::Wait(wait) => Score::Waiting { suspect, wait },
        }
    }

    fn tier(&self) -> u8 {
        match self {
            Score::Unavailable { .. } => 0,
            Score::Waiting { suspect: true, .. } => 1,
            Score::Waiting { suspect: false, .. } => 2,
            Score::Ready { suspect: true, .. } => 3,
            Score::Ready { suspect: false, .. } => 4,
        }
    }

    /// Compares two scores (greater is better).
    pub(crate) fn compare(&self, other: &Score) -> Ordering {
        match self.tier().cmp(&other.tier()) {
            Ordering::Equal => {}
            o => return o,
        }
        match (self, other) {
            (Score::Ready { level: a, .. }, Score::Ready { level: b, .. }) => a.total_cmp(b),
            (Score::Waiting { wait: a, .. }, Score::Waiting { wait: b, .. }) => b.cmp(a),
            _ => Ordering::Equal,
        }
    }

    /// Whether a call could go to this account now, and it is healthy: no
    /// other account can be strictly better in kind.
    pub(crate) fn is_healthy_ready(&self) -> bool {
        matches!(self, Score::Ready { suspect: false, .. })
    }
}

/// The outcome of a pick.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Pick {
    /// Send to account `index`.
    Account { index: usize, score: Score },
    /// Every account's circuit refuses calls; the soonest probes after
    /// `retry_after`, when known.
    AllUnavailable { retry_after: Option<Duration> },
}

/// The pick of a request pinned to account `index`, whose score is
/// `score`.
pub(crate) fn pick_one(index: usize, score: Score) -> Pick {
    match score {
        Score::Unavailable { retry_after } => Pick::AllUnavailable { retry_after },
        score => Pick::Account { index, score },
    }
}

/// The two distinct indices of `n >= 2` accounts chosen by the random
/// `bits`.
#[inline]
pub(crate) fn two_of(n: usize, bits: u64) -> (usize, usize) {
    debug_assert!(n >= 2);
    let n64 = n as u64;
    let i = ((bits & 0xFFFF_FFFF) % n64) as usize;
    let step = 1 + ((bits >> 32) % (n64 - 1)) as usize;
    (i, (i + step) % n)
}

/// Picks an account among `n` (`n >= 1`): the better of two chosen at
/// random (`bits`; ties go to the first), and when that one is not healthy
/// with room now, the best of all `n` (ties to the earlier seen, starting
/// from the better of the two). `score(i)` is called at most once per
/// account.
pub(crate) fn pick(n: usize, bits: u64, mut score: impl FnMut(usize) -> Score) -> Pick {
    // The soonest probe among the unavailable accounts seen.
    let mut min_open: Option<Duration> = None;
    let mut seen = |k: usize| {
        let s = score(k);
        if let Score::Unavailable {
            retry_after: Some(d),
        } = s
        {
            min_open = Some(min_open.map_or(d, |m| m.min(d)));
        }
        s
    };
    let (mut best, mut best_score, sampled) = if n <= 1 {
        (0, seen(0), (0, 0))
    } else {
        let (i, j) = two_of(n, bits);
        let (si, sj) = (seen(i), seen(j));
        if sj.compare(&si) == Ordering::Greater {
            (j, sj, (i, j))
        } else {
            (i, si, (i, j))
        }
    };
    if n > 1 && !best_score.is_healthy_ready() {
        // Cold path: nobody in the sample can take the call now. Look at
        // every account, so that a call waits only when all of them would
        // make it wait, and then on the one that frees first.
        for k in 0..n {
            if k == sampled.0 || k == sampled.1 {
                continue;
            }
            let s = seen(k);
            if s.compare(&best_score) == Ordering::Greater {
                best = k;
                best_score = s;
            }
        }
    }
    match best_score {
        Score::Unavailable { .. } => Pick::AllUnavailable {
            retry_after: min_open,
        },
        score => Pick::Account { index: best, score },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn dim(limit: u32, remaining: u64, reset_ms: u64, retry_ms: u64, rate: f64) -> DimState {
        DimState {
            limit,
            remaining,
            reset: Duration::from_millis(reset_ms),
            retry_after: Duration::from_millis(retry_ms),
            rate,
        }
    }

    fn snap(requests: Option<DimState>, tokens: Option<DimState>) -> Snapshot {
        Snapshot {
            requests,
            tokens,
            throttles: 0,
            last_throttle: None,
        }
    }

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn health_of_states() {
        let never = || -> Option<Duration> { panic!("clock read for a non-open circuit") };
        assert_eq!(Health::of(State::Closed, never), Health::Healthy);
        assert_eq!(Health::of(State::ForcedClosed, never), Health::Healthy);
        assert_eq!(Health::of(State::Degraded, never), Health::Suspect);
        assert_eq!(
            Health::of(State::HalfOpen, never),
            Health::Unavailable { retry_after: None }
        );
        assert_eq!(
            Health::of(State::ForcedOpen, never),
            Health::Unavailable { retry_after: None }
        );
        assert_eq!(
            Health::of(State::Open, || Some(MS(300))),
            Health::Unavailable {
                retry_after: Some(MS(300))
            }
        );
        // Open, time up: the next call is a probe.
        assert_eq!(
            Health::of(State::Open, || Some(Duration::ZERO)),
            Health::Suspect
        );
    }

    #[test]
    fn headroom_of_requests() {
        let s = snap(Some(dim(10, 4, 600, 0, 1.0)), None);
        assert_eq!(Headroom::of(&s, 100), Headroom::Ready { level: 0.4 });
        let s = snap(Some(dim(10, 4, 600, 0, 0.5)), None);
        assert_eq!(Headroom::of(&s, 100), Headroom::Ready { level: 0.2 });
        let s = snap(Some(dim(1, 0, 200, 200, 1.0)), None);
        assert_eq!(Headroom::of(&s, 100), Headroom::Wait(MS(200)));
        assert_eq!(Headroom::of(&snap(None, None), 5), Headroom::FULL);
    }

    #[test]
    fn headroom_of_tokens() {
        // A cost above the burst goes only when the bucket is full.
        let s = snap(None, Some(dim(1, 1, 0, 0, 1.0)));
        assert_eq!(Headroom::of(&s, 500), Headroom::Ready { level: 1.0 });
        let s = snap(None, Some(dim(1, 0, 700, 700, 1.0)));
        assert_eq!(Headroom::of(&s, 500), Headroom::Wait(MS(700)));
        // Enough tokens now.
        let s = snap(None, Some(dim(1000, 800, 200, 0, 1.0)));
        assert_eq!(Headroom::of(&s, 500), Headroom::Ready { level: 0.8 });
        // 200 tokens missing of 1000 - 300 empty, refilled in 700 ms.
        let s = snap(None, Some(dim(1000, 300, 700, 0, 1.0)));
        assert_eq!(Headroom::of(&s, 500), Headroom::Wait(MS(200)));
        // The tighter dimension decides; waits take the longer.
        let s = snap(
            Some(dim(10, 9, 100, 0, 1.0)),
            Some(dim(1000, 100, 900, 0, 1.0)),
        );
        assert_eq!(Headroom::of(&s, 50), Headroom::Ready { level: 0.1 });
        let s = snap(
            Some(dim(1, 0, 300, 300, 1.0)),
            Some(dim(1, 0, 800, 800, 1.0)),
        );
        assert_eq!(Headroom::of(&s, 50), Headroom::Wait(MS(800)));
    }

    #[test]
    fn score_order() {
        let order = [
            Score::Unavailable { retry_after: None },
            Score::Waiting {
                suspect: true,
                wait: MS(10),
            },
            Score::Waiting {
                suspect: false,
                wait: MS(500),
            },
            Score::Waiting {
                suspect: false,
                wait: MS(10),
            },
            Score::Ready {
                suspect: true,
                level: 1.0,
            },
            Score::Ready {
                suspect: false,
                level: 0.1,
            },
            Score::Ready {
                suspect: false,
                level: 0.9,
            },
        ];
        for (a, x) in order.iter().enumerate() {
            for (b, y) in order.iter().enumerate() {
                assert_eq!(x.compare(y), a.cmp(&b), "{x:?} vs {y:?}");
            }
        }
    }

    #[test]
    fn headroom_is_only_read_when_available() {
        let s = Score::of(Health::Unavailable { retry_after: None }, || {
            panic!("read the limiter of an open circuit")
        });
        assert_eq!(s, Score::Unavailable { retry_after: None });
    }

    #[test]
    fn two_distinct() {
        for n in 2..20 {
            for bits in [0u64, 1, u64::MAX, 0x1234_5678_9abc_def0, 42 << 32 | 7] {
                let (i, j) = two_of(n, bits);
                assert!(i < n && j < n && i != j, "{n} {bits:x}");
            }
        }
    }

    fn ready(level: f64) -> Score {
        Score::Ready {
            suspect: false,
            level,
        }
    }

    #[test]
    fn single_account() {
        assert_eq!(
            pick(1, 99, |_| ready(0.5)),
            Pick::Account {
                index: 0,
                score: ready(0.5)
            }
        );
        assert_eq!(
            pick(1, 0, |_| Score::Unavailable {
                retry_after: Some(MS(5))
            }),
            Pick::AllUnavailable {
                retry_after: Some(MS(5))
            }
        );
    }

    #[test]
    fn ties_go_to_the_first_choice() {
        // bits choose (0, 1) and (1, 0).
        assert!(matches!(
            pick(2, 0, |_| ready(1.0)),
            Pick::Account { index: 0, .. }
        ));
        assert!(matches!(
            pick(2, 1, |_| ready(1.0)),
            Pick::Account { index: 1, .. }
        ));
    }

    #[test]
    fn sample_is_enough_when_healthy_and_ready() {
        let mut asked = Vec::new();
        let p = pick(5, 0, |k| {
            asked.push(k);
            ready(0.5)
        });
        assert!(matches!(p, Pick::Account { index: 0, .. }));
        assert_eq!(asked.len(), 2);
    }

    #[test]
    fn all_unavailable_reports_the_soonest() {
        let waits = [Some(MS(900)), None, Some(MS(300)), Some(MS(500))];
        let p = pick(4, 0, |k| Score::Unavailable {
            retry_after: waits[k],
        });
        assert_eq!(
            p,
            Pick::AllUnavailable {
                retry_after: Some(MS(300))
            }
        );
    }

    fn score_strategy() -> impl Strategy<Value = Score> {
        prop_oneof![
            prop::option::of(0u64..1000).prop_map(|r| Score::Unavailable {
                retry_after: r.map(MS)
            }),
            (any::<bool>(), 1u64..1000).prop_map(|(suspect, w)| Score::Waiting {
                suspect,
                wait: MS(w)
            }),
            (any::<bool>(), 0u32..=100).prop_map(|(suspect, l)| Score::Ready {
                suspect,
                level: f64::from(l) / 100.0
            }),
        ]
    }

    proptest! {
        #[test]
        fn pick_is_best_unless_a_healthy_ready_one_was_sampled(
            scores in prop::collection::vec(score_strategy(), 1..8),
            bits in any::<u64>(),
        ) {
            let mut calls = vec![0u32; scores.len()];
            let p = pick(scores.len(), bits, |k| { calls[k] += 1; scores[k] });
            prop_assert!(calls.iter().all(|&c| c <= 1));
            let any_healthy_ready = scores.iter().any(Score::is_healthy_ready);
            let best = scores.iter().max_by(|a, b| a.compare(b)).unwrap();
            match p {
                Pick::Account { index, score } => {
                    prop_assert_eq!(score, scores[index]);
                    if any_healthy_ready {
                        // Never worse in kind than the best account.
                        prop_assert!(score.is_healthy_ready());
                    } else {
                        prop_assert_eq!(score.compare(best), Ordering::Equal);
                    }
                }
                Pick::AllUnavailable { retry_after } => {
                    let all_unavailable = scores.iter().all(|s| matches!(s, Score::Unavailable { .. }));
                    prop_assert!(all_unavailable);
                    let soonest = scores.iter().filter_map(|s| match s {
                        Score::Unavailable { retry_after } => *retry_after,
                        _ => None,
                    }).min();
                    prop_assert_eq!(retry_after, soonest);
                }
            }
        }
    }
}
