//! The GCRA as one Redis server-side script, and its Rust calling side.
//!
//! The script mirrors [`bucket`](crate::rate_limit::bucket) operation for
//! operation: the same conformance test, the same reservation at one common
//! slot for the request and token dimensions, the same give-back, refund
//! and overrun rules, and the same pause as the in-memory feedback (without
//! the rate ramp). Each call runs atomically on the server: there is no
//! compare-and-swap loop because nothing interleaves.
//!
//! # Numbers
//!
//! Redis runs Lua 5.1, whose numbers are doubles: integers are exact below
//! 2^53. Absolute nanoseconds since 1970 do not fit, so each key stores an
//! epoch second `e` and keeps its times as nanoseconds since `e` (exact for
//! about 104 days); a key written more than a day after its epoch is
//! rebased to the current second. Grants handed to clients carry the epoch
//! they were made in, and the script shifts them when the key has been
//! rebased since. Charges, tolerances and waits sent to the script are
//! capped at 2^53 - 1 ns (104 days). Redis converts Lua numbers to strings
//! with 14 significant digits, which is exact for integers below 10^14 (27
//! hours of nanoseconds); larger values are written with
//! `string.format('%.0f')`.
//!
//! # Clock
//!
//! With [`Clock::Server`](super::Clock::Server) the script reads Redis's
//! `TIME` (allowed before writes since Redis 5 with effect replication,
//! the only mode since Redis 7), so every replica decides on one clock.
//! With [`Clock::Local`](super::Clock::Local) the caller passes `now`.
//!
//! # Layout of a key
//!
//! One hash per limiter key: `e` (epoch second), `r`/`t` (TAT of the request
//! and token buckets), `lr`/`lt` (latest slot granted to a waiter, read by
//! refunds), `p` (when the key was last paused by feedback). After every
//! write the key gets `PEXPIRE` = time until both buckets are full again,
//! plus a slack, so idle keys vanish on their own: an expired key reads as
//! full buckets, which is what it was.

use std::sync::LazyLock;

use ::redis::aio::ConnectionLike;
use ::redis::{Cmd, ErrorKind, RedisError, ServerErrorKind};

/// The largest integer a Lua number (a double) holds exactly.
pub(crate) const MAX_EXACT: u64 = (1 << 53) - 1;

/// The script. See the module docs.
pub(crate) const SOURCE: &str = r#"
-- tower-qwen: GCRA rate limit (requests and tokens) on one Redis hash.
local key = KEYS[1]
local op = ARGV[1]
local sec, nsec
if ARGV[2] == 'server' then
  local t = redis.call('TIME')
  sec = tonumber(t[1])
  nsec = tonumber(t[2]) * 1000
else
  sec = tonumber(ARGV[2])
  nsec = tonumber(ARGV[3])
end
local slack = tonumber(ARGV[4])
local A = 5

local raw = redis.call('HMGET', key, 'e', 'r', 't', 'lr', 'lt', 'p')
local e = tonumber(raw[1])
local exists = e ~= nil
if not exists then e = sec end
local st = {r = tonumber(raw[2]), t = tonumber(raw[3]), lr = tonumber(raw[4]),
            lt = tonumber(raw[5]), p = tonumber(raw[6])}
local FIELDS = {'r', 't', 'lr', 'lt', 'p'}
if sec - e > 86400 then
  local d = (sec - e) * 1e9
  for _, f in ipairs(FIELDS) do
    if st[f] then st[f] = st[f] - d end
  end
  e = sec
end
local now = (sec - e) * 1e9 + nsec
local dirty = false

local function num(i)
  return tonumber(ARGV[A + i])
end

-- Shift of a value made in epoch `ge` into the current epoch.
local function shift_of(ge)
  return (ge - e) * 1e9
end

-- Redis writes Lua numbers with 14 significant digits: exact below 1e14
-- (27 hours of nanoseconds), formatted in full above. '' reads back as nil.
local function enc(v)
  if v == nil then return '' end
  if v < 1e14 and v > -1e14 then return v end
  return string.format('%.0f', v)
end

local function save()
  redis.call('HSET', key, 'e', e, 'r', enc(st.r), 't', enc(st.t), 'lr', enc(st.lr),
             'lt', enc(st.lt), 'p', enc(st.p))
  local hi = now
  if st.r and st.r > hi then hi = st.r end
  if st.t and st.t > hi then hi = st.t end
  local ttl = math.ceil((hi - now) / 1e6) + slack
  if ttl < 1 then ttl = 1 end
  redis.call('PEXPIRE', key, ttl)
end

local function conforms(tat, x, tol)
  local m = x
  if m > tol then m = tol end
  return tat - (tol - m)
end

-- Reserves xr / xt at one common slot at most max_wait after now.
local function book(xr, tolr, xt, tolt, max_wait)
  local tr = st.r or now
  local tt = st.t or now
  local at_r, at_t = now, now
  if xr > 0 then at_r = math.max(conforms(tr, xr, tolr), now) end
  if xt > 0 then at_t = math.max(conforms(tt, xt, tolt), now) end
  local slot = math.max(at_r, at_t)
  if slot - now > max_wait then
    local dim = 1
    if at_t > at_r then dim = 2 end
    return {0, slot - now, dim}
  end
  local g = {1, slot - now, e, now, 0, 0, 0, 0, 0, 0}
  if xr > 0 then
    g[5] = 1
    g[6] = tr
    st.r = math.max(tr, slot) + xr
    g[7] = st.r
    if slot > now then st.lr = math.max(st.lr or slot, slot) end
  end
  if xt > 0 then
    g[8] = 1
    g[9] = tt
    st.t = math.max(tt, slot) + xt
    g[10] = st.t
    if slot > now then st.lt = math.max(st.lt or slot, slot) end
  end
  dirty = true
  return g
end

-- Returns up to `amount` of a grant's charge (see Bucket::refund).
local function refund(f, lf, after, charge, amount)
  local tat = st[f]
  if tat == nil then return 0 end
  if amount > charge then amount = charge end
  if amount <= 0 then return 0 end
  local new
  if tat == after then
    new = tat - amount
  else
    local later = tat - after
    if later < 0 then later = 0 end
    local horizon = now
    if st[lf] and st[lf] > horizon then horizon = st[lf] end
    new = math.max(tat - amount, horizon + later)
  end
  if new >= tat then return 0 end
  st[f] = new
  dirty = true
  return tat - new
end

-- Charges an overrun (see Bucket::charge_more). An expired key has been
-- full for at least `slack` ms: its TAT is taken as the latest it can be.
local function more(f, amount)
  if amount <= 0 then return end
  st[f] = (st[f] or (now - slack * 1e6)) + amount
  dirty = true
end

-- Refunds of a grant in both dims: (has, epoch, after/charge/amount r,
-- after/charge/amount t) from i. Returns the two refunded amounts.
local function refund_both(i)
  if num(i) ~= 1 then return 0, 0 end
  local s = shift_of(num(i + 1))
  local a = refund('r', 'lr', num(i + 2) + s, num(i + 3), num(i + 4))
  local b = refund('t', 'lt', num(i + 5) + s, num(i + 6), num(i + 7))
  return a, b
end

local reply
if op == 'b' then
  -- book: xr, tolr, xt, tolt, max_wait
  reply = book(num(0), num(1), num(2), num(3), num(4))
elseif op == 'l' then
  -- lease: the call (xr, tolr, xt, tolt, max_wait), the lease (lr, lt), then
  -- the refund of the previous lease (from 7).
  refund_both(7)
  reply = book(num(0) + num(5), num(1), num(2) + num(6), num(3), 0)
  if reply[1] == 1 then
    reply[11] = 1
  else
    reply = book(num(0), num(1), num(2), num(3), num(4))
    reply[11] = 0
  end
elseif op == 'c' then
  -- cancel (give back): epoch, has_r, before_r, after_r, has_t, before_t, after_t
  reply = {0, 0}
  if exists then
    local s = shift_of(num(0))
    if num(1) == 1 and st.r ~= nil and st.r == num(3) + s then
      st.r = num(2) + s
      reply[1] = 1
      dirty = true
    end
    if num(4) == 1 and st.t ~= nil and st.t == num(6) + s then
      st.t = num(5) + s
      reply[2] = 1
      dirty = true
    end
  end
elseif op == 'r' then
  -- reconcile: refund (from 0), then overruns r, t
  local a, b = 0, 0
  if exists then a, b = refund_both(0) end
  more('r', num(8))
  more('t', num(9))
  reply = {a, b}
elseif op == 'p' then
  -- pause (feedback): epoch, admitted slot, pause, ir, tolr, it, tolt
  local admitted = num(1) + shift_of(num(0))
  local pause = num(2)
  if st.p ~= nil and admitted <= st.p then
    reply = {0}
  else
    local delta = 0
    local function pd(tat, iv, tol)
      local empty = now + tol - math.min(iv, tol)
      return math.max(tat, empty) + pause - tat
    end
    if num(4) > 0 then delta = math.max(delta, pd(st.r or now, num(3), num(4))) end
    if num(6) > 0 then delta = math.max(delta, pd(st.t or now, num(5), num(6))) end
    if num(4) > 0 then st.r = (st.r or now) + delta end
    if num(6) > 0 then st.t = (st.t or now) + delta end
    st.p = now
    dirty = true
    reply = {1, delta}
  end
else
  return redis.error_reply('tower-qwen: unknown op')
end
if dirty then save() end
return reply
"#;

static SCRIPT: LazyLock<::redis::Script> = LazyLock::new(|| ::redis::Script::new(SOURCE));

/// The SHA-1 of the script (what `EVALSHA` takes).
pub(crate) fn sha() -> &'static str {
    SCRIPT.get_hash()
}

/// What the script takes as "now".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Now {
    /// Redis's `TIME`.
    Server,
    /// Nanoseconds since the limiter's origin.
    Local(u64),
}

/// One dimension's GCRA parameters and the charge of a call in it
/// (`charge == 0`: the call does not use this dimension).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct DimArgs {
    pub(crate) charge: u64,
    pub(crate) interval: u64,
    pub(crate) tolerance: u64,
}

/// A reservation granted by the script in one dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DimGrant {
    pub(crate) before: i64,
    pub(crate) after: i64,
    pub(crate) charge: u64,
}

/// A granted reservation: its key epoch, the slot (in the epoch's
/// nanoseconds) and the grant in each dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Grant {
    pub(crate) epoch: i64,
    pub(crate) slot: i64,
    pub(crate) req: Option<DimGrant>,
    pub(crate) tok: Option<DimGrant>,
}

/// The script's answer to a booking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Booked {
    /// Reserved: the call may go `wait` ns after the script's now.
    Granted {
        wait: u64,
        grant: Grant,
        /// Whether the lease slice was booked too (lease op only).
        leased: bool,
    },
    /// Not within `max_wait`: the earliest slot is `wait` ns away; `tokens`
    /// says the token quota is the one that refused.
    Refused { wait: u64, tokens: bool },
}

/// What to refund in one dimension of a grant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Refund {
    pub(crate) after: i64,
    pub(crate) charge: u64,
    pub(crate) amount: u64,
}

/// A malformed reply (a different script under the same SHA, or a bug).
fn bad_reply() -> RedisError {
    RedisError::from((
        ErrorKind::Parse,
        "unexpected reply from the rate limit script",
    ))
}

fn cap(x: u64) -> i64 {
    x.min(MAX_EXACT) as i64
}

/// Builds one script call: `EVALSHA sha 1 key op clock.. slack args..`.
pub(crate) struct Call {
    cmd: Cmd,
    args: Vec<i64>,
    key: String,
    op: &'static str,
    now: Now,
    slack_ms: u64,
}

impl Call {
    pub(crate) fn new(key: String, op: &'static str, now: Now, slack_ms: u64) -> Self {
        Self {
            cmd: Cmd::new(),
            args: Vec::with_capacity(16),
            key,
            op,
            now,
            slack_ms,
        }
    }

    fn arg(mut self, v: i64) -> Self {
        self.args.push(v);
        self
    }

    fn dims(self, r: DimArgs, t: DimArgs) -> Self {
        self.arg(cap(r.charge))
            .arg(cap(r.tolerance))
            .arg(cap(t.charge))
            .arg(cap(t.tolerance))
    }

    fn fill(&mut self, verb: &str, body: &str) {
        let mut cmd = ::redis::cmd(verb);
        cmd.arg(body).arg(1).arg(&self.key).arg(self.op);
        match self.now {
            Now::Server => {
                cmd.arg("server").arg(0);
            }
            Now::Local(ns) => {
                cmd.arg(ns / 1_000_000_000).arg(ns % 1_000_000_000);
            }
        }
        cmd.arg(self.slack_ms.min(MAX_EXACT));
        for a in &self.args {
            cmd.arg(*a);
        }
        self.cmd = cmd;
    }

    /// Runs the call: `EVALSHA`, and `EVAL` (which also caches the script)
    /// when the server does not know the SHA.
    pub(crate) async fn run<C: ConnectionLike>(
        mut self,
        conn: &mut C,
    ) -> Result<Vec<i64>, RedisError> {
        self.fill("EVALSHA", sha());
        match self.cmd.query_async::<Vec<i64>>(conn).await {
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                self.fill("EVAL", SOURCE);
                self.cmd.query_async(conn).await
            }
            other => other,
        }
    }

    /// `b`: reserve `r`/`t` at one slot at most `max_wait` ns away.
    pub(crate) fn book(
        key: String,
        now: Now,
        slack_ms: u64,
        r: DimArgs,
        t: DimArgs,
        max_wait: u64,
    ) -> Self {
        Self::new(key, "b", now, slack_ms)
            .dims(r, t)
            .arg(cap(max_wait))
    }

    /// `l`: book the call plus a lease slice (`lease_r`, `lease_t` ns) if
    /// both conform now, else the call alone within `max_wait`; first
    /// refund what is left of the previous lease.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn lease(
        key: String,
        now: Now,
        slack_ms: u64,
        r: DimArgs,
        t: DimArgs,
        max_wait: u64,
        lease: (u64, u64),
        prev: Option<(i64, Refund, Refund)>,
    ) -> Self {
        let c = Self::new(key, "l", now, slack_ms)
            .dims(r, t)
            .arg(cap(max_wait))
            .arg(cap(lease.0))
            .arg(cap(lease.1));
        c.refunds(prev)
    }

    fn refunds(self, prev: Option<(i64, Refund, Refund)>) -> Self {
        match prev {
            None => {
                let mut c = self;
                c.args.extend_from_slice(&[0; 8]);
                c
            }
            Some((epoch, r, t)) => self
                .arg(1)
                .arg(epoch)
                .arg(r.after)
                .arg(cap(r.charge))
                .arg(cap(r.amount))
                .arg(t.after)
                .arg(cap(t.charge))
                .arg(cap(t.amount)),
        }
    }

    /// `c`: give a grant back.
    pub(crate) fn cancel(key: String, slack_ms: u64, now: Now, g: &Grant) -> Self {
        let (hr, br, ar) = g.req.map_or((0, 0, 0), |d| (1, d.before, d.after));
        let (ht, bt, at) = g.tok.map_or((0, 0, 0), |d| (1, d.before, d.after));
        Self::new(key, "c", now, slack_ms)
            .arg(g.epoch)
            .arg(hr)
            .arg(br)
            .arg(ar)
            .arg(ht)
            .arg(bt)
            .arg(at)
    }

    /// `r`: refund part of a grant and/or charge overruns.
    pub(crate) fn reconcile(
        key: String,
        now: Now,
        slack_ms: u64,
        refund: Option<(i64, Refund, Refund)>,
        more: (u64, u64),
    ) -> Self {
        Self::new(key, "r", now, slack_ms)
            .refunds(refund)
            .arg(cap(more.0))
            .arg(cap(more.1))
    }

    /// `p`: pause the key (feedback) unless it was paused after `slot`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn pause(
        key: String,
        now: Now,
        slack_ms: u64,
        epoch: i64,
        slot: i64,
        pause: u64,
        r: DimArgs,
        t: DimArgs,
    ) -> Self {
        Self::new(key, "p", now, slack_ms)
            .arg(epoch)
            .arg(slot)
            .arg(cap(pause))
            .arg(cap(r.interval))
            .arg(cap(r.tolerance))
            .arg(cap(t.interval))
            .arg(cap(t.tolerance))
    }
}

/// Parses a `b` or `l` reply.
pub(crate) fn parse_booked(
    v: &[i64],
    r: DimArgs,
    t: DimArgs,
    lease: (u64, u64),
) -> Result<Booked, RedisError> {
    match v {
        [0, wait, dim, ..] => Ok(Booked::Refused {
            wait: u64::try_from(*wait).map_err(|_| bad_reply())?,
            tokens: *dim == 2,
        }),
        [1, wait, epoch, now, hr, br, ar, ht, bt, at, rest @ ..] => {
            let wait = u64::try_from(*wait).map_err(|_| bad_reply())?;
            let leased = rest.first() == Some(&1);
            let (lr, lt) = if leased { lease } else { (0, 0) };
            Ok(Booked::Granted {
                wait,
                leased,
                grant: Grant {
                    epoch: *epoch,
                    slot: now + wait as i64,
                    req: (*hr == 1).then_some(DimGrant {
                        before: *br,
                        after: *ar,
                        charge: cap(r.charge.saturating_add(lr)) as u64,
                    }),
                    tok: (*ht == 1).then_some(DimGrant {
                        before: *bt,
                        after: *at,
                        charge: cap(t.charge.saturating_add(lt)) as u64,
                    }),
                },
            })
        }
        _ => Err(bad_reply()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse() {
        let r = DimArgs {
            charge: 10,
            interval: 10,
            tolerance: 20,
        };
        let t = DimArgs::default();
        assert_eq!(
            parse_booked(&[0, 5, 2], r, t, (0, 0)).unwrap(),
            Booked::Refused {
                wait: 5,
                tokens: true
            }
        );
        let g = parse_booked(&[1, 3, 7, 100, 1, 90, 113, 0, 0, 0, 1], r, t, (30, 0)).unwrap();
        assert_eq!(
            g,
            Booked::Granted {
                wait: 3,
                leased: true,
                grant: Grant {
                    epoch: 7,
                    slot: 103,
                    req: Some(DimGrant {
                        before: 90,
                        after: 113,
                        charge: 40
                    }),
                    tok: None,
                }
            }
        );
        assert!(parse_booked(&[1, 3], r, t, (0, 0)).is_err());
        assert!(parse_booked(&[0, -1, 1], r, t, (0, 0)).is_err());
    }

    #[test]
    fn script_sha_is_stable() {
        assert_eq!(sha().len(), 40);
        assert!(SOURCE.contains("PEXPIRE"));
    }
}
