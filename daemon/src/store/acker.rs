//! Completing a commit's answers from inside the runtime. A `oneshot` completed from a spool thread wakes
//! its task from outside the runtime: through the runtime's shared inject queue, with a futex wake of a
//! parked worker, once per waiting webhook. Handed over as one message per commit to a task on the runtime,
//! the answers are completed from a worker, where each wake is a push onto that worker's own run queue: one
//! wake from outside per commit.

use tokio::sync::mpsc;

/// An answer that can be given (a reply channel with its result).
pub(crate) trait Complete: Send + 'static {
    /// Gives the answer (a waiter that has gone away is not an error).
    fn complete(self);
}

impl<T: Send + 'static> Complete for (tokio::sync::oneshot::Sender<T>, T) {
    fn complete(self) {
        let _ = self.0.send(self.1);
    }
}

/// Collects a commit's answers and gives them, either through a task on the runtime the spool was opened
/// in, or (opened outside any runtime) at once from the calling thread.
pub(crate) struct Answers<M: Complete> {
    acker: Option<mpsc::UnboundedSender<Vec<M>>>,
    pending: Vec<M>,
}

impl<M: Complete> Answers<M> {
    /// With a task on the current runtime, if there is one.
    pub(crate) fn new() -> Self {
        let acker = tokio::runtime::Handle::try_current().ok().map(|rt| {
            let (tx, mut rx) = mpsc::unbounded_channel::<Vec<M>>();
            rt.spawn(async move {
                while let Some(answers) = rx.recv().await {
                    answers.into_iter().for_each(Complete::complete);
                }
            });
            tx
        });
        Answers { acker, pending: Vec::new() }
    }

    /// Gives `answer` now (no acker) or with the next [`Answers::flush`].
    pub(crate) fn push(&mut self, answer: M) {
        match self.acker {
            Some(_) => self.pending.push(answer),
            None => answer.complete(),
        }
    }

    /// Hands the answers collected so far to the acker, in one message.
    pub(crate) fn flush(&mut self) {
        if let Some(tx) = &self.acker
            && !self.pending.is_empty()
        {
            // The runtime is gone only when the daemon is: the answers' waiters are gone with it.
            let _ = tx.send(std::mem::take(&mut self.pending));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    /// Inside a runtime the answers wait for `flush` and arrive from the runtime; outside one they are
    /// given at once.
    #[tokio::test]
    async fn answers_are_given_at_the_flush_from_the_runtime_or_at_once_without_one() {
        let mut answers = Answers::new();
        let (tx, mut rx) = oneshot::channel();
        answers.push((tx, 7u32));
        tokio::task::yield_now().await;
        assert!(rx.try_recv().is_err(), "held until the flush");
        answers.flush();
        assert_eq!(rx.await.unwrap(), 7);

        let (tx, rx) = oneshot::channel();
        std::thread::spawn(move || {
            let mut outside: Answers<(oneshot::Sender<u32>, u32)> = Answers::new();
            outside.push((tx, 8));
        })
        .join()
        .unwrap();
        assert_eq!(rx.await.unwrap(), 8);
    }
}
