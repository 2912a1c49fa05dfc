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
//!
//! # Batches
//!
//! One script call runs a batch of operations, in order, on any number of
//! keys: each key is read once (`HMGET`) and written once (`HSET` and
//! `PEXPIRE`) however many operations touch it, and the answers come back
//! together, one per operation. The [`batch`](super::batch) client sends
//! the operations that wait at the same moment in one call, so a round trip
//! carries many exact decisions. (All keys of a batch go to one Redis: a
//! Redis Cluster would need them in one hash slot.)

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use ::redis::aio::ConnectionLike;
use ::redis::{Cmd, ErrorKind, RedisError, ServerErrorKind};

/// The largest integer a Lua number (a double) holds exactly.
pub(crate) const MAX_EXACT: u64 = (1 << 53) - 1;

/// The script. See the module docs.
pub(crate) const SOURCE: &str = r#"
-- tower-qwen: GCRA rate limits (requests and tokens) on Redis hashes, a
-- batch of operations per call.
-- ARGV: clock ('server' or 'local'), slack (ms), then per operation:
--   key index, op, sec, nsec (local clock), n, then n numbers.
local server = ARGV[1] == 'server'
local ssec, snsec = 0, 0
if server then
  local t = redis.call('TIME')
  ssec = tonumber(t[1])
  snsec = tonumber(t[2]) * 1000
end
local slack = tonumber(ARGV[2])
local FIELDS = {'r', 't', 'lr', 'lt', 'p'}
local keys = {}

local function load(i, sec)
  local k = keys[i]
  if k then return k end
  local raw = redis.call('HMGET', KEYS[i], 'e', 'r', 't', 'lr', 'lt', 'p')
  local e = tonumber(raw[1])
  k = {exists = e ~= nil, e = e or sec, r = tonumber(raw[2]), t = tonumber(raw[3]),
       lr = tonumber(raw[4]), lt = tonumber(raw[5]), p = tonumber(raw[6]),
       dirty = false, now = 0}
  keys[i] = k
  return k
end

-- Redis writes Lua numbers with 14 significant digits: exact below 1e14
-- (27 hours of nanoseconds), formatted in full above. '' reads back as nil.
local function enc(v)
  if v == nil then return '' end
  if v < 1e14 and v > -1e14 then return v end
  return string.format('%.0f', v)
end

local function save(i, k)
  redis.call('HSET', KEYS[i], 'e', k.e, 'r', enc(k.r), 't', enc(k.t), 'lr', enc(k.lr),
             'lt', enc(k.lt), 'p', enc(k.p))
  local now = k.now
  local hi = now
  if k.r and k.r > hi then hi = k.r end
  if k.t and k.t > hi then hi = k.t end
  local ttl = math.ceil((hi - now) / 1e6) + slack
  if ttl < 1 then ttl = 1 end
  redis.call('PEXPIRE', KEYS[i], ttl)
end

local function conforms(tat, x, tol)
  local m = x
  if m > tol then m = tol end
  return tat - (tol - m)
end

-- What is left to repay in each bucket after now (for the caller's view).
local function debts(k, now)
  local dr, dt = 0, 0
  if k.r and k.r > now then dr = k.r - now end
  if k.t and k.t > now then dt = k.t - now end
  return dr, dt
end

-- Reserves xr / xt at one common slot at most max_wait after now, and
-- appends the answer to `out` (2 numbers): the wait, and 0 when booked
-- (the caller replays the TATs: before = the TAT, after = max(before,
-- slot) + charge), or the dimension that refused (1 requests, 2 tokens).
-- Returns whether it booked.
local function book(k, now, xr, tolr, xt, tolt, max_wait, out)
  local n = #out
  local tr = k.r or now
  local tt = k.t or now
  local at_r, at_t = now, now
  if xr > 0 then at_r = math.max(conforms(tr, xr, tolr), now) end
  if xt > 0 then at_t = math.max(conforms(tt, xt, tolt), now) end
  local slot = math.max(at_r, at_t)
  if slot - now > max_wait then
    local dim = 1
    if at_t > at_r then dim = 2 end
    out[n + 1], out[n + 2] = slot - now, dim
    return false
  end
  if xr > 0 then
    k.r = math.max(tr, slot) + xr
    if slot > now then k.lr = math.max(k.lr or slot, slot) end
  end
  if xt > 0 then
    k.t = math.max(tt, slot) + xt
    if slot > now then k.lt = math.max(k.lt or slot, slot) end
  end
  k.dirty = true
  out[n + 1], out[n + 2] = slot - now, 0
  return true
end

-- What a booking answer ends with: the key's epoch, the script's now, and
-- each bucket's TAT (an unset TAT reads as now).
local function head(k, now)
  return {k.e, now, k.r or now, k.t or now}
end

-- Appends the debts left in each bucket after now.
local function tail(k, now, out)
  local n = #out
  local dr, dt = debts(k, now)
  out[n + 1], out[n + 2] = dr, dt
  return out
end

-- Returns up to `amount` of a grant's charge (see Bucket::refund).
local function refund(k, now, f, lf, after, charge, amount)
  local tat = k[f]
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
    if k[lf] and k[lf] > horizon then horizon = k[lf] end
    new = math.max(tat - amount, horizon + later)
  end
  if new >= tat then return 0 end
  k[f] = new
  k.dirty = true
  return tat - new
end

-- Charges an overrun (see Bucket::charge_more). An expired key has been
-- full for at least `slack` ms: its TAT is taken as the latest it can be.
local function more(k, now, f, amount)
  if amount <= 0 then return end
  k[f] = (k[f] or (now - slack * 1e6)) + amount
  k.dirty = true
end

-- Shift of a value made in epoch `ge` into the key's current epoch.
local function shift_of(k, ge)
  return (ge - k.e) * 1e9
end

-- Refunds of a grant in both dims: (has, epoch, after/charge/amount r,
-- after/charge/amount t) from i of `a`. Returns the two refunded amounts.
local function refund_both(k, now, a, i)
  if a[i] ~= 1 then return 0, 0 end
  local s = shift_of(k, a[i + 1])
  local x = refund(k, now, 'r', 'lr', a[i + 2] + s, a[i + 3], a[i + 4])
  local y = refund(k, now, 't', 'lt', a[i + 5] + s, a[i + 6], a[i + 7])
  return x, y
end

local replies = {}
local pos = 3
local nargs = #ARGV
while pos <= nargs do
  local ki = tonumber(ARGV[pos])
  local op = ARGV[pos + 1]
  local sec, nsec = ssec, snsec
  if not server then
    sec = tonumber(ARGV[pos + 2])
    nsec = tonumber(ARGV[pos + 3])
  end
  local n = tonumber(ARGV[pos + 4])
  local a = {}
  for j = 0, n - 1 do a[j] = tonumber(ARGV[pos + 5 + j]) end
  pos = pos + 5 + n

  local k = load(ki, sec)
  if sec - k.e > 86400 then
    -- Rebase the key's epoch to this second (exact for ~104 days).
    local d = (sec - k.e) * 1e9
    for _, f in ipairs(FIELDS) do
      if k[f] then k[f] = k[f] - d end
    end
    k.e = sec
  end
  local now = (sec - k.e) * 1e9 + nsec
  k.now = now

  local reply
  if op == 'B' then
    -- book calls in order: tolr, tolt, max_wait, then (xr, xt) per call.
    -- Reply: epoch, now, TATs before, (wait, refused) per call, debts.
    reply = head(k, now)
    for i = 3, n - 1, 2 do
      book(k, now, a[i], a[0], a[i + 1], a[1], a[2], reply)
    end
    tail(k, now, reply)
  elseif op == 'l' then
    -- lease: the call (xr, tolr, xt, tolt, max_wait), the lease (lr, lt),
    -- then the refund of the previous lease (from 7). Reply: epoch, now,
    -- TATs before, (wait, refused), leased, debts.
    refund_both(k, now, a, 7)
    reply = head(k, now)
    if book(k, now, a[0] + a[5], a[1], a[2] + a[6], a[3], 0, reply) then
      reply[7] = 1
    else
      reply[5], reply[6] = nil, nil
      book(k, now, a[0], a[1], a[2], a[3], a[4], reply)
      reply[7] = 0
    end
    tail(k, now, reply)
  elseif op == 'c' then
    -- cancel (give back): epoch, has_r, before_r, after_r, has_t, before_t, after_t
    reply = {0, 0}
    if k.exists or k.dirty then
      local s = shift_of(k, a[0])
      if a[1] == 1 and k.r ~= nil and k.r == a[3] + s then
        k.r = a[2] + s
        reply[1] = 1
        k.dirty = true
      end
      if a[4] == 1 and k.t ~= nil and k.t == a[6] + s then
        k.t = a[5] + s
        reply[2] = 1
        k.dirty = true
      end
    end
  elseif op == 'r' then
    -- reconcile: refund (from 0), then overruns r, t
    local x, y = 0, 0
    if k.exists or k.dirty then x, y = refund_both(k, now, a, 0) end
    more(k, now, 'r', a[8])
    more(k, now, 't', a[9])
    reply = {x, y}
  elseif op == 'p' then
    -- pause (feedback): epoch, admitted slot, pause, ir, tolr, it, tolt
    local admitted = a[1] + shift_of(k, a[0])
    local pause = a[2]
    if k.p ~= nil and admitted <= k.p then
      reply = {0}
    else
      local delta = 0
      local function pd(tat, iv, tol)
        local empty = now + tol - math.min(iv, tol)
        return math.max(tat, empty) + pause - tat
      end
      if a[4] > 0 then delta = math.max(delta, pd(k.r or now, a[3], a[4])) end
      if a[6] > 0 then delta = math.max(delta, pd(k.t or now, a[5], a[6])) end
      if a[4] > 0 then k.r = (k.r or now) + delta end
      if a[6] > 0 then k.t = (k.t or now) + delta end
      k.p = now
      k.dirty = true
      reply = {1, delta}
    end
  else
    return redis.error_reply('tower-qwen: unknown op')
  end
  replies[#replies + 1] = reply
end
for i, k in pairs(keys) do
  if k.dirty then save(i, k) end
end
return replies
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
        /// What is left to repay in each bucket after the script's now.
        debts: (u64, u64),
    },
    /// Not within `max_wait`: the earliest slot is `wait` ns away; `tokens`
    /// says the token quota is the one that refused.
    Refused {
        wait: u64,
        tokens: bool,
        debts: (u64, u64),
    },
}

/// What to refund in one dimension of a grant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Refund {
    pub(crate) after: i64,
    pub(crate) charge: u64,
    pub(crate) amount: u64,
}

/// A malformed reply (a different script under the same SHA, or a bug).
pub(crate) fn bad_reply() -> RedisError {
    RedisError::from((
        ErrorKind::Parse,
        "unexpected reply from the rate limit script",
    ))
}

fn cap(x: u64) -> i64 {
    x.min(MAX_EXACT) as i64
}

/// One operation of a batch, on one Redis key.
#[derive(Clone, Debug)]
pub(crate) struct Op {
    key: Arc<str>,
    code: &'static str,
    now: Now,
    args: Vec<i64>,
}

impl Op {
    fn new(key: Arc<str>, code: &'static str, now: Now) -> Self {
        Self {
            key,
            code,
            now,
            args: Vec::with_capacity(16),
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

    /// `b`: reserve `r`/`t` at one slot at most `max_wait` ns away.
    pub(crate) fn book(key: Arc<str>, now: Now, r: DimArgs, t: DimArgs, max_wait: u64) -> Self {
        Self::new(key, "b", now).dims(r, t).arg(cap(max_wait))
    }

    /// `l`: book the call plus a lease slice (`lease_r`, `lease_t` ns) if
    /// both conform now, else the call alone within `max_wait`; first
    /// refund what is left of the previous lease.
    pub(crate) fn lease(
        key: Arc<str>,
        now: Now,
        r: DimArgs,
        t: DimArgs,
        max_wait: u64,
        lease: (u64, u64),
        prev: Option<(i64, Refund, Refund)>,
    ) -> Self {
        Self::new(key, "l", now)
            .dims(r, t)
            .arg(cap(max_wait))
            .arg(cap(lease.0))
            .arg(cap(lease.1))
            .refunds(prev)
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
    pub(crate) fn cancel(key: Arc<str>, now: Now, g: &Grant) -> Self {
        let (hr, br, ar) = g.req.map_or((0, 0, 0), |d| (1, d.before, d.after));
        let (ht, bt, at) = g.tok.map_or((0, 0, 0), |d| (1, d.before, d.after));
        Self::new(key, "c", now)
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
        key: Arc<str>,
        now: Now,
        refund: Option<(i64, Refund, Refund)>,
        more: (u64, u64),
    ) -> Self {
        Self::new(key, "r", now)
            .refunds(refund)
            .arg(cap(more.0))
            .arg(cap(more.1))
    }

    /// `p`: pause the key (feedback) unless it was paused after `slot`.
    pub(crate) fn pause(
        key: Arc<str>,
        now: Now,
        (epoch, slot): (i64, i64),
        pause: u64,
        r: DimArgs,
        t: DimArgs,
    ) -> Self {
        Self::new(key, "p", now)
            .arg(epoch)
            .arg(slot)
            .arg(cap(pause))
            .arg(cap(r.interval))
            .arg(cap(r.tolerance))
            .arg(cap(t.interval))
            .arg(cap(t.tolerance))
    }
}

/// Consecutive operations of a batch sent as one script operation: a run
/// of bookings on one key with the same tolerances, maximum wait and
/// clock (`B`), or any other operation alone.
fn groups(ops: &[Op]) -> Vec<std::ops::Range<usize>> {
    let joins = |a: &Op, b: &Op| {
        a.code == "b"
            && b.code == "b"
            && a.key == b.key
            && a.now == b.now
            && (a.args[1], a.args[3], a.args[4]) == (b.args[1], b.args[3], b.args[4])
    };
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    for i in 0..ops.len() {
        match out.last_mut() {
            Some(g) if joins(&ops[g.start], &ops[i]) => g.end = i + 1,
            _ => out.push(i..i + 1),
        }
    }
    out
}

/// Builds the script call for a batch: `EVALSHA sha nkeys keys.. clock
/// slack (key index, op, sec, nsec, n, args..)..`, bookings grouped.
fn command(
    verb: &str,
    body: &str,
    ops: &[Op],
    groups: &[std::ops::Range<usize>],
    slack_ms: u64,
) -> Cmd {
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(ops.len());
    let mut keys: Vec<&str> = Vec::new();
    for op in ops {
        index.entry(&op.key).or_insert_with(|| {
            keys.push(&op.key);
            keys.len()
        });
    }
    let mut cmd = ::redis::cmd(verb);
    cmd.arg(body).arg(keys.len());
    for k in &keys {
        cmd.arg(*k);
    }
    let server = ops.iter().all(|o| o.now == Now::Server);
    cmd.arg(if server { "server" } else { "local" })
        .arg(slack_ms.min(MAX_EXACT));
    for g in groups {
        let op = &ops[g.start];
        let (sec, nsec) = match op.now {
            Now::Server => (0, 0),
            Now::Local(ns) => (ns / 1_000_000_000, ns % 1_000_000_000),
        };
        cmd.arg(index[&*op.key]);
        if op.code == "b" {
            // tolr, tolt, max_wait, then (xr, xt) per booking.
            cmd.arg("B")
                .arg(sec)
                .arg(nsec)
                .arg(3 + 2 * g.len())
                .arg(op.args[1])
                .arg(op.args[3])
                .arg(op.args[4]);
            for o in &ops[g.clone()] {
                cmd.arg(o.args[0]).arg(o.args[2]);
            }
        } else {
            cmd.arg(op.code).arg(sec).arg(nsec).arg(op.args.len());
            for a in &op.args {
                cmd.arg(*a);
            }
        }
    }
    cmd
}

/// Runs a batch: `EVALSHA`, and `EVAL` (which also caches the script)
/// when the server does not know the SHA. One reply per operation (a
/// booking's reply is `[answer (6), leased, epoch, now, debts (2)]`).
pub(crate) async fn run<C: ConnectionLike>(
    conn: &mut C,
    ops: &[Op],
    slack_ms: u64,
) -> Result<Vec<Vec<i64>>, RedisError> {
    let groups = groups(ops);
    let replies = match command("EVALSHA", sha(), ops, &groups, slack_ms)
        .query_async::<Vec<Vec<i64>>>(conn)
        .await
    {
        Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            command("EVAL", SOURCE, ops, &groups, slack_ms)
                .query_async(conn)
                .await?
        }
        other => other?,
    };
    if replies.len() != groups.len() {
        return Err(bad_reply());
    }
    let mut out = Vec::with_capacity(ops.len());
    for (g, reply) in groups.iter().zip(replies) {
        let op = &ops[g.start];
        if op.code != "b" {
            out.push(reply);
            continue;
        }
        // Replay the bookings of the group in order: each one's TATs
        // before are the previous one's after.
        let [epoch, now, mut tr, mut tt] = reply[..4.min(reply.len())] else {
            return Err(bad_reply());
        };
        if reply.len() != 4 + 2 * g.len() + 2 {
            return Err(bad_reply());
        }
        let debts = &reply[reply.len() - 2..];
        for (o, answer) in ops[g.clone()].iter().zip(reply[4..].chunks_exact(2)) {
            let (wait, refused) = (answer[0], answer[1]);
            let mut v = vec![epoch, now, tr, tt, wait, refused, 0, debts[0], debts[1]];
            if refused == 0 {
                let slot = now.saturating_add(wait);
                if o.args[0] > 0 {
                    tr = tr.max(slot).saturating_add(o.args[0]);
                }
                if o.args[2] > 0 {
                    tt = tt.max(slot).saturating_add(o.args[2]);
                }
            }
            v.shrink_to_fit();
            out.push(v);
        }
    }
    Ok(out)
}

/// Parses a booking's reply: `[epoch, now, TAT before r, TAT before t,
/// wait, refused, leased, debt r, debt t]`, `refused` being 0 when booked
/// or the dimension that refused (1 requests, 2 tokens). The TATs after a
/// booking are replayed: `max(before, slot) + charge`, as the script does.
pub(crate) fn parse_booked(
    v: &[i64],
    r: DimArgs,
    t: DimArgs,
    lease: (u64, u64),
) -> Result<Booked, RedisError> {
    let unsigned = |d: &i64| u64::try_from(*d).map_err(|_| bad_reply());
    let [epoch, now, tr, tt, wait, refused, leased, dr, dt] = v else {
        return Err(bad_reply());
    };
    let wait = unsigned(wait)?;
    let debts = (unsigned(dr)?, unsigned(dt)?);
    if *refused != 0 {
        return Ok(Booked::Refused {
            wait,
            tokens: *refused == 2,
            debts,
        });
    }
    let leased = *leased == 1;
    let (lr, lt) = if leased { lease } else { (0, 0) };
    let slot = now.saturating_add(wait as i64);
    let grant = |before: i64, charge: u64| {
        (charge > 0).then(|| {
            let charge = cap(charge);
            DimGrant {
                before,
                after: before.max(slot).saturating_add(charge),
                charge: charge as u64,
            }
        })
    };
    Ok(Booked::Granted {
        wait,
        leased,
        debts,
        grant: Grant {
            epoch: *epoch,
            slot,
            req: grant(*tr, r.charge.saturating_add(lr)),
            tok: grant(*tt, t.charge.saturating_add(lt)),
        },
    })
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
            parse_booked(&[7, 100, 104, 100, 5, 2, 0, 4, 0], r, t, (0, 0)).unwrap(),
            Booked::Refused {
                wait: 5,
                tokens: true,
                debts: (4, 0),
            }
        );
        // Booked 3 ns away with a lease slice of 30: 90 -> max(90, 103) + 40.
        let g = parse_booked(&[7, 100, 90, 100, 3, 0, 1, 43, 0], r, t, (30, 0)).unwrap();
        assert_eq!(
            g,
            Booked::Granted {
                wait: 3,
                leased: true,
                debts: (43, 0),
                grant: Grant {
                    epoch: 7,
                    slot: 103,
                    req: Some(DimGrant {
                        before: 90,
                        after: 143,
                        charge: 40
                    }),
                    tok: None,
                }
            }
        );
        assert!(parse_booked(&[1, 3], r, t, (0, 0)).is_err());
        assert!(parse_booked(&[7, 100, 0, 0, -1, 1, 0, 0, 0], r, t, (0, 0)).is_err());
    }

    #[test]
    fn bookings_of_one_key_go_as_one_group() {
        let r = DimArgs {
            charge: 10,
            interval: 10,
            tolerance: 20,
        };
        let t = DimArgs::default();
        let ops = [
            Op::book(Arc::from("k1"), Now::Local(1_500_000_000), r, t, 0),
            Op::book(Arc::from("k1"), Now::Local(1_500_000_000), r, t, 0),
            Op::book(Arc::from("k2"), Now::Local(1_500_000_000), r, t, 0),
            Op::cancel(
                Arc::from("k1"),
                Now::Local(1_500_000_000),
                &Grant {
                    epoch: 1,
                    slot: 0,
                    req: None,
                    tok: None,
                },
            ),
            Op::book(Arc::from("k1"), Now::Local(1_500_000_000), r, t, 0),
            Op::book(Arc::from("k1"), Now::Local(1_500_000_000), r, t, 5),
        ];
        let g = groups(&ops);
        // k1 twice, k2, the cancel, k1 (a later maximum wait apart).
        assert_eq!(g, [0..2, 2..3, 3..4, 4..5, 5..6]);
        let cmd = command("EVALSHA", "sha", &ops, &g, 9);
        let args: Vec<String> = cmd
            .args_iter()
            .map(|a| match a {
                ::redis::Arg::Simple(b) => String::from_utf8_lossy(b).into_owned(),
                _ => "other".to_owned(),
            })
            .collect();
        // Two distinct keys; k1's operations point at key 1.
        assert_eq!(
            &args[..7],
            ["EVALSHA", "sha", "2", "k1", "k2", "local", "9"]
        );
        // The group: tolr, tolt, max_wait, then (xr, xt) twice.
        assert_eq!(
            &args[7..19],
            [
                "1",
                "B",
                "1",
                "500000000",
                "7",
                "20",
                "0",
                "0",
                "10",
                "0",
                "10",
                "0"
            ]
        );
        assert_eq!(&args[19..21], ["2", "B"]);
    }

    #[test]
    fn script_sha_is_stable() {
        assert_eq!(sha().len(), 40);
        assert!(SOURCE.contains("PEXPIRE"));
    }
}
