//! Nothing lost across restarts (issue 18, item 2): the service is dropped
//! mid-batch, with its callers, and a new one built over the same store
//! collects the answers.

use std::collections::BTreeMap;
use std::time::Duration;

use http::Method;
use serde_json::Value;
use tower::{Layer, ServiceExt};
use tower_qwen::batch::{BatchLayer, BatchStore, CustomId, FileStore, Record, Recovered, Recovery};
use tower_qwen::client::COMPATIBLE_CHAT;
use tower_qwen::mock::{BatchTiming, MockHandle};

use super::service::{body, post};
use super::{Raw, chat, eventually, eventually_every, layer, line, mock, temp_dir, transport};

/// Sends `n` requests with ids `row-<i>` through a service built by
/// `layer`, waits (checking every `step`) until their batch exists upstream
/// and is remembered, then drops the service and every caller, as a
/// process that stops would. Its worker writes nothing more.
async fn submit_then_stop(mock: &MockHandle, layer: BatchLayer, n: usize, step: Duration) {
    let svc = layer.layer(transport(mock));
    let calls: Vec<_> = (0..n)
        .map(|i| {
            let mut req = post(COMPATIBLE_CHAT, chat("qwen-plus", &format!("review {i}")));
            req.extensions_mut().insert(CustomId(format!("row-{i}")));
            tokio::spawn(svc.clone().oneshot(req))
        })
        .collect();
    eventually_every("a batch", step, || svc.stats().batches > 0).await;
    drop(svc);
    for c in calls {
        c.abort();
        assert!(c.await.unwrap_err().is_cancelled());
    }
}

/// The next recovered line, within an hour.
async fn next(recovery: &mut Recovery) -> Option<Recovered> {
    tokio::time::timeout(Duration::from_secs(3600), recovery.next())
        .await
        .expect("a recovered line within an hour")
}

/// Resumes with a new service over `layer`'s store; every line's status
/// and body by custom id.
async fn resume_all(mock: &MockHandle, layer: BatchLayer) -> BTreeMap<String, (u16, Value)> {
    let svc = layer.layer(transport(mock));
    let mut recovery = svc.resume().await.unwrap();
    assert_eq!(recovery.batches(), 1);
    let mut out = BTreeMap::new();
    while let Some(line) = next(&mut recovery).await {
        let id = line.custom_id().to_owned();
        assert!(line.batch_id().is_some());
        let res = line.into_result().unwrap();
        let status = res.status().as_u16();
        out.insert(id, (status, body(res).await));
    }
    // The recovery ended once the batch was forgotten: resuming again
    // finds nothing left.
    assert_eq!(svc.resume().await.unwrap().lines(), 0);
    out
}

#[tokio::test(start_paused = true)]
async fn a_new_process_collects_what_the_old_one_submitted() {
    let mock = mock(BatchTiming::default().in_progress(Duration::from_secs(600))).await;
    let dir = temp_dir("restart");
    submit_then_stop(&mock, layer(&dir), 5, Duration::from_millis(500)).await;

    // The store remembers the batch and every custom id.
    let records = FileStore::new(dir.join("batches.json"))
        .load()
        .await
        .unwrap();
    assert_eq!(records.len(), 1);
    assert!(records[0].batch_id.is_some());
    assert_eq!(records[0].custom_ids.len(), 5);
    assert_eq!(records[0].model, "qwen-plus");

    let got = resume_all(&mock, layer(&dir)).await;
    assert_eq!(got.len(), 5);
    for (i, (id, (status, v))) in got.iter().enumerate() {
        assert_eq!(id, &format!("row-{i}"));
        assert_eq!(*status, 200);
        assert_eq!(v["object"], "chat.completion");
    }
    let bs = mock.batch_stats();
    assert_eq!(
        (
            bs.batches_created,
            bs.batches_completed,
            bs.batches_cancelled
        ),
        (1, 1, 0)
    );
    assert!(
        FileStore::new(dir.join("batches.json"))
            .load()
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(start_paused = true)]
async fn a_batch_whose_creation_was_not_recorded_is_found_or_created() {
    let mock = mock(BatchTiming::instant()).await;
    let raw = Raw::new(&mock);
    let dir = temp_dir("half-done");
    let store = FileStore::new(dir.join("batches.json"));
    let content = |ids: &[&str]| {
        ids.iter()
            .map(|id| line(id, "/v1/chat/completions", chat("qwen-plus", id)))
            .collect::<Vec<_>>()
            .join("\n")
    };
    // Crashed after the upload: no batch exists.
    let (_, f1) = raw.upload(&content(&["a", "b"])).await;
    // Crashed after the create, before recording it.
    let (_, f2) = raw.upload(&content(&["c"])).await;
    let (_, created) = raw
        .create(f2["id"].as_str().unwrap(), "/v1/chat/completions")
        .await;
    for (f, ids) in [(&f1, vec!["a", "b"]), (&f2, vec!["c"])] {
        let r: Record = serde_json::from_value(serde_json::json!({
            "input_file_id": f["id"], "batch_id": null, "endpoint": "/v1/chat/completions",
            "model": "qwen-plus", "custom_ids": ids, "submitted_at": 0,
        }))
        .unwrap();
        store.save(&r).await.unwrap();
    }
    let svc = layer(&dir).layer(transport(&mock));
    let mut recovery = svc.resume().await.unwrap();
    assert_eq!((recovery.batches(), recovery.lines()), (2, 3));
    let mut seen = BTreeMap::new();
    while let Some(l) = next(&mut recovery).await {
        seen.insert(l.custom_id().to_owned(), l.batch_id().unwrap().to_owned());
        assert!(l.into_result().is_ok());
    }
    assert_eq!(seen.len(), 3);
    assert_eq!(seen["c"], created["id"].as_str().unwrap());
    // One batch created by the test, one by the resume: none twice.
    assert_eq!(mock.batch_stats().batches_created, 2);
    let (_, list) = raw.json(Method::GET, "/batches", None).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_batch_that_cannot_be_polled_for_now_stays_for_a_resume() {
    let mock = mock(BatchTiming::default().in_progress(Duration::from_secs(600))).await;
    let dir = temp_dir("revoked");
    let svc = layer(&dir).layer(transport(&mock));
    let call = tokio::spawn(
        svc.clone()
            .oneshot(post(COMPATIBLE_CHAT, chat("qwen-plus", "x"))),
    );
    eventually("a batch", || svc.stats().batches > 0).await;
    // The key stops working: polls get 401, the caller an error.
    assert!(mock.remove_key(super::KEY));
    let e = call.await.unwrap().unwrap_err();
    let e = e
        .downcast_ref::<tower_qwen::batch::error::BatchError>()
        .unwrap();
    assert_eq!(e.status(), Some(401));
    // The batch is still remembered; with the key back, a resume gets it.
    assert_eq!(
        FileStore::new(dir.join("batches.json"))
            .load()
            .await
            .unwrap()
            .len(),
        1
    );
    mock.add_key(super::KEY, "acct");
    let got = resume_all(&mock, layer(&dir)).await;
    assert_eq!(got.len(), 1);
    assert!(got.values().all(|(s, _)| *s == 200));
}

#[tokio::test(start_paused = true)]
async fn a_corrupt_store_is_an_error_not_a_silent_loss() {
    let mock = mock(BatchTiming::instant()).await;
    let dir = temp_dir("corrupt");
    std::fs::write(dir.join("batches.json"), b"{\"version\":1,\"batches\":[{").unwrap();
    let svc = layer(&dir).layer(transport(&mock));
    let e = svc.resume().await.unwrap_err();
    assert!(e.is_store(), "{e}");
    assert_eq!(std::fs::read(dir.join("batches.json")).unwrap().len(), 25);
}

#[cfg(feature = "redis")]
mod on_redis {
    use super::*;
    use crate::redis_server as server;
    use tower_qwen::batch::RedisStore;

    fn store(server: &server::RedisServer) -> RedisStore {
        let client = redis::Client::open(server.url()).unwrap();
        let conn = redis::aio::ConnectionManager::new_lazy_with_config(
            client,
            redis::aio::ConnectionManagerConfig::new(),
        )
        .unwrap();
        RedisStore::new(conn, "test:batches")
    }

    /// Real time, unlike the other tests: Redis cannot follow a paused
    /// clock, which would jump to the next timer while a Redis reply is on
    /// its way. Nothing here depends on how long anything takes; the states
    /// of the mock's batch last 300 ms and the service polls every 10 to
    /// 50 ms.
    #[tokio::test]
    async fn a_new_process_collects_through_redis() {
        let server = server::RedisServer::start();
        let mock = mock(
            BatchTiming::instant()
                .in_progress(Duration::from_millis(300))
                .finalizing(Duration::from_millis(10)),
        )
        .await;
        let layer = || {
            BatchLayer::new()
                .max_wait(Duration::from_millis(10))
                .poll_interval(Duration::from_millis(10), Duration::from_millis(50))
                .store(store(&server))
        };
        submit_then_stop(&mock, layer(), 3, Duration::from_millis(10)).await;
        let records = store(&server).load().await.unwrap();
        assert_eq!(records.len(), 1);
        assert!(records[0].batch_id.is_some());
        assert_eq!(records[0].custom_ids, ["row-0", "row-1", "row-2"]);
        let got = resume_all(&mock, layer()).await;
        assert_eq!(got.keys().collect::<Vec<_>>(), ["row-0", "row-1", "row-2"]);
        assert!(got.values().all(|(s, _)| *s == 200));
        assert!(store(&server).load().await.unwrap().is_empty());
        let bs = mock.batch_stats();
        assert_eq!((bs.batches_created, bs.batches_cancelled), (1, 0));
    }
}
