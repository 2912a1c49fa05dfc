//! The quota algorithm: per-second buckets over a sliding minute. Pure: the
//! current second is an argument.

use super::config::{BurstGuard, Quota};

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Throttle {
    /// RPM or RPS: `Throttling.RateQuota`.
    Requests,
    /// TPM or TPS: `Throttling.AllocationQuota`.
    Tokens,
    /// The burst guard: `Throttling.BurstRate`.
    Burst,
}

const SLOTS: usize = 60;

/// Admitted requests and charged tokens of one (account, model), in one
/// bucket per second for the last 60 seconds.
#[derive(Clone, Debug)]
pub(crate) struct Window {
    sec: [u64; SLOTS],
    reqs: [u64; SLOTS],
    tokens: [u64; SLOTS],
    last: u64,
}

impl Default for Window {
    fn default() -> Self {
        Self {
            sec: [u64::MAX; SLOTS],
            reqs: [0; SLOTS],
            tokens: [0; SLOTS],
            last: 0,
        }
    }
}

impl Window {
    /// The bucket of second `s`, if it still holds that second.
    fn at(&self, s: u64) -> (u64, u64) {
        let i = (s % SLOTS as u64) as usize;
        if self.sec[i] == s {
            (self.reqs[i], self.tokens[i])
        } else {
            (0, 0)
        }
    }

    /// Sums of the seconds `now - 59 ..= now`.
    fn minute(&self, now: u64) -> (u64, u64) {
        let lo = now.saturating_sub(SLOTS as u64 - 1);
        let (mut r, mut t) = (0, 0);
        for i in 0..SLOTS {
            let s = self.sec[i];
            if s != u64::MAX && s >= lo && s <= now {
                r += self.reqs[i];
                t += self.tokens[i];
            }
        }
        (r, t)
    }

    /// The last second anything was admitted in.
    pub(crate) fn last_second(&self) -> u64 {
        self.last
    }

    /// Admits one request costing `tokens` in second `now`, or says why not.
    ///
    /// A window refuses once its limit is **already reached**: a request is
    /// admitted while the window holds fewer requests / tokens than the
    /// limit, and its own tokens may take the window past the limit (the
    /// token charge is known only as the request is served, as on
    /// DashScope). Refused requests charge nothing.
    ///
    /// Order: RPS, RPM (`Requests`), burst guard (`Burst`), TPS, TPM
    /// (`Tokens`).
    pub(crate) fn try_admit(
        &mut self,
        now: u64,
        tokens: u64,
        quota: &Quota,
        burst: Option<&BurstGuard>,
    ) -> Result<(), Throttle> {
        let (cur_reqs, cur_tokens) = self.at(now);
        let need_minute = quota.rpm().is_some() || quota.tpm().is_some();
        let (min_reqs, min_tokens) = if need_minute {
            self.minute(now)
        } else {
            (0, 0)
        };
        if quota.rps().is_some_and(|l| cur_reqs >= l)
            || quota.rpm().is_some_and(|l| min_reqs >= u64::from(l.get()))
        {
            return Err(Throttle::Requests);
        }
        if let Some(b) = burst {
            let n = u64::from(b.window);
            let prev: u64 = (1..=n)
                .filter_map(|k| now.checked_sub(k))
                .map(|s| self.at(s).0)
                .sum();
            let avg = prev as f64 / n as f64;
            let limit = u64::from(b.floor).max((b.factor * avg).ceil() as u64);
            if cur_reqs >= limit {
                return Err(Throttle::Burst);
            }
        }
        if quota.tps().is_some_and(|l| cur_tokens >= l)
            || quota.tpm().is_some_and(|l| min_tokens >= l.get())
        {
            return Err(Throttle::Tokens);
        }
        let i = (now % SLOTS as u64) as usize;
        if self.sec[i] != now {
            self.sec[i] = now;
            self.reqs[i] = 0;
            self.tokens[i] = 0;
        }
        self.reqs[i] += 1;
        self.tokens[i] = self.tokens[i].saturating_add(tokens);
        self.last = now;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::num::{NonZeroU32, NonZeroU64};

    use super::*;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    #[test]
    fn rps_is_rpm_over_sixty() {
        let q = Quota::per_minute(nz(600));
        let mut w = Window::default();
        let ok = (0..50)
            .filter(|_| w.try_admit(0, 1, &q, None).is_ok())
            .count();
        assert_eq!(ok, 10);
        assert_eq!(w.try_admit(0, 1, &q, None), Err(Throttle::Requests));
        assert!(w.try_admit(1, 1, &q, None).is_ok());
    }

    #[test]
    fn rpm_slides_over_sixty_seconds() {
        let q = Quota::per_minute(nz(60)).per_second(false);
        let mut w = Window::default();
        for _ in 0..60 {
            w.try_admit(10, 1, &q, None).unwrap();
        }
        assert_eq!(w.try_admit(10, 1, &q, None), Err(Throttle::Requests));
        assert_eq!(w.try_admit(69, 1, &q, None), Err(Throttle::Requests));
        assert!(w.try_admit(70, 1, &q, None).is_ok());
    }

    #[test]
    fn tokens_may_overshoot_by_one_request() {
        let q = Quota::tokens_per_minute(NonZeroU64::new(6000).unwrap());
        let mut w = Window::default();
        // TPS = 100: 30-token requests pass at 0, 30, 60, 90, then refused.
        let ok = (0..10)
            .filter(|_| w.try_admit(5, 30, &q, None).is_ok())
            .count();
        assert_eq!(ok, 4);
        assert_eq!(w.try_admit(5, 30, &q, None), Err(Throttle::Tokens));
        // A single request bigger than the per-second limit still passes
        // when the window is empty.
        assert!(w.try_admit(6, 1_000, &q, None).is_ok());
    }

    #[test]
    fn burst_guard_compares_with_recent_average() {
        let q = Quota::unlimited();
        let b = BurstGuard::new(nz(2), 2.0).window(2);
        let mut w = Window::default();
        let first = (0..10)
            .filter(|_| w.try_admit(0, 0, &q, Some(&b)).is_ok())
            .count();
        assert_eq!(first, 2);
        assert_eq!(w.try_admit(0, 0, &q, Some(&b)), Err(Throttle::Burst));
        // Second 1: average of seconds -1..0 is 1 -> limit max(2, 2) = 2.
        let second = (0..10)
            .filter(|_| w.try_admit(1, 0, &q, Some(&b)).is_ok())
            .count();
        assert_eq!(second, 2);
        // Second 2: average of seconds 0 and 1 is 2 -> limit 4.
        let third = (0..10)
            .filter(|_| w.try_admit(2, 0, &q, Some(&b)).is_ok())
            .count();
        assert_eq!(third, 4);
        // The rate limit is checked first.
        let q = Quota::per_minute(nz(60));
        let mut w = Window::default();
        w.try_admit(0, 0, &q, Some(&b)).unwrap();
        assert_eq!(w.try_admit(0, 0, &q, Some(&b)), Err(Throttle::Requests));
    }

    #[test]
    fn old_buckets_are_forgotten() {
        let q = Quota::per_minute(nz(60)).per_second(false);
        let mut w = Window::default();
        for _ in 0..60 {
            w.try_admit(0, 0, &q, None).unwrap();
        }
        // Exactly 60 seconds later the slot is reused.
        assert!(w.try_admit(60, 0, &q, None).is_ok());
        assert_eq!(w.last_second(), 60);
    }
}
