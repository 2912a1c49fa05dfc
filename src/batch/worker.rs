//! The worker: files filling per (endpoint, model), and one task per batch
//! that uploads, creates, polls and hands out the answers.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Weak};
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use tokio::sync::{mpsc, oneshot};

use super::api::{Api, BatchObject, OutLine, Status, Upstream};
use super::error::BatchError;
use super::future::Answer;
use super::line::{GroupKey, Prepared};
use super::service::{Counters, Ctx, Shared};
use super::store::Record;
use crate::time::{self, Instant};
use crate::usage::Usage;

/// A request on its way to the worker.
pub(crate) struct Item {
    pub(crate) prepared: Prepared,
    pub(crate) reply: oneshot::Sender<Answer>,
}

/// Where a line's answer goes.
enum Reply {
    Caller(oneshot::Sender<Answer>),
    Recovered(mpsc::UnboundedSender<Recovered>),
}

impl Reply {
    fn is_closed(&self) -> bool {
        match self {
            Self::Caller(tx) => tx.is_closed(),
            Self::Recovered(tx) => tx.is_closed(),
        }
    }

    fn send(self, custom_id: &Arc<str>, batch_id: Option<&Arc<str>>, answer: Answer) {
        match self {
            Self::Caller(tx) => {
                let _ = tx.send(answer);
            }
            Self::Recovered(tx) => {
                let _ = tx.send(Recovered {
                    custom_id: custom_id.clone(),
                    batch_id: batch_id.cloned(),
                    result: answer,
                });
            }
        }
    }
}

/// A line of a file, waiting for its answer.
struct Waiter {
    custom_id: Arc<str>,
    reply: Option<Reply>,
}

impl Waiter {
    fn is_closed(&self) -> bool {
        self.reply.as_ref().is_none_or(Reply::is_closed)
    }
}

/// A file filling up.
struct Group {
    lines: Vec<(Waiter, Vec<u8>)>,
    bytes: usize,
    ids: std::collections::HashSet<Arc<str>>,
    deadline: Instant,
    /// Opening order, to send the oldest first on equal deadlines.
    opened: u64,
}

/// Extension on every response the Batch API answered: which batch and
/// line it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchLine {
    batch_id: Arc<str>,
    custom_id: Arc<str>,
}

impl BatchLine {
    /// The batch's id.
    pub fn batch_id(&self) -> &str {
        &self.batch_id
    }

    /// The line's `custom_id`.
    pub fn custom_id(&self) -> &str {
        &self.custom_id
    }
}

/// One line of a batch submitted before a restart, collected by
/// [`Batch::resume`](super::Batch::resume).
pub struct Recovered {
    custom_id: Arc<str>,
    batch_id: Option<Arc<str>>,
    result: Answer,
}

impl Recovered {
    /// The line's `custom_id` (yours, if the request carried a
    /// [`CustomId`](super::CustomId)).
    pub fn custom_id(&self) -> &str {
        &self.custom_id
    }

    /// The batch, if it was created.
    pub fn batch_id(&self) -> Option<&str> {
        self.batch_id.as_deref()
    }

    /// The answer: what the original caller would have received.
    pub fn result(&self) -> &Answer {
        &self.result
    }

    /// The answer, by value.
    pub fn into_result(self) -> Answer {
        self.result
    }
}

impl fmt::Debug for Recovered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recovered")
            .field("custom_id", &self.custom_id)
            .field("batch_id", &self.batch_id)
            .field("status", &self.result.as_ref().map(|r| r.status()))
            .finish()
    }
}

/// The answers of batches submitted before a restart, from
/// [`Batch::resume`](super::Batch::resume).
///
/// Dropping it means nobody wants them: the batches are cancelled
/// upstream (at their next poll) while the service lives.
pub struct Recovery {
    rx: mpsc::UnboundedReceiver<Recovered>,
    batches: usize,
    lines: usize,
}

impl Recovery {
    /// The next line collected; `None` once every batch was collected and
    /// removed from the store.
    pub async fn next(&mut self) -> Option<Recovered> {
        self.rx.recv().await
    }

    /// The batches being collected.
    pub fn batches(&self) -> usize {
        self.batches
    }

    /// The lines they hold: how many [`next`](Self::next) yields in all.
    pub fn lines(&self) -> usize {
        self.lines
    }
}

impl fmt::Debug for Recovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Recovery")
            .field("batches", &self.batches)
            .field("lines", &self.lines)
            .finish()
    }
}

fn unix_now() -> u64 {
    time::system_now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The worker: fills one file per (endpoint, model), sends it when it is
/// full or its first line has waited `max_wait`, and everything at once
/// when the service is gone.
pub(crate) async fn run<S: Upstream>(
    mut rx: mpsc::UnboundedReceiver<Item>,
    api: Api<S>,
    ctx: Arc<Ctx>,
    alive: Weak<Shared>,
) {
    let mut groups: HashMap<GroupKey, Group> = HashMap::new();
    let sleep = tokio::time::sleep_until(time::far_future());
    tokio::pin!(sleep);
    let mut armed: Option<Instant> = None;
    let send = |key: GroupKey, group: Group| {
        flush(&api, &ctx, &alive, key, group);
    };
    loop {
        let next = groups.values().map(|g| g.deadline).min();
        if next != armed {
            if let Some(d) = next {
                sleep.as_mut().reset(d);
            }
            armed = next;
        }
        tokio::select! {
            item = rx.recv() => match item {
                Some(item) => add(&mut groups, item, &ctx, &send),
                None => {
                    for (key, group) in groups.drain() {
                        send(key, group);
                    }
                    return;
                }
            },
            () = &mut sleep, if armed.is_some() => {
                let now = time::now();
                let due: Vec<GroupKey> = groups
                    .iter()
                    .filter(|(_, g)| g.deadline <= now)
                    .map(|(k, _)| k.clone())
                    .collect();
                for key in due {
                    if let Some(g) = groups.remove(&key) {
                        send(key, g);
                    }
                }
                armed = None;
            }
        }
    }
}

fn add(
    groups: &mut HashMap<GroupKey, Group>,
    item: Item,
    ctx: &Ctx,
    send: &impl Fn(GroupKey, Group),
) {
    let c = &ctx.config;
    let Prepared {
        key,
        custom_id,
        bytes,
    } = item.prepared;
    // Send the file first if this line cannot join it.
    if let Some(g) = groups.get(&key)
        && (g.ids.contains(&custom_id)
            || g.lines.len() >= c.max_lines
            || g.bytes + bytes.len() > c.max_bytes)
        && let Some(g) = groups.remove(&key)
    {
        send(key.clone(), g);
    }
    if !groups.contains_key(&key) && groups.len() >= c.max_groups {
        let oldest = groups
            .iter()
            .min_by_key(|(_, g)| (g.deadline, g.opened))
            .map(|(k, _)| k.clone());
        if let Some(k) = oldest
            && let Some(g) = groups.remove(&k)
        {
            send(k, g);
        }
    }
    let opened = groups.values().map(|g| g.opened + 1).max().unwrap_or(0);
    let group = groups.entry(key.clone()).or_insert_with(|| Group {
        lines: Vec::new(),
        bytes: 0,
        ids: Default::default(),
        deadline: time::now() + c.max_wait,
        opened,
    });
    group.bytes += bytes.len();
    group.ids.insert(custom_id.clone());
    group.lines.push((
        Waiter {
            custom_id,
            reply: Some(Reply::Caller(item.reply)),
        },
        bytes,
    ));
    if (group.lines.len() >= c.max_lines
        || group.bytes >= c.max_bytes
        || group.deadline <= time::now())
        && let Some(g) = groups.remove(&key)
    {
        send(key, g);
    }
}

/// Sends a file: drops the lines whose callers are gone and spawns its
/// batch's task.
fn flush<S: Upstream>(
    api: &Api<S>,
    ctx: &Arc<Ctx>,
    alive: &Weak<Shared>,
    key: GroupKey,
    group: Group,
) {
    let mut content = Vec::with_capacity(group.bytes);
    let mut waiters = Vec::with_capacity(group.lines.len());
    for (w, bytes) in group.lines {
        if w.is_closed() {
            Counters::add(&ctx.stats.dropped, 1);
            continue;
        }
        content.extend_from_slice(&bytes);
        waiters.push(w);
    }
    if waiters.is_empty() {
        return;
    }
    tracing::debug!(model = %key.model, lines = waiters.len(), bytes = content.len(), "batch: sending a file");
    tokio::spawn(submit(
        api.clone(),
        ctx.clone(),
        alive.clone(),
        key,
        Bytes::from(content),
        waiters,
    ));
}

fn fail_all(ctx: &Ctx, waiters: &mut [Waiter], batch_id: Option<&Arc<str>>, e: &BatchError) {
    for w in waiters {
        if let Some(reply) = w.reply.take() {
            Counters::add(&ctx.stats.errors, 1);
            let err = e.clone().with_ids(batch_id, &w.custom_id);
            reply.send(&w.custom_id, batch_id, Err(Box::new(err)));
        }
    }
}

async fn save(ctx: &Ctx, record: &Record) {
    if let Err(e) = ctx.config.store.save(record).await {
        tracing::warn!(
            input_file_id = %record.input_file_id,
            error = %e,
            "batch: the store failed; this batch cannot be resumed after a restart"
        );
    }
}

async fn forget(ctx: &Ctx, input_file_id: &str) {
    if let Err(e) = ctx.config.store.remove(input_file_id).await {
        tracing::warn!(%input_file_id, error = %e, "batch: removing a collected batch from the store failed");
    }
    ctx.untrack(input_file_id);
}

/// Uploads a file, creates its batch and collects it.
async fn submit<S: Upstream>(
    api: Api<S>,
    ctx: Arc<Ctx>,
    alive: Weak<Shared>,
    key: GroupKey,
    content: Bytes,
    mut waiters: Vec<Waiter>,
) {
    let job = ctx.next_id();
    let file = match api.upload(content, &format!("{job}.jsonl")).await {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(error = %e, "batch: upload failed");
            fail_all(&ctx, &mut waiters, None, &e);
            return;
        }
    };
    Counters::add(&ctx.stats.files, 1);
    let mut record = Record {
        input_file_id: file.id,
        batch_id: None,
        endpoint: key.url.to_owned(),
        model: key.model.to_string(),
        custom_ids: waiters.iter().map(|w| w.custom_id.to_string()).collect(),
        submitted_at: unix_now(),
    };
    ctx.track(&record.input_file_id);
    save(&ctx, &record).await;
    if waiters.iter().all(Waiter::is_closed) && alive.strong_count() > 0 {
        // Every caller left during the upload.
        Counters::add(&ctx.stats.dropped, waiters.len() as u64);
        discard(&api, &ctx, &record, None).await;
        return;
    }
    let batch = match create(&api, &record, &job).await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "batch: creating the batch failed");
            fail_all(&ctx, &mut waiters, None, &e);
            discard(&api, &ctx, &record, None).await;
            return;
        }
    };
    record.batch_id = Some(batch.id.clone());
    save(&ctx, &record).await;
    // Counted once remembered: a process that stops from here on leaves
    // the batch to `resume`.
    Counters::add(&ctx.stats.batches, 1);
    collect(api, ctx, alive, record, batch, waiters).await;
}

/// Forgets a batch nobody will collect: cancels it (when created) and
/// deletes its input file.
async fn discard<S: Upstream>(api: &Api<S>, ctx: &Ctx, record: &Record, batch_id: Option<&str>) {
    if let Some(id) = batch_id {
        match api.cancel(id).await {
            Ok(_) => Counters::add(&ctx.stats.cancelled_by_callers, 1),
            Err(e) => tracing::warn!(batch_id = %id, error = %e, "batch: cancelling failed"),
        }
    }
    if ctx.config.delete_files
        && let Err(e) = api.delete(&record.input_file_id).await
    {
        tracing::debug!(error = %e, "batch: deleting the input file failed");
    }
    forget(ctx, &record.input_file_id).await;
}

/// Creates the batch; after an attempt that failed in a way that may have
/// created it anyway, looks for it before trying again.
async fn create<S: Upstream>(
    api: &Api<S>,
    record: &Record,
    job: &str,
) -> Result<BatchObject, BatchError> {
    let mut wait = api.backoff;
    let mut n = 0;
    loop {
        n += 1;
        match api
            .create_once(&record.input_file_id, &record.endpoint, &api.window, job)
            .await
        {
            Ok(b) => return Ok(b),
            Err((e, false)) => return Err(e),
            Err((e, true)) => {
                if n >= api.attempts {
                    return Err(e);
                }
                tokio::time::sleep(wait).await;
                wait = wait.saturating_mul(2);
                if let Ok(Some(b)) = find(api, &record.input_file_id).await {
                    return Ok(b);
                }
            }
        }
    }
}

/// The batch created from `input_file_id`, if any (the 1,000 most recent
/// batches are searched).
async fn find<S: Upstream>(
    api: &Api<S>,
    input_file_id: &str,
) -> Result<Option<BatchObject>, BatchError> {
    let mut after: Option<String> = None;
    for _ in 0..10 {
        let page = api.list(after.as_deref()).await?;
        if let Some(b) = page
            .data
            .iter()
            .find(|b| b.input_file_id.as_deref() == Some(input_file_id))
        {
            return Ok(Some(b.clone()));
        }
        match (page.has_more, page.last_id) {
            (true, Some(last)) => after = Some(last),
            _ => break,
        }
    }
    Ok(None)
}

/// Polls a batch until it ends (or every caller is gone), then hands out
/// its answers.
async fn collect<S: Upstream>(
    api: Api<S>,
    ctx: Arc<Ctx>,
    alive: Weak<Shared>,
    record: Record,
    mut batch: BatchObject,
    mut waiters: Vec<Waiter>,
) {
    let batch_id: Arc<str> = Arc::from(batch.id.as_str());
    let c = &ctx.config;
    let mut wait = c.poll_initial;
    while Status::of(&batch.status) == Status::Running {
        if waiters.iter().all(Waiter::is_closed) {
            if alive.strong_count() > 0 {
                tracing::debug!(%batch_id, "batch: every caller is gone; cancelling the batch");
                discard(&api, &ctx, &record, Some(&batch_id)).await;
            } else {
                // The service and every caller are gone, as in a process
                // that stops: the record stays for `resume`.
                ctx.untrack(&record.input_file_id);
            }
            return;
        }
        tokio::time::sleep(wait).await;
        wait = wait.saturating_mul(2).min(c.poll_max);
        Counters::add(&ctx.stats.polls, 1);
        match api.retrieve(&batch_id).await {
            Ok(b) => batch = b,
            Err((e, true)) => {
                tracing::debug!(%batch_id, error = %e, "batch: poll failed; polling again later");
            }
            Err((e, false)) => {
                tracing::warn!(%batch_id, error = %e, "batch: the batch cannot be polled");
                fail_all(&ctx, &mut waiters, Some(&batch_id), &e);
                if e.status() == Some(404) {
                    forget(&ctx, &record.input_file_id).await;
                } else {
                    // Perhaps a key to fix: a resume may collect it later.
                    ctx.untrack(&record.input_file_id);
                }
                return;
            }
        }
    }
    if batch.output_file_id.is_none()
        && batch.error_file_id.is_none()
        && Status::of(&batch.status) != Status::Failed
    {
        // An ended batch names its files; ask once more before calling its
        // lines missing.
        if let Ok(b) = api.retrieve(&batch_id).await {
            batch = b;
        }
    }
    finish(&api, &ctx, &alive, &record, &batch, &batch_id, waiters).await;
}

/// Hands out the answers of a terminal batch.
async fn finish<S: Upstream>(
    api: &Api<S>,
    ctx: &Ctx,
    alive: &Weak<Shared>,
    record: &Record,
    batch: &BatchObject,
    batch_id: &Arc<str>,
    mut waiters: Vec<Waiter>,
) {
    if alive.strong_count() == 0 && waiters.iter().all(Waiter::is_closed) {
        // A process that stopped: nobody would receive the answers, so
        // they stay upstream for `resume`.
        ctx.untrack(&record.input_file_id);
        return;
    }
    let status = Status::of(&batch.status);
    let s = &ctx.stats;
    Counters::add(
        match status {
            Status::Completed => &s.completed,
            Status::Failed => &s.failed,
            Status::Expired => &s.expired,
            _ => &s.cancelled,
        },
        1,
    );
    tracing::debug!(%batch_id, status = %batch.status, "batch: ended");
    if status == Status::Failed {
        let first = batch.errors.as_ref().and_then(|e| e.data.first());
        let code = first
            .and_then(|e| e.code.clone())
            .unwrap_or_else(|| "failed".into());
        let mut message = first
            .and_then(|e| e.message.clone())
            .unwrap_or_else(|| "the batch failed".into());
        if let Some(line) = first.and_then(|e| e.line) {
            message.push_str(&format!(" (line {line})"));
        }
        fail_all(
            ctx,
            &mut waiters,
            Some(batch_id),
            &BatchError::failed(code, message),
        );
        cleanup(api, ctx, record, batch).await;
        return;
    }
    let index: HashMap<Arc<str>, usize> = waiters
        .iter()
        .enumerate()
        .map(|(i, w)| (w.custom_id.clone(), i))
        .collect();
    let mut download_error = None;
    for file_id in [&batch.output_file_id, &batch.error_file_id]
        .into_iter()
        .flatten()
    {
        let bytes = match api.content(file_id).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(%batch_id, %file_id, error = %e, "batch: downloading a result file failed");
                download_error = Some(e);
                continue;
            }
        };
        for raw in bytes.split(|&b| b == b'\n') {
            let raw = raw.trim_ascii();
            if raw.is_empty() {
                continue;
            }
            let Ok(line) = serde_json::from_slice::<OutLine>(raw) else {
                tracing::debug!(%batch_id, "batch: skipping a result line that is not JSON");
                continue;
            };
            let Some(w) = index
                .get(line.custom_id.as_str())
                .and_then(|&i| waiters.get_mut(i))
            else {
                continue;
            };
            let Some(reply) = w.reply.take() else {
                continue;
            };
            let answer = answer(ctx, line, batch_id, &w.custom_id);
            reply.send(&w.custom_id, Some(batch_id), answer);
        }
    }
    let rest = match (&download_error, status) {
        (Some(e), _) => e.clone(),
        (None, Status::Expired) => BatchError::expired(),
        (None, Status::Cancelled) => BatchError::cancelled(),
        (None, _) => BatchError::missing(),
    };
    fail_all(ctx, &mut waiters, Some(batch_id), &rest);
    if download_error.is_some() {
        // Keep the record: a resume may download the files later.
        ctx.untrack(&record.input_file_id);
        return;
    }
    cleanup(api, ctx, record, batch).await;
}

/// Deletes a collected batch's files (when configured) and its record.
async fn cleanup<S: Upstream>(api: &Api<S>, ctx: &Ctx, record: &Record, batch: &BatchObject) {
    if ctx.config.delete_files {
        for id in [
            Some(&record.input_file_id),
            batch.output_file_id.as_ref(),
            batch.error_file_id.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            if let Err(e) = api.delete(id).await {
                tracing::debug!(file_id = %id, error = %e, "batch: deleting a file failed");
            }
        }
    }
    forget(ctx, &record.input_file_id).await;
}

/// A result line as the caller's answer.
fn answer(ctx: &Ctx, line: OutLine, batch_id: &Arc<str>, custom_id: &Arc<str>) -> Answer {
    let s = &ctx.stats;
    let Some(r) = line.response else {
        Counters::add(&s.errors, 1);
        let (code, message) = line.error.map(|e| (e.code, e.message)).unwrap_or_default();
        let err = match code.as_deref() {
            // OpenAI's codes for lines a batch did not reach.
            Some("batch_expired") => BatchError::expired(),
            Some("batch_cancelled") => BatchError::cancelled(),
            _ => BatchError::line(
                code.unwrap_or_else(|| "error".into()),
                message.unwrap_or_default(),
            ),
        };
        return Err(Box::new(err.with_ids(Some(batch_id), custom_id)));
    };
    Counters::add(&s.responses, 1);
    let body = Bytes::from(r.body.to_string());
    let usage = Usage::find(&body);
    if let Some(u) = usage {
        Counters::add(&s.input_tokens, u64::from(u.input_tokens));
        Counters::add(&s.output_tokens, u64::from(u.output_tokens));
    }
    let mut res = Response::new(
        Full::new(body)
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *res.status_mut() = StatusCode::from_u16(r.status_code).unwrap_or(StatusCode::BAD_GATEWAY);
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    if let Some(v) = r
        .request_id
        .as_deref()
        .and_then(|id| header::HeaderValue::from_str(id).ok())
    {
        h.insert("x-request-id", v);
    }
    let ext = res.extensions_mut();
    if let Some(u) = usage {
        ext.insert(u);
    }
    ext.insert(BatchLine {
        batch_id: batch_id.clone(),
        custom_id: custom_id.clone(),
    });
    Ok(res)
}

/// Starts collecting the batches of `records`.
pub(crate) fn resume<S: Upstream>(
    records: Vec<Record>,
    api: Api<S>,
    ctx: Arc<Ctx>,
    alive: Weak<Shared>,
) -> Recovery {
    let (tx, rx) = mpsc::unbounded_channel();
    let (mut batches, mut lines) = (0, 0);
    for record in records {
        if !ctx.track(&record.input_file_id) {
            continue;
        }
        batches += 1;
        lines += record.custom_ids.len();
        let (api, ctx, alive) = (api.clone(), ctx.clone(), alive.clone());
        let waiters = record
            .custom_ids
            .iter()
            .map(|id| Waiter {
                custom_id: Arc::from(id.as_str()),
                reply: Some(Reply::Recovered(tx.clone())),
            })
            .collect();
        let done = tx.clone();
        tokio::spawn(async move {
            resume_one(api, ctx, alive, record, waiters).await;
            // The recovery ends once this batch is also forgotten.
            drop(done);
        });
    }
    Recovery { rx, batches, lines }
}

async fn resume_one<S: Upstream>(
    api: Api<S>,
    ctx: Arc<Ctx>,
    alive: Weak<Shared>,
    mut record: Record,
    mut waiters: Vec<Waiter>,
) {
    tracing::debug!(input_file_id = %record.input_file_id, batch_id = ?record.batch_id, "batch: resuming");
    let found = match &record.batch_id {
        Some(id) => {
            let mut wait = api.backoff;
            let mut n = 0;
            loop {
                n += 1;
                match api.retrieve(id).await {
                    Ok(b) => break Ok(b),
                    Err((e, true)) if n < api.attempts => {
                        tracing::debug!(error = %e, "batch: retrying a poll");
                        tokio::time::sleep(wait).await;
                        wait = wait.saturating_mul(2);
                    }
                    Err((e, _)) => break Err(e),
                }
            }
        }
        None => match find(&api, &record.input_file_id).await {
            Ok(Some(b)) => Ok(b),
            Ok(None) => {
                let job = ctx.next_id();
                create(&api, &record, &job).await.inspect(|_| {
                    Counters::add(&ctx.stats.batches, 1);
                })
            }
            Err(e) => Err(e),
        },
    };
    match found {
        Ok(batch) => {
            if record.batch_id.is_none() {
                record.batch_id = Some(batch.id.clone());
                save(&ctx, &record).await;
            }
            collect(api, ctx, alive, record, batch, waiters).await;
        }
        Err(e) => {
            tracing::warn!(input_file_id = %record.input_file_id, error = %e, "batch: a remembered batch cannot be collected");
            let batch_id = record.batch_id.as_deref().map(Arc::from);
            fail_all(&ctx, &mut waiters, batch_id.as_ref(), &e);
            if e.status() == Some(404) {
                forget(&ctx, &record.input_file_id).await;
            } else {
                ctx.untrack(&record.input_file_id);
            }
        }
    }
}
