use std::fmt;
use std::str::FromStr;

use http::Uri;
use http::uri::{Authority, Scheme};

/// The DashScope regions and deployments, with their hosts (QWEN-API.md A1).
///
/// API keys are region-specific: a Beijing key does not work on the
/// Singapore host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Region {
    /// China (Beijing), "Mainland China": `dashscope.aliyuncs.com`.
    Beijing,
    /// Singapore, "International": `dashscope-intl.aliyuncs.com`.
    Singapore,
    /// US (Virginia), the "Global"/"US" deployment modes:
    /// `dashscope-us.aliyuncs.com`.
    Virginia,
    /// China (Hong Kong): `cn-hongkong.dashscope.aliyuncs.com`.
    HongKong,
    /// Germany (Frankfurt): served by the international host, as the official
    /// SDK maps `eu-central-1`.
    Frankfurt,
}

impl Region {
    /// Every region, in declaration order.
    pub const ALL: [Region; 5] = [
        Region::Beijing,
        Region::Singapore,
        Region::Virginia,
        Region::HongKong,
        Region::Frankfurt,
    ];

    /// The legacy shared gateway host of this region.
    pub const fn host(self) -> &'static str {
        match self {
            Region::Beijing => "dashscope.aliyuncs.com",
            Region::Singapore | Region::Frankfurt => "dashscope-intl.aliyuncs.com",
            Region::Virginia => "dashscope-us.aliyuncs.com",
            Region::HongKong => "cn-hongkong.dashscope.aliyuncs.com",
        }
    }

    /// The region id used by the workspace-scoped gateway
    /// (`{workspace}.{region}.maas.aliyuncs.com`).
    pub const fn id(self) -> &'static str {
        match self {
            Region::Beijing => "cn-beijing",
            Region::Singapore => "ap-southeast-1",
            Region::Virginia => "us-east-1",
            Region::HongKong => "cn-hongkong",
            Region::Frankfurt => "eu-central-1",
        }
    }
}

impl FromStr for Region {
    type Err = UnknownRegion;

    /// Accepts the region id (`cn-beijing`, `ap-southeast-1`, ...) or a short
    /// name (`beijing`, `singapore`, `intl`, `us`, `hongkong`, `frankfurt`).
    fn from_str(s: &str) -> Result<Self, UnknownRegion> {
        let s = s.trim().to_ascii_lowercase();
        Ok(match s.as_str() {
            "cn-beijing" | "beijing" | "cn" | "china" => Region::Beijing,
            "ap-southeast-1" | "singapore" | "intl" | "international" => Region::Singapore,
            "us-east-1" | "virginia" | "us" | "global" => Region::Virginia,
            "cn-hongkong" | "hongkong" | "hong-kong" | "hk" => Region::HongKong,
            "eu-central-1" | "frankfurt" | "eu" => Region::Frankfurt,
            _ => return Err(UnknownRegion(s)),
        })
    }
}

/// A region name that [`Region::from_str`] does not know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownRegion(String);

impl fmt::Display for UnknownRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown region {:?} (expected one of cn-beijing, ap-southeast-1, us-east-1, cn-hongkong, eu-central-1)",
            self.0
        )
    }
}

impl std::error::Error for UnknownRegion {}

impl crate::classify::KnownError for UnknownRegion {
    fn outcome(&self) -> crate::classify::Outcome {
        crate::classify::Outcome::Permanent {
            reason: crate::classify::PermanentReason::InvalidConfig,
        }
    }
}

/// Where requests go: a scheme, a host and an optional path prefix.
///
/// Requests carry DashScope's own paths (`/api/v1/services/...`,
/// `/compatible-mode/v1/chat/completions`), so one base URL serves both
/// protocols. A path prefix is kept for gateways mounted under one.
///
/// # Example
///
/// ```
/// use tower_qwen::client::{BaseUrl, Region};
/// let b = BaseUrl::region(Region::Singapore);
/// assert_eq!(b.to_string(), "https://dashscope-intl.aliyuncs.com");
/// let ws = BaseUrl::workspace("ws-123", Region::Beijing).unwrap();
/// assert_eq!(ws.to_string(), "https://ws-123.cn-beijing.maas.aliyuncs.com");
/// let local: BaseUrl = "http://127.0.0.1:8080/proxy/".parse().unwrap();
/// assert_eq!(local.to_string(), "http://127.0.0.1:8080/proxy");
/// assert!("ftp://x".parse::<BaseUrl>().is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BaseUrl {
    scheme: Scheme,
    authority: Authority,
    prefix: String,
}

impl BaseUrl {
    /// The legacy shared gateway of a region.
    pub fn region(region: Region) -> Self {
        Self {
            scheme: Scheme::HTTPS,
            authority: Authority::from_static(region.host()),
            prefix: String::new(),
        }
    }

    /// The workspace-scoped gateway `https://{workspace}.{region}.maas.aliyuncs.com`.
    ///
    /// # Errors
    ///
    /// [`InvalidBaseUrl`] when `workspace` is not a valid host label.
    pub fn workspace(workspace: &str, region: Region) -> Result<Self, InvalidBaseUrl> {
        let valid = !workspace.is_empty()
            && workspace.len() <= 63
            && workspace
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !valid {
            return Err(InvalidBaseUrl("workspace is not a valid host label"));
        }
        let authority = format!("{workspace}.{}.maas.aliyuncs.com", region.id())
            .parse()
            .map_err(|_| InvalidBaseUrl("workspace is not a valid host label"))?;
        Ok(Self {
            scheme: Scheme::HTTPS,
            authority,
            prefix: String::new(),
        })
    }

    /// The scheme (`http` or `https`).
    pub fn scheme(&self) -> &Scheme {
        &self.scheme
    }

    /// The host and port.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// Resolves a request's path (and query) against this base.
    pub(crate) fn resolve(&self, path_and_query: &str) -> Result<Uri, http::Error> {
        let pq = if path_and_query.is_empty() {
            "/"
        } else {
            path_and_query
        };
        let mut full = String::with_capacity(self.prefix.len() + pq.len());
        full.push_str(&self.prefix);
        full.push_str(pq);
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(full)
            .build()
    }
}

impl fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.prefix)
    }
}

impl FromStr for BaseUrl {
    type Err = InvalidBaseUrl;

    /// Parses `http(s)://host[:port][/prefix]`. A trailing `/api/v1` or
    /// `/compatible-mode/v1` (as in the SDKs' `DASHSCOPE_HTTP_BASE_URL`) is
    /// dropped, since requests carry those paths themselves.
    fn from_str(s: &str) -> Result<Self, InvalidBaseUrl> {
        let uri: Uri = s
            .trim()
            .parse()
            .map_err(|_| InvalidBaseUrl("not a valid URL"))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or(InvalidBaseUrl("missing scheme (http:// or https://)"))?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(InvalidBaseUrl("scheme must be http or https"));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or(InvalidBaseUrl("missing host"))?;
        if uri.query().is_some() {
            return Err(InvalidBaseUrl("a base URL takes no query"));
        }
        let mut prefix = uri.path().trim_end_matches('/').to_owned();
        for suffix in ["/api/v1", "/compatible-mode/v1"] {
            if let Some(p) = prefix.strip_suffix(suffix) {
                prefix = p.to_owned();
            }
        }
        Ok(Self {
            scheme,
            authority,
            prefix,
        })
    }
}

/// A base URL that could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidBaseUrl(&'static str);

impl fmt::Display for InvalidBaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid base URL: {}", self.0)
    }
}

impl std::error::Error for InvalidBaseUrl {}

impl InvalidBaseUrl {
    #[cfg(test)]
    pub(crate) const fn new(what: &'static str) -> Self {
        Self(what)
    }
}

impl crate::classify::KnownError for InvalidBaseUrl {
    fn outcome(&self) -> crate::classify::Outcome {
        crate::classify::Outcome::Permanent {
            reason: crate::classify::PermanentReason::InvalidConfig,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_region_has_a_host_and_parses_back() {
        for r in Region::ALL {
            let b = BaseUrl::region(r);
            assert!(b.to_string().starts_with("https://"));
            assert_eq!(r.id().parse::<Region>().unwrap(), r);
        }
        assert!("mars".parse::<Region>().is_err());
    }

    #[test]
    fn resolve_joins_prefix_and_path() {
        let b: BaseUrl = "https://dashscope.aliyuncs.com/api/v1".parse().unwrap();
        assert_eq!(b.to_string(), "https://dashscope.aliyuncs.com");
        let u = b
            .resolve("/api/v1/services/aigc/text-generation/generation")
            .unwrap();
        assert_eq!(
            u.to_string(),
            "https://dashscope.aliyuncs.com/api/v1/services/aigc/text-generation/generation"
        );
        let p: BaseUrl = "http://127.0.0.1:9/gw".parse().unwrap();
        assert_eq!(
            p.resolve("/compatible-mode/v1/embeddings?x=1")
                .unwrap()
                .to_string(),
            "http://127.0.0.1:9/gw/compatible-mode/v1/embeddings?x=1"
        );
        for bad in [
            "",
            "dashscope.aliyuncs.com",
            "ftp://h",
            "http://h/?q=1",
            "http://",
        ] {
            assert!(bad.parse::<BaseUrl>().is_err(), "{bad}");
        }
        assert!(BaseUrl::workspace("bad host", Region::Beijing).is_err());
    }
}
