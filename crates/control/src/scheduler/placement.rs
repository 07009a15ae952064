//! Placement rounds: a fair batch of claimable queued tasks, the candidate workers, ONE policy
//! call for the batch, then the round's assignments written together by the store
//! ([`Store::place_round`](crate::store::Store::place_round)): claim the tasks -> reserve on
//! each worker (one conditional update per worker) -> insert the ASSIGNMENTS -> mark the
//! tasks running (conditional on the round's claim), as docs/consistency.md describes.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use super::{Scheduler, chrono_duration, source_label};
use crate::lifecycle::Cause;
use crate::model::queue_order;
use crate::model::{self, Task, TaskStatus, Worker};
use crate::policy::{Decision, PlacementInput, PolicyKind, RunningTask};
use crate::store::{PlannedPlacement, RoundPlan, RoundReadPlan, RoundReads, StoreError};

/// Most running tasks a round offers a preempting policy (the lowest priorities first).
const PREEMPTIBLE_READ_LIMIT: u32 = 10_000;

/// What one placement round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoundStats {
    /// Tasks in the batch.
    pub batch: usize,
    pub placed: usize,
    /// Left queued with the policy's reason.
    pub waited: usize,
    /// Failed as unschedulable.
    pub failed: usize,
    /// Lost a race (the capacity or the task was taken meanwhile): re-planned next round.
    pub lost: usize,
    /// Running tasks asked to stop to make room for a task of the batch (a preempting policy).
    pub preempted: usize,
}

impl RoundStats {
    /// Another round right away may place more: this one placed a full batch, or lost races
    /// that deserve a fresh look.
    pub(super) fn wants_another(&self) -> bool {
        self.lost > 0 || (self.placed > 0 && self.placed + self.failed == self.batch)
    }
}

/// The batch in queue order with per-user fairness: higher priority first; within a priority,
/// users take turns, counting the tasks each already has `running` (a user with 3 running
/// tasks waits for the turn of its 4th), older first within a turn. So one user's 10,000
/// queued tasks cannot keep another user's single task out, even when capacity frees one
/// task at a time: the user with fewer running tasks goes first.
pub(super) fn fair_order(
    mut tasks: Vec<Task>,
    limit: usize,
    running: &BTreeMap<String, u32>,
) -> Vec<Task> {
    tasks.sort_by(queue_order);
    let mut turn: HashMap<(i32, String), usize> = HashMap::new();
    let mut ranked: Vec<(usize, Task)> = tasks
        .into_iter()
        .map(|task| {
            let slot = turn
                .entry((task.priority, task.user_id.clone()))
                .or_insert_with(|| running.get(&task.user_id).map_or(0, |n| *n as usize));
            let rank = *slot;
            *slot += 1;
            (rank, task)
        })
        .collect();
    ranked.sort_by(|(ra, a), (rb, b)| {
        b.priority
            .cmp(&a.priority)
            .then(ra.cmp(rb))
            .then_with(|| queue_order(a, b))
    });
    ranked.into_iter().take(limit).map(|(_, t)| t).collect()
}

impl Scheduler {
    /// Reads a fair batch (the queue's head, then the queue without the users that have their
    /// share: [`Store::round_reads`](crate::store::Store::round_reads)) in fair order.
    #[cfg(test)]
    pub(super) async fn fair_batch(
        &self,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<Task>, StoreError> {
        let reads = self.read_round(now, false).await?;
        Ok(fair_order(reads.tasks, self.batch_limit(), &reads.running))
    }

    /// Most tasks per round.
    fn batch_limit(&self) -> usize {
        self.config.batch_size.max(1) as usize
    }

    /// The round's reads in one store call: the fair batch and, with `workers`, the workers.
    async fn read_round(
        &self,
        now: chrono::DateTime<chrono::Utc>,
        workers: bool,
    ) -> Result<RoundReads, StoreError> {
        let plan = RoundReadPlan {
            limit: self.config.batch_size.max(1),
            now,
            workers,
        };
        self.lifecycle.store().round_reads(&plan).await
    }

    /// One placement round. `Err` only when the round could not start (reading the queue or
    /// the workers failed); a failed placement is logged and left for a later round.
    pub async fn placement_round(&self) -> Result<RoundStats, StoreError> {
        let started = Instant::now();
        let now = model::now();
        let stale_before = now.timestamp() - self.config.heartbeat_staleness.as_secs() as i64;
        let changed = self.lifecycle.wakeup().take_capacity_changed();
        // The workers are read with the batch only when the view of them is stale.
        let cached = self.view.current(changed, stale_before);
        let reads = self.read_round(now, cached.is_none()).await?;
        if reads.tasks.is_empty() {
            // Nothing to place (and no workers read).
            return Ok(RoundStats::default());
        }
        let view = match (reads.workers, cached) {
            (Some(read), _) => self.view.replace(read, started),
            (None, Some(cached)) => cached,
            (None, None) => {
                return Err(StoreError::backend(
                    "reading a placement round",
                    "the store read a batch but not the workers it was asked for",
                ));
            }
        };
        let tasks = fair_order(reads.tasks, self.batch_limit(), &reads.running);
        let mut stats = RoundStats {
            batch: tasks.len(),
            ..RoundStats::default()
        };
        // A preempting policy (cloudai:policy@0.2.0) sees the running tasks it may stop; a
        // task whose victims are still stopping waits for them instead of preempting more.
        let (tasks, may_preempt) = if self.policies.active_may_preempt() {
            match self.hold_preemptors(tasks, &mut stats).await {
                Ok(rest) => (rest, true),
                // Without knowing which preemptions are under way, preempting again could
                // stop more than needed: this round places without preemption.
                Err(tasks) => (tasks, false),
            }
        } else {
            (tasks, false)
        };
        if tasks.is_empty() {
            return Ok(stats);
        }
        let workers = &view.workers;
        let fresh = |w: &Worker| w.last_heartbeat >= stale_before;
        let stale: Vec<Worker>;
        let candidates: &[Worker] = if workers.iter().all(fresh) {
            workers
        } else {
            stale = workers.iter().filter(|w| fresh(w)).cloned().collect();
            &stale
        };
        let mut input =
            PlacementInput::build(&tasks, candidates, now).with_running_tasks(&view.counts);
        if self.policies.has_active(PolicyKind::Placement) {
            let history = self.runtimes.get(&**self.lifecycle.store()).await;
            input = input.with_runtime_history(tasks.iter().map(Task::task_type), &history);
        }
        if may_preempt && let Some(highest) = tasks.iter().map(|t| t.priority).max() {
            match self
                .lifecycle
                .store()
                .preemptible_running(highest, PREEMPTIBLE_READ_LIMIT)
                .await
            {
                Ok(running) => input = input.with_preemptible(&running, now),
                // The round goes on without preemption.
                Err(error) => {
                    tracing::warn!(%error, "reading the tasks a preemption may stop")
                }
            }
        }
        let policies = self.policies.clone();
        let read = started.elapsed();
        let (input, outcome) = tokio::task::spawn_blocking(move || {
            let outcome = policies.place(&input);
            (input, outcome)
        })
        .await
        .map_err(|e| StoreError::backend("running the placement policy", e.to_string()))?;
        let (name, version, fallback) = outcome.source.metric_labels();
        crate::metrics::policy_call(
            PolicyKind::Placement.as_str(),
            name,
            version,
            fallback,
            outcome.elapsed,
        );

        let mut assigned = Vec::new();
        let mut preemptions = Vec::new();
        for (task, decision) in tasks.iter().zip(outcome.decisions) {
            match decision {
                Decision::Preempt { worker, victims } => {
                    let (Some(worker_id), Some(victims)) = (
                        input.worker_id(worker),
                        victims
                            .iter()
                            .map(|&v| input.running_task(v).cloned())
                            .collect::<Option<Vec<_>>>(),
                    ) else {
                        // The runtime checks indices; this is only defence in depth.
                        stats.lost += 1;
                        continue;
                    };
                    preemptions.push((task, worker_id.to_string(), victims));
                }
                Decision::Assign { worker } => {
                    let Some(worker_id) = input.worker_id(worker) else {
                        // The runtime checks indices; this is only defence in depth.
                        stats.lost += 1;
                        continue;
                    };
                    assigned.push((task, worker_id));
                }
                Decision::Wait { reason } => {
                    stats.waited += 1;
                    self.wait(task, reason).await;
                }
                Decision::Unschedulable { reason } => {
                    // A worker that is stale or draining now may come back: only a request no
                    // registered worker could ever hold fails.
                    let request = task.request();
                    if workers.iter().any(|w| w.total().covers(&request)) {
                        stats.waited += 1;
                        let reason = format!(
                            "no available worker can hold the request now ({reason}); a registered worker could"
                        );
                        self.wait(task, reason).await;
                    } else if self.fail_unschedulable(task, &reason).await {
                        stats.failed += 1;
                    }
                }
            }
        }
        // The policy planned the whole batch within the capacity it saw, so the round's
        // placements are written together (docs/consistency.md, per round): a few store
        // commands for the round, or one transaction, whatever its size. A lost race is
        // re-planned next round with fresh data.
        // Its workers are written to next: this round's copy must not hold the view.
        drop(view);
        let mut write_ms = 0.0;
        if !assigned.is_empty() {
            let plan = RoundPlan {
                claim: self.new_claim(),
                lease_until: now + chrono_duration(self.config.claim_lease),
                now: model::now(),
                placements: assigned
                    .into_iter()
                    .map(|(task, worker_id)| PlannedPlacement {
                        task: task.clone(),
                        worker_id: worker_id.to_string(),
                    })
                    .collect(),
            };
            let writing = Instant::now();
            let written = self.lifecycle.place(&plan).await;
            write_ms = writing.elapsed().as_secs_f64() * 1000.0;
            match written {
                Ok(written) => {
                    let policy = source_label(&outcome.source);
                    for (task, assignment) in &written.placed {
                        // The task's lifecycle span of its placement (as `submit` and `admit`
                        // are), for logs and traces that follow one task.
                        tracing::info_span!(
                            "place",
                            task_id = %task.task_id,
                            worker_id = %assignment.worker_id,
                            policy = %policy,
                        )
                        .in_scope(|| {
                            tracing::info!(
                                ass_id = %assignment.ass_id,
                                attempt = assignment.attempt,
                                "task placed"
                            );
                        });
                    }
                    for (task_id, error) in &written.failed {
                        tracing::warn!(task_id = %task_id, %error, "placing a task failed; a later round retries it");
                    }
                    stats.placed += written.placed.len();
                    stats.lost += written.lost.len();
                    if written.lost.is_empty() && written.failed.is_empty() {
                        let placed: Vec<_> = written.placed.into_iter().map(|(_, a)| a).collect();
                        self.view.record(&placed);
                    } else {
                        // Someone else changed the workers (or a write failed): read them
                        // again rather than plan on what this round believed.
                        self.view.invalidate();
                    }
                }
                Err(error) => {
                    self.view.invalidate();
                    tracing::warn!(%error, tasks = plan.placements.len(), "writing a placement round failed; a later round retries it");
                }
            }
        }
        for (task, worker_id, victims) in preemptions {
            stats.preempted += self.preempt(task, &worker_id, &victims).await;
        }
        if stats.placed > 0 || stats.preempted > 0 {
            // Workers learn of their new work, and of what they must stop, from their poll.
            self.work.notify();
        }
        tracing::info!(
            batch = stats.batch,
            placed = stats.placed,
            waited = stats.waited,
            failed = stats.failed,
            lost = stats.lost,
            preempted = stats.preempted,
            workers = input.worker_count(),
            policy = %source_label(&outcome.source),
            policy_ms = outcome.elapsed.as_secs_f64() * 1000.0,
            read_ms = read.as_secs_f64() * 1000.0,
            write_ms,
            latency_ms = started.elapsed().as_secs_f64() * 1000.0,
            "placement round"
        );
        crate::metrics::scheduling_round(
            &crate::metrics::RoundFigures {
                batch: stats.batch,
                placed: stats.placed,
                waited: stats.waited,
                unschedulable: stats.failed,
                lost: stats.lost,
                preempted: stats.preempted,
            },
            started.elapsed(),
        );
        Ok(stats)
    }

    /// Leaves out of the round the tasks whose victims are still stopping (a preemption
    /// under way), each waiting with the reason; the rest of the batch in order.
    /// `Err` gives the batch back when the preemptions under way could not be read.
    async fn hold_preemptors(
        &self,
        tasks: Vec<Task>,
        stats: &mut RoundStats,
    ) -> Result<Vec<Task>, Vec<Task>> {
        let in_progress = match self.lifecycle.store().preemptions_in_progress().await {
            Ok(in_progress) if !in_progress.is_empty() => in_progress,
            Ok(_) => return Ok(tasks),
            Err(error) => {
                tracing::warn!(%error, "reading the preemptions in progress; no preemption this round");
                return Err(tasks);
            }
        };
        let mut rest = Vec::with_capacity(tasks.len());
        for task in tasks {
            match in_progress.get(&task.task_id) {
                Some(&stopping) if stopping > 0 => {
                    stats.waited += 1;
                    let reason = format!(
                        "waiting for {stopping} preempted task{} to stop",
                        if stopping == 1 { "" } else { "s" }
                    );
                    self.wait(&task, reason).await;
                }
                _ => rest.push(task),
            }
        }
        Ok(rest)
    }

    /// Carries out a preemption decided for `task`: asks `victims` (running on `worker_id`)
    /// to stop; their workers stop them (graceful stop, then kill) and each is queued again
    /// with the attempt counted when its worker reports the stop (`finish`). The task waits
    /// for them and is placed by a later round. Returns how many victims were asked to stop.
    async fn preempt(&self, task: &Task, worker_id: &str, victims: &[RunningTask]) -> usize {
        let targets: Vec<(String, u32)> = victims
            .iter()
            .map(|v| (v.task_id.clone(), v.attempt))
            .collect();
        let reason = format!(
            "preempted by {} (priority {}) on {worker_id}",
            task.task_id, task.priority
        );
        let marked = match self
            .lifecycle
            .preempt(&targets, &task.task_id, &reason)
            .await
        {
            Ok(marked) => marked,
            Err(error) => {
                tracing::warn!(task_id = %task.task_id, worker_id, %error, "asking tasks to stop for a preemption; a later round decides again");
                return 0;
            }
        };
        for victim in &marked {
            tracing::info!(
                task_id = %victim,
                worker_id,
                preempted_by = %task.task_id,
                priority = task.priority,
                "task preempted: its worker stops it, then it is queued again"
            );
        }
        if !marked.is_empty() {
            let reason = format!(
                "preempting {} lower-priority task{} on {worker_id}; placed once {} stopped",
                marked.len(),
                if marked.len() == 1 { "" } else { "s" },
                if marked.len() == 1 {
                    "it has"
                } else {
                    "they have"
                },
            );
            self.wait(task, reason).await;
        }
        marked.len()
    }

    /// A claim token of its own for one round (or one unschedulable task): `<replica
    /// owner>/<uuid>`.
    fn new_claim(&self) -> String {
        format!("{}/{}", self.owner, uuid::Uuid::now_v7().simple())
    }

    async fn unclaim(&self, task_id: &str, claim: &str) {
        if let Err(error) = self.lifecycle.store().unclaim_task(task_id, claim).await {
            // The claim expires with its lease.
            tracing::warn!(task_id, %error, "giving up a claim");
        }
    }

    /// Keeps a task queued with the reason shown to its user, written only when it changed.
    async fn wait(&self, task: &Task, reason: String) {
        if task.status_reason.as_deref() == Some(reason.as_str()) {
            return;
        }
        let ids = [task.task_id.clone()];
        match self
            .lifecycle
            .explain(&ids, TaskStatus::Queued, &reason)
            .await
        {
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(task_id = %task.task_id, %error, "recording a wait reason")
            }
        }
    }

    /// Fails a task no worker could ever hold, under our claim so that a replica placing it
    /// meanwhile is not overruled. True when it was failed.
    async fn fail_unschedulable(&self, task: &Task, reason: &str) -> bool {
        let task_id = task.task_id.as_str();
        let now = model::now();
        let lease_until = now + chrono_duration(self.config.claim_lease);
        let claim = self.new_claim();
        if self
            .lifecycle
            .store()
            .claim_task(task_id, &claim, lease_until, now)
            .await
            .is_err()
        {
            return false;
        }
        let ids = [task_id.to_string()];
        match self
            .lifecycle
            .fail_unrun(&ids, TaskStatus::Queued, reason, Cause::Placement)
            .await
        {
            Ok(failed) if !failed.is_empty() => {
                tracing::info!(task_id, reason, "task unschedulable");
                true
            }
            outcome => {
                if let Err(error) = outcome {
                    tracing::warn!(task_id, %error, "failing an unschedulable task");
                }
                self.unclaim(task_id, &claim).await;
                false
            }
        }
    }
}
