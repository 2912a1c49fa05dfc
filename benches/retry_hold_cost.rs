//! What holding output-less frames (#15) costs the retry layer's peek, in
//! instructions: the same answers peeked with `Hold::NONE` (the first
//! `data:` line decides) and with the default hold, side by side.
//!
//! Two answers: a native stream whose first frame carries a token (the hold
//! only has to see that it does), and a compatible stream whose role-only
//! first chunk is held until the content chunk after it. Each is peeked and
//! read whole, `N` times.
//!
//! Time on a shared 2-core machine is noise; count instructions instead
//! (per request: the difference of two runs divided by the difference of
//! their `N`):
//!
//! ```text
//! cargo bench --no-default-features --features retry --bench retry_hold_cost --no-run
//! valgrind --tool=callgrind target/release/deps/retry_hold_cost-<hash> none compat 1000
//! valgrind --tool=callgrind target/release/deps/retry_hold_cost-<hash> none compat 11000
//! ```
//!
//! Run by `cargo bench` without arguments, it prints the wall time per
//! request of the four cases.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tower_qwen::classify::Classifier;
use tower_qwen::retry::{Hold, Peek};

const NATIVE: &str = "id:1\nevent:result\n:HTTP_STATUS/200\ndata:{\"output\":{\"choices\":[{\"message\":{\"content\":\"Hel\",\"role\":\"assistant\"},\"finish_reason\":\"null\"}]},\"usage\":{\"input_tokens\":12,\"output_tokens\":1},\"request_id\":\"9d3c\"}\n\n";
const COMPAT: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"\",\"role\":\"assistant\"},\"index\":0,\"logprobs\":null,\"finish_reason\":null}],\"object\":\"chat.completion.chunk\",\"usage\":null,\"created\":1,\"system_fingerprint\":null,\"model\":\"qwen-plus\",\"id\":\"chatcmpl-1\"}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"Hi\"},\"index\":0,\"logprobs\":null,\"finish_reason\":null}],\"object\":\"chat.completion.chunk\",\"id\":\"chatcmpl-1\"}\n\n";

fn run(hold: Hold, wire: &'static str, n: usize) -> std::time::Duration {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let c = Classifier::new();
    rt.block_on(async {
        let start = std::time::Instant::now();
        for _ in 0..n {
            let res = http::Response::builder()
                .header("content-type", "text/event-stream")
                .body(Full::new(Bytes::from_static(wire.as_bytes())))
                .expect("response");
            let peeked = Peek::with_hold(res, &c, hold).await;
            let body = peeked.response.into_body().collect().await.expect("body");
            std::hint::black_box(body);
        }
        start.elapsed()
    })
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let hold = |s: &str| if s == "none" { Hold::NONE } else { Hold::new() };
    let wire = |s: &str| if s == "native" { NATIVE } else { COMPAT };
    if let [h, w, n] = &args[..] {
        run(hold(h), wire(w), n.parse().expect("N"));
        return;
    }
    let n = 100_000;
    for (h, w) in [
        ("none", "native"),
        ("hold", "native"),
        ("none", "compat"),
        ("hold", "compat"),
    ] {
        let t = run(hold(h), wire(w), n);
        println!(
            "{h:>4} {w:>6}: {:.0} ns per request",
            t.as_nanos() as f64 / n as f64
        );
    }
}
