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
//! capped at 2^53 - 1 ns (104 days).
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
//! One string of 56 bytes per limiter key: seven little-endian doubles
//! (Lua's `struct`), `e` (epoch second), `r`/`t` (TAT of the request and
//! token buckets), `lr`/`lt` (latest slot granted to a waiter, read by
//! refunds), `p` (when the key was last paused by feedback) and `x` (the
//! expiry last set), an unset field holding -2^53. A key lives until its
//! buckets are full again plus the slack, so idle keys vanish on their
//! own: an expired key reads as full buckets, which is what it was. With
//! the server's clock the expiry is set with room to spare (twice the
//! slack) and a write keeps it (`SET .. KEEPTTL`) while it still covers the
//! buckets plus the slack: a busy key pays for an expiry about once per
//! slack, not once per write. (A key of another type, e.g. the hash an
//! older build wrote, reads as absent and is overwritten.) Redis 6.0 or
//! later.
//!
//! # Batches
//!
//! One script call runs a batch of operations on any number of keys,
//! grouped by key (the operations of one key in the order they were
//! queued; keys are independent, so the order between keys does not
//! matter): all keys are read with one `MGET`, each key is written once
//! however many operations touch it, consecutive bookings of one key are
//! one operation (one reply head for all of them), and the answers come
//! back as one flat array of integers. The [`batch`](super::batch) client
//! sends the operations that wait at the same moment in one call, so a
//! round trip carries many exact decisions. (All keys of a batch go to one
//! Redis: a Redis Cluster would need them in one hash slot.)

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use ::redis::aio::ConnectionLike;
use ::redis::{Cmd, ErrorKind, RedisError, ServerErrorKind};

/// The largest integer a Lua number (a double) holds exactly.
pub(crate) const MAX_EXACT: u64 = (1 << 53) - 1;

/// The script. See the module docs.
pub(crate) const SOURCE: &str = r#"
-- tower-qwen: GCRA rate limits (requests and tokens), one packed string
-- per key, a batch of operations per call grouped by key.
-- ARGV: clock ('server' or 'local'), slack (ms), and the operations as
-- little-endian doubles: per key (KEYS order), the number of its
-- operations, then each: code (1 book, 2 lease, 3 cancel, 4 reconcile,
-- 5 pause), [sec, nsec when local], its arguments ('book': tolr, tolt,
-- count, then (xr, xt, max_wait) each).
-- Reply: the operations' answers, in the order sent, as doubles.
local server = ARGV[1] == 'server'
local ssec, snsec = 0, 0
if server then
  local tm = redis.call('TIME')
  ssec = tonumber(tm[1])
  snsec = tonumber(tm[2]) * 1000
end
local slack_ms = tonumber(ARGV[2])
local slack = slack_ms * 1e6
local NIL = -9007199254740992
local FMT = '<ddddddd'
local max = math.max
local spack, sunpack = struct.pack, struct.unpack
local a = {sunpack('<' .. string.rep('d', #ARGV[3] / 8), ARGV[3])}
local raws = redis.call('MGET', unpack(KEYS))
local out, o = {}, 0
local pos = 1
local e, r, t, lr, lt, p, x, now

-- The earliest time a charge conforms (see Gcra::conforms_at).
local function conforms(tat, xc, tol)
  if xc > tol then xc = tol end
  return tat - (tol - xc)
end

-- Reserves xr / xt at one common slot at most mw after now; appends the
-- wait and 0 (booked) or the dimension that refused (1 requests, 2 tokens).
local function book(xr, tolr, xt, tolt, mw)
  local tr, tt = r, t
  if tr == NIL then tr = now end
  if tt == NIL then tt = now end
  local at_r, at_t = now, now
  if xr > 0 then at_r = max(conforms(tr, xr, tolr), now) end
  if xt > 0 then at_t = max(conforms(tt, xt, tolt), now) end
  local slot = max(at_r, at_t)
  out[o + 1] = slot - now
  o = o + 2
  if slot - now > mw then
    if at_t > at_r then out[o] = 2 else out[o] = 1 end
    return false
  end
  out[o] = 0
  if xr > 0 then
    r = max(tr, slot) + xr
    if slot > now then lr = max(lr, slot) end
  end
  if xt > 0 then
    t = max(tt, slot) + xt
    if slot > now then lt = max(lt, slot) end
  end
  return true
end

-- The head of a booking answer: epoch, now, each TAT (unset reads as now).
local function head()
  out[o + 1] = e
  out[o + 2] = now
  if r == NIL then out[o + 3] = now else out[o + 3] = r end
  if t == NIL then out[o + 4] = now else out[o + 4] = t end
  o = o + 4
end

-- Its tail: what is left to repay in each bucket after now.
local function debts()
  local dr, dt = 0, 0
  if r > now then dr = r - now end
  if t > now then dt = t - now end
  out[o + 1] = dr
  out[o + 2] = dt
  o = o + 2
end

-- Returns up to `amount` of a grant's charge (see Bucket::refund); `tat`
-- and `latest` are the bucket's, `fin` where the grant's charge ends when
-- laid from its slot; returns the new TAT and what came back.
local function refund(tat, latest, fin, charge, amount)
  if tat == NIL then return tat, 0 end
  if amount > charge then amount = charge end
  if amount <= 0 then return tat, 0 end
  local later = tat - fin
  if later < 0 then later = 0 end
  local horizon = now
  if later > 0 and latest > horizon then horizon = latest end
  local new = max(tat - amount, horizon + later)
  if new >= tat then return tat, 0 end
  return new, tat - new
end

-- The TAT after giving back a grant whose `after` is the TAT (see
-- Bucket::give_back): `before`, or later when the TAT holds more than the
-- grant beyond its end `fin`, that part kept after max(now, latest).
local function give_back(tat, latest, before, fin)
  local later = tat - fin
  if later <= 0 then return before end
  local horizon = now
  if latest > horizon then horizon = latest end
  return max(before, horizon + later)
end

-- Refunds of a grant in both dims from a[i]: has, epoch, then end
-- (slot + charge), charge, amount for r and for t. Returns the two refunded amounts.
local function refund_both(i)
  if a[i] ~= 1 then return 0, 0 end
  local s = (a[i + 1] - e) * 1e9
  local gr, gt
  r, gr = refund(r, lr, a[i + 2] + s, a[i + 3], a[i + 4])
  t, gt = refund(t, lt, a[i + 5] + s, a[i + 6], a[i + 7])
  return gr, gt
end

for ki = 1, #KEYS do
  local raw = raws[ki]
  local dirty = false
  if raw and #raw == 56 then
    e, r, t, lr, lt, p, x = sunpack(FMT, raw)
  else
    e, r, t, lr, lt, p, x = nil, NIL, NIL, NIL, NIL, NIL, NIL
  end
  local nops = a[pos]
  pos = pos + 1
  for _ = 1, nops do
    local code = a[pos]
    local sec, nsec = ssec, snsec
    if server then
      pos = pos + 1
    else
      sec, nsec = a[pos + 1], a[pos + 2]
      pos = pos + 3
    end
    if e == nil then e = sec end
    if sec - e > 86400 then
      -- Rebase the key's epoch to this second (exact for ~104 days).
      local d = (sec - e) * 1e9
      if r ~= NIL then r = r - d end
      if t ~= NIL then t = t - d end
      if lr ~= NIL then lr = lr - d end
      if lt ~= NIL then lt = lt - d end
      if p ~= NIL then p = p - d end
      if x ~= NIL then x = x - d end
      e = sec
    end
    now = (sec - e) * 1e9 + nsec
    if code == 1 then
      -- A run of bookings: tolr, tolt, count, then (xr, xt, max_wait).
      -- Reply: epoch, now, TATs before, (wait, refused) each, debts.
      local tolr, tolt = a[pos], a[pos + 1]
      local last = pos + 3 * a[pos + 2]
      head()
      for j = pos + 3, last, 3 do
        book(a[j], tolr, a[j + 1], tolt, a[j + 2])
      end
      debts()
      pos = last + 3
      dirty = true
    elseif code == 2 then
      -- lease: the call (xr, tolr, xt, tolt, max_wait), the slice (sr, st),
      -- then the refund of the previous lease (8 numbers). Reply: epoch,
      -- now, TATs before, (wait, refused), leased, debts.
      local xr, tolr, xt, tolt = a[pos], a[pos + 1], a[pos + 2], a[pos + 3]
      refund_both(pos + 7)
      head()
      if book(xr + a[pos + 5], tolr, xt + a[pos + 6], tolt, 0) then
        out[o + 1] = 1
      else
        o = o - 2
        book(xr, tolr, xt, tolt, a[pos + 4])
        out[o + 1] = 0
      end
      o = o + 1
      debts()
      pos = pos + 15
      dirty = true
    elseif code == 3 then
      -- cancel (give back): epoch, refunded_r, then has, before, after,
      -- end (slot + charge) for r and for t. Reply: given back r, t.
      local s = (a[pos] - e) * 1e9
      local gr, gt = 0, 0
      local latest_r = NIL
      if a[pos + 1] == 1 then latest_r = lr end
      if a[pos + 2] == 1 and r ~= NIL and r == a[pos + 4] + s then
        r = give_back(r, latest_r, a[pos + 3] + s, a[pos + 5] + s)
        gr = 1
      end
      if a[pos + 6] == 1 and t ~= NIL and t == a[pos + 8] + s then
        t = give_back(t, lt, a[pos + 7] + s, a[pos + 9] + s)
        gt = 1
      end
      if gr + gt > 0 then dirty = true end
      out[o + 1], out[o + 2] = gr, gt
      o = o + 2
      pos = pos + 10
    elseif code == 4 then
      -- reconcile: refund (8 numbers), then overruns r, t (an unset TAT
      -- has been full for at least the slack). Reply: refunded r, t.
      local gr, gt = refund_both(pos)
      local mr, mt = a[pos + 8], a[pos + 9]
      if mr > 0 then
        if r == NIL then r = now - slack end
        r = r + mr
      end
      if mt > 0 then
        if t == NIL then t = now - slack end
        t = t + mt
      end
      if gr + gt + mr + mt > 0 then dirty = true end
      out[o + 1], out[o + 2] = gr, gt
      o = o + 2
      pos = pos + 10
    elseif code == 5 then
      -- pause (feedback): epoch, admitted slot, pause, ir, tolr, it, tolt.
      -- Reply: paused (0 or 1), the delta.
      local admitted = a[pos + 1] + (a[pos] - e) * 1e9
      if p ~= NIL and admitted <= p then
        out[o + 1], out[o + 2] = 0, 0
      else
        local pause, ir, tolr, it, tolt = a[pos + 2], a[pos + 3], a[pos + 4], a[pos + 5], a[pos + 6]
        local tr, tt = r, t
        if tr == NIL then tr = now end
        if tt == NIL then tt = now end
        local delta = 0
        if tolr > 0 then
          delta = max(delta, max(tr, now + tolr - math.min(ir, tolr)) + pause - tr)
        end
        if tolt > 0 then
          delta = max(delta, max(tt, now + tolt - math.min(it, tolt)) + pause - tt)
        end
        if tolr > 0 then r = tr + delta end
        if tolt > 0 then t = tt + delta end
        p = now
        dirty = true
        out[o + 1], out[o + 2] = 1, delta
      end
      o = o + 2
      pos = pos + 7
    else
      return redis.error_reply('tower-qwen: unknown op')
    end
  end
  if dirty then
    local hi = now
    if r > hi then hi = r end
    if t > hi then hi = t end
    if server and x ~= NIL and x >= hi + slack then
      redis.call('SET', KEYS[ki], spack(FMT, e, r, t, lr, lt, p, x), 'KEEPTTL')
    else
      local ttl = math.ceil((hi - now) / 1e6) + slack_ms
      if server then ttl = ttl + slack_ms end
      if ttl < 1 then ttl = 1 end
      x = now + ttl * 1e6
      redis.call('SET', KEYS[ki], spack(FMT, e, r, t, lr, lt, p, x), 'PX', ttl)
    end
  end
end
return spack('<' .. string.rep('d', o), unpack(out, 1, o))
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
    /// Where the grant's charge ends when laid from its slot (what the
    /// script counts later charges from; see `Bucket::refund`).
    pub(crate) end: i64,
    pub(crate) charge: u64,
    pub(crate) amount: u64,
}

impl Refund {
    /// Up to `amount` of `d`'s charge, `d` granted at `slot`.
    pub(crate) fn of(slot: i64, d: &DimGrant, amount: u64) -> Self {
        Self {
            end: slot.saturating_add(cap(d.charge)),
            charge: d.charge,
            amount: amount.min(d.charge),
        }
    }
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

/// The most arguments of one operation (a lease: 15).
const MAX_ARGS: usize = 15;

/// The script's operation codes.
const BOOK: u8 = 1;
const LEASE: u8 = 2;
const CANCEL: u8 = 3;
const RECONCILE: u8 = 4;
const PAUSE: u8 = 5;

/// One operation of a batch, on one Redis key.
#[derive(Clone, Debug)]
pub(crate) struct Op {
    key: Arc<str>,
    code: u8,
    now: Now,
    args: [i64; MAX_ARGS],
    len: u8,
}

impl Op {
    fn new(key: Arc<str>, code: u8, now: Now) -> Self {
        Self {
            key,
            code,
            now,
            args: [0; MAX_ARGS],
            len: 0,
        }
    }

    fn arg(mut self, v: i64) -> Self {
        self.args[usize::from(self.len)] = v;
        self.len += 1;
        self
    }

    fn args(&self) -> &[i64] {
        &self.args[..usize::from(self.len)]
    }

    fn dims(self, r: DimArgs, t: DimArgs) -> Self {
        self.arg(cap(r.charge))
            .arg(cap(r.tolerance))
            .arg(cap(t.charge))
            .arg(cap(t.tolerance))
    }

    /// `b`: reserve `r`/`t` at one slot at most `max_wait` ns away.
    pub(crate) fn book(key: Arc<str>, now: Now, r: DimArgs, t: DimArgs, max_wait: u64) -> Self {
        Self::new(key, BOOK, now).dims(r, t).arg(cap(max_wait))
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
        Self::new(key, LEASE, now)
            .dims(r, t)
            .arg(cap(max_wait))
            .arg(cap(lease.0))
            .arg(cap(lease.1))
            .refunds(prev)
    }

    fn refunds(self, prev: Option<(i64, Refund, Refund)>) -> Self {
        match prev {
            None => (0..8).fold(self, |op, _| op.arg(0)),
            Some((epoch, r, t)) => self
                .arg(1)
                .arg(epoch)
                .arg(r.end)
                .arg(cap(r.charge))
                .arg(cap(r.amount))
                .arg(t.end)
                .arg(cap(t.charge))
                .arg(cap(t.amount)),
        }
    }

    /// `c`: give a grant back. Each dimension sends where its charge ends
    /// laid from the slot (see `Bucket::give_back`); `refunded_r` says
    /// whether request buckets are ever refunded (leases): if not, the
    /// request give-back reads no latest slot, as the in-memory one.
    pub(crate) fn cancel(key: Arc<str>, now: Now, g: &Grant, refunded_r: bool) -> Self {
        let dim = |d: Option<DimGrant>| {
            d.map_or((0, 0, 0, 0), |d| {
                (1, d.before, d.after, g.slot.saturating_add(cap(d.charge)))
            })
        };
        let (hr, br, ar, er) = dim(g.req);
        let (ht, bt, at, et) = dim(g.tok);
        Self::new(key, CANCEL, now)
            .arg(g.epoch)
            .arg(i64::from(refunded_r))
            .arg(hr)
            .arg(br)
            .arg(ar)
            .arg(er)
            .arg(ht)
            .arg(bt)
            .arg(at)
            .arg(et)
    }

    /// `r`: refund part of a grant and/or charge overruns.
    pub(crate) fn reconcile(
        key: Arc<str>,
        now: Now,
        refund: Option<(i64, Refund, Refund)>,
        more: (u64, u64),
    ) -> Self {
        Self::new(key, RECONCILE, now)
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
        Self::new(key, PAUSE, now)
            .arg(epoch)
            .arg(slot)
            .arg(cap(pause))
            .arg(cap(r.interval))
            .arg(cap(r.tolerance))
            .arg(cap(t.interval))
            .arg(cap(t.tolerance))
    }

    /// Whether `next` (a later operation of the same key) joins this
    /// booking's run: both bookings, at the same instant, with the same
    /// tolerances.
    fn joins(&self, next: &Op) -> bool {
        self.code == BOOK
            && next.code == BOOK
            && self.now == next.now
            && (self.args[1], self.args[3]) == (next.args[1], next.args[3])
    }

    /// How many numbers the script answers for this operation alone (a
    /// run of `n` bookings answers `6 + 2n`).
    fn reply_len(&self) -> usize {
        if self.code == LEASE { 9 } else { 2 }
    }
}

/// What one script call carries: the keys in order, and per key the
/// operations sent as one script operation each (a run of bookings, or any
/// other operation alone), as index ranges into `order`.
#[derive(Debug, PartialEq, Eq)]
struct Plan<'a> {
    keys: Vec<&'a str>,
    /// The operations' indexes, grouped by key (in the order keys first
    /// appear), each key's in the order they were queued.
    order: Vec<usize>,
    /// Per key, its script operations: ranges of `order`.
    units: Vec<Vec<std::ops::Range<usize>>>,
}

fn plan(ops: &[Op]) -> Plan<'_> {
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(ops.len());
    let mut keys: Vec<&str> = Vec::new();
    let mut of_key: Vec<Vec<usize>> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let k = *index.entry(&op.key).or_insert_with(|| {
            keys.push(&op.key);
            of_key.push(Vec::new());
            keys.len() - 1
        });
        of_key[k].push(i);
    }
    let mut order = Vec::with_capacity(ops.len());
    let mut units = Vec::with_capacity(keys.len());
    for list in of_key {
        let mut mine: Vec<std::ops::Range<usize>> = Vec::new();
        for i in list {
            let at = order.len();
            order.push(i);
            match mine.last_mut() {
                Some(u) if ops[order[u.start]].joins(&ops[i]) => u.end = at + 1,
                _ => mine.push(at..at + 1),
            }
        }
        units.push(mine);
    }
    Plan { keys, order, units }
}

/// Builds the script call for a batch: `EVALSHA sha nkeys keys.. clock
/// slack ops`, `ops` being the operations as little-endian doubles, per
/// key its operation count and operations (see the script). Doubles hold
/// every argument exactly (they are capped at 2^53 - 1), and the script
/// reads them all with one `struct.unpack` instead of parsing a string
/// each.
fn command(verb: &str, body: &str, ops: &[Op], plan: &Plan<'_>, slack_ms: u64) -> Cmd {
    let mut cmd = ::redis::cmd(verb);
    cmd.arg(body).arg(plan.keys.len());
    for k in &plan.keys {
        cmd.arg(*k);
    }
    let server = ops.iter().all(|o| o.now == Now::Server);
    cmd.arg(if server { "server" } else { "local" })
        .arg(slack_ms.min(MAX_EXACT));
    let mut blob: Vec<u8> = Vec::with_capacity(8 * (plan.keys.len() + ops.len() * 6));
    let mut put = |v: i64| blob.extend_from_slice(&(v as f64).to_le_bytes());
    for units in &plan.units {
        put(units.len() as i64);
        for u in units {
            let op = &ops[plan.order[u.start]];
            put(i64::from(op.code));
            if let Now::Local(ns) = op.now {
                put((ns / 1_000_000_000) as i64);
                put((ns % 1_000_000_000) as i64);
            }
            if op.code == BOOK {
                // tolr, tolt, count, then (xr, xt, max_wait) per booking.
                put(op.args[1]);
                put(op.args[3]);
                put(u.len() as i64);
                for &i in &plan.order[u.clone()] {
                    let a = &ops[i].args;
                    put(a[0]);
                    put(a[2]);
                    put(a[4]);
                }
            } else {
                for a in op.args() {
                    put(*a);
                }
            }
        }
    }
    cmd.arg(blob);
    cmd
}

/// Runs a batch: `EVALSHA`, and `EVAL` (which also caches the script)
/// when the server does not know the SHA. One reply per operation, in the
/// order of `ops` (a booking's reply is `[epoch, now, TAT before r, TAT
/// before t, wait, refused, 0, debt r, debt t]`, as a lease's).
pub(crate) async fn run<C: ConnectionLike>(
    conn: &mut C,
    ops: &[Op],
    slack_ms: u64,
) -> Result<Vec<Vec<i64>>, RedisError> {
    let plan = plan(ops);
    let raw = match command("EVALSHA", sha(), ops, &plan, slack_ms)
        .query_async::<Vec<u8>>(conn)
        .await
    {
        Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
            command("EVAL", SOURCE, ops, &plan, slack_ms)
                .query_async(conn)
                .await?
        }
        other => other?,
    };
    split(ops, &plan, &decode(&raw)?)
}

/// The script's answer: little-endian doubles, each an integer below 2^53.
fn decode(raw: &[u8]) -> Result<Vec<i64>, RedisError> {
    if !raw.len().is_multiple_of(8) {
        return Err(bad_reply());
    }
    raw.chunks_exact(8)
        .map(|c| {
            let v = f64::from_le_bytes(c.try_into().expect("8 bytes"));
            if v.is_finite() && v.fract() == 0.0 && v.abs() <= MAX_EXACT as f64 + 1.0 {
                Ok(v as i64)
            } else {
                Err(bad_reply())
            }
        })
        .collect()
}

/// Splits the script's flat answer into one reply per operation.
fn split(ops: &[Op], plan: &Plan<'_>, flat: &[i64]) -> Result<Vec<Vec<i64>>, RedisError> {
    let mut out = vec![Vec::new(); ops.len()];
    let mut rest = flat;
    let mut take = |n: usize| -> Result<&[i64], RedisError> {
        if rest.len() < n {
            return Err(bad_reply());
        }
        let (a, b) = rest.split_at(n);
        rest = b;
        Ok(a)
    };
    for u in plan.units.iter().flatten() {
        let first = &ops[plan.order[u.start]];
        if first.code != BOOK {
            out[plan.order[u.start]] = take(first.reply_len())?.to_vec();
            continue;
        }
        // Replay the bookings of the run in order: each one's TATs before
        // are the previous one's after.
        let reply = take(6 + 2 * u.len())?;
        let [epoch, now, mut tr, mut tt] = reply[..4] else {
            return Err(bad_reply());
        };
        let debts = &reply[reply.len() - 2..];
        for (&i, answer) in plan.order[u.clone()].iter().zip(reply[4..].chunks_exact(2)) {
            let (wait, refused) = (answer[0], answer[1]);
            out[i] = vec![epoch, now, tr, tt, wait, refused, 0, debts[0], debts[1]];
            if refused == 0 {
                let slot = now.saturating_add(wait);
                let a = &ops[i].args;
                if a[0] > 0 {
                    tr = tr.max(slot).saturating_add(a[0]);
                }
                if a[2] > 0 {
                    tt = tt.max(slot).saturating_add(a[2]);
                }
            }
        }
    }
    if !rest.is_empty() {
        return Err(bad_reply());
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
    fn operations_go_grouped_by_key_and_bookings_as_runs() {
        let r = DimArgs {
            charge: 10,
            interval: 10,
            tolerance: 20,
        };
        let t = DimArgs::default();
        let at = Now::Local(1_500_000_000);
        let ops = [
            Op::book(Arc::from("k1"), at, r, t, 0),
            Op::book(Arc::from("k2"), at, r, t, 0),
            Op::book(Arc::from("k1"), at, r, t, 7),
            Op::cancel(
                Arc::from("k1"),
                at,
                &Grant {
                    epoch: 1,
                    slot: 0,
                    req: None,
                    tok: None,
                },
                false,
            ),
            Op::book(Arc::from("k1"), at, r, t, 0),
            Op::book(Arc::from("k1"), Now::Local(1_600_000_000), r, t, 0),
        ];
        let p = plan(&ops);
        // k1's operations first (in their order), then k2's; k1's first two
        // bookings are one run (their maximum waits differ: each booking
        // carries its own), the cancel breaks the run, a booking at another
        // instant starts a new one.
        assert_eq!(p.keys, ["k1", "k2"]);
        assert_eq!(p.order, [0, 2, 3, 4, 5, 1]);
        assert_eq!(p.units[0], [0..2, 2..3, 3..4, 4..5]);
        assert_eq!(p.units[1].as_slice(), std::slice::from_ref(&(5..6)));
        let cmd = command("EVALSHA", "sha", &ops, &p, 9);
        let args: Vec<Vec<u8>> = cmd
            .args_iter()
            .map(|a| match a {
                ::redis::Arg::Simple(b) => b.to_vec(),
                _ => Vec::new(),
            })
            .collect();
        let text: Vec<String> = args[..7]
            .iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect();
        assert_eq!(text, ["EVALSHA", "sha", "2", "k1", "k2", "local", "9"]);
        let blob: Vec<i64> = args[7]
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as i64)
            .collect();
        // k1: 4 operations; the run: book, sec, nsec, tolr, tolt, count,
        // then (xr, xt, max_wait) twice; the cancel: code, sec, nsec, epoch..
        assert_eq!(
            &blob[..17],
            [
                4,
                1,
                1,
                500_000_000,
                20,
                0,
                2,
                10,
                0,
                0,
                10,
                0,
                7,
                3,
                1,
                500_000_000,
                1
            ]
        );
        assert_eq!(args.len(), 8);

        // The flat answer goes back to each operation, in the order of
        // `ops`; a run's bookings get the TATs replayed.
        let flat = [
            // k1's run: epoch, now, TATs, (wait, refused) x2, debts
            5, 100, 100, 100, 0, 0, 3, 0, 23, 0, // the cancel
            0, 0, // a run of one
            5, 100, 123, 100, 4, 1, 23, 0, // the later run
            5, 200, 123, 200, 0, 0, 33, 0, // k2
            6, 100, 100, 100, 0, 0, 10, 0,
        ];
        let raw: Vec<u8> = flat
            .iter()
            .flat_map(|v| (*v as f64).to_le_bytes())
            .collect();
        assert_eq!(decode(&raw).unwrap(), flat);
        assert!(decode(&raw[1..]).is_err());
        assert!(decode(&0.5f64.to_le_bytes()).is_err());
        let replies = split(&ops, &p, &flat).unwrap();
        assert_eq!(replies[0], [5, 100, 100, 100, 0, 0, 0, 23, 0]);
        assert_eq!(replies[2], [5, 100, 110, 100, 3, 0, 0, 23, 0]);
        assert_eq!(replies[3], [0, 0]);
        assert_eq!(replies[1], [6, 100, 100, 100, 0, 0, 0, 10, 0]);
        assert_eq!(replies[5], [5, 200, 123, 200, 0, 0, 0, 33, 0]);
        assert!(split(&ops, &p, &flat[1..]).is_err());
        assert!(split(&ops, &p, &[&flat[..], &[0]].concat()).is_err());
    }

    #[test]
    fn script_sha_is_stable() {
        assert_eq!(sha().len(), 40);
        assert!(SOURCE.contains("KEEPTTL"));
    }
}

/// Issue 19: the calling side's pure parts at their edges, so that a
/// changed operator or condition fails a test without a Redis.
#[cfg(test)]
mod edges {
    use super::*;

    fn dims(tolerance: u64, charge: u64) -> DimArgs {
        DimArgs {
            charge,
            interval: 1,
            tolerance,
        }
    }

    fn key() -> Arc<str> {
        Arc::from("k")
    }

    /// Only bookings join a run: a lease or a reconciliation beside a
    /// booking with the same numbers in the same places stays alone.
    #[test]
    fn only_bookings_join_a_run() {
        let at = Now::Local(7);
        let (r, t) = (dims(20, 10), dims(0, 0));
        let book = || Op::book(key(), at, r, t, 0);
        let lease = Op::lease(key(), at, r, t, 0, (5, 0), None);
        // A reconciliation whose arguments 1 and 3 (epoch, charge) read as
        // the booking's tolerances (20, 0).
        let refund = Refund {
            end: 0,
            charge: 0,
            amount: 0,
        };
        let reconcile = Op::reconcile(key(), at, Some((20, refund, refund)), (0, 0));
        for ops in [
            vec![book(), lease.clone()],
            vec![lease.clone(), book()],
            vec![reconcile.clone(), book()],
            vec![book(), reconcile],
        ] {
            assert_eq!(plan(&ops).units, [vec![0..1, 1..2]], "{ops:?}");
        }
        // Other tolerances: another run.
        let other = Op::book(key(), at, dims(30, 10), t, 0);
        assert_eq!(plan(&[book(), other]).units, [vec![0..1, 1..2]]);
        let other = Op::book(key(), at, r, dims(5, 1), 0);
        assert_eq!(plan(&[book(), other]).units, [vec![0..1, 1..2]]);
        // A lease answers 9 numbers, the others 2.
        assert_eq!(lease.reply_len(), 9);
        assert_eq!(
            Op::cancel(
                key(),
                at,
                &Grant {
                    epoch: 0,
                    slot: 0,
                    req: None,
                    tok: None
                },
                false
            )
            .reply_len(),
            2
        );
    }

    /// Operations on Redis's clock say so and carry no instant.
    #[test]
    fn server_clock_operations_carry_no_instant() {
        let ops = [Op::book(key(), Now::Server, dims(20, 10), dims(0, 0), 3)];
        let p = plan(&ops);
        let cmd = command("EVALSHA", "sha", &ops, &p, u64::MAX);
        let args: Vec<Vec<u8>> = cmd
            .args_iter()
            .map(|a| match a {
                ::redis::Arg::Simple(b) => b.to_vec(),
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(args[4], b"server");
        // The slack is capped at 2^53 - 1 like every number sent.
        assert_eq!(args[5], b"9007199254740991");
        let blob: Vec<i64> = args[6]
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as i64)
            .collect();
        // One operation: book, tolr, tolt, count, (xr, xt, max_wait).
        assert_eq!(blob, [1, 1, 20, 0, 1, 10, 0, 3]);
        // One operation on the local clock makes the whole call local.
        let mixed = [
            ops[0].clone(),
            Op::book(key(), Now::Local(1), dims(20, 10), dims(0, 0), 3),
        ];
        let cmd = command("EVALSHA", "sha", &mixed, &plan(&mixed), 0);
        assert!(
            cmd.args_iter()
                .any(|a| matches!(a, ::redis::Arg::Simple(b) if b == b"local"))
        );
    }

    /// Doubles decode exactly up to 2^53 and nothing else passes.
    #[test]
    fn decoding_takes_exact_integers_only() {
        let raw = |v: f64| v.to_le_bytes().to_vec();
        let top = 9_007_199_254_740_992.0; // 2^53
        assert_eq!(decode(&raw(top)).unwrap(), [1 << 53]);
        assert_eq!(decode(&raw(-top)).unwrap(), [-(1 << 53)]);
        assert_eq!(decode(&raw(top - 1.0)).unwrap(), [(1 << 53) - 1]);
        for bad in [top * 2.0, f64::INFINITY, f64::NEG_INFINITY, f64::NAN, 2.5] {
            assert!(decode(&raw(bad)).is_err(), "{bad}");
        }
        assert_eq!(decode(&[]).unwrap(), Vec::<i64>::new());
        assert!(decode(&[0; 9]).is_err());
    }

    /// A run's replay moves a TAT only for a dimension the booking
    /// charges, and not for a refused booking.
    #[test]
    fn the_replay_moves_only_charged_dimensions() {
        let at = Now::Local(0);
        let ops = [
            // Tokens only, then requests only, then both.
            Op::book(key(), at, dims(20, 0), dims(9, 4), 50),
            Op::book(key(), at, dims(20, 6), dims(9, 0), 50),
            Op::book(key(), at, dims(20, 6), dims(9, 4), 50),
            Op::book(key(), at, dims(20, 6), dims(9, 4), 50),
        ];
        let p = plan(&ops);
        assert_eq!(p.units.len(), 1);
        assert_eq!(p.units[0].as_slice(), std::slice::from_ref(&(0..4)));
        // epoch, now, TATs (r 100, t 100), answers: waits 10, 20, 30 and a
        // refusal (tokens), debts.
        let flat = [3, 100, 100, 100, 10, 0, 20, 0, 30, 0, 5, 2, 8, 9];
        let replies = split(&ops, &p, &flat).unwrap();
        // The first books tokens at 110: r stays 100, t = 114.
        assert_eq!(replies[1][2..4], [100, 114]);
        // The second books requests at 120: r = 126, t stays 114.
        assert_eq!(replies[2][2..4], [126, 114]);
        // The third at 130: r = 136, t = 134; the refusal changes nothing.
        assert_eq!(replies[3][2..6], [136, 134, 5, 2]);
        assert_eq!(replies[3][7..], [8, 9]);
        match parse_booked(&replies[3], dims(20, 6), dims(9, 4), (0, 0)).unwrap() {
            Booked::Refused {
                wait,
                tokens,
                debts,
            } => {
                assert_eq!((wait, tokens, debts), (5, true, (8, 9)));
            }
            other => panic!("{other:?}"),
        }
        // A refusal by the request quota.
        let r = parse_booked(
            &[3, 100, 0, 0, 5, 1, 0, 0, 0],
            dims(1, 1),
            dims(0, 0),
            (0, 0),
        );
        assert!(matches!(r, Ok(Booked::Refused { tokens: false, .. })));
        // Granted without the lease: its slice is not charged.
        let g = parse_booked(
            &[3, 100, 90, 0, 0, 0, 0, 0, 0],
            dims(20, 6),
            dims(0, 0),
            (7, 0),
        );
        match g.unwrap() {
            Booked::Granted { leased, grant, .. } => {
                assert!(!leased);
                assert_eq!(grant.req.unwrap().charge, 6);
                assert_eq!(grant.req.unwrap().after, 106);
            }
            other => panic!("{other:?}"),
        }
        // Charges above what a double holds exactly are capped.
        let g = parse_booked(
            &[3, 0, 0, 0, 0, 0, 0, 0, 0],
            dims(1, u64::MAX),
            dims(0, 0),
            (0, 0),
        );
        match g.unwrap() {
            Booked::Granted { grant, .. } => {
                assert_eq!(grant.req.unwrap().charge, 9_007_199_254_740_991);
            }
            other => panic!("{other:?}"),
        }
    }

    /// A connection that answers from a list and records the verbs sent.
    struct Scripted {
        verbs: Vec<String>,
        answers: std::collections::VecDeque<Result<::redis::Value, RedisError>>,
    }

    impl ConnectionLike for Scripted {
        fn req_packed_command<'a>(
            &'a mut self,
            cmd: &'a Cmd,
        ) -> ::redis::RedisFuture<'a, ::redis::Value> {
            if let Some(::redis::Arg::Simple(verb)) = cmd.args_iter().next() {
                self.verbs.push(String::from_utf8_lossy(verb).into_owned());
            }
            let answer = self.answers.pop_front().expect("no more answers");
            Box::pin(async move { answer })
        }

        fn req_packed_commands<'a>(
            &'a mut self,
            _: &'a ::redis::Pipeline,
            _: usize,
            _: usize,
        ) -> ::redis::RedisFuture<'a, Vec<::redis::Value>> {
            Box::pin(async { Err(bad_reply()) })
        }

        fn get_db(&self) -> i64 {
            0
        }
    }

    /// The script is sent in full only when the server does not know its
    /// SHA; any other error comes back at once.
    #[tokio::test]
    async fn the_script_is_sent_only_when_unknown() {
        let ops = [Op::cancel(
            key(),
            Now::Local(0),
            &Grant {
                epoch: 0,
                slot: 0,
                req: None,
                tok: None,
            },
            false,
        )];
        let reply: Vec<u8> = [1f64, 0f64].iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut conn = Scripted {
            verbs: Vec::new(),
            answers: [
                Err(RedisError::from((
                    ErrorKind::Server(ServerErrorKind::NoScript),
                    "NOSCRIPT",
                ))),
                Ok(::redis::Value::BulkString(reply)),
            ]
            .into(),
        };
        assert_eq!(run(&mut conn, &ops, 0).await.unwrap(), [vec![1, 0]]);
        assert_eq!(conn.verbs, ["EVALSHA", "EVAL"]);
        let mut conn = Scripted {
            verbs: Vec::new(),
            answers: [Err(RedisError::from((
                ErrorKind::Server(ServerErrorKind::ResponseError),
                "ERR",
            )))]
            .into(),
        };
        assert!(run(&mut conn, &ops, 0).await.is_err());
        assert_eq!(conn.verbs, ["EVALSHA"]);
    }
}
