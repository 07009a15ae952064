//! Writing a placement round: the protocol of docs/consistency.md, applied to a whole round's
//! decisions at once rather than task by task.
//!
//! [`place_in_steps`] is the protocol for a store whose writes are separate commands (MongoDB):
//!
//! 1. **claim** the round's tasks under one fresh claim token ([`PlacementSteps::claim_tasks`]);
//! 2. **reserve** once per worker for the sum of the requests of its claimed tasks
//!    ([`WorkerStore::reserve`](crate::WorkerStore::reserve), the one conditional update); when a worker refuses the sum, its
//!    tasks are reserved one by one and those that do not fit are lost (re-planned next round);
//! 3. **insert** the round's assignments together ([`PlacementSteps::insert_assignments`]);
//! 4. **mark running** the claimed tasks whose assignment is in ([`PlacementSteps::mark_claimed_running`]),
//!    guarded by the claim token, so that a task cancelled or re-claimed meanwhile is not moved.
//!
//! A round then costs a handful of commands whatever its size. The crash points are the gaps
//! between the steps, and each leaves only what the reconciler already repairs:
//!
//! - **after 1** (claims, nothing reserved): the claims expire with their lease and are
//!   cleared; the tasks are claimable again.
//! - **after 2** (reservations without assignments): the worker's `allocated_*` exceeds the sum
//!   of its active assignments; once that drift has settled (longer than a claim lease) it is
//!   recomputed from the assignments.
//! - **after 3** (assignments of tasks still queued and claimed): once the claims expire and
//!   are cleared, each assignment's task is not running at its attempt, so the assignment is
//!   released as an orphan (its reservation goes back exactly once).
//! - **during 4** (some tasks running, some not): the running ones are placed; the others are
//!   the previous case.
//!
//! A round that is slow rather than dead has one more hazard: the reconciler recounts a
//! drifting worker from its active assignments once the drift has held for a claim lease plus
//! its settle time, so a round whose inserts land after its lease may have been recounted
//! without its reservation. Such a round starts none of its tasks, and every reservation given
//! back without having run (here or by the reconciler) returns its amounts only while the
//! worker's accounting epoch is the one read before the reserve ([`AssignmentStore::release_unstarted`],
//! docs/consistency.md).
//!
//! The embedded store writes a round in one transaction instead (no crash point at all); the
//! FerretDB 1.x compatibility strategy writes each step task by task under its document locks.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use futures::StreamExt;

use super::{Result, Store, StoreError};
use crate::AssignmentStore;
use crate::TaskStore;
use crate::model::{self, Assignment, Resources, Task, TaskStatus};

/// Reserves of one round in flight at once (one per worker).
const RESERVES_IN_FLIGHT: usize = 16;

/// One decision of a placement round: run `task` on `worker_id`.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedPlacement {
    /// The task as the round read it (queued). Its request is what is reserved; its
    /// `attempts` is checked again when it is marked running.
    pub task: Task,
    pub worker_id: String,
}

/// A placement round's decisions, written together under one claim.
#[derive(Debug, Clone)]
pub struct RoundPlan {
    /// The claim token of this round (unique per round: `<replica>/<uuid>`): a round that
    /// stalls past its lease can never mark a task running under a later claim.
    pub claim: String,
    /// Until when the claims hold. A store whose round is still writing at this time gives
    /// the round up (another replica may own the tasks by then).
    pub lease_until: DateTime<Utc>,
    /// The time the round's claims are taken at (expired claims older than this are taken
    /// over), and the `assigned_at` of its assignments.
    pub now: DateTime<Utc>,
    pub placements: Vec<PlannedPlacement>,
}

/// What writing a round did, task by task.
#[derive(Debug, Default)]
pub struct RoundOutcome {
    /// Tasks now running (as they are after the write), each with its assignment.
    pub placed: Vec<(Task, Assignment)>,
    /// Tasks another actor got to first (claimed, moved or cancelled elsewhere, the worker's
    /// capacity taken or the worker gone): the next round plans them again with fresh data.
    pub lost: Vec<String>,
    /// Tasks left unplaced because a write failed, with the error: a later round retries them.
    pub failed: Vec<(String, StoreError)>,
}

/// The batched steps of [`place_in_steps`], for a store whose round is several commands. Every
/// step applies to each record conditionally, as [`Store`]'s single-record methods do.
#[async_trait::async_trait]
pub trait PlacementSteps: Send + Sync {
    /// Claims each of `tasks` (`(task_id, attempts)` as the round read them) that is still
    /// `queued` at those `attempts` and unclaimed, claimed by `owner`, or whose lease expired
    /// before `now`, for `owner` until `lease_until`. Returns the ids it claimed (the others
    /// are someone else's now, no longer queued, or queued again after another attempt).
    async fn claim_tasks(
        &self,
        tasks: &[(String, u32)],
        owner: &str,
        lease_until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<BTreeSet<String>>;

    /// Inserts `assignments` (new ids). On `Err` some of them may have been inserted: the
    /// caller checks each.
    async fn insert_assignments(&self, assignments: &[Assignment]) -> Result<()>;

    /// Moves to `running` each task of `assignments` that is `queued`, claimed by `owner` and
    /// at `attempt - 1` attempts: sets `attempts` to the assignment's attempt, clears the claim
    /// and the status reason, records `placed_by` = `owner`, `updated_at` = `at`. Returns the
    /// ids it moved.
    async fn mark_claimed_running(
        &self,
        owner: &str,
        assignments: &[Assignment],
        at: DateTime<Utc>,
    ) -> Result<BTreeSet<String>>;
}

/// Runs `futures`, at most `limit` at a time; their outputs in completion order.
async fn in_flight<F: std::future::Future>(futures: Vec<F>, limit: usize) -> Vec<F::Output> {
    futures::stream::iter(futures)
        .buffer_unordered(limit)
        .collect()
        .await
}

/// The sum of the requests of `tasks` (exact: requests are quantized).
fn sum_requests<'a>(tasks: impl IntoIterator<Item = &'a Task>) -> Resources {
    tasks.into_iter().fold(Resources::default(), |sum, task| {
        let r = task.request();
        Resources::new(
            sum.cpu + r.cpu,
            sum.memory + r.memory,
            sum.storage + r.storage,
            sum.gpu + r.gpu,
        )
    })
}

/// `task` as [`PlacementSteps::mark_claimed_running`] leaves it.
pub fn running_copy(task: &Task, attempt: u32, claim: &str, at: DateTime<Utc>) -> Task {
    let mut task = task.clone();
    task.status = TaskStatus::Running;
    task.attempts = attempt;
    task.owner = None;
    task.lease_expires_at = None;
    task.status_reason = None;
    task.updated_at = at;
    task.placed_by = Some(claim.to_string());
    task
}

/// What a worker's reserve step decided for its tasks.
struct WorkerReserve {
    won: Vec<usize>,
    lost: Vec<usize>,
    failed: Vec<(usize, StoreError)>,
}

/// Reserves on one worker for the tasks `indices` of `plan`: the sum at once, or (when the
/// worker refuses the sum) task by task in plan order.
async fn reserve_on_worker<S: Store + ?Sized>(
    store: &S,
    plan: &RoundPlan,
    worker_id: &str,
    indices: Vec<usize>,
) -> WorkerReserve {
    let mut outcome = WorkerReserve {
        won: Vec::new(),
        lost: Vec::new(),
        failed: Vec::new(),
    };
    let sum = sum_requests(indices.iter().map(|&i| &plan.placements[i].task));
    match store.reserve(worker_id, &sum).await {
        Ok(true) => {
            outcome.won = indices;
            return outcome;
        }
        // The worker is gone: every task of it is re-planned.
        Err(StoreError::NotFound { .. }) => {
            outcome.lost = indices;
            return outcome;
        }
        Err(error) if indices.len() == 1 => {
            outcome.failed.push((indices[0], error));
            return outcome;
        }
        // Refused (another actor took some of the capacity), or an error: task by task.
        Ok(false) | Err(_) => {}
    }
    if indices.len() == 1 {
        outcome.lost = indices;
        return outcome;
    }
    for i in indices {
        match store
            .reserve(worker_id, &plan.placements[i].task.request())
            .await
        {
            Ok(true) => outcome.won.push(i),
            Ok(false) | Err(StoreError::NotFound { .. }) => outcome.lost.push(i),
            Err(error) => outcome.failed.push((i, error)),
        }
    }
    outcome
}

/// Writes `plan` with the steps of [`PlacementSteps`] (see the module docs for the crash
/// points). Undoes what it can of a task that does not make it (unclaims it, returns its
/// reservation); what it cannot undo (the store failing meanwhile) the reconciler repairs.
pub async fn place_in_steps<S, P>(store: &S, steps: &P, plan: &RoundPlan) -> Result<RoundOutcome>
where
    S: Store + ?Sized,
    P: PlacementSteps + ?Sized,
{
    let mut outcome = RoundOutcome::default();
    if plan.placements.is_empty() {
        return Ok(outcome);
    }
    let ids: Vec<(String, u32)> = plan
        .placements
        .iter()
        .map(|p| (p.task.task_id.clone(), p.task.attempts))
        .collect();

    // Step 1: claim. An error here leaves at most claims that expire.
    let claimed = steps
        .claim_tasks(&ids, &plan.claim, plan.lease_until, plan.now)
        .await?;
    let mut by_worker: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, p) in plan.placements.iter().enumerate() {
        if claimed.contains(&p.task.task_id) {
            by_worker.entry(p.worker_id.as_str()).or_default().push(i);
        } else {
            outcome.lost.push(p.task.task_id.clone());
        }
    }

    // Each worker's accounting epoch before its reserve, recorded in its assignments: a
    // reservation given back later returns its amounts only while no recount has happened
    // since (a recount between this round's reserve and its insert left them out).
    let worker_ids: Vec<&str> = by_worker.keys().copied().collect();
    let epochs = match store.accounting_epochs(&worker_ids).await {
        Ok(epochs) => epochs,
        Err(error) => {
            let all: Vec<usize> = by_worker.values().flatten().copied().collect();
            unclaim_all(store, plan, &all).await;
            return Err(error);
        }
    };
    let epoch_of = |worker_id: &str| epochs.get(worker_id).copied();

    // Step 2: one reserve per worker (side by side).
    let mut pending = Vec::with_capacity(by_worker.len());
    for (worker_id, indices) in by_worker {
        pending.push(async move {
            let reserve = reserve_on_worker(store, plan, worker_id, indices).await;
            (worker_id.to_string(), reserve)
        });
    }
    let reserves: Vec<(String, WorkerReserve)> = in_flight(pending, RESERVES_IN_FLIGHT).await;
    let mut won: Vec<usize> = Vec::new();
    let mut unclaim: Vec<usize> = Vec::new();
    for (_, reserve) in reserves {
        won.extend(reserve.won);
        for i in reserve.lost {
            outcome.lost.push(plan.placements[i].task.task_id.clone());
            unclaim.push(i);
        }
        for (i, error) in reserve.failed {
            outcome
                .failed
                .push((plan.placements[i].task.task_id.clone(), error));
            unclaim.push(i);
        }
    }
    won.sort_unstable();

    if model::now() >= plan.lease_until {
        // The claims lapsed while the reserves were in flight (a very slow store): the
        // reconciler may by now have recounted these workers without the reservations, so
        // they are returned only where it has not (the epoch) and the tasks left for a later
        // round.
        tracing::warn!(
            tasks = won.len(),
            "the round's claims expired before its reservations were recorded; reservations returned"
        );
        for &i in &won {
            let p = &plan.placements[i];
            let epoch = epoch_of(&p.worker_id);
            unreserve_or_log(
                store,
                &p.worker_id,
                &p.task.request(),
                epoch,
                &p.task.task_id,
            )
            .await;
            outcome.failed.push((
                p.task.task_id.clone(),
                StoreError::backend(
                    "placing a task",
                    "the claim expired before the reservation was recorded",
                ),
            ));
        }
        unclaim.extend(won);
        unclaim_all(store, plan, &unclaim).await;
        return Ok(outcome);
    }

    // Step 3: the assignments, together.
    let mut assignments: Vec<(usize, Assignment)> = won
        .iter()
        .map(|&i| {
            let p = &plan.placements[i];
            let mut a = Assignment::for_next_attempt(&p.task, &p.worker_id, &plan.claim, plan.now);
            a.reserved_epoch = epoch_of(&p.worker_id);
            (i, a)
        })
        .collect();
    let rows: Vec<Assignment> = assignments.iter().map(|(_, a)| a.clone()).collect();
    if let Err(error) = steps.insert_assignments(&rows).await {
        tracing::warn!(%error, assignments = rows.len(), "inserting a round's assignments; checking each");
        // Some may be in: keep those, undo the others.
        let mut kept = Vec::with_capacity(assignments.len());
        for (i, a) in assignments {
            match store.get_assignment(&a.ass_id).await {
                Ok(_) => kept.push((i, a)),
                Err(StoreError::NotFound { .. }) => {
                    let epoch = a.reserved_epoch;
                    unreserve_or_log(store, &a.worker_id, &a.request(), epoch, &a.task_id).await;
                    outcome.failed.push((
                        a.task_id.clone(),
                        StoreError::backend("inserting an assignment", error.to_string()),
                    ));
                    unclaim.push(i);
                }
                // Unknown: the reconciler sorts it out once the claim expires.
                Err(check) => outcome.failed.push((a.task_id.clone(), check)),
            }
        }
        assignments = kept;
    }

    if model::now() >= plan.lease_until {
        // The inserts outlasted the claims' lease. The reconciler recounts a drifting worker
        // once the drift has held unchanged for a lease and its settle time, so a recount may
        // have counted these workers without this round's reservations (its assignments were
        // not in yet): a task marked running now would run uncounted, and its release would
        // return the amounts a second time. So none runs: each assignment is retired, its
        // amounts returned only where no recount has happened since the reserve.
        tracing::warn!(
            assignments = assignments.len(),
            "the round's claims expired before its assignments were recorded; none is started"
        );
        for (i, a) in assignments {
            release_unstarted_or_log(store, &a).await;
            outcome.failed.push((
                a.task_id.clone(),
                StoreError::backend(
                    "placing a task",
                    "the claim expired before the assignment was recorded",
                ),
            ));
            unclaim.push(i);
        }
        unclaim_all(store, plan, &unclaim).await;
        return Ok(outcome);
    }

    // Step 4: running, guarded by the claim.
    let rows: Vec<Assignment> = assignments.iter().map(|(_, a)| a.clone()).collect();
    let at = model::now();
    match steps.mark_claimed_running(&plan.claim, &rows, at).await {
        Ok(moved) => {
            for (i, a) in assignments {
                let task = &plan.placements[i].task;
                if moved.contains(&a.task_id) {
                    outcome
                        .placed
                        .push((running_copy(task, a.attempt, &plan.claim, at), a));
                } else {
                    // Cancelled meanwhile, or our claim was taken over: the capacity goes back
                    // through the assignment (released exactly once).
                    release_unstarted_or_log(store, &a).await;
                    outcome.lost.push(a.task_id.clone());
                    unclaim.push(i);
                }
            }
        }
        Err(error) => {
            // Some may have moved: each task is either running at its assignment's attempt
            // (placed) or claimed with an assignment that the reconciler releases once the
            // claim expires. Neither needs undoing here.
            tracing::warn!(%error, tasks = rows.len(), "marking a round's tasks running; the reconciler repairs what did not apply");
            for (_, a) in assignments {
                outcome.failed.push((
                    a.task_id.clone(),
                    StoreError::backend("marking a task running", error.to_string()),
                ));
            }
        }
    }
    unclaim_all(store, plan, &unclaim).await;
    Ok(outcome)
}

async fn unreserve_or_log<S: Store + ?Sized>(
    store: &S,
    worker_id: &str,
    request: &Resources,
    epoch: Option<i64>,
    task_id: &str,
) {
    match store.unreserve(worker_id, request, epoch).await {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(
                worker_id,
                task_id,
                "a reservation not returned: the worker was recounted or released meanwhile; left to the reconciler"
            );
        }
        Err(error) => {
            tracing::error!(%error, worker_id, task_id, "returning a reservation failed; left for the reconciler");
        }
    }
}

async fn release_unstarted_or_log<S: Store + ?Sized>(store: &S, a: &Assignment) {
    if let Err(error) = store.release_unstarted(&a.ass_id).await {
        tracing::error!(%error, ass_id = %a.ass_id, task_id = %a.task_id, worker_id = %a.worker_id, "releasing an unused assignment failed; left for the reconciler");
    }
}

/// Gives up the round's claim on the tasks `indices` (a claim left behind expires anyway, but
/// only after its lease: giving it up lets the next round plan the task at once).
async fn unclaim_all<S: Store + ?Sized>(store: &S, plan: &RoundPlan, indices: &[usize]) {
    for &i in indices {
        let task_id = &plan.placements[i].task.task_id;
        if let Err(error) = store.unclaim_task(task_id, &plan.claim).await {
            tracing::warn!(task_id = %task_id, %error, "giving up a claim");
        }
    }
}

/// The steps of any [`Store`] done task by task with its single-record methods: what a store
/// without batched writes (and the FerretDB 1.x compatibility strategy, whose multi-document
/// updates are not atomic) places a round with.
/// `S` is anything that leads to a store: `&SqliteStore`, `&dyn Store`, `Arc<dyn Store>`.
pub struct TaskByTask<S>(pub S);

/// Claims, inserts or marks in flight at once in [`TaskByTask`].
const TASK_BY_TASK_IN_FLIGHT: usize = 16;

#[async_trait::async_trait]
impl<S> PlacementSteps for TaskByTask<S>
where
    S: std::ops::Deref + Send + Sync,
    S::Target: Store,
{
    async fn claim_tasks(
        &self,
        tasks: &[(String, u32)],
        owner: &str,
        lease_until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<BTreeSet<String>> {
        let mut pending = Vec::with_capacity(tasks.len());
        for (id, attempts) in tasks {
            pending.push(async move {
                let claim = self.0.claim_task(id, owner, lease_until, now).await;
                (id.clone(), *attempts, claim)
            });
        }
        let claims = in_flight(pending, TASK_BY_TASK_IN_FLIGHT).await;
        let mut claimed = BTreeSet::new();
        let mut first_error = None;
        for (id, attempts, claim) in claims {
            match claim {
                Ok(task) if task.attempts == attempts => {
                    claimed.insert(id);
                }
                Ok(_) => {
                    // Queued again after another attempt since the round read it: the round
                    // planned a stale copy.
                    if let Err(error) = self.0.unclaim_task(&id, owner).await {
                        tracing::warn!(task_id = %id, %error, "giving up a claim");
                    }
                }
                Err(StoreError::Conflict { .. } | StoreError::NotFound { .. }) => {}
                Err(error) => {
                    tracing::warn!(task_id = %id, %error, "claiming a task");
                    first_error.get_or_insert(error);
                }
            }
        }
        match first_error {
            // Nothing claimed and the store failing: the round could not start.
            Some(error) if claimed.is_empty() => Err(error),
            _ => Ok(claimed),
        }
    }

    async fn insert_assignments(&self, assignments: &[Assignment]) -> Result<()> {
        let mut pending = Vec::with_capacity(assignments.len());
        for a in assignments {
            pending.push(self.0.insert_assignment(a));
        }
        in_flight(pending, TASK_BY_TASK_IN_FLIGHT)
            .await
            .into_iter()
            .collect()
    }

    async fn mark_claimed_running(
        &self,
        owner: &str,
        assignments: &[Assignment],
        _at: DateTime<Utc>,
    ) -> Result<BTreeSet<String>> {
        let mut pending = Vec::with_capacity(assignments.len());
        for a in assignments {
            pending.push(async move {
                let marked = self.0.mark_running(&a.task_id, owner, a.attempt).await;
                (a.task_id.clone(), marked)
            });
        }
        let marks = in_flight(pending, TASK_BY_TASK_IN_FLIGHT).await;
        let mut moved = BTreeSet::new();
        for (id, mark) in marks {
            match mark {
                Ok(_) => {
                    moved.insert(id);
                }
                Err(StoreError::Conflict { .. } | StoreError::NotFound { .. }) => {}
                // The task may or may not have moved: the reconciler decides once the claim
                // expires (see the module docs), so it is neither placed nor released here.
                Err(error) => return Err(error),
            }
        }
        Ok(moved)
    }
}

/// Groups `assignments` by the task's attempts before placement (`attempt - 1`): a store that
/// marks a group with one conditional update per attempt count.
pub fn by_previous_attempts(assignments: &[Assignment]) -> HashMap<u32, Vec<&Assignment>> {
    let mut groups: HashMap<u32, Vec<&Assignment>> = HashMap::new();
    for a in assignments {
        groups
            .entry(a.attempt.saturating_sub(1))
            .or_default()
            .push(a);
    }
    groups
}
