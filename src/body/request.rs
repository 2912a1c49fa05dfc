use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full};

use crate::BoxError;

/// A request body that layers can read and replay.
///
/// Either fully buffered bytes (readable by [`BufferedBody::buffered`], and
/// cloneable for retries) or a stream (sent once, never replayed unless the
/// retry layer buffered it within its cap first).
///
/// # Example
///
/// ```
/// use tower_qwen::body::{Body, BufferedBody};
/// let b = Body::from(r#"{"model":"qwen-plus"}"#);
/// assert_eq!(b.buffered().unwrap().as_ref(), br#"{"model":"qwen-plus"}"#);
/// assert!(b.try_clone().is_some());
/// ```
pub struct Body {
    kind: Kind,
}

enum Kind {
    Full(Option<Bytes>),
    Stream(http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>),
}

impl Body {
    /// An empty body.
    pub fn empty() -> Self {
        Self {
            kind: Kind::Full(None),
        }
    }

    /// A streaming body: sent as it comes, not readable by the layers and
    /// not replayable.
    pub fn stream<B>(body: B) -> Self
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        Self {
            kind: Kind::Stream(body.map_err(Into::into).boxed_unsync()),
        }
    }

    /// Whether this body is a stream (not buffered).
    pub fn is_stream(&self) -> bool {
        matches!(self.kind, Kind::Stream(_))
    }
}

impl Default for Body {
    fn default() -> Self {
        Self::empty()
    }
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Full(b) => f
                .debug_struct("Body")
                .field("len", &b.as_ref().map_or(0, Bytes::len))
                .finish(),
            Kind::Stream(_) => f.write_str("Body(stream)"),
        }
    }
}

impl From<Bytes> for Body {
    fn from(b: Bytes) -> Self {
        Self {
            kind: Kind::Full((!b.is_empty()).then_some(b)),
        }
    }
}

impl From<Vec<u8>> for Body {
    fn from(b: Vec<u8>) -> Self {
        Bytes::from(b).into()
    }
}

impl From<String> for Body {
    fn from(s: String) -> Self {
        Bytes::from(s).into()
    }
}

impl From<&'static str> for Body {
    fn from(s: &'static str) -> Self {
        Bytes::from_static(s.as_bytes()).into()
    }
}

impl From<&'static [u8]> for Body {
    fn from(s: &'static [u8]) -> Self {
        Bytes::from_static(s).into()
    }
}

impl From<Full<Bytes>> for Body {
    fn from(b: Full<Bytes>) -> Self {
        b.into_inner().map(Body::from).unwrap_or_default()
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.get_mut().kind {
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Stream(s) => Pin::new(s).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Stream(s) => s.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Stream(s) => s.size_hint(),
        }
    }
}

/// A request body the layers can read and replay, when it is buffered.
///
/// Implemented for [`Body`], `http_body_util::Full<Bytes>`,
/// `http_body_util::Empty<Bytes>` and `String`. Implement it for your own
/// body type to let the rate limiter read the model and estimate tokens, and
/// the retry layer replay requests; return `None` for streams.
pub trait BufferedBody: http_body::Body + Sized {
    /// The whole body, if it is buffered.
    fn buffered(&self) -> Option<Bytes>;

    /// A copy for a retry, if the body can be replayed.
    fn try_clone(&self) -> Option<Self>;
}

impl BufferedBody for Body {
    fn buffered(&self) -> Option<Bytes> {
        match &self.kind {
            Kind::Full(b) => Some(b.clone().unwrap_or_default()),
            Kind::Stream(_) => None,
        }
    }

    fn try_clone(&self) -> Option<Self> {
        match &self.kind {
            Kind::Full(b) => Some(Self {
                kind: Kind::Full(b.clone()),
            }),
            Kind::Stream(_) => None,
        }
    }
}

impl BufferedBody for Full<Bytes> {
    fn buffered(&self) -> Option<Bytes> {
        Some(self.clone().into_inner().unwrap_or_default())
    }

    fn try_clone(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl BufferedBody for Empty<Bytes> {
    fn buffered(&self) -> Option<Bytes> {
        Some(Bytes::new())
    }

    fn try_clone(&self) -> Option<Self> {
        Some(Empty::new())
    }
}

impl BufferedBody for String {
    fn buffered(&self) -> Option<Bytes> {
        Some(Bytes::copy_from_slice(self.as_bytes()))
    }

    fn try_clone(&self) -> Option<Self> {
        Some(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;

    #[tokio::test]
    async fn full_and_stream_bodies() {
        let b = Body::from("abc");
        let c = b.try_clone().unwrap();
        assert_eq!(b.collect().await.unwrap().to_bytes(), "abc");
        assert_eq!(c.size_hint().exact(), Some(3));
        let s = Body::stream(Full::new(Bytes::from_static(b"xyz")));
        assert!(s.is_stream());
        assert!(s.buffered().is_none() && s.try_clone().is_none());
        assert_eq!(s.collect().await.unwrap().to_bytes(), "xyz");
        assert!(Body::empty().is_end_stream());
        assert_eq!(
            Body::from(Full::new(Bytes::from_static(b"q")))
                .buffered()
                .unwrap(),
            "q"
        );
    }
}
