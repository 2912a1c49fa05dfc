//! Routing by urgency (issue 18, item 5).

use std::num::{NonZeroU32, NonZeroU64};
use std::time::Duration;

use tower::{Layer, ServiceExt};
use tower_qwen::batch::{DEFER_HEADER, DeferLayer, Deferrable};
use tower_qwen::client::{ChatRequest, QwenClient};
use tower_qwen::mock::{BatchTiming, MockDashScope, Quota};

use super::service::body;
use super::{KEY, layer, temp_dir, transport};

fn realtime(mock: &tower_qwen::mock::MockHandle) -> QwenClient {
    QwenClient::builder()
        .base_url(mock.base_url().parse().unwrap())
        .api_key(KEY)
        .unwrap()
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn deferrable_requests_go_to_the_batch_api_and_the_others_in_real_time() {
    let mock = MockDashScope::builder()
        .key(KEY, "acct")
        .batch_timing(BatchTiming::instant())
        .start()
        .await
        .unwrap();
    let dir = temp_dir("route");
    let batch = layer(&dir).layer(transport(&mock));
    let client = DeferLayer::new(batch.clone()).layer(realtime(&mock));

    // Not marked: real time.
    let res = client
        .clone()
        .oneshot(ChatRequest::new("qwen-plus").user("now").into_request())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(mock.stats().admitted("qwen-plus"), 1);

    // The extension, and the header (which never reaches either side).
    let mut by_ext = ChatRequest::new("qwen-plus").user("later").into_request();
    Deferrable::mark(&mut by_ext);
    let mut by_header = ChatRequest::new("qwen-plus")
        .user("later too")
        .into_request();
    by_header
        .headers_mut()
        .insert(DEFER_HEADER, "1".parse().unwrap());
    let (a, b) = tokio::join!(
        client.clone().oneshot(by_ext),
        client.clone().oneshot(by_header)
    );
    for res in [a.unwrap(), b.unwrap()] {
        assert_eq!(res.status(), 200);
        assert_eq!(body(res).await["object"], "chat.completion");
    }
    assert_eq!(mock.stats().admitted("qwen-plus"), 1);
    assert_eq!(mock.batch_stats().lines_succeeded, 2);
    assert_eq!(batch.stats().requests, 2);

    // `x-tower-qwen-defer: 0` is not deferrable.
    let mut zero = ChatRequest::new("qwen-plus").user("now").into_request();
    zero.headers_mut()
        .insert(DEFER_HEADER, "0".parse().unwrap());
    client.oneshot(zero).await.unwrap();
    assert_eq!(mock.stats().admitted("qwen-plus"), 2);
}

#[tokio::test(start_paused = true)]
async fn a_bulk_job_uses_no_real_time_quota() {
    // A tiny real-time quota that 300 real-time calls would exhaust.
    let mock = MockDashScope::builder()
        .key(KEY, "acct")
        .quota(
            "qwen-plus",
            Quota::new(
                NonZeroU32::new(10).unwrap(),
                NonZeroU64::new(10_000).unwrap(),
            ),
        )
        .batch_timing(BatchTiming::default().in_progress(Duration::from_secs(600)))
        .start()
        .await
        .unwrap();
    let dir = temp_dir("bulk");
    let client = DeferLayer::new(layer(&dir).layer(transport(&mock))).layer(realtime(&mock));
    let calls: Vec<_> = (0..300)
        .map(|i| {
            let mut req = ChatRequest::new("qwen-plus")
                .user(format!("Classify the sentiment of review {i}"))
                .max_tokens(1)
                .into_request();
            Deferrable::mark(&mut req);
            tokio::spawn(client.clone().oneshot(req))
        })
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap().unwrap().status(), 200);
    }
    let stats = mock.stats();
    assert!(stats.admitted_by_model.is_empty());
    assert_eq!(stats.status(429), 0);
    assert_eq!(mock.batch_stats().lines_succeeded, 300);
}
