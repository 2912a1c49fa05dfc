//! Response bodies: a scripted body that sends frames on a schedule (event
//! streams, partial bodies), and the wrapper that keeps a request counted as
//! in flight until its body is done.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Sleep;

use super::server::ConnCtl;
use super::stats::{Counters, InFlight};
use crate::time;

/// What happens after the last scripted frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum End {
    /// The body ends normally.
    Complete,
    /// Nothing more is ever sent; the body stays open until the client goes
    /// away (or the server shuts down).
    StallForever,
    /// The connection is dropped with a reset.
    Reset,
}

/// A body that yields `frames` (each after its delay), then does `end`.
#[derive(Debug)]
pub(crate) struct ScriptBody {
    frames: VecDeque<(Duration, Bytes)>,
    end: End,
    sleep: Option<Pin<Box<Sleep>>>,
    waiting: bool,
    conn: ConnCtl,
    counters: Counters,
    /// Counted as an event stream (started / completed / cancelled).
    stream: bool,
    finished: bool,
}

impl ScriptBody {
    pub(crate) fn new(
        frames: VecDeque<(Duration, Bytes)>,
        end: End,
        conn: ConnCtl,
        counters: Counters,
        stream: bool,
    ) -> Self {
        if stream {
            counters.stream_started();
        }
        Self {
            frames,
            end,
            sleep: None,
            waiting: false,
            conn,
            counters,
            stream,
            finished: false,
        }
    }
}

impl Body for ScriptBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.finished {
            return Poll::Ready(None);
        }
        loop {
            if this.waiting {
                if let Some(sleep) = this.sleep.as_mut() {
                    ready!(sleep.as_mut().poll(cx));
                }
                this.waiting = false;
                let (_, bytes) = this.frames.pop_front().expect("a frame is scheduled");
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            match this.frames.front() {
                Some((delay, _)) if !delay.is_zero() => {
                    let deadline = time::now() + *delay;
                    match this.sleep.as_mut() {
                        Some(s) => s.as_mut().reset(deadline),
                        None => this.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                    this.waiting = true;
                }
                Some(_) => {
                    let (_, bytes) = this.frames.pop_front().expect("front exists");
                    return Poll::Ready(Some(Ok(Frame::data(bytes))));
                }
                None => {
                    return match this.end {
                        End::Complete => {
                            this.finished = true;
                            if this.stream {
                                this.counters.stream_completed();
                            }
                            Poll::Ready(None)
                        }
                        End::StallForever => Poll::Pending,
                        End::Reset => {
                            if !this.conn.is_killed() {
                                this.counters.reset_conn();
                                this.conn.kill();
                            }
                            Poll::Pending
                        }
                    };
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished
    }

    fn size_hint(&self) -> SizeHint {
        if self.end == End::Complete && self.frames.is_empty() {
            SizeHint::with_exact(0)
        } else {
            SizeHint::default()
        }
    }
}

impl Drop for ScriptBody {
    fn drop(&mut self) {
        if self.stream && !self.finished && !self.conn.is_killed() {
            self.counters.stream_cancelled();
        }
    }
}

pin_project! {
    /// A response body that keeps its request counted as in flight.
    pub(crate) struct Tracked {
        #[pin]
        inner: axum::body::Body,
        _guard: InFlight,
    }
}

impl Tracked {
    pub(crate) fn new(inner: axum::body::Body, guard: InFlight) -> Self {
        Self {
            inner,
            _guard: guard,
        }
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
