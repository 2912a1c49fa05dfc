//! The GCRA core at its edges (issue 19): the exact arithmetic of
//! [`Gcra`], every outcome of a [`Bucket`] operation (what it returns and
//! the TAT it leaves), and the rate ramps. The property tests in `gcra.rs`
//! check the bound over random sequences; these pin each operation to its
//! definition, so a changed comparison or operator fails a test.

use tower_qwen::rate_limit::bucket::{
    Bucket, FULL_RATE, Gcra, Grant, Ramp, RampKind, rate_from_f64, rate_to_f64,
};

const MS: u64 = 1_000_000;

/// The parameters and the pure arithmetic, at their edges.
#[test]
fn gcra_arithmetic() {
    let g = Gcra::new(100, 3);
    assert_eq!((g.interval(), g.tolerance()), (100, 300));
    // Zero interval and burst are raised to one.
    let z = Gcra::new(0, 0);
    assert_eq!((z.interval(), z.tolerance()), (1, 1));
    assert_eq!(Gcra::new(7, 0).tolerance(), 7);
    assert_eq!(Gcra::new(0, 5).tolerance(), 5);
    assert_eq!(Gcra::new(u64::MAX, 2).tolerance(), u64::MAX);
    // Charges: units × interval, divided by the rate factor.
    assert_eq!(g.charge(2, FULL_RATE), 200);
    assert_eq!(g.charge(2, FULL_RATE + 7), 200);
    assert_eq!(g.charge(2, FULL_RATE - 1), 200 * 65_536 / 65_535);
    assert_eq!(g.charge(3, FULL_RATE / 4), 1_200);
    assert_eq!(g.charge(1, 0), 100 * u64::from(FULL_RATE));
    assert_eq!(Gcra::new(u64::MAX / 2, 1).charge(3, FULL_RATE), u64::MAX);
    assert_eq!(Gcra::new(u64::MAX / 2, 1).charge(3, 1), u64::MAX);
    // Conformance: the tolerance left after the charge; a charge above
    // the tolerance conforms only when the bucket is full.
    assert_eq!(g.conforms_at(1_000, 100), 800);
    assert_eq!(g.conforms_at(1_000, 300), 1_000);
    assert_eq!(g.conforms_at(1_000, 500), 1_000);
    assert_eq!(g.conforms_at(100, 50), 0);
    // Remaining units.
    assert_eq!(g.remaining(1_000, 1_000), 3);
    assert_eq!(g.remaining(1_150, 1_000), 1);
    assert_eq!(g.remaining(1_100, 1_000), 2);
    assert_eq!(g.remaining(900, 1_000), 3);
    assert_eq!(g.remaining(1_400, 1_000), 0);
}

/// The waits are inclusive, the grants say what they did, and a stale
/// `expected` is answered with the current TAT.
#[test]
fn reservations_at_their_edges() {
    let g = Gcra::new(100, 1);
    let b = Bucket::with_tat(5);
    assert_eq!(b.tat(), 5);
    assert!(!b.is_full(4));
    assert!(b.is_full(5));
    assert!(b.is_full(6));
    assert_eq!(Bucket::new().tat(), 0);
    assert_eq!(Bucket::default().tat(), 0);
    let b = Bucket::new();
    let first = b.reserve(&g, 0, 100, 0).unwrap();
    assert_eq!(
        first,
        Grant {
            slot: 0,
            before: 0,
            after: 100,
            charge: 100
        }
    );
    // Exactly the longest wait allowed: granted; one less: refused.
    assert_eq!(b.reserve(&g, 0, 100, 99), Err(100));
    assert_eq!(b.tat(), 100, "a refusal reserves nothing");
    let second = b.reserve(&g, 0, 100, 100).unwrap();
    assert_eq!(
        (second.slot, second.before, second.after, second.charge),
        (100, 100, 200, 100)
    );
    assert_eq!(b.reserve(&g, 150, 100, 0), Err(200));
    // A bucket whose TAT is in the past is full: the TAT starts from now.
    let b = Bucket::with_tat(50);
    let late = b.reserve(&g, 1_000, 100, 0).unwrap();
    assert_eq!((late.slot, late.before, late.after), (1_000, 50, 1_100));
    // At a given slot: conforming exactly there is enough, one ns before is
    // not, and a refusal reserves nothing.
    let b = Bucket::with_tat(200);
    assert_eq!(b.reserve_at(&g, 199, 100, 200), Err(200));
    assert_eq!(b.tat(), 200);
    let at = b.reserve_at(&g, 200, 100, 200).unwrap();
    assert_eq!(
        (at.slot, at.before, at.after, at.charge),
        (200, 200, 300, 100)
    );
    assert_eq!(b.tat(), 300);
    // Later than the earliest conforming slot is fine too.
    let b = Bucket::with_tat(200);
    assert_eq!(b.reserve_at(&g, 250, 100, 200).unwrap().after, 350);
    // A later slot than the TAT: the TAT starts from the slot.
    let b = Bucket::with_tat(200);
    assert_eq!(b.reserve_at(&g, 500, 100, 200).unwrap().after, 600);
    // `expected` is stale: nothing changes, the current TAT comes back.
    assert_eq!(b.reserve_at(&g, 1_000, 100, 200), Err(600));
    assert_eq!(b.tat(), 600);
}

/// A refund counts what was charged after the grant from the end of its
/// charge laid from its slot, never from the TAT it left (which other
/// refunds can move): a grant booked while the bucket was in debt gets
/// back only the part of its charge that time has not repaid since its
/// slot. With nothing charged after it, a stale `latest` (a cancelled
/// waiter's slot) does not hold the refund back.
#[test]
fn refunds_count_later_charges_from_the_grant_end() {
    // Burst 10 ms: a takes 8, g 2 at the same slot (booked in a's debt).
    let gc = Gcra::new(MS, 10);
    let b = Bucket::new();
    b.reserve(&gc, 0, 8 * MS, 0).unwrap();
    let r = b.reserve(&gc, 0, 2 * MS, 0).unwrap();
    assert_eq!((r.slot, r.before, r.after), (0, 8 * MS, 10 * MS));
    // At 1 ms, 1 ms of g's charge (0 to 2 ms) is still ahead: that comes
    // back, a's debt stays.
    assert_eq!(b.refund(&r, 2 * MS, MS, 0), MS);
    assert_eq!(b.tat(), 9 * MS);
    // A waiter granted 10 ms and cancelled: its slot stays the latest, but
    // nothing is charged after r any more, so r's refund is exact.
    let g = Gcra::new(MS, 1);
    let b = Bucket::new();
    let r = b.reserve(&g, 0, 10 * MS, 0).unwrap();
    let w = b.reserve(&g, 0, MS, 100 * MS).unwrap();
    assert_eq!(w.slot, 10 * MS);
    assert!(b.give_back(&w, 0, w.slot));
    assert_eq!(b.refund(&r, 4 * MS, 3 * MS, w.slot), 4 * MS);
    assert_eq!(b.tat(), 6 * MS);
}

/// Giving back and refunding never move capacity ahead of the queue, and
/// say what they did.
#[test]
fn give_back_refund_and_overrun() {
    let g = Gcra::new(MS, 1);
    let b = Bucket::new();
    let r = b.reserve(&g, 0, 10 * MS, 0).unwrap();
    assert_eq!(b.refund(&r, 0, 0, 0), 0);
    assert_eq!(b.tat(), 10 * MS);
    // More than was charged: only the charge comes back.
    assert_eq!(b.refund(&r, 50 * MS, 0, 0), 10 * MS);
    assert_eq!(b.tat(), 0);
    // The tail, partly: exact.
    let b = Bucket::new();
    let r = b.reserve(&g, 0, 10 * MS, 0).unwrap();
    assert_eq!(b.refund(&r, 4 * MS, 3 * MS, 0), 4 * MS);
    assert_eq!(b.tat(), 6 * MS);
    // Not the tail, with a waiter granted a later slot: capacity comes
    // back only behind that slot.
    let b = Bucket::new();
    let r = b.reserve(&g, 0, 100 * MS, 0).unwrap();
    b.charge_more(5 * MS);
    assert_eq!(b.refund(&r, 90 * MS, 10 * MS, 50 * MS), 50 * MS);
    assert_eq!(b.tat(), 55 * MS);
    // ... and behind now when now is later than every slot.
    let b = Bucket::new();
    let r = b.reserve(&g, 0, 100 * MS, 0).unwrap();
    b.charge_more(5 * MS);
    assert_eq!(b.refund(&r, 90 * MS, 40 * MS, 20 * MS), 60 * MS);
    assert_eq!(b.tat(), 45 * MS);
    // Nothing left to return: time has repaid it already.
    assert_eq!(b.refund(&r, 90 * MS, 60 * MS, 0), 0);
    assert_eq!(b.tat(), 45 * MS);
    // Exactly nothing left (the floor is the TAT): nothing moves.
    assert_eq!(b.refund(&r, 90 * MS, 45 * MS, 0), 0);
    assert_eq!(b.tat(), 45 * MS);
    // An overrun of nothing changes nothing; any other is added.
    b.charge_more(0);
    assert_eq!(b.tat(), 45 * MS);
    b.charge_more(MS);
    assert_eq!(b.tat(), 46 * MS);
    b.charge_more(u64::MAX);
    assert_eq!(b.tat(), u64::MAX);
    // A give-back of the tail restores the TAT; of anything else, not.
    let b = Bucket::new();
    let a = b.reserve(&g, 0, MS, 0).unwrap();
    assert!(b.give_back(&a, 0, 0));
    assert_eq!(b.tat(), 0);
    let a = b.reserve(&g, 0, MS, 0).unwrap();
    b.charge_more(1);
    assert!(!b.give_back(&a, 0, 0));
    assert_eq!(b.tat(), MS + 1);
}

/// The tail's give-back is exact when nothing lies beyond it: queued
/// behind a debt in a bucket that is never refunded (no `latest`), or
/// booked later than it conformed (an idle gap before its slot); a stale
/// latest slot (a later waiter cancelled first) holds the debt's share
/// back, the documented price.
#[test]
fn the_tails_give_back_is_exact() {
    let g = Gcra::new(MS, 2);
    // Queued behind a debt: 4 ms charged at 0, a 1 ms waiter at 3 ms.
    let b = Bucket::new();
    b.reserve(&g, 0, 4 * MS, 0).unwrap();
    let w = b.reserve(&g, 0, MS, 10 * MS).unwrap();
    assert_eq!((w.slot, w.before, w.after), (3 * MS, 4 * MS, 5 * MS));
    assert!(b.give_back(&w, MS, 0));
    assert_eq!(b.tat(), 4 * MS);
    // Booked at 7 ms (another dimension asked for later), TAT 4 ms.
    let w = b.reserve_at(&g, 7 * MS, MS, 4 * MS).unwrap();
    assert_eq!(w.after, 8 * MS);
    assert!(b.give_back(&w, MS, w.slot));
    assert_eq!(b.tat(), 4 * MS);
    // Two waiters; the later one cancelled first leaves its slot the
    // latest: the earlier one gives back only what lies before it.
    let w1 = b.reserve(&g, MS, MS, 10 * MS).unwrap();
    let w2 = b.reserve(&g, MS, MS, 10 * MS).unwrap();
    assert_eq!((w1.slot, w2.slot), (3 * MS, 4 * MS));
    assert!(b.give_back(&w2, MS, w2.slot));
    assert!(b.give_back(&w1, MS, w2.slot));
    assert_eq!(b.tat(), 5 * MS);
}

/// A pause of a full bucket with a burst above one: nothing conforms until
/// the pause is over, and then exactly one unit (the bucket is empty).
#[test]
fn pausing_a_full_bucket_with_a_burst() {
    let g = Gcra::new(100, 3);
    let b = Bucket::new();
    let now = 1_000;
    let delta = b.pause_delta(&g, now, 500);
    assert_eq!(delta, 1_700);
    b.charge_more(delta);
    assert_eq!(b.reserve(&g, now, 100, 0), Err(1_500));
    assert_eq!(b.reserve(&g, 1_499, 100, 0), Err(1_500));
    assert!(b.reserve(&g, 1_500, 100, 0).is_ok());
    assert_eq!(b.reserve(&g, 1_500, 100, 0), Err(1_600));
    // A bucket already in debt keeps its debt, after the pause.
    let b = Bucket::with_tat(3_000);
    assert_eq!(b.pause_delta(&g, now, 500), 500);
    // A tolerance below the interval cannot happen (burst >= 1); at burst 1
    // the bucket is empty from now.
    let g1 = Gcra::new(100, 1);
    assert_eq!(Bucket::new().pause_delta(&g1, now, 500), 1_500);
}

/// Ramps of both kinds survive packing; unknown words are fresh; the rate
/// is `from` until the start, linear, then full for good.
#[test]
fn ramps_pack_rise_and_end() {
    let slow = Ramp {
        start: 7 * MS,
        from: 2,
        kind: RampKind::SlowStart,
    };
    assert_eq!(slow.pack(), (7 << 21) | (2 << 4) | 1);
    assert_eq!(Ramp::unpack(slow.pack()), Some(slow));
    for word in [0, 3, 4, 15, (9 << 21) | 0xF] {
        assert_eq!(Ramp::unpack(word), None, "{word:#x}");
    }
    // Rates are clamped into (0, 1]; the start keeps 43 bits of ms.
    let odd = Ramp {
        start: ((1 << 43) + 5) * MS + 999,
        from: 0,
        kind: RampKind::Recover,
    };
    assert_eq!(odd.pack(), (5 << 21) | (1 << 4) | 2);
    let back = Ramp::unpack(odd.pack()).unwrap();
    assert_eq!(
        (back.start, back.from, back.kind),
        (5 * MS, 1, RampKind::Recover)
    );
    let over = Ramp {
        from: FULL_RATE + 9,
        ..slow
    };
    assert_eq!(Ramp::unpack(over.pack()).unwrap().from, FULL_RATE);
    // The rate over time.
    let r = Ramp {
        start: 1_000,
        from: FULL_RATE / 2,
        kind: RampKind::Recover,
    };
    assert_eq!(r.rate_at(0, 400), FULL_RATE / 2);
    assert_eq!(r.rate_at(1_000, 400), FULL_RATE / 2);
    assert_eq!(r.rate_at(1_100, 400), FULL_RATE / 2 + FULL_RATE / 8);
    assert_eq!(r.rate_at(1_399, 400), FULL_RATE / 2 + 32_686);
    assert_eq!(r.rate_at(1_400, 400), FULL_RATE);
    assert_eq!(r.rate_at(1_800, 400), FULL_RATE);
    assert_eq!(r.rate_at(1_000_000, 400), FULL_RATE);
    assert_eq!(r.rate_at(1_001, 0), FULL_RATE);
    assert_eq!(r.end(400), 1_400);
    assert_eq!(r.end(u64::MAX), u64::MAX);
    // Fractions and back.
    assert_eq!(rate_from_f64(f64::NAN), 1);
    assert_eq!(rate_from_f64(-1.0), 1);
    assert_eq!(rate_from_f64(0.0), 1);
    assert_eq!(rate_from_f64(1e-12), 1);
    assert_eq!(rate_from_f64(0.25), FULL_RATE / 4);
    assert_eq!(rate_from_f64(1.0), FULL_RATE);
    assert_eq!(rate_from_f64(7.0), FULL_RATE);
    assert_eq!(rate_to_f64(FULL_RATE / 4), 0.25);
    assert_eq!(rate_to_f64(FULL_RATE * 2), 1.0);
}
