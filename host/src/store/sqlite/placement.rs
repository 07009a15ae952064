//! A placement round on SQLite: the whole round in ONE transaction (the writer thread's call),
//! so it has no crash point at all: either every write of the round is kept or none is. The
//! batched steps of [`PlacementSteps`] are here too, each one transaction, for the tests that
//! leave a store as a crash between two steps of [`place_in_steps`] would.
//!
//! [`place_in_steps`]: crate::store::placement::place_in_steps

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use rusqlite::{Connection, params};

use super::{SqliteStore, date_text, insert_assignment_sync, reserve_sync, sql_err};
use crate::model::{Assignment, Resources};
use crate::store::placement::{
    PlacementSteps, RoundOutcome, RoundPlan, assignment_for, running_copy,
};
use crate::store::{Result, StoreError};

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

/// The round in the caller's transaction: claim, reserve per worker (the sum, else task by
/// task), insert the assignments, mark running. A statement that fails fails the round, whose
/// savepoint is then rolled back whole.
fn place_round_sync(conn: &Connection, plan: &RoundPlan) -> Result<RoundOutcome> {
    let mut outcome = RoundOutcome::default();
    let now = date_text(&plan.now);
    let lease_until = date_text(&plan.lease_until);
    let mut by_worker: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, p) in plan.placements.iter().enumerate() {
        if claim_sync(
            conn,
            &p.task.task_id,
            p.task.attempts,
            &plan.claim,
            &lease_until,
            &now,
        )? {
            by_worker.entry(p.worker_id.as_str()).or_default().push(i);
        } else {
            outcome.lost.push(p.task.task_id.clone());
        }
    }
    let mut won = Vec::with_capacity(plan.placements.len());
    for (worker_id, indices) in by_worker {
        let total = sum(indices.iter().map(|&i| plan.placements[i].task.request()));
        let grouped = match reserve_sync(conn, worker_id, &total) {
            Ok(applied) => applied,
            Err(StoreError::NotFound { .. }) => false,
            Err(error) => return Err(error),
        };
        if grouped {
            won.extend(indices);
            continue;
        }
        for i in indices {
            let p = &plan.placements[i];
            match reserve_sync(conn, worker_id, &p.task.request()) {
                Ok(true) => won.push(i),
                Ok(false) | Err(StoreError::NotFound { .. }) => {
                    release_claim(conn, &p.task.task_id, &plan.claim)?;
                    outcome.lost.push(p.task.task_id.clone());
                }
                Err(error) => return Err(error),
            }
        }
    }
    won.sort_unstable();
    for i in won {
        let p = &plan.placements[i];
        let assignment = assignment_for(&p.task, &p.worker_id, &plan.claim, plan.now);
        insert_assignment_sync(conn, &assignment)?;
        if !mark_sync(conn, &assignment, &plan.claim, &now)? {
            // Claimed above in this same transaction: nothing can have moved it.
            return Err(StoreError::backend(
                "placing a round",
                format!(
                    "task {} changed inside the round's transaction",
                    p.task.task_id
                ),
            ));
        }
        outcome.placed.push((
            running_copy(&p.task, assignment.attempt, &plan.claim, plan.now),
            assignment,
        ));
    }
    Ok(outcome)
}

/// Gives up a claim taken earlier in the same transaction.
fn release_claim(conn: &Connection, task_id: &str, owner: &str) -> Result<()> {
    conn.prepare_cached(
        "UPDATE TASKS SET owner = NULL, lease_expires_at = NULL \
         WHERE task_id = ?1 AND status = 'queued' AND owner = ?2",
    )
    .and_then(|mut stmt| stmt.execute(params![task_id, owner]))
    .map(drop)
    .map_err(sql_err("giving up a claim"))
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
