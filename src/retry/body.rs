//! Request bodies the retry layer can send more than once.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use http_body_util::Empty;
use http_body_util::{BodyExt, Full};

use crate::BoxError;
use crate::body::{Body, BufferedBody};

/// A boxed future that reads a streamed request body into memory.
pub type BufferFuture<B> = Pin<Box<dyn Future<Output = Buffered<B>> + Send>>;

/// What [`ReplayBody::buffer`] produced.
#[derive(Debug)]
#[non_exhaustive]
pub struct Buffered<B> {
    /// The body to send: the buffered bytes (replayable), or, when the
    /// stream outgrew the limit or failed, what was read followed by the
    /// rest of the stream (or its error).
    pub body: B,
    /// Whether `body` can be cloned for a retry.
    pub replayable: bool,
}

/// A request body the retry layer can make replayable.
///
/// A body whose [`BufferedBody::try_clone`] returns `Some` is replayed as
/// is. When it returns `None` (a stream), [`buffer`](Self::buffer) is asked
/// to read the stream into memory, up to a limit, before the first attempt.
/// The default does not buffer: the request is sent once and not retried.
///
/// Implemented for the crate's [`Body`] (its streams are buffered),
/// `Full<Bytes>`, `Empty<Bytes>` and `String` (always replayable). For your
/// own body type, `impl ReplayBody for MyBody {}` is enough.
pub trait ReplayBody: BufferedBody {
    /// Reads a streamed body into memory, up to `limit` bytes; `Err(self)`
    /// when this body cannot be buffered (it is then sent once).
    ///
    /// The future must never lose a byte: when the stream is longer than
    /// `limit` (or fails), it returns a body that yields what was read and
    /// then the rest (or the error), with `replayable: false`.
    fn buffer(self, limit: usize) -> Result<BufferFuture<Self>, Self> {
        let _ = limit;
        Err(self)
    }
}

impl ReplayBody for Full<Bytes> {}
impl ReplayBody for Empty<Bytes> {}
impl ReplayBody for String {}

impl ReplayBody for Body {
    fn buffer(self, limit: usize) -> Result<BufferFuture<Self>, Self> {
        if !self.is_stream() {
            return Err(self);
        }
        Ok(Box::pin(buffer_body(self, limit)))
    }
}

async fn buffer_body(mut body: Body, limit: usize) -> Buffered<Body> {
    let mut read: VecDeque<Frame<Bytes>> = VecDeque::new();
    let mut len = 0usize;
    let stopped = loop {
        match body.frame().await {
            None => break None,
            Some(Err(e)) => break Some(Err(e)),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    len = len.saturating_add(data.len());
                    read.push_back(Frame::data(data));
                    if len > limit {
                        break Some(Ok(()));
                    }
                }
                Err(trailers) => {
                    // Trailers end a body but cannot live in a buffered one:
                    // send what was read, then the trailers, once.
                    read.push_back(trailers);
                    break Some(Ok(()));
                }
            },
        }
    };
    match stopped {
        None => {
            let mut all = BytesMut::with_capacity(len);
            for f in read {
                if let Ok(d) = f.into_data() {
                    all.extend_from_slice(&d);
                }
            }
            Buffered {
                body: Body::from(all.freeze()),
                replayable: true,
            }
        }
        Some(rest) => {
            let (error, rest) = match rest {
                Ok(()) => (None, Some(body)),
                Err(e) => (Some(e), None),
            };
            Buffered {
                body: Body::stream(Resumed { read, error, rest }),
                replayable: false,
            }
        }
    }
}

/// The frames already read from a stream, then its error or the rest of it.
struct Resumed {
    read: VecDeque<Frame<Bytes>>,
    error: Option<BoxError>,
    rest: Option<Body>,
}

impl http_body::Body for Resumed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(f) = this.read.pop_front() {
            return Poll::Ready(Some(Ok(f)));
        }
        if let Some(e) = this.error.take() {
            return Poll::Ready(Some(Err(e)));
        }
        match &mut this.rest {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_empty()
            && self.error.is_none()
            && self
                .rest
                .as_ref()
                .is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let read: u64 = self
            .read
            .iter()
            .filter_map(Frame::data_ref)
            .map(|d| d.remaining() as u64)
            .sum();
        match &self.rest {
            Some(rest) => {
                let h = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(h.lower().saturating_add(read));
                if let Some(u) = h.upper() {
                    hint.set_upper(u.saturating_add(read));
                }
                hint
            }
            None => SizeHint::with_exact(read),
        }
    }
}

impl fmt::Debug for Resumed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resumed")
            .field("read_frames", &self.read.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;

    fn stream(chunks: Vec<Result<&'static str, &'static str>>) -> Body {
        let s = futures_util::stream::iter(chunks.into_iter().map(|c| match c {
            Ok(s) => Ok(Frame::data(Bytes::from_static(s.as_bytes()))),
            Err(e) => Err(BoxError::from(e)),
        }));
        Body::stream(StreamBody::new(s))
    }

    #[tokio::test]
    async fn small_stream_becomes_replayable() {
        let b = stream(vec![Ok("ab"), Ok("cd")]);
        let out = b.buffer(10).unwrap().await;
        assert!(out.replayable);
        assert_eq!(out.body.try_clone().unwrap().buffered().unwrap(), "abcd");
        assert_eq!(out.body.collect().await.unwrap().to_bytes(), "abcd");
    }

    #[tokio::test]
    async fn long_stream_is_sent_whole_once() {
        let b = stream(vec![Ok("abc"), Ok("def"), Ok("ghi")]);
        let out = b.buffer(4).unwrap().await;
        assert!(!out.replayable);
        assert!(out.body.try_clone().is_none());
        assert_eq!(out.body.collect().await.unwrap().to_bytes(), "abcdefghi");
    }

    #[tokio::test]
    async fn failing_stream_keeps_its_error() {
        let b = stream(vec![Ok("abc"), Err("boom")]);
        let out = b.buffer(100).unwrap().await;
        assert!(!out.replayable);
        let mut body = out.body;
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "abc"
        );
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(err.to_string(), "boom");
        assert!(body.frame().await.is_none());
    }

    #[test]
    fn buffered_bodies_are_not_buffered_again() {
        assert!(Body::from("x").buffer(1).is_err());
        assert!(Full::new(Bytes::from_static(b"x")).buffer(1).is_err());
        assert!(String::from("x").buffer(1).is_err());
    }
}
