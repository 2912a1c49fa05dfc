//! A FIFO semaphore with a resizable capacity, a bounded wait queue and a
//! lock-free fast path.
//!
//! One `AtomicU64` holds both the permits available (high 32 bits, a signed
//! `i32`: negative while the capacity was shrunk below the permits in use)
//! and the number of queued waiters (low 32 bits). Acquire and release touch
//! only that word while nobody waits; the queue's mutex is taken only when a
//! caller must wait, and then a released permit is handed straight to the
//! oldest waiter, so a newcomer can never overtake the queue.
//!
//! Invariant: `waiting > 0` implies `available <= 0`.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Waker;

const ONE_PERMIT: u64 = 1 << 32;

#[inline]
fn available(state: u64) -> i32 {
    (state >> 32) as u32 as i32
}

#[inline]
fn waiting(state: u64) -> u32 {
    state as u32
}

struct Entry {
    id: u64,
    waker: Waker,
}

pub(crate) struct Semaphore {
    state: AtomicU64,
    queue: Mutex<Queue>,
}

struct Queue {
    entries: VecDeque<Entry>,
    next_id: u64,
}

/// What a slow-path acquire got.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Acquire {
    /// A permit: the caller now owns it.
    Acquired,
    /// Queued with this id; poll with [`Semaphore::poll_waiter`].
    Queued(u64),
    /// The queue is full.
    Full,
}

impl Semaphore {
    pub(crate) fn new(permits: u32) -> Self {
        let permits = permits.min(i32::MAX as u32);
        Self {
            state: AtomicU64::new(u64::from(permits) << 32),
            queue: Mutex::new(Queue {
                entries: VecDeque::new(),
                next_id: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // A panic while holding this lock cannot leave the queue half-updated
        // (every update is one push/pop plus one atomic), so poison is ignored.
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes a permit if one is free and nobody is queued. Lock-free.
    #[inline]
    pub(crate) fn try_acquire(&self) -> bool {
        let mut s = self.state.load(Ordering::Relaxed);
        loop {
            if waiting(s) != 0 || available(s) <= 0 {
                return false;
            }
            match self.state.compare_exchange_weak(
                s,
                s - ONE_PERMIT,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(actual) => s = actual,
            }
        }
    }

    /// Takes a permit, or joins the queue (registering `waker`), or reports a
    /// queue already holding `max_waiting` callers.
    pub(crate) fn acquire_or_enqueue(&self, waker: &Waker, max_waiting: u32) -> Acquire {
        if self.try_acquire() {
            return Acquire::Acquired;
        }
        let mut q = self.lock();
        let mut s = self.state.load(Ordering::Relaxed);
        loop {
            if waiting(s) == 0 && available(s) > 0 {
                match self.state.compare_exchange_weak(
                    s,
                    s - ONE_PERMIT,
                    Ordering::Acquire,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => return Acquire::Acquired,
                    Err(actual) => s = actual,
                }
            } else if waiting(s) >= max_waiting {
                return Acquire::Full;
            } else {
                match self.state.compare_exchange_weak(
                    s,
                    s + 1,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        let id = q.next_id;
                        q.next_id = q.next_id.wrapping_add(1);
                        q.entries.push_back(Entry {
                            id,
                            waker: waker.clone(),
                        });
                        return Acquire::Queued(id);
                    }
                    Err(actual) => s = actual,
                }
            }
        }
    }

    /// Whether waiter `id` was granted its permit (it now owns it); if not,
    /// refreshes its waker.
    pub(crate) fn poll_waiter(&self, id: u64, waker: &Waker) -> bool {
        let mut q = self.lock();
        match q.entries.iter_mut().find(|e| e.id == id) {
            Some(e) => {
                if !e.waker.will_wake(waker) {
                    e.waker = waker.clone();
                }
                false
            }
            None => true,
        }
    }

    /// Leaves the queue. Returns `true` when the waiter had already been
    /// granted a permit, which the caller then owns (and usually releases).
    pub(crate) fn cancel(&self, id: u64) -> bool {
        let mut q = self.lock();
        match q.entries.iter().position(|e| e.id == id) {
            Some(i) => {
                q.entries.remove(i);
                self.state.fetch_sub(1, Ordering::AcqRel);
                false
            }
            None => true,
        }
    }

    /// Returns one permit: to the oldest waiter if any, else to the pool (or
    /// to pay off a shrink).
    #[inline]
    pub(crate) fn release(&self) {
        let mut s = self.state.load(Ordering::Relaxed);
        loop {
            if waiting(s) != 0 {
                break;
            }
            match self.state.compare_exchange_weak(
                s,
                s.wrapping_add(ONE_PERMIT),
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(actual) => s = actual,
            }
        }
        self.release_slow();
    }

    #[cold]
    fn release_slow(&self) {
        let waker = {
            let mut q = self.lock();
            let mut s = self.state.load(Ordering::Relaxed);
            loop {
                if waiting(s) == 0 || available(s) < 0 {
                    match self.state.compare_exchange_weak(
                        s,
                        s.wrapping_add(ONE_PERMIT),
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    ) {
                        Ok(_) => return,
                        Err(actual) => s = actual,
                    }
                } else {
                    // Hand the permit to the oldest waiter.
                    let Some(entry) = q.entries.pop_front() else {
                        // Unreachable by the invariant; keep the permit.
                        self.state.fetch_add(ONE_PERMIT, Ordering::AcqRel);
                        return;
                    };
                    self.state.fetch_sub(1, Ordering::AcqRel);
                    break entry.waker;
                }
            }
        };
        waker.wake();
    }

    /// Grows the capacity by `n` permits (each goes to a waiter first).
    pub(crate) fn add_permits(&self, n: u32) {
        for _ in 0..n {
            self.release();
        }
    }

    /// Shrinks the capacity by `n` permits: free ones disappear at once,
    /// permits in use disappear as they are released.
    pub(crate) fn remove_permits(&self, n: u32) {
        self.state.fetch_sub(u64::from(n) << 32, Ordering::AcqRel);
    }

    /// Permits free right now (negative while a shrink is being paid off).
    pub(crate) fn available(&self) -> i32 {
        available(self.state.load(Ordering::Relaxed))
    }

    /// Callers queued right now.
    pub(crate) fn waiting(&self) -> u32 {
        waiting(self.state.load(Ordering::Relaxed))
    }
}

impl std::fmt::Debug for Semaphore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Semaphore")
            .field("available", &self.available())
            .field("waiting", &self.waiting())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn waker() -> (Arc<Count>, Waker) {
        let c = Arc::new(Count(AtomicUsize::new(0)));
        (c.clone(), Waker::from(c))
    }

    #[test]
    fn fifo_handoff_and_no_barging() {
        let s = Semaphore::new(1);
        let (_, w) = waker();
        assert!(s.try_acquire());
        let (c1, w1) = waker();
        let Acquire::Queued(a) = s.acquire_or_enqueue(&w1, 10) else {
            panic!()
        };
        let Acquire::Queued(b) = s.acquire_or_enqueue(&w, 10) else {
            panic!()
        };
        s.release();
        assert_eq!(c1.0.load(Ordering::SeqCst), 1);
        // A newcomer cannot take anything: b still waits.
        assert!(!s.try_acquire());
        assert!(s.poll_waiter(a, &w));
        assert!(!s.poll_waiter(b, &w));
        s.release(); // a's permit -> b
        assert!(s.poll_waiter(b, &w));
        s.release();
        assert_eq!((s.available(), s.waiting()), (1, 0));
    }

    #[test]
    fn queue_bound_and_cancel() {
        let s = Semaphore::new(0);
        let (_, w) = waker();
        let Acquire::Queued(a) = s.acquire_or_enqueue(&w, 1) else {
            panic!()
        };
        assert_eq!(s.acquire_or_enqueue(&w, 1), Acquire::Full);
        assert!(!s.cancel(a));
        assert_eq!(s.waiting(), 0);
        s.add_permits(1);
        let Acquire::Acquired = s.acquire_or_enqueue(&w, 1) else {
            panic!()
        };
        // Granted then cancelled: the caller owns the permit.
        let Acquire::Queued(b) = s.acquire_or_enqueue(&w, 1) else {
            panic!()
        };
        s.release();
        assert!(s.cancel(b));
        s.release();
        assert_eq!(s.available(), 1);
    }

    #[test]
    fn shrink_below_in_use_is_paid_by_releases() {
        let s = Semaphore::new(3);
        assert!(s.try_acquire() && s.try_acquire() && s.try_acquire());
        s.remove_permits(2);
        assert_eq!(s.available(), -2);
        let (c, w) = waker();
        let Acquire::Queued(id) = s.acquire_or_enqueue(&w, 10) else {
            panic!()
        };
        s.release();
        s.release();
        assert_eq!(c.0.load(Ordering::SeqCst), 0);
        s.release();
        assert_eq!(c.0.load(Ordering::SeqCst), 1);
        assert!(s.poll_waiter(id, &w));
        s.release();
        assert_eq!((s.available(), s.waiting()), (1, 0));
    }

    #[test]
    fn threads_never_exceed_capacity() {
        let s = Arc::new(Semaphore::new(3));
        let in_use = Arc::new(AtomicUsize::new(0));
        let max = Arc::new(AtomicUsize::new(0));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (s, in_use, max) = (s.clone(), in_use.clone(), max.clone());
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        if s.try_acquire() {
                            let n = in_use.fetch_add(1, Ordering::SeqCst) + 1;
                            max.fetch_max(n, Ordering::SeqCst);
                            in_use.fetch_sub(1, Ordering::SeqCst);
                            s.release();
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert!(max.load(Ordering::SeqCst) <= 3);
        assert_eq!(s.available(), 3);
    }
}
