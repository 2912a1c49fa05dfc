//! The response side: splitting one upstream answer into one answer per
//! text, splitting `usage`, and putting answers back together.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Extensions, HeaderMap, Response, StatusCode, Version};
use serde_json::{Map, Value};

use crate::BoxError;
use crate::classify::ErrorInfo;
use crate::request::Protocol;

use super::error::BatchFailed;

/// What every caller receives, or the error it sees.
pub(crate) type Reply = Result<Response<Bytes>, BoxError>;

/// The head of an upstream response, shared by the answers cut from it.
#[derive(Debug)]
pub(crate) struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    extensions: Extensions,
}

impl Head {
    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    pub(crate) fn new(parts: http::response::Parts) -> Self {
        let mut headers = parts.headers;
        headers.remove(header::CONTENT_LENGTH);
        headers.remove(header::TRANSFER_ENCODING);
        Self {
            status: parts.status,
            version: parts.version,
            headers,
            extensions: parts.extensions,
        }
    }

    fn response(&self, body: Bytes) -> Response<Bytes> {
        let mut res = Response::new(Bytes::new());
        *res.status_mut() = self.status;
        *res.version_mut() = self.version;
        *res.headers_mut() = self.headers.clone();
        *res.extensions_mut() = self.extensions.clone();
        res.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        *res.body_mut() = body;
        res
    }
}

/// One successful upstream answer, without its list of embeddings.
#[derive(Debug)]
pub(crate) struct Answer {
    head: Head,
    protocol: Protocol,
    /// The JSON document with an empty embeddings list.
    skeleton: Map<String, Value>,
    /// The integer fields of `usage`, split among the texts.
    usage_fields: Vec<String>,
}

/// One text's share of an [`Answer`].
#[derive(Debug)]
pub(crate) struct Piece {
    answer: Arc<Answer>,
    /// The embedding object (`{"text_index","embedding"}` natively,
    /// `{"object","embedding","index"}` compatibly).
    entry: Value,
    /// This text's share of each of `answer.usage_fields`.
    usage: Vec<u64>,
}

/// Why a merged call did not give every text its piece. Shared by the
/// texts of that call.
#[derive(Debug)]
pub(crate) enum Failure {
    /// An HTTP answer that is not a splittable success: every caller gets
    /// it as it came.
    Response { head: Box<Head>, body: Bytes },
    /// No answer: see [`BatchFailed`].
    Error(BatchFailed),
}

impl Failure {
    pub(crate) fn reply(&self) -> Reply {
        match self {
            Failure::Response { head, body } => Ok(head.response(body.clone())),
            Failure::Error(e) => Err(Box::new(e.clone())),
        }
    }
}

/// The key of the embeddings list and of each item's index.
fn list_keys(protocol: Protocol) -> (&'static str, &'static str) {
    match protocol {
        Protocol::Native => ("embeddings", "text_index"),
        Protocol::Compatible => ("data", "index"),
    }
}

fn list_mut(doc: &mut Map<String, Value>, protocol: Protocol) -> Option<&mut Value> {
    let (list, _) = list_keys(protocol);
    match protocol {
        Protocol::Native => doc.get_mut("output")?.as_object_mut()?.get_mut(list),
        Protocol::Compatible => doc.get_mut(list),
    }
}

/// Splits a 2xx answer for `weights.len()` texts. Returns the answer as a
/// [`Failure`] when it is not a splittable success: a business error in a
/// 200, or a body that does not hold exactly one embedding per text.
pub(crate) fn split(
    parts: http::response::Parts,
    body: Bytes,
    protocol: Protocol,
    weights: &[u64],
) -> Result<Vec<Piece>, Failure> {
    let head = Head::new(parts);
    let n = weights.len();
    let doc = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(doc)) => doc,
        _ => return Err(not_split(head, body, "not a JSON object")),
    };
    let mut doc = doc;
    let Some(Value::Array(items)) = list_mut(&mut doc, protocol).map(|l| l.take()) else {
        return Err(not_split(head, body, "no list of embeddings"));
    };
    if let Some(list) = list_mut(&mut doc, protocol) {
        *list = Value::Array(Vec::new());
    }
    if items.len() != n {
        return Err(not_split(head, body, "not one embedding per text"));
    }
    let (_, index_key) = list_keys(protocol);
    let mut slots: Vec<Option<Value>> = (0..n).map(|_| None).collect();
    for (pos, item) in items.into_iter().enumerate() {
        let i = match item.get(index_key) {
            None => pos,
            Some(v) => match v.as_u64().and_then(|i| usize::try_from(i).ok()) {
                Some(i) if i < n => i,
                _ => return Err(not_split(head, body, "an embedding index is out of range")),
            },
        };
        if !item.is_object() {
            return Err(not_split(head, body, "an embedding is not an object"));
        }
        if slots[i].replace(item).is_some() {
            return Err(not_split(head, body, "embedding indexes repeat"));
        }
    }
    let mut usage_fields = Vec::new();
    let mut shares: Vec<Vec<u64>> = Vec::new();
    if let Some(Value::Object(usage)) = doc.get("usage") {
        for (name, v) in usage {
            if let Some(total) = v.as_u64() {
                usage_fields.push(name.clone());
                shares.push(apportion(total, weights));
            }
        }
    }
    let answer = Arc::new(Answer {
        head,
        protocol,
        skeleton: doc,
        usage_fields,
    });
    Ok(slots
        .into_iter()
        .enumerate()
        .map(|(i, entry)| Piece {
            answer: answer.clone(),
            entry: entry.unwrap_or(Value::Null),
            usage: shares.iter().map(|s| s[i]).collect(),
        })
        .collect())
}

/// A 2xx answer that could not be split: a business error in a 200 is
/// handed to every caller as it came; anything else is malformed.
fn not_split(head: Head, body: Bytes, what: &'static str) -> Failure {
    if ErrorInfo::parse(&body).is_some_and(|e| e.is_error()) {
        Failure::Response {
            head: Box::new(head),
            body,
        }
    } else {
        Failure::Error(BatchFailed::malformed(what))
    }
}

/// Puts `pieces` (in order) into one answer of the shape DashScope gives
/// for that many texts: the first piece's answer as the frame, the
/// embeddings re-indexed from 0, each integer `usage` field the sum of the
/// pieces' shares.
pub(crate) fn render(pieces: Vec<Piece>) -> Response<Bytes> {
    let answer = pieces[0].answer.clone();
    let protocol = answer.protocol;
    let (_, index_key) = list_keys(protocol);
    let mut doc = answer.skeleton.clone();
    let mut usage: Vec<(&str, u64)> = Vec::with_capacity(answer.usage_fields.len());
    let mut entries = Vec::with_capacity(pieces.len());
    for (i, piece) in pieces.iter().enumerate() {
        for (name, share) in piece.answer.usage_fields.iter().zip(&piece.usage) {
            match usage.iter_mut().find(|(n, _)| *n == name.as_str()) {
                Some((_, sum)) => *sum = sum.saturating_add(*share),
                None => usage.push((name.as_str(), *share)),
            }
        }
        let mut entry = piece.entry.clone();
        if let Value::Object(e) = &mut entry {
            e.insert(index_key.to_owned(), Value::from(i));
        }
        entries.push(entry);
    }
    if let Some(list) = list_mut(&mut doc, protocol) {
        *list = Value::Array(entries);
    }
    if !usage.is_empty() {
        let u = doc
            .entry("usage")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(u) = u {
            for (name, sum) in usage {
                u.insert(name.to_owned(), Value::from(sum));
            }
        }
    }
    // Serializing a `Map` of `Value`s cannot fail.
    let body = Bytes::from(serde_json::to_vec(&doc).unwrap_or_default());
    answer.head.response(body)
}

/// Splits `total` into integers proportional to `weights` that sum to
/// `total` (largest-remainder apportionment: each gets the floor of its
/// exact share, and the units left over go to the largest remainders, the
/// earlier text first on ties). All-zero weights count as equal weights.
///
/// `weights` must not be empty.
pub(crate) fn apportion(total: u64, weights: &[u64]) -> Vec<u64> {
    let n = weights.len();
    let sum: u128 = weights.iter().map(|&w| u128::from(w)).sum();
    let (weights, sum): (Vec<u128>, u128) = if sum == 0 {
        (vec![1; n], n as u128)
    } else {
        (weights.iter().map(|&w| u128::from(w)).collect(), sum)
    };
    let total128 = u128::from(total);
    let mut shares = Vec::with_capacity(n);
    let mut rems = Vec::with_capacity(n);
    let mut given: u128 = 0;
    for (i, w) in weights.iter().enumerate() {
        let exact = total128 * w;
        let share = exact / sum;
        given += share;
        shares.push(share as u64);
        rems.push((exact % sum, i));
    }
    let left = (total128 - given) as usize;
    // Equivalent mutant `>=`: with nothing left over it hands out nothing.
    if left > 0 {
        // Largest remainder first; earlier index first on ties.
        rems.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for &(_, i) in rems.iter().take(left) {
            shares[i] += 1;
        }
    }
    shares
}

/// If `body` is DashScope refusing a batch as too large (a 400 or a 200
/// business error whose message mentions the batch size), the limit it
/// states, if any: `Some(Some(10))` for "batch size is invalid, it should
/// not be larger than 10.", `Some(None)` when no number follows.
pub(crate) fn batch_size_error(status: StatusCode, body: &[u8]) -> Option<Option<usize>> {
    let may_be = status == StatusCode::BAD_REQUEST
        || status == StatusCode::PAYLOAD_TOO_LARGE
        || status.is_success();
    if !may_be {
        return None;
    }
    let info = ErrorInfo::parse(body)?;
    if !info.is_error() {
        return None;
    }
    let msg = info.message.as_deref()?.to_ascii_lowercase();
    let at = msg.find("batch size")?;
    let rest = &msg[at..];
    let digits: String = rest
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(char::is_ascii_digit)
        .collect();
    Some(digits.parse::<usize>().ok().filter(|&n| n > 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parts(status: u16) -> http::response::Parts {
        let mut res = Response::new(());
        *res.status_mut() = StatusCode::from_u16(status).unwrap();
        res.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/json"));
        res.headers_mut()
            .insert("content-length", HeaderValue::from_static("999"));
        res.into_parts().0
    }

    fn json(res: &Response<Bytes>) -> Value {
        serde_json::from_slice(res.body()).unwrap()
    }

    #[test]
    fn apportion_examples() {
        assert_eq!(apportion(10, &[1, 1, 1]), vec![4, 3, 3]);
        assert_eq!(apportion(7, &[0, 0]), vec![4, 3]);
        assert_eq!(apportion(0, &[5, 1]), vec![0, 0]);
        assert_eq!(apportion(9, &[1, 2]), vec![3, 6]);
        assert_eq!(apportion(5, &[3, 0, 1]), vec![4, 0, 1]);
        assert_eq!(
            apportion(u64::MAX, &[u64::MAX, u64::MAX])
                .iter()
                .map(|&x| u128::from(x))
                .sum::<u128>(),
            u128::from(u64::MAX)
        );
    }

    proptest! {
        #[test]
        fn apportion_sums_to_total(total in 0u64..1_000_000, weights in prop::collection::vec(0u64..10_000, 1..40)) {
            let shares = apportion(total, &weights);
            prop_assert_eq!(shares.len(), weights.len());
            prop_assert_eq!(shares.iter().sum::<u64>(), total);
            let sum: u64 = weights.iter().sum();
            if sum > 0 {
                for (s, w) in shares.iter().zip(&weights) {
                    // Within one unit of the exact share.
                    let exact = total as f64 * *w as f64 / sum as f64;
                    prop_assert!((*s as f64 - exact).abs() < 1.0 + 1e-9);
                }
            }
        }
    }

    #[test]
    fn native_split_and_render() {
        let body = Bytes::from_static(
            br#"{"output":{"embeddings":[{"text_index":1,"embedding":[0.5]},{"text_index":0,"embedding":[0.25]}]},"usage":{"total_tokens":7},"request_id":"r"}"#,
        );
        let pieces = split(parts(200), body, Protocol::Native, &[1, 2]).unwrap();
        let mut it = pieces.into_iter();
        let a = render(vec![it.next().unwrap()]);
        let b = render(vec![it.next().unwrap()]);
        assert_eq!(
            json(&a),
            serde_json::json!({"output":{"embeddings":[{"text_index":0,"embedding":[0.25]}]},"usage":{"total_tokens":2},"request_id":"r"})
        );
        assert_eq!(json(&b)["output"]["embeddings"][0]["embedding"][0], 0.5);
        assert_eq!(json(&b)["usage"]["total_tokens"], 5);
        assert_eq!(
            a.headers()["content-length"],
            a.body().len().to_string().as_str()
        );
        assert_eq!(a.headers()["content-type"], "application/json");
    }

    #[test]
    fn compatible_join() {
        let body = Bytes::from_static(
            br#"{"data":[{"object":"embedding","embedding":[1],"index":0},{"object":"embedding","embedding":[2],"index":1}],"model":"m","object":"list","usage":{"prompt_tokens":4,"total_tokens":4}}"#,
        );
        let first = split(parts(200), body.clone(), Protocol::Compatible, &[1, 1]).unwrap();
        let second = split(parts(200), body, Protocol::Compatible, &[1, 1]).unwrap();
        let all: Vec<Piece> = first.into_iter().chain(second).collect();
        let v = json(&render(all));
        let idx: Vec<_> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["index"].as_u64().unwrap())
            .collect();
        assert_eq!(idx, vec![0, 1, 2, 3]);
        assert_eq!(v["data"][2]["embedding"][0], 1);
        assert_eq!(
            v["usage"],
            serde_json::json!({"prompt_tokens":8,"total_tokens":8})
        );
    }

    #[test]
    fn bad_answers() {
        let err = |body: &'static [u8], n: usize| {
            split(
                parts(200),
                Bytes::from_static(body),
                Protocol::Native,
                &vec![1; n],
            )
            .unwrap_err()
        };
        assert!(matches!(
            err(br#"{"output":{"embeddings":[]}}"#, 1),
            Failure::Error(_)
        ));
        assert!(matches!(
            err(
                br#"{"output":{"embeddings":[{"text_index":0},{"text_index":0}]}}"#,
                2
            ),
            Failure::Error(_)
        ));
        assert!(matches!(
            err(br#"{"output":{"embeddings":[{"text_index":3}]}}"#, 1),
            Failure::Error(_)
        ));
        assert!(matches!(
            err(
                br#"{"code":"InternalError","message":"boom","request_id":"x"}"#,
                1
            ),
            Failure::Response { .. }
        ));
        assert!(matches!(err(b"[]", 1), Failure::Error(_)));
    }

    /// #19: what a split keeps of the head, and what it refuses.
    #[test]
    fn heads_and_refusals() {
        #[derive(Clone, Debug, PartialEq)]
        struct Mark(u8);
        let mut p = parts(200);
        p.version = Version::HTTP_2;
        p.extensions.insert(Mark(7));
        p.headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        p.headers
            .insert("x-request-id", HeaderValue::from_static("r"));
        let head = Head::new(p);
        assert_eq!(head.status(), StatusCode::OK);
        assert_eq!(Head::new(parts(400)).status(), StatusCode::BAD_REQUEST);
        assert!(!head.headers.contains_key(header::CONTENT_LENGTH));
        assert!(!head.headers.contains_key(header::TRANSFER_ENCODING));
        let res = head.response(Bytes::from_static(b"abc"));
        assert_eq!(res.version(), Version::HTTP_2);
        assert_eq!(res.extensions().get::<Mark>(), Some(&Mark(7)));
        assert_eq!(res.headers()["x-request-id"], "r");
        assert_eq!(res.headers()["content-length"], "3");
        assert_eq!(res.body().as_ref(), b"abc");

        let split_err = |body: &'static [u8], protocol, n: usize| {
            split(parts(200), Bytes::from_static(body), protocol, &vec![1; n]).unwrap_err()
        };
        let malformed = |f: Failure| match f.reply() {
            Err(e) => e
                .downcast_ref::<BatchFailed>()
                .is_some_and(|b| b.is_malformed()),
            Ok(_) => false,
        };
        for (body, protocol, n) in [
            (&b"not json"[..], Protocol::Native, 1),
            (b"[]", Protocol::Compatible, 1),
            (br#"{"output":{}}"#, Protocol::Native, 1),
            (br#"{"output":[]}"#, Protocol::Native, 1),
            (br#"{"output":{"embeddings":{}}}"#, Protocol::Native, 1),
            (br#"{"data":[{"index":0}]}"#, Protocol::Compatible, 2),
            (
                br#"{"data":[{"index":0},{"index":1},{"index":2}]}"#,
                Protocol::Compatible,
                2,
            ),
            (br#"{"data":[{"index":"0"}]}"#, Protocol::Compatible, 1),
            (br#"{"data":[{"index":-1}]}"#, Protocol::Compatible, 1),
            (br#"{"data":[{"index":1}]}"#, Protocol::Compatible, 1),
            (br#"{"data":[7]}"#, Protocol::Compatible, 1),
            (
                br#"{"data":[{"index":1},{"index":1}]}"#,
                Protocol::Compatible,
                2,
            ),
            // A native list under the compatible key, and the reverse.
            (br#"{"data":[{"index":0}]}"#, Protocol::Native, 1),
            (
                br#"{"output":{"embeddings":[{"text_index":0}]}}"#,
                Protocol::Compatible,
                1,
            ),
        ] {
            let got = split_err(body, protocol, n);
            assert!(malformed(got), "{}", String::from_utf8_lossy(body));
        }
        // A business error in a 200 goes to every caller as it came.
        let error = br#"{"code":"InternalError","message":"boom"}"#;
        match split_err(error, Protocol::Native, 1).reply() {
            Ok(res) => {
                assert_eq!(res.status(), StatusCode::OK);
                assert_eq!(res.body().as_ref(), error);
                assert_eq!(
                    res.headers()["content-length"],
                    error.len().to_string().as_str()
                );
            }
            Err(e) => panic!("{e}"),
        }
    }

    /// #19: items without an index are taken in order; only integer
    /// `usage` fields are split; answers without `usage` join with ones
    /// that have it.
    #[test]
    fn positions_and_usage_fields() {
        let body = Bytes::from_static(
            br#"{"data":[{"embedding":[1]},{"embedding":[2]},{"embedding":[3]}],"usage":{"prompt_tokens":10,"total_tokens":10,"unit":"tokens","ratio":0.5}}"#,
        );
        let pieces = split(parts(200), body, Protocol::Compatible, &[1, 0, 1]).unwrap();
        let shares: Vec<_> = pieces.iter().map(|p| p.usage.clone()).collect();
        assert_eq!(shares, [vec![5, 5], vec![0, 0], vec![5, 5]]);
        let v = json(&render(pieces));
        assert_eq!(
            v["data"],
            serde_json::json!([
                {"embedding":[1],"index":0},
                {"embedding":[2],"index":1},
                {"embedding":[3],"index":2},
            ])
        );
        assert_eq!(
            v["usage"],
            serde_json::json!({"prompt_tokens":10,"total_tokens":10,"unit":"tokens","ratio":0.5})
        );
        // The first answer has no usage; the second one's shares are kept.
        let bare = Bytes::from_static(br#"{"data":[{"index":0,"embedding":[1]}],"model":"a"}"#);
        let counted = Bytes::from_static(
            br#"{"data":[{"index":0,"embedding":[2]},{"index":1,"embedding":[3]}],"usage":{"total_tokens":6}}"#,
        );
        let mut all = split(parts(200), bare, Protocol::Compatible, &[1]).unwrap();
        all.extend(split(parts(200), counted, Protocol::Compatible, &[1, 2]).unwrap());
        let v = json(&render(all));
        assert_eq!(v["model"], "a");
        assert_eq!(v["usage"], serde_json::json!({"total_tokens":6}));
        assert_eq!(v["data"][2], serde_json::json!({"index":2,"embedding":[3]}));
        // No usage anywhere: none is made up.
        let bare = Bytes::from_static(br#"{"data":[{"index":0,"embedding":[1]}]}"#);
        let v = json(&render(
            split(parts(200), bare, Protocol::Compatible, &[1]).unwrap(),
        ));
        assert_eq!(v.get("usage"), None);
    }

    #[test]
    fn apportion_ties_and_remainders() {
        // The largest remainder gets the unit left over...
        assert_eq!(apportion(10, &[1, 2]), vec![3, 7]);
        assert_eq!(apportion(10, &[2, 1]), vec![7, 3]);
        // ...which need not be the largest share.
        assert_eq!(apportion(3, &[5, 1, 1]), vec![2, 1, 0]);
        // ...the earlier text on ties, one unit each at most.
        assert_eq!(apportion(5, &[1, 1, 1]), vec![2, 2, 1]);
        assert_eq!(apportion(2, &[1, 1, 1, 1]), vec![1, 1, 0, 0]);
        assert_eq!(apportion(3, &[0, 0, 0, 0]), vec![1, 1, 1, 0]);
        assert_eq!(apportion(6, &[1, 1, 1]), vec![2, 2, 2]);
        assert_eq!(apportion(1, &[0, 5]), vec![0, 1]);
        assert_eq!(apportion(7, &[4]), vec![7]);
    }

    #[test]
    fn size_error_statuses_and_numbers() {
        let native = br#"{"code":"InvalidParameter","message":"Batch size is invalid, it should not be larger than 25."}"#;
        for (status, want) in [
            (StatusCode::BAD_REQUEST, Some(Some(25))),
            (StatusCode::PAYLOAD_TOO_LARGE, Some(Some(25))),
            (StatusCode::OK, Some(Some(25))),
            (StatusCode::NOT_FOUND, None),
            (StatusCode::INTERNAL_SERVER_ERROR, None),
        ] {
            assert_eq!(batch_size_error(status, native), want, "{status}");
        }
        let zero =
            br#"{"code":"InvalidParameter","message":"batch size should not be larger than 0"}"#;
        assert_eq!(batch_size_error(StatusCode::BAD_REQUEST, zero), Some(None));
        // Not an error, or no message: not a size refusal.
        let ok = br#"{"output":{},"message":"batch size 10"}"#;
        assert_eq!(batch_size_error(StatusCode::OK, ok), None);
        let bare = br#"{"code":"InvalidParameter"}"#;
        assert_eq!(batch_size_error(StatusCode::BAD_REQUEST, bare), None);
        assert_eq!(
            batch_size_error(StatusCode::BAD_REQUEST, b"batch size 3"),
            None
        );
    }

    #[test]
    fn size_errors() {
        let native = br#"{"code":"InvalidParameter","message":"batch size is invalid, it should not be larger than 10.","request_id":"x"}"#;
        assert_eq!(
            batch_size_error(StatusCode::BAD_REQUEST, native),
            Some(Some(10))
        );
        let compat = br#"{"error":{"message":"<400> InternalError.Algo.InvalidParameter: Value error, batch size is invalid, it should not be larger than 6.: input.contents","type":"invalid_parameter_error","code":"invalid_parameter_error"}}"#;
        assert_eq!(
            batch_size_error(StatusCode::BAD_REQUEST, compat),
            Some(Some(6))
        );
        let vague = br#"{"code":"InvalidParameter","message":"Batch size too large"}"#;
        assert_eq!(batch_size_error(StatusCode::BAD_REQUEST, vague), Some(None));
        let other = br#"{"code":"InvalidParameter","message":"dimension is invalid"}"#;
        assert_eq!(batch_size_error(StatusCode::BAD_REQUEST, other), None);
        assert_eq!(
            batch_size_error(StatusCode::TOO_MANY_REQUESTS, native),
            None
        );
    }
}
