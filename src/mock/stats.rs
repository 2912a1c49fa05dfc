//! The mock's counters.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// A snapshot of the mock's counters, from
/// [`MockHandle::stats`](super::MockHandle::stats).
///
/// Status and code counts record what the server **answered**: the HTTP
/// status line of every response, and the error code of every error it sent,
/// whether as an error status, in a `200` body, or as an in-stream error
/// frame (native code on native endpoints, compatible code on compatible
/// ones). Connections dropped on purpose count in `resets` and have no
/// status.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Requests received (any path, any outcome).
    pub requests: u64,
    /// Responses by HTTP status.
    pub by_status: BTreeMap<u16, u64>,
    /// Errors sent, by code.
    pub by_code: BTreeMap<String, u64>,
    /// Input tokens charged to quotas (admitted requests).
    pub input_tokens: u64,
    /// Output tokens charged to quotas (admitted requests; what the answer
    /// would contain in full, even if a fault cut it short).
    pub output_tokens: u64,
    /// Requests in flight now: from arrival until the response body ended
    /// or was dropped.
    pub in_flight: u64,
    /// The most requests ever in flight at once.
    pub peak_in_flight: u64,
    /// Requests that named each model (after authentication and body
    /// validation, before quota checks): the upstream calls a client made.
    pub calls_by_model: BTreeMap<String, u64>,
    /// Requests admitted by the quota, by model.
    pub admitted_by_model: BTreeMap<String, u64>,
    /// Event streams started (status 200 with `text/event-stream`).
    pub streams_started: u64,
    /// Event streams whose body was sent to its end (including streams
    /// that end with an error frame or are cut short on purpose).
    pub streams_completed: u64,
    /// Event streams dropped before their end because the client went away.
    pub streams_cancelled: u64,
    /// Connections the mock dropped on purpose (reset faults).
    pub resets: u64,
    /// Requests by their `X-DashScope-WorkSpace` header (requests without
    /// one are not counted here).
    pub by_workspace: BTreeMap<String, u64>,
    /// Requests answered by a [`Script`](super::Script) rule.
    pub scripted: u64,
}

impl Stats {
    /// Responses answered with `status`.
    pub fn status(&self, status: u16) -> u64 {
        self.by_status.get(&status).copied().unwrap_or(0)
    }

    /// Errors answered with `code`.
    pub fn code(&self, code: &str) -> u64 {
        self.by_code.get(code).copied().unwrap_or(0)
    }

    /// Calls that named `model`.
    pub fn calls(&self, model: &str) -> u64 {
        self.calls_by_model.get(model).copied().unwrap_or(0)
    }

    /// Requests admitted for `model`.
    pub fn admitted(&self, model: &str) -> u64 {
        self.admitted_by_model.get(model).copied().unwrap_or(0)
    }

    /// Requests that named `workspace` in `X-DashScope-WorkSpace`.
    pub fn workspace(&self, workspace: &str) -> u64 {
        self.by_workspace.get(workspace).copied().unwrap_or(0)
    }
}

/// The live counters behind [`Stats`].
#[derive(Debug, Default, Clone)]
pub(crate) struct Counters(Arc<Mutex<Stats>>);

impl Counters {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Stats> {
        // A panic while holding this lock cannot leave it inconsistent in a
        // way that matters for counters.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn snapshot(&self) -> Stats {
        self.lock().clone()
    }

    pub(crate) fn reset(&self) {
        let mut s = self.lock();
        let (in_flight, peak) = (s.in_flight, s.in_flight);
        *s = Stats {
            in_flight,
            peak_in_flight: peak,
            ..Stats::default()
        };
    }

    pub(crate) fn request_started(&self) -> InFlight {
        let mut s = self.lock();
        s.requests += 1;
        s.in_flight += 1;
        s.peak_in_flight = s.peak_in_flight.max(s.in_flight);
        InFlight(self.clone())
    }

    pub(crate) fn status(&self, status: u16) {
        *self.lock().by_status.entry(status).or_default() += 1;
    }

    pub(crate) fn code(&self, code: &str) {
        let mut s = self.lock();
        match s.by_code.get_mut(code) {
            Some(n) => *n += 1,
            None => {
                s.by_code.insert(code.to_owned(), 1);
            }
        }
    }

    pub(crate) fn call(&self, model: &str) {
        let mut s = self.lock();
        match s.calls_by_model.get_mut(model) {
            Some(n) => *n += 1,
            None => {
                s.calls_by_model.insert(model.to_owned(), 1);
            }
        }
    }

    pub(crate) fn admitted(&self, model: &str, input: u64, output: u64) {
        let mut s = self.lock();
        s.input_tokens += input;
        s.output_tokens += output;
        match s.admitted_by_model.get_mut(model) {
            Some(n) => *n += 1,
            None => {
                s.admitted_by_model.insert(model.to_owned(), 1);
            }
        }
    }

    pub(crate) fn workspace(&self, workspace: &str) {
        let mut s = self.lock();
        match s.by_workspace.get_mut(workspace) {
            Some(n) => *n += 1,
            None => {
                s.by_workspace.insert(workspace.to_owned(), 1);
            }
        }
    }

    pub(crate) fn scripted(&self) {
        self.lock().scripted += 1;
    }

    pub(crate) fn stream_started(&self) {
        self.lock().streams_started += 1;
    }

    pub(crate) fn stream_completed(&self) {
        self.lock().streams_completed += 1;
    }

    pub(crate) fn stream_cancelled(&self) {
        self.lock().streams_cancelled += 1;
    }

    pub(crate) fn reset_conn(&self) {
        self.lock().resets += 1;
    }
}

/// Counts one request in flight until dropped.
#[derive(Debug)]
pub(crate) struct InFlight(Counters);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.in_flight = s.in_flight.saturating_sub(1);
    }
}
