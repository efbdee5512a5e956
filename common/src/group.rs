//! Group commit: items handed in by many concurrent callers are executed in
//! batches, so many callers share one statement and one commit.
//!
//! There is no timer: a few executors take turns at the queue, and each
//! takes everything that arrived while the others were busy. Alone, an item
//! is executed at once; under load, batches grow by themselves.

use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};

/// Where an item's result goes.
pub type Reply<R> = oneshot::Sender<R>;

/// A batch: each item with the sender its result goes to.
pub type Batch<T, R> = Vec<(T, Reply<R>)>;

/// Hands items to the executors.
pub struct GroupCommit<T, R> {
    tx: mpsc::UnboundedSender<(T, Reply<R>)>,
}

impl<T, R> Clone for GroupCommit<T, R> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

impl<T: Send + 'static, R: Send + 'static> GroupCommit<T, R> {
    /// Starts `executors` tasks that run `execute` on batches of at most
    /// `max_batch` items; `execute` must answer every item of its batch.
    /// The tasks stop when every clone of the returned value is gone.
    pub fn start<F, Fut>(executors: usize, max_batch: usize, execute: F) -> Self
    where
        F: Fn(Batch<T, R>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let rx = Arc::new(Mutex::new(rx));
        let execute = Arc::new(execute);
        for _ in 0..executors.max(1) {
            let (rx, execute) = (rx.clone(), execute.clone());
            tokio::spawn(async move {
                let mut batch = Vec::with_capacity(max_batch);
                loop {
                    let received = rx.lock().await.recv_many(&mut batch, max_batch).await;
                    if received == 0 {
                        return;
                    }
                    execute(std::mem::take(&mut batch)).await;
                }
            });
        }
        Self { tx }
    }

    /// Executes `item` in the next batch and returns its result; `None` if
    /// the executors are gone (the process is stopping).
    pub async fn run(&self, item: T) -> Option<R> {
        let (reply, answer) = oneshot::channel();
        self.tx.send((item, reply)).ok()?;
        answer.await.ok()
    }
}

/// Answers every caller of a batch with `answer()`, e.g. the same error
/// when the whole batch failed.
pub fn answer_all<R>(replies: Vec<Reply<R>>, answer: impl Fn() -> R) {
    for reply in replies {
        // A caller that gave up no longer needs its answer.
        let _ = reply.send(answer());
    }
}

/// Answers one caller of a batch from a task of its own (e.g. an item
/// retried alone), so a slow item does not hold up the executor.
pub fn answer_alone<R: Send + 'static>(
    reply: Reply<R>,
    answer: impl Future<Output = R> + Send + 'static,
) {
    tokio::spawn(async move {
        let _ = reply.send(answer.await);
    });
}
