use std::fmt;
use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::Body;

/// The HTTP client under the stack: hyper-util's pooled legacy client over
/// rustls (ring provider, Mozilla roots), HTTP/1.1 and HTTP/2 by ALPN.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Body>;

/// Settings for the [`HttpClient`]: pool, timeouts, protocol. See the
/// [module docs](super) for an example.
///
/// Defaults follow the source advice and the official SDK: connect timeout
/// 5 s, at most 20 idle connections kept per host, idle connections closed
/// after 90 s, TCP_NODELAY on, HTTP/1.1 and HTTP/2 offered by ALPN. Redirects
/// are never followed (hyper does not follow them; a 3xx is classified as a
/// permanent failure). Plain `http://` is allowed for local gateways and the
/// mock server.
#[derive(Clone)]
pub struct TransportConfig {
    connect_timeout: Option<Duration>,
    pool_idle_timeout: Option<Duration>,
    pool_max_idle_per_host: usize,
    http2_only: bool,
    tcp_keepalive: Option<Duration>,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for TransportConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransportConfig")
            .field("connect_timeout", &self.connect_timeout)
            .field("pool_idle_timeout", &self.pool_idle_timeout)
            .field("pool_max_idle_per_host", &self.pool_max_idle_per_host)
            .field("http2_only", &self.http2_only)
            .field("tcp_keepalive", &self.tcp_keepalive)
            .finish()
    }
}

impl TransportConfig {
    /// The defaults described on the type.
    pub const fn new() -> Self {
        Self {
            connect_timeout: Some(Duration::from_secs(5)),
            pool_idle_timeout: Some(Duration::from_secs(90)),
            pool_max_idle_per_host: 20,
            http2_only: false,
            tcp_keepalive: Some(Duration::from_secs(60)),
        }
    }

    /// Time allowed to open a TCP connection. Default is 5 s; `None`
    /// disables it.
    pub fn connect_timeout(mut self, t: impl Into<Option<Duration>>) -> Self {
        self.connect_timeout = t.into();
        self
    }

    /// How long an idle pooled connection is kept. Default is 90 s; `None`
    /// keeps them until the server closes them.
    pub fn pool_idle_timeout(mut self, t: impl Into<Option<Duration>>) -> Self {
        self.pool_idle_timeout = t.into();
        self
    }

    /// Most idle connections kept per host. Default is 20. Keep the
    /// concurrency limit above it only if you accept new connections
    /// being opened under load.
    pub fn pool_max_idle_per_host(mut self, n: usize) -> Self {
        self.pool_max_idle_per_host = n;
        self
    }

    /// Speak only HTTP/2 (prior knowledge on `http://`). Default is false:
    /// HTTP/1.1 and HTTP/2 are both offered by ALPN on `https://`.
    pub fn http2_only(mut self, yes: bool) -> Self {
        self.http2_only = yes;
        self
    }

    /// TCP keep-alive. Default is 60 s; `None` disables it.
    pub fn tcp_keepalive(mut self, t: impl Into<Option<Duration>>) -> Self {
        self.tcp_keepalive = t.into();
        self
    }

    /// Builds the client.
    pub fn build(&self) -> HttpClient {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(self.connect_timeout);
        http.set_keepalive(self.tcp_keepalive);
        let provider = rustls::crypto::ring::default_provider();
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(provider)
            // The ring provider supports the safe default protocol versions;
            // this cannot fail for it.
            .expect("ring supports the default TLS versions")
            .https_or_http();
        let https = if self.http2_only {
            builder.enable_http2().wrap_connector(http)
        } else {
            builder.enable_all_versions().wrap_connector(http)
        };
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(self.pool_idle_timeout)
            .pool_max_idle_per_host(self.pool_max_idle_per_host)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_only(self.http2_only)
            .build(https)
    }
}
