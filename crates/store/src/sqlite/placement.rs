//! A placement round on SQLite: the whole round in ONE transaction (the writer thread's call),
//! so it has no crash point at all: either every write of the round is kept or none is. Inside
//! it a task needs no claim: it moves from claimable to running in one update. The
//! batched steps of [`PlacementSteps`] are here too, each one transaction, for the tests that
//! leave a store as a crash between two steps of [`place_in_steps`] would.
//!
//! [`place_in_steps`]: crate::placement::place_in_steps

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use rusqlite::{Connection, params};

use super::{SqliteStore, date_text, insert_assignment_sync, reserve_sync, sql_err};
use crate::model::{Assignment, Resources};
use crate::placement::{PlacementSteps, RoundOutcome, RoundPlan, running_copy};
use crate::{Result, StoreError};

/// Claims one task for `owner` when it is queued at `attempts` and claimable at `now`.
fn claim_sync(
    conn: &Connection,
    task_id: &str,
    attempts: u32,
    owner: &str,
    lease_until: &str,
    now: &str,
) -> Result<bool> {
    let changed = conn
        .prepare_cached(
            "UPDATE TASKS SET owner = ?1, lease_expires_at = ?2, updated_at = ?3 \
             WHERE task_id = ?4 AND status = 'queued' AND attempts = ?5 \
               AND (owner IS NULL OR owner = ?1 OR lease_expires_at IS NULL \
                    OR lease_expires_at < ?3)",
        )
        .and_then(|mut stmt| stmt.execute(params![owner, lease_until, now, task_id, attempts]))
        .map_err(sql_err("claiming a task"))?;
    Ok(changed == 1)
}

/// Moves one task claimed by `owner` at `attempt - 1` attempts to running.
fn mark_sync(conn: &Connection, a: &Assignment, owner: &str, at: &str) -> Result<bool> {
    let changed = conn
        .prepare_cached(
            "UPDATE TASKS SET status = 'running', attempts = ?3, owner = NULL, \
                 lease_expires_at = NULL, status_reason = NULL, updated_at = ?4, placed_by = ?2 \
             WHERE task_id = ?1 AND status = 'queued' AND owner = ?2 AND attempts = ?5",
        )
        .and_then(|mut stmt| {
            stmt.execute(params![
                a.task_id,
                owner,
                a.attempt,
                at,
                a.attempt.saturating_sub(1)
            ])
        })
        .map_err(sql_err("marking a task running"))?;
    Ok(changed == 1)
}

fn sum(requests: impl IntoIterator<Item = Resources>) -> Resources {
    requests.into_iter().fold(Resources::default(), |s, r| {
        Resources::new(
            s.cpu + r.cpu,
            s.memory + r.memory,
            s.storage + r.storage,
            s.gpu + r.gpu,
        )
    })
}

/// Moves one task straight from claimable `queued` (at `attempts`, unclaimed or with an
/// expired claim) to `running` under `claim`: inside one transaction the claim and the mark
/// are one update.
fn start_sync(
    conn: &Connection,
    task_id: &str,
    attempts: u32,
    claim: &str,
    now: &str,
) -> Result<bool> {
    let changed = conn
        .prepare_cached(
            "UPDATE TASKS SET status = 'running', attempts = ?3, owner = NULL, \
                 lease_expires_at = NULL, status_reason = NULL, updated_at = ?4, placed_by = ?5 \
             WHERE task_id = ?1 AND status = 'queued' AND attempts = ?2 \
               AND (owner IS NULL OR lease_expires_at IS NULL OR lease_expires_at < ?4)",
        )
        .and_then(|mut stmt| {
            stmt.execute(params![
                task_id,
                attempts,
                attempts.saturating_add(1),
                now,
                claim
            ])
        })
        .map_err(sql_err("starting a task"))?;
    Ok(changed == 1)
}

fn savepoint(conn: &Connection, sql: &'static str) -> Result<()> {
    conn.prepare_cached(sql)
        .and_then(|mut stmt| stmt.execute([]))
        .map(drop)
        .map_err(sql_err("delimiting a worker's placements"))
}

/// The round in the caller's transaction. Per worker, inside a savepoint: its claimable tasks
/// move to running and the sum of their requests is reserved at once; when the worker refuses
/// the sum, the savepoint is rolled back and its tasks go one by one, each in a savepoint of
/// its own, until the worker is full. Then one assignment per placed task. A statement that
/// fails fails the round, whose own savepoint is then rolled back whole: all or nothing.
fn place_round_sync(conn: &Connection, plan: &RoundPlan) -> Result<RoundOutcome> {
    let mut outcome = RoundOutcome::default();
    let now = date_text(&plan.now);
    let mut by_worker: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, p) in plan.placements.iter().enumerate() {
        by_worker.entry(p.worker_id.as_str()).or_default().push(i);
    }
    let mut won = Vec::with_capacity(plan.placements.len());
    for (worker_id, indices) in by_worker {
        savepoint(conn, "SAVEPOINT worker")?;
        let mut started = Vec::with_capacity(indices.len());
        for i in indices {
            let task = &plan.placements[i].task;
            if start_sync(conn, &task.task_id, task.attempts, &plan.claim, &now)? {
                started.push(i);
            } else {
                outcome.lost.push(task.task_id.clone());
            }
        }
        let total = sum(started.iter().map(|&i| plan.placements[i].task.request()));
        let grouped = started.is_empty()
            || match reserve_sync(conn, worker_id, &total) {
                Ok(applied) => applied,
                Err(StoreError::NotFound { .. }) => false,
                Err(error) => return Err(error),
            };
        if grouped {
            savepoint(conn, "RELEASE worker")?;
            won.extend(started);
            continue;
        }
        savepoint(conn, "ROLLBACK TO worker")?;
        savepoint(conn, "RELEASE worker")?;
        for i in started {
            let task = &plan.placements[i].task;
            savepoint(conn, "SAVEPOINT task")?;
            let placed = start_sync(conn, &task.task_id, task.attempts, &plan.claim, &now)?
                && match reserve_sync(conn, worker_id, &task.request()) {
                    Ok(applied) => applied,
                    Err(StoreError::NotFound { .. }) => false,
                    Err(error) => return Err(error),
                };
            if placed {
                savepoint(conn, "RELEASE task")?;
                won.push(i);
            } else {
                savepoint(conn, "ROLLBACK TO task")?;
                savepoint(conn, "RELEASE task")?;
                outcome.lost.push(task.task_id.clone());
            }
        }
    }
    won.sort_unstable();
    for i in won {
        let p = &plan.placements[i];
        let assignment = Assignment::for_next_attempt(&p.task, &p.worker_id, &plan.claim, plan.now);
        insert_assignment_sync(conn, &assignment)?;
        outcome.placed.push((
            running_copy(&p.task, assignment.attempt, &plan.claim, plan.now),
            assignment,
        ));
    }
    Ok(outcome)
}

impl SqliteStore {
    pub(super) async fn place_round_impl(&self, plan: &RoundPlan) -> Result<RoundOutcome> {
        if plan.placements.is_empty() {
            return Ok(RoundOutcome::default());
        }
        let plan = plan.clone();
        self.call("placing a round", move |conn| place_round_sync(conn, &plan))
            .await
    }
}

#[async_trait::async_trait]
impl PlacementSteps for SqliteStore {
    async fn claim_tasks(
        &self,
        tasks: &[(String, u32)],
        owner: &str,
        lease_until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<BTreeSet<String>> {
        let (tasks, owner) = (tasks.to_vec(), owner.to_string());
        let (lease_until, now) = (date_text(&lease_until), date_text(&now));
        self.call("claiming a round's tasks", move |conn| {
            let mut claimed = BTreeSet::new();
            for (task_id, attempts) in tasks {
                if claim_sync(conn, &task_id, attempts, &owner, &lease_until, &now)? {
                    claimed.insert(task_id);
                }
            }
            Ok(claimed)
        })
        .await
    }

    async fn insert_assignments(&self, assignments: &[Assignment]) -> Result<()> {
        let assignments = assignments.to_vec();
        self.call("inserting a round's assignments", move |conn| {
            assignments
                .iter()
                .try_for_each(|a| insert_assignment_sync(conn, a))
        })
        .await
    }

    async fn mark_claimed_running(
        &self,
        owner: &str,
        assignments: &[Assignment],
        at: DateTime<Utc>,
    ) -> Result<BTreeSet<String>> {
        let (assignments, owner, at) = (assignments.to_vec(), owner.to_string(), date_text(&at));
        self.call("marking a round's tasks running", move |conn| {
            let mut moved = BTreeSet::new();
            for a in assignments {
                if mark_sync(conn, &a, &owner, &at)? {
                    moved.insert(a.task_id);
                }
            }
            Ok(moved)
        })
        .await
    }
}
