//! Reading a placement round: the fair batch of claimable queued tasks, the running counts of
//! their users and, when the scheduler's view of the workers is stale, the workers and their
//! active assignment counts.
//!
//! A round reads before its policy call and writes after it ([`super::Store::place_round`]).
//! On a store with one writer (the embedded store) each read waits behind every request queued
//! before it, so a round's reads are taken together ([`super::Store::round_reads`]: one call,
//! one snapshot), not one after the other.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};

use super::{Result, Store};
use crate::model::{Task, Worker};

/// Most queue reads one batch takes to be fair (each leaves out the users that already have
/// their share): bounds a round's reads whatever the queue looks like.
pub const MAX_QUEUE_READS: usize = 4;

/// What a round reads.
#[derive(Debug, Clone, Copy)]
pub struct RoundReadPlan {
    /// The batch size: at most this many tasks per queue read.
    pub limit: u32,
    /// Claims whose lease expired before this are claimable.
    pub now: DateTime<Utc>,
    /// Read the workers and their active assignment counts too, when the batch has tasks (a
    /// round with nothing to place does not need them).
    pub workers: bool,
}

/// The registry and the number of active assignments of each worker that has any.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerReads {
    /// Every registered worker, ordered by `worker_id`.
    pub workers: Vec<Worker>,
    pub active_assignments: BTreeMap<String, u32>,
}

/// What a round read.
#[derive(Debug, Clone, Default)]
pub struct RoundReads {
    /// Claimable queued tasks: the queue's head, then (while one user filled more than its
    /// share) the queue without the users that had theirs. Each query's tasks in queue order,
    /// at most [`MAX_QUEUE_READS`] times `limit` in all; the scheduler orders them fairly.
    pub tasks: Vec<Task>,
    /// How many tasks each user of `tasks` has running (users with none are absent).
    pub running: BTreeMap<String, u32>,
    /// When asked for and `tasks` is not empty.
    pub workers: Option<WorkerReads>,
}

/// The queue reads of a fair batch, one query at a time: which users the next query leaves
/// out, and when the batch is complete. Shared by every backend, so that the batch is the same
/// whether its queries run as separate commands or inside one transaction.
pub struct QueueReads {
    limit: u32,
    share: usize,
    queries: usize,
    done: bool,
    fetched: Vec<Task>,
    seen: HashSet<String>,
    per_user: HashMap<String, usize>,
    excluded: Vec<String>,
}

impl QueueReads {
    pub fn new(limit: u32) -> Self {
        let limit = limit.max(1);
        QueueReads {
            limit,
            // A user has its share with a quarter of the batch.
            share: (limit as usize).div_ceil(4).max(1),
            queries: 0,
            done: false,
            fetched: Vec::new(),
            seen: HashSet::new(),
            per_user: HashMap::new(),
            excluded: Vec::new(),
        }
    }

    /// The users the next query leaves out, or `None` when the batch is complete.
    pub fn next_query(&self) -> Option<&[String]> {
        (!self.done && self.queries < MAX_QUEUE_READS).then_some(self.excluded.as_slice())
    }

    /// Takes the answer of the query [`Self::next_query`] asked for.
    pub fn add(&mut self, page: Vec<Task>) {
        self.queries += 1;
        let exhausted = page.len() < self.limit as usize;
        for task in page {
            if self.seen.insert(task.task_id.clone()) {
                *self.per_user.entry(task.user_id.clone()).or_default() += 1;
                self.fetched.push(task);
            }
        }
        let before = self.excluded.len();
        for (user, count) in &self.per_user {
            if *count >= self.share && !self.excluded.contains(user) {
                self.excluded.push(user.clone());
            }
        }
        // Nobody new to leave out: the next query would return the same tasks.
        self.done = exhausted || self.excluded.len() == before;
    }

    /// The tasks read, and their users.
    pub fn finish(self) -> (Vec<Task>, Vec<String>) {
        let users = self.per_user.into_keys().collect();
        (self.fetched, users)
    }
}

/// [`super::Store::round_reads`] from the single-purpose reads: the queue, then its users'
/// running counts and the workers side by side (two round trips at a time on a networked
/// store).
pub async fn round_reads_by_parts<S: Store + ?Sized>(
    store: &S,
    plan: &RoundReadPlan,
) -> Result<RoundReads> {
    let mut reads = QueueReads::new(plan.limit);
    while let Some(exclude) = reads.next_query() {
        let page = store.claimable_tasks(plan.limit, plan.now, exclude).await?;
        reads.add(page);
    }
    let (tasks, users) = reads.finish();
    if tasks.is_empty() {
        return Ok(RoundReads::default());
    }
    let workers = async {
        if !plan.workers {
            return Ok(None);
        }
        let (workers, active_assignments) =
            futures::try_join!(store.list_workers(), store.active_assignment_counts())?;
        Ok(Some(WorkerReads {
            workers,
            active_assignments,
        }))
    };
    let (running, workers) = futures::try_join!(store.running_counts(&users), workers)?;
    Ok(RoundReads {
        tasks,
        running,
        workers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str, user: &str) -> Task {
        crate::conformance::sample_task(id, user)
    }

    #[test]
    fn one_user_filling_the_head_is_left_out_of_a_second_query() {
        let mut reads = QueueReads::new(4);
        assert_eq!(reads.next_query(), Some(&[][..]));
        reads.add(vec![
            task("a", "u1"),
            task("b", "u1"),
            task("c", "u1"),
            task("d", "u1"),
        ]);
        assert_eq!(reads.next_query(), Some(&["u1".to_string()][..]));
        reads.add(vec![task("e", "u2")]);
        // Short page: the queue without u1 is exhausted.
        assert_eq!(reads.next_query(), None);
        let (tasks, mut users) = reads.finish();
        users.sort();
        assert_eq!(tasks.len(), 5);
        assert_eq!(users, ["u1", "u2"]);
    }

    #[test]
    fn a_short_first_page_is_the_whole_batch() {
        let mut reads = QueueReads::new(100);
        reads.add(vec![task("a", "u1")]);
        assert_eq!(reads.next_query(), None);
    }

    #[test]
    fn queries_stop_at_the_bound() {
        let mut reads = QueueReads::new(1);
        for n in 0..MAX_QUEUE_READS {
            assert!(reads.next_query().is_some(), "query {n}");
            reads.add(vec![task(&format!("t{n}"), &format!("u{n}"))]);
        }
        assert_eq!(reads.next_query(), None);
        assert_eq!(reads.finish().0.len(), MAX_QUEUE_READS);
    }

    #[test]
    fn a_task_read_twice_counts_once() {
        let mut reads = QueueReads::new(1);
        reads.add(vec![task("a", "u1")]);
        assert!(reads.next_query().is_some());
        reads.add(vec![task("a", "u1")]);
        // Nobody new to leave out: done.
        assert_eq!(reads.next_query(), None);
        assert_eq!(reads.finish().0.len(), 1);
    }
}
